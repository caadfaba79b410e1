# Shared by the side-by-side scripts (run.sh, pusher.sh): logging, starting and stopping one server
# at a time, waiting for its port, the ratio table, and the client source addresses of an idle run.
# The sourcing script sets OUT, WORK, CONNECTIONS and the SERVERS array first.
# shellcheck shell=bash

log() { printf '[compare] %s\n' "$*" >&2; }

RUNNING_PID=""
stop_running() {
    if [ -n "$RUNNING_PID" ]; then
        kill "$RUNNING_PID" 2>/dev/null || true
        wait "$RUNNING_PID" 2>/dev/null || true
        RUNNING_PID=""
    fi
}
cleanup() {
    stop_running
    rm -rf "$WORK"
}
trap cleanup EXIT

wait_for_port() {
    local port=$1
    for _ in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    log "nothing listens on port $port after 10 s"
    return 1
}

# Prints a Markdown table of every numeric field the JSON lines share: each server's value, and each
# reference's value divided by notification-service's.
ratio_table() {
    local scenario=$1
    local files=()
    for name in "${SERVERS[@]}"; do
        files+=("$name=$OUT/$scenario-$name.json")
    done
    python3 - "$scenario" "${files[@]}" <<'PY'
import json, sys

scenario, pairs = sys.argv[1], [a.split("=", 1) for a in sys.argv[2:]]
def load(path):
    try:
        with open(path) as f:
            return json.loads(f.read())
    except (OSError, ValueError) as e:
        sys.exit(f"{scenario}: no JSON result in {path} ({e})")
results = [(name, load(path)) for name, path in pairs]
(ours_name, ours), refs = results[0], results[1:]
def number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)
header = ["field"] + [name for name, _ in results] + [f"{name} / {ours_name}" for name, _ in refs]
print(f"\n{scenario}\n")
print("| " + " | ".join(header) + " |")
print("|" + "---|" * len(header))
for key, value in ours.items():
    others = [r.get(key) for _, r in refs]
    if not (number(value) and all(number(o) for o in others)):
        continue
    ratios = [f"{o / value:.2f}" if value else "n/a" for o in others]
    show = lambda v: str(v) if isinstance(v, int) else f"{v:g}"
    cells = [key, show(value)] + [show(o) for o in others] + ratios
    print("| " + " | ".join(cells) + " |")
PY
}

# Client source addresses for an idle run: block `n` is 127.0.(10+n).1, .2, ... one per 20,000
# connections (loadtest's own spread), so consecutive runs never meet each other's TIME-WAIT ports.
source_ips() {
    local block=$1 count=$(((CONNECTIONS + 19999) / 20000)) ips=()
    for i in $(seq 1 "$count"); do
        ips+=("127.0.$((10 + block)).$i")
    done
    local IFS=,
    echo "${ips[*]}"
}


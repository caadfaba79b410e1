#!/usr/bin/env bash
# Side by side: the same loadtest scenarios against notification-service and against refhub, the
# reference hub in loadtest/src/bin/refhub.rs (tokio + tokio-tungstenite, a task and an mpsc queue per
# connection: the typical async design), then a table of the results and their ratios.
#
# refhub runs twice: as written (tungstenite's default 128 KiB read buffer, which tungstenite zeroes,
# so every connection that has read once holds it), and as `refhub-4k` with `--read-buffer-bytes 4096`,
# the one setting that a hub tuned for many idle connections changes first. The second is the fairer
# baseline for memory; the first is what the defaults give.
#
#   loadtest/compare/run.sh                      # 10,000 idle connections, fan-out if available
#   CONNECTIONS=19000 HOLD_S=30 loadtest/compare/run.sh
#
# Each server runs alone, freshly started, on a private loopback port, one scenario at a time, so
# they never share the cores during a measurement. Each idle run binds its client sockets to source
# addresses of its own (127.0.11.x, 127.0.12.x, ...): the previous run's closed connections hold their
# ports in TIME-WAIT for 60 s. The result lines are kept under
# target/compare/<time>/ (idle-<server>.json, fanout-<server>.json, table.md).
#
# Scenarios:
# - idle: `loadtest idle`, N connections each as its own user, server RSS per connection and CPU
#   while idle (both servers ping every 30 s).
# - fanout: `loadtest fanout --via ws` (client publishes to a channel with many subscribers), when the
#   loadtest binary has that scenario; otherwise skipped with a note.
# - sockudo: compared on the Pusher protocol it speaks, by loadtest/compare/pusher.sh.
#
# Environment (all optional):
#   CONNECTIONS (10000)  HOLD_S (10)                      idle scenario
#   SUBSCRIBERS (1000)  MESSAGES (2000)  RATE (100)      fanout scenario
#   SERVER_PORT (18701)  REFHUB_PORT (18702)             private ports
#   SKIP_BUILD=1                                          use the release binaries already built
#   LOADTEST (target/release/loadtest)                    the load generator, e.g. one built from
#                                                         another branch
#   SCENARIOS ("idle fanout")                             which scenarios to run
set -euo pipefail
cd "$(dirname "$0")/../.."

CONNECTIONS=${CONNECTIONS:-10000}
HOLD_S=${HOLD_S:-10}
SUBSCRIBERS=${SUBSCRIBERS:-1000}
MESSAGES=${MESSAGES:-2000}
RATE=${RATE:-100}
SERVER_PORT=${SERVER_PORT:-18701}
REFHUB_PORT=${REFHUB_PORT:-18702}
BIN=target/release
LOADTEST=${LOADTEST:-$BIN/loadtest}
SCENARIOS=${SCENARIOS:-idle fanout}
OUT=target/compare/$(date -u +%Y%m%dT%H%M%SZ)
WORK=$(mktemp -d /tmp/compare.XXXXXX)

# shellcheck source=loadtest/compare/common.sh
source loadtest/compare/common.sh

# Starts one of the two servers, fresh, and records its pid in RUNNING_PID.
start() {
    local name=$1
    case $name in
    notification-service)
        rm -f "$WORK"/n.db*
        PORT=$SERVER_PORT HOST=127.0.0.1 RUST_LOG=warn DATABASE_URL="sqlite://$WORK/n.db" \
            "$BIN/notification-service" >>"$OUT/$name.log" 2>&1 &
        RUNNING_PID=$!
        wait_for_port "$SERVER_PORT"
        ;;
    refhub)
        "$BIN/refhub" --port "$REFHUB_PORT" >>"$OUT/$name.log" 2>&1 &
        RUNNING_PID=$!
        wait_for_port "$REFHUB_PORT"
        ;;
    refhub-4k)
        "$BIN/refhub" --port "$REFHUB_PORT" --read-buffer-bytes 4096 >>"$OUT/$name.log" 2>&1 &
        RUNNING_PID=$!
        wait_for_port "$REFHUB_PORT"
        ;;
    esac
    # Let start-up finish (store threads, first allocations) before the "before" RSS reading.
    sleep 1
}

port_of() {
    case $1 in
    notification-service) echo "$SERVER_PORT" ;;
    refhub | refhub-4k) echo "$REFHUB_PORT" ;;
    esac
}

# Runs a scenario against a freshly started server; its last output line (the JSON result) goes to
# $OUT/<scenario>-<server>.json. Extra arguments are the scenario's flags; @PID@ in them becomes the
# server's pid (so the figures are of that process, whatever else listens nearby).
measure() {
    local scenario=$1 name=$2
    shift 2
    local port
    port=$(port_of "$name")
    start "$name"
    log "$scenario against $name (pid $RUNNING_PID, port $port)"
    local args=("${@//@PID@/$RUNNING_PID}")
    local status=0
    "$LOADTEST" "$scenario" --url "ws://127.0.0.1:$port/ws" "${args[@]}" >"$OUT/$scenario-$name.out" || status=$?
    stop_running
    tail -n 1 "$OUT/$scenario-$name.out" >"$OUT/$scenario-$name.json"
    if [ "$status" -ne 0 ]; then
        log "$scenario against $name exited with status $status (see $OUT/$scenario-$name.out)"
    fi
}

mkdir -p "$OUT"
if [ -z "${SKIP_BUILD:-}" ]; then
    log "building release binaries"
    cargo build --release -p notification-service -p loadtest
fi

{
    echo "# notification-service vs refhub, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD)"
    echo
    echo "Ratios are reference / notification-service: above 1 means the reference uses more (or, for a rate, does more)."
} >"$OUT/table.md"

SERVERS=(notification-service refhub refhub-4k)
wants() { [[ " $SCENARIOS " == *" $1 "* ]]; }

if wants idle; then
    block=0
    for name in "${SERVERS[@]}"; do
        block=$((block + 1))
        measure idle "$name" --connections "$CONNECTIONS" --hold-s "$HOLD_S" --server-pid @PID@ \
            --source-ips "$(source_ips "$block")"
    done
    ratio_table idle >>"$OUT/table.md"
fi

if ! wants fanout; then
    :
elif "$LOADTEST" fanout --help >/dev/null 2>&1; then
    for name in "${SERVERS[@]}"; do
        measure fanout "$name" --subscribers "$SUBSCRIBERS" --messages "$MESSAGES" --rate "$RATE" --via ws --json \
            --server-pid @PID@
    done
    ratio_table fanout >>"$OUT/table.md"
else
    printf '
fanout

not run: this loadtest build has no `fanout` scenario (pass a newer one as LOADTEST=).
' >>"$OUT/table.md"
fi

printf '
sockudo

compared on the Pusher protocol by loadtest/compare/pusher.sh.
' >>"$OUT/table.md"

cat "$OUT/table.md"
log "results in $OUT"

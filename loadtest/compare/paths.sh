#!/usr/bin/env bash
# notification-service's Pusher path against its native path, in one sitting (issue "Laravel and
# Pusher-protocol clients": the Pusher path must cost no more than the native one). The same server
# binary, freshly started per run on its embedded store with PUSHER_APPS, with the same loadtest runs:
# - pusher: pusher-js-style subscribers (`--pusher-app`), events through the signed HTTP API
#   (`fanout --via pusher`): ephemeral, like every Pusher event;
# - native-ws: native WebSocket subscribers, messages published by a WebSocket client
#   (`fanout --via ws`): the native ephemeral path;
# - native-rest: native WebSocket subscribers, durable REST sends (`fanout --via rest`): stored first,
#   so it pays for the store too.
#
#   loadtest/compare/paths.sh
#   ROUNDS=2 SKIP_BUILD=1 loadtest/compare/paths.sh
#
# Scenarios, alternating the paths (A B C A B C with ROUNDS=2):
# - idle: CONNECTIONS connections held HOLD_S (pusher: Pusher connections; native: /ws), RSS per
#   connection (native-rest is skipped: its connections are native-ws's);
# - fanout: SUBSCRIBERS on one channel, MESSAGES at RATE per second (1,000 x 100/s).
#
# Environment (all optional):
#   ROUNDS (1)  CONNECTIONS (10000)  HOLD_S (10)  SUBSCRIBERS (1000)  MESSAGES (3000)  RATE (100)
#   SCENARIOS ("idle fanout")  SERVER_PORT (18711)  SKIP_BUILD=1
set -euo pipefail
cd "$(dirname "$0")/../.."

ROUNDS=${ROUNDS:-1}
CONNECTIONS=${CONNECTIONS:-10000}
HOLD_S=${HOLD_S:-10}
SUBSCRIBERS=${SUBSCRIBERS:-1000}
MESSAGES=${MESSAGES:-3000}
RATE=${RATE:-100}
SCENARIOS=${SCENARIOS:-idle fanout}
SERVER_PORT=${SERVER_PORT:-18711}
BIN=target/release
LOADTEST=$BIN/loadtest
OUT=target/compare/paths-$(date -u +%Y%m%dT%H%M%SZ)
WORK=$(mktemp -d /tmp/compare.XXXXXX)
APP_ID=lt-app APP_KEY=lt-key APP_SECRET=lt-secret
SERVERS=(pusher native-ws native-rest)

# shellcheck source=loadtest/compare/common.sh
source loadtest/compare/common.sh

start() {
    rm -f "$WORK"/n.db*
    PORT=$SERVER_PORT HOST=127.0.0.1 RUST_LOG=warn DATABASE_URL="sqlite://$WORK/n.db" \
        PUSHER_APPS="$APP_ID:$APP_KEY:$APP_SECRET" \
        "$BIN/notification-service" >>"$OUT/server.log" 2>&1 &
    RUNNING_PID=$!
    wait_for_port "$SERVER_PORT"
    sleep 1
}

# Runs `loadtest <scenario>` for path `name` against a fresh server; the JSON line goes to
# $OUT/<label>-<name>.json (the last round's is the one the table shows; every round's .out is kept).
measure() {
    local label=$1 scenario=$2 name=$3 round=$4
    shift 4
    local protocol=()
    [ "$name" = pusher ] && protocol=(--pusher-app "$APP_ID:$APP_KEY:$APP_SECRET")
    start
    log "$label (round $round), $name path (pid $RUNNING_PID)"
    local status=0
    "$LOADTEST" "$scenario" --url "ws://127.0.0.1:$SERVER_PORT/ws" "${protocol[@]}" \
        --server-pid "$RUNNING_PID" "$@" >"$OUT/$label-$name-$round.out" || status=$?
    stop_running
    tail -n 1 "$OUT/$label-$name-$round.out" >"$OUT/$label-$name.json"
    [ "$status" -eq 0 ] || log "$label, $name path, exited with status $status (see $OUT/$label-$name-$round.out)"
}

mkdir -p "$OUT"
if [ -z "${SKIP_BUILD:-}" ]; then
    log "building release binaries"
    cargo build --release -p notification-service -p loadtest
fi
{
    echo "# notification-service: the Pusher path against the native paths, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD)"
    echo
    echo "Ratios are native / pusher: above 1 means the native path uses more (or, for a rate, does more)."
} >"$OUT/table.md"
wants() { [[ " $SCENARIOS " == *" $1 "* ]]; }

block=0
for round in $(seq 1 "$ROUNDS"); do
    for name in "${SERVERS[@]}"; do
        if wants idle && [ "$name" != native-rest ]; then
            block=$((block + 1))
            measure idle idle "$name" "$round" --connections "$CONNECTIONS" --hold-s "$HOLD_S" \
                --source-ips "$(source_ips "$block")"
        fi
        if wants fanout; then
            measure fanout fanout "$name" "$round" --via "${name#native-}" --subscribers "$SUBSCRIBERS" \
                --messages "$MESSAGES" --rate "$RATE" --json
        fi
    done
done
if wants fanout; then ratio_table fanout >>"$OUT/table.md"; fi
# The idle scenario has no native-rest run.
SERVERS=(pusher native-ws)
if wants idle; then ratio_table idle >>"$OUT/table.md"; fi
cat "$OUT/table.md"
log "results in $OUT"

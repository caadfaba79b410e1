#!/usr/bin/env bash
# Side by side on the Pusher Channels protocol: notification-service's Pusher endpoint (`/app/KEY`,
# `POST /apps/ID/events`) against sockudo, the Rust Pusher-protocol server, with the same loadtest runs:
# pusher-js-style subscribers (`--pusher-app`) and events triggered through the signed HTTP API
# (`fanout --via pusher`). Both servers are ephemeral here: Pusher events are not stored.
#
#   apt-get install protobuf-compiler     # sockudo's build needs protoc
#   cargo install sockudo --version 5.2.0 --locked --no-default-features --features local,v2
#   loadtest/compare/pusher.sh
#   ROUNDS=2 CONNECTIONS=18000 loadtest/compare/pusher.sh
#
# Scenarios, each server alone and freshly started, alternating servers (A B A B with ROUNDS=2):
# - idle: CONNECTIONS Pusher connections (no subscription), RSS per connection after HOLD_S;
# - fanout: SUBSCRIBERS on one public channel, MESSAGES events at RATE per second (1,000 x 100/s);
# - saturated: the same subscribers, SAT_MESSAGES events asked at SAT_RATE per second.
# sockudo runs with its rate limiter off, the local adapter, its default app from the environment and
# client connection limits raised; notification-service on its embedded store with PUSHER_APPS.
#
# Environment (all optional):
#   ROUNDS (1)  CONNECTIONS (10000)  HOLD_S (10)  SUBSCRIBERS (1000)  MESSAGES (3000)  RATE (100)
#   SAT_MESSAGES (20000)  SAT_RATE (2000)  SCENARIOS ("idle fanout saturated")
#   SERVER_PORT (18701)  SOCKUDO_PORT (18703)  SOCKUDO (sockudo on PATH)  SKIP_BUILD=1
set -euo pipefail
cd "$(dirname "$0")/../.."

ROUNDS=${ROUNDS:-1}
CONNECTIONS=${CONNECTIONS:-10000}
HOLD_S=${HOLD_S:-10}
SUBSCRIBERS=${SUBSCRIBERS:-1000}
MESSAGES=${MESSAGES:-3000}
RATE=${RATE:-100}
SAT_MESSAGES=${SAT_MESSAGES:-20000}
SAT_RATE=${SAT_RATE:-2000}
SCENARIOS=${SCENARIOS:-idle fanout saturated}
SERVER_PORT=${SERVER_PORT:-18701}
SOCKUDO_PORT=${SOCKUDO_PORT:-18703}
SOCKUDO=${SOCKUDO:-$(command -v sockudo || echo "$HOME/.cargo/bin/sockudo")}
BIN=target/release
LOADTEST=$BIN/loadtest
OUT=target/compare/pusher-$(date -u +%Y%m%dT%H%M%SZ)
WORK=$(mktemp -d /tmp/compare.XXXXXX)
APP_ID=lt-app APP_KEY=lt-key APP_SECRET=lt-secret
SERVERS=(notification-service sockudo)

# shellcheck source=loadtest/compare/common.sh
source loadtest/compare/common.sh

[ -x "$SOCKUDO" ] || {
    log "sockudo not found; install it with: cargo install sockudo --version 5.2.0 --locked --no-default-features --features local,v2"
    exit 1
}

start() {
    case $1 in
    notification-service)
        rm -f "$WORK"/n.db*
        PORT=$SERVER_PORT HOST=127.0.0.1 RUST_LOG=warn DATABASE_URL="sqlite://$WORK/n.db" \
            PUSHER_APPS="$APP_ID:$APP_KEY:$APP_SECRET" \
            "$BIN/notification-service" >>"$OUT/$1.log" 2>&1 &
        RUNNING_PID=$!
        wait_for_port "$SERVER_PORT"
        ;;
    sockudo)
        (cd "$WORK" && HOST=127.0.0.1 PORT=$SOCKUDO_PORT DEBUG=false RATE_LIMITER_ENABLED=false \
            ADAPTER_DRIVER=local CACHE_DRIVER=memory QUEUE_DRIVER=memory APP_MANAGER_DRIVER=memory \
            METRICS_ENABLED=false SOCKUDO_DEFAULT_APP_ID=$APP_ID SOCKUDO_DEFAULT_APP_KEY=$APP_KEY \
            SOCKUDO_DEFAULT_APP_SECRET=$APP_SECRET SOCKUDO_DEFAULT_APP_MAX_CONNECTIONS=1000000 \
            exec "$SOCKUDO") >>"$OUT/$1.log" 2>&1 &
        RUNNING_PID=$!
        wait_for_port "$SOCKUDO_PORT"
        ;;
    esac
    sleep 1
}

port_of() {
    case $1 in
    notification-service) echo "$SERVER_PORT" ;;
    sockudo) echo "$SOCKUDO_PORT" ;;
    esac
}

# Runs `loadtest <scenario>` against a fresh server; the JSON line goes to
# $OUT/<label>-<server>.json (the last round's is the one the table shows; every round's .out is kept).
measure() {
    local label=$1 scenario=$2 name=$3 round=$4
    shift 4
    local port
    port=$(port_of "$name")
    start "$name"
    log "$label (round $round) against $name (pid $RUNNING_PID, port $port)"
    local status=0
    "$LOADTEST" "$scenario" --url "ws://127.0.0.1:$port/ws" --pusher-app "$APP_ID:$APP_KEY:$APP_SECRET" \
        --server-pid "$RUNNING_PID" "$@" >"$OUT/$label-$name-$round.out" || status=$?
    stop_running
    tail -n 1 "$OUT/$label-$name-$round.out" >"$OUT/$label-$name.json"
    [ "$status" -eq 0 ] || log "$label against $name exited with status $status (see $OUT/$label-$name-$round.out)"
}

mkdir -p "$OUT"
if [ -z "${SKIP_BUILD:-}" ]; then
    log "building release binaries"
    cargo build --release -p notification-service -p loadtest
fi
{
    echo "# notification-service vs sockudo on the Pusher protocol, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD), sockudo $("$SOCKUDO" --version 2>/dev/null | head -n 1)"
    echo
    echo "Ratios are sockudo / notification-service: above 1 means sockudo uses more (or, for a rate, does more)."
} >"$OUT/table.md"
wants() { [[ " $SCENARIOS " == *" $1 "* ]]; }

block=0
for round in $(seq 1 "$ROUNDS"); do
    for name in "${SERVERS[@]}"; do
        if wants idle; then
            block=$((block + 1))
            measure idle idle "$name" "$round" --connections "$CONNECTIONS" --hold-s "$HOLD_S" \
                --source-ips "$(source_ips "$block")"
        fi
        if wants fanout; then
            measure fanout fanout "$name" "$round" --via pusher --subscribers "$SUBSCRIBERS" \
                --messages "$MESSAGES" --rate "$RATE" --json
        fi
        if wants saturated; then
            measure saturated fanout "$name" "$round" --via pusher --subscribers "$SUBSCRIBERS" \
                --messages "$SAT_MESSAGES" --rate "$SAT_RATE" --json
        fi
    done
done
for label in idle fanout saturated; do
    if wants "$label"; then ratio_table "$label" >>"$OUT/table.md"; fi
done
cat "$OUT/table.md"
log "results in $OUT"

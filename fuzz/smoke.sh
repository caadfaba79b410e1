#!/usr/bin/env bash
# CI fuzz smoke run: build the three cargo-fuzz targets and run each for a few seconds over the committed
# corpus (fuzz/corpus/<target>), so a parser change that panics on a known input, or breaks the fuzz
# build, fails CI. The long runs are described in docs/security.md ("Fuzzing").
#
# Stable toolchain: --sanitizer none (AddressSanitizer would need nightly). --dev: an unoptimized build
# compiles in a fraction of the release build's time, which matters more for a 10-second run than
# executions per second. New inputs go to a temporary directory, so the committed corpus is never changed.
#
# Settings: FUZZ_SECONDS (per target, default 10), FUZZ_TARGET_DIR (cargo target directory). The default
# target directory is outside the clone, in ~/.cache, like cargo-fuzz itself in ~/.cargo/bin: a clean
# clone then rebuilds only this crate and the targets (about a minute), not every dependency with
# coverage instrumentation (about 7 CPU-minutes).
set -euo pipefail
cd "$(dirname "$0")"

seconds="${FUZZ_SECONDS:-10}"
target_dir="${FUZZ_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/notification-service/fuzz-target}"
targets=(http_request ws_frame ws_protocol)

log() { printf '[fuzz] %s\n' "$*"; }

if ! cargo fuzz --version >/dev/null 2>&1; then
    log "installing cargo-fuzz (cached in ~/.cargo/bin afterwards)"
    cargo install cargo-fuzz --locked
fi

build=(--sanitizer none --dev --target-dir "$target_dir")
log "building ${targets[*]}"
cargo fuzz build "${build[@]}"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for t in "${targets[@]}"; do
    log "$t: ${seconds}s over corpus/$t"
    mkdir -p "$work/$t"
    # One process (the machine is shared). A crash, timeout or out-of-memory exits non-zero and leaves
    # the input in fuzz/artifacts/$t/.
    if cargo fuzz run "${build[@]}" "$t" "$work/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$work/$t.log" 2>&1; then
        grep -E '^(#[0-9]+ +DONE|stat::number_of_executed_units)' "$work/$t.log" || true
    else
        tail -n 60 "$work/$t.log"
        log "$t FAILED: the input is in fuzz/artifacts/$t/"
        exit 1
    fi
done
log "all targets ran clean"

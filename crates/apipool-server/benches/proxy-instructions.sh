#!/usr/bin/env bash
# Instructions per proxied request: apipool's transparent route and the bare hyper reference
# proxy (benches/reference-proxy), each run under valgrind's callgrind while wrk sends requests
# through it (8 keep-alive connections). Unlike requests/s or CPU time, an instruction count does
# not depend on what else the machine (or its neighbours on the host) is doing: the same binary
# gives the same count within ~1 %, so a change to the proxy path can be measured on a noisy VM.
# It counts every thread of the process (apipool's stats writer and SQLite included), user space
# only: system calls and the kernel's TCP work are not in it.
#
# Run with: crates/apipool-server/benches/proxy-instructions.sh [seconds, default 6]
# Needs: valgrind, wrk, curl, jq. SKIP_BUILD=1 uses the release binaries as they are.
# Prints one line per proxy: requests, instructions, instructions per request; and, with
# KEEP=DIR, leaves the callgrind profiles in DIR (callgrind_annotate DIR/apipool.out.1).
set -euo pipefail
DUR=${1:-6}
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$ROOT"
if [[ -z "${SKIP_BUILD:-}" ]]; then
  cargo build --release --workspace --bins >&2
fi
CARGO_TARGET_DIR="$ROOT/target/reference-proxy" cargo build --release --offline --quiet \
  --manifest-path "$ROOT/crates/apipool-server/benches/reference-proxy/Cargo.toml" >&2
# shellcheck source=bench-env.sh
source "$ROOT/crates/apipool-server/benches/bench-env.sh"
OUT=${KEEP:-$TMP}
mkdir -p "$OUT"

# Counts instructions of PID while wrk runs against URL (after a 2 s warm-up); NAME for the line.
count() { # name pid url header
  local out total ir
  wrk -t1 -c8 -d2s -H "$4" "$3" >/dev/null
  callgrind_control -z "$2" >/dev/null
  out=$(wrk -t1 -c8 -d"${DUR}s" -H "$4" "$3")
  callgrind_control -d "$2" >/dev/null
  sleep 1
  total=$(awk '/requests in/ {print $1}' <<<"$out")
  ir=$(callgrind_annotate "$OUT/$1.out.1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}')
  echo "$1 requests=$total instructions=$ir instructions_per_request=$((ir / total)) $(awk '/Non-2xx|Socket errors/' <<<"$out" | tr '\n' ' ')"
}

KEYS=$(seq -s, -f 'load-key-%02g' 0 9)
start_mock --keys "$KEYS"
start_server
IDS=()
for i in $(seq 0 9); do
  api /keys "{\"identifier\":\"k$i\",\"raw_key\":\"$(printf 'load-key-%02d' "$i")\"}"
  IDS+=("\"k$i\"")
done
MEMBERS=$(IFS=,; echo "${IDS[*]}")
api /pools "{\"identifier\":\"load\",\"name\":\"load\",\"rotation_strategy\":\"round_robin\",\"key_identifiers\":[$MEMBERS],\"upstream\":{\"base_url\":\"$MOCK\",\"auth\":\"bearer\"}}"
# The same server again, under callgrind (its start-up, the password hashing included, is left
# out of the count), with one serving thread.
kill "$SPID"
wait "$SPID" 2>/dev/null || true
RUST_LOG="${BENCH_LOG:-warn}" APIPOOL_WORKERS="${APIPOOL_WORKERS:-1}" valgrind --tool=callgrind --callgrind-out-file="$OUT/apipool.out" \
  "$BIN/apipool" serve --bind "${SERVER#http://}" --data-dir "$TMP/data" >"$TMP/server.out" 2>&1 &
SPID=$!
PIDS+=("$SPID")
for _ in $(seq 600); do curl -fs "$SERVER/health" >/dev/null && break; sleep 0.1; done

echo "# $(date -u +%FT%TZ) callgrind, wrk -t1 -c8, ${DUR}s per proxy"
count apipool "$SPID" "$SERVER/api/v1/proxy/load/http/price?id=bitcoin" "authorization: Bearer $TOKEN"
kill "$SPID"

REF_THREADS=1 valgrind --tool=callgrind --callgrind-out-file="$OUT/bare-hyper.out" \
  "$ROOT/target/reference-proxy/release/reference-proxy" "${MOCK#http://}" 127.0.0.1:0 load-key-00 \
  >"$TMP/ref.out" 2>/dev/null &
RPID=$!
PIDS+=("$RPID")
for _ in $(seq 600); do grep -q listening "$TMP/ref.out" 2>/dev/null && break; sleep 0.1; done
count bare-hyper "$RPID" "$(sed -n 's/^listening on //p' "$TMP/ref.out")/price?id=bitcoin" "x-bench: 1"

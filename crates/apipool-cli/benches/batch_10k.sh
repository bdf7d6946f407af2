#!/usr/bin/env bash
# Measures `apipool batch run` end to end: N items (default 10,000) through a pool of KEYS keys
# (default 10) that mock-upstream limits to RATE requests per second each (default 20), via the
# server's transparent proxy, with the pool paced by the engine (rate_limit RATE / interval 1 s).
# Prints elapsed, utilisation = (N / (KEYS*RATE)) / elapsed, the upstream's 200/429 counts, and
# the ETA the plain progress output showed at ~50% against the time that was actually left.
#
# Run with (release binaries):
#   cargo build --release --workspace --bins && crates/apipool-cli/benches/batch_10k.sh
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
N=${N:-10000}
KEYS=${KEYS:-10}
RATE=${RATE:-20}
# shellcheck source=../../apipool-server/benches/bench-env.sh
source "$ROOT/crates/apipool-server/benches/bench-env.sh"
work=$TMP
PW=bench-admin-password

keys=()
for i in $(seq 1 "$KEYS"); do keys+=("bench-key-$(printf %02d "$i")-0123456789"); done
start_mock --keys "$(IFS=,; echo "${keys[*]}")" --rate "$RATE" --interval 1
mock=$MOCK
start_server
server=$SERVER

export APIPOOL_CONFIG_DIR="$work/cfg"
cli="$BIN/apipool"
APIPOOL_PASSWORD=$PW "$cli" login --server "$server" --username admin >/dev/null
members=()
for i in $(seq 1 "$KEYS"); do
    printf '%s' "${keys[$((i - 1))]}" | "$cli" key add "k$i" --key-stdin >/dev/null
    members+=(--key "k$i")
done
"$cli" pool create bench "${members[@]}" --upstream-url "$mock" --rate-limit "$RATE" --rate-interval 1 >/dev/null

for i in $(seq 0 $((N - 1))); do
    printf '{"id": "item-%d", "method": "GET", "path": "/price", "query": {"id": "item-%d"}}\n' "$i" "$i"
done >"$work/items.jsonl"

set +e
"$cli" batch run --pool bench --input "$work/items.jsonl" --output "$work/results.jsonl" \
    --progress-interval 1 --json >"$work/summary.json" 2>"$work/progress.log"
rc=$?
set -e
curl -fsS "$mock/__stats" >"$work/stats.json"

python3 - "$work" "$N" "$KEYS" "$RATE" "$rc" <<'PY'
import json, re, sys
work, n, keys, rate, rc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
summary = json.load(open(f"{work}/summary.json"))
stats = json.load(open(f"{work}/stats.json"))
elapsed = summary["elapsed_s"]
ideal = n / (keys * rate)
lines = open(f"{work}/results.jsonl").read().splitlines()
ok = sum(1 for l in lines if json.loads(l)["ok"])
print(f"exit code {rc}; {len(lines)} results, {ok} ok; concurrency {summary['concurrency']}")
print(f"elapsed {elapsed:.2f} s; physical limit {ideal:.1f} s; utilisation {ideal / elapsed:.3f}")
print(f"upstream: 200={stats['by_status'].get('200', 0)} 429={stats['by_status'].get('429', 0)} total={stats['total_requests']}")
pat = re.compile(r"\[batch\] (\d+)/(\d+) done, (\d+) failed, ([\d.]+)/s, ETA ([\d.]+)s, elapsed ([\d.]+)s")
prog = [tuple(float(x) for x in m.groups()) for m in map(pat.search, open(f"{work}/progress.log")) if m]
half = next((p for p in prog if p[0] >= n / 2), None)
if half:
    done, _, _, r, eta, at = half
    actual = elapsed - at
    print(f"at {int(done)}/{n} ({at:.1f} s): rate {r:.1f}/s, ETA shown {eta:.1f} s, actual remaining {actual:.1f} s, error {100 * (eta - actual) / actual:+.1f}%")
for p in prog[:: max(1, len(prog) // 8)]:
    print(f"  progress {int(p[0])}/{int(p[1])} rate {p[3]:.1f}/s ETA {p[4]:.1f}s at {p[5]:.1f}s")
PY

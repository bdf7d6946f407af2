#!/usr/bin/env bash
# Quota through the proxy (issue 5): mock-upstream with 10 keys × 20 requests/s (an exact sliding
# window per key; 429 + Retry-After beyond it), a pool of those 10 keys on a release `apipool
# serve`, and 2,000 requests from 50 concurrent clients on the transparent route. Prints, per mode,
# the answers by status, the elapsed time, utilisation = (N / (keys × rate)) / elapsed, and the
# 429s the upstream served.
#
# Run with: crates/apipool-server/benches/proxy-quota.sh [requests, default 2000] [clients, default 50]
# Needs: curl, jq, python3 (the clients: one keep-alive connection per thread).
# Modes: "configured" (pool_config rate_limit 20 / interval 1: the engine paces, no 429 expected)
# and "learned" (no limits configured: the engine learns them from the upstream's 429s).
# SKIP_BUILD=1 uses the release binaries as they are.
set -euo pipefail
N=${1:-2000}
CLIENTS=${2:-50}
KEYS=10
RATE=20
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$ROOT"
[[ -n "${SKIP_BUILD:-}" ]] || cargo build --release --workspace --bins >&2
# shellcheck source=bench-env.sh
source "$ROOT/crates/apipool-server/benches/bench-env.sh"

RAW=$(seq -s, -f 'quota-key-%02g' 0 $((KEYS - 1)))
start_mock --keys "$RAW" --rate "$RATE" --interval 1
start_server
IDS=()
for i in $(seq 0 $((KEYS - 1))); do
  api /keys "{\"identifier\":\"q$i\",\"raw_key\":\"$(printf 'quota-key-%02d' "$i")\"}"
  IDS+=("\"q$i\"")
done
MEMBERS=$(IFS=,; echo "${IDS[*]}")
api /pools "{\"identifier\":\"configured\",\"name\":\"configured\",\"key_identifiers\":[$MEMBERS],\"upstream\":{\"base_url\":\"$MOCK\",\"auth\":\"bearer\"},\"pool_config\":{\"rate_limit\":$RATE,\"rate_limit_interval\":1,\"timeout\":60}}"
api /pools "{\"identifier\":\"learned\",\"name\":\"learned\",\"key_identifiers\":[$MEMBERS],\"upstream\":{\"base_url\":\"$MOCK\",\"auth\":\"bearer\"},\"pool_config\":{\"timeout\":60}}"

echo "# $(date -u +%FT%TZ) $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), $KEYS keys x $RATE/s, N=$N, $CLIENTS clients"
for mode in configured learned; do
  # A fresh upstream window and counters for each mode.
  curl -fs -X POST "$MOCK/__reset" >/dev/null
  sleep 1.1
  python3 - "$SERVER" "$mode" "$TOKEN" "$N" "$CLIENTS" "$KEYS" "$RATE" <<'PY'
import collections, http.client, json, sys, threading, time, urllib.parse
server, pool, token, n, clients, keys, rate = sys.argv[1:8]
n, clients, keys, rate = int(n), int(clients), int(keys), int(rate)
u = urllib.parse.urlsplit(server)
lock = threading.Lock()
todo = iter(range(n))
statuses = collections.Counter()
def worker():
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    while True:
        with lock:
            i = next(todo, None)
        if i is None:
            return
        conn.request("GET", f"/api/v1/proxy/{pool}/http/price?id=item-{i}",
                     headers={"Authorization": f"Bearer {token}"})
        r = conn.getresponse()
        r.read()
        with lock:
            statuses[r.status] += 1
start = time.monotonic()
threads = [threading.Thread(target=worker) for _ in range(clients)]
for t in threads: t.start()
for t in threads: t.join()
elapsed = time.monotonic() - start
ideal = n / (keys * rate)
print(json.dumps({"mode": pool, "answers": dict(statuses), "elapsed_s": round(elapsed, 3),
                  "utilisation": round(ideal / elapsed, 3)}))
PY
  echo "upstream ($mode): $(curl -fs "$MOCK/__stats" | jq -c '{total_requests, by_status}')"
done

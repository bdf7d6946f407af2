#!/usr/bin/env bash
# Proxy under load (loopback): wrk against mock-upstream directly and through apipool's
# transparent route, at several connection counts, then the server's RSS with 1,000 open
# connections. Release binaries; everything on 127.0.0.1.
#
# Run with: crates/apipool-server/benches/proxy-load.sh [seconds per run, default 10]
# Needs: wrk (apt-get install -y wrk), curl, jq. SKIP_BUILD=1 uses the release binaries as they are.
#
# Prints one line per run: target, connections, requests/s, p50, p99 (wrk's latency
# distribution), then "added" = proxy − direct at the same connection count, the throughput
# ratio, and VmRSS / VmHWM of the server while 1,000 connections are open.
#
# REFERENCE=1 also runs two reference proxies against the same upstream in the same run, to
# tell apipool's own cost from what any proxy costs on the machine: a bare hyper proxy
# (benches/reference-proxy, built offline from the registry cache; fixed key, no selection,
# limits, stats or auth) and nginx (when installed: apt-get install -y nginx-light; one worker,
# upstream keep-alive). Their lines read like the proxy's, with their own CPU per request.
# The processes inherit the environment: APIPOOL_WORKERS=N sets apipool's serving threads
# (`serve --workers`), REF_THREADS=N runs the bare proxy as N current-thread runtimes on one
# SO_REUSEPORT port (default: one multi-thread runtime).
#
# Or:       crates/apipool-server/benches/proxy-load.sh clients N SECONDS [SAMPLE_SECS]
# Needs: curl, jq (no wrk).
#
# N concurrent clients for SECONDS through the transparent route with the Rust load generator
# (crates/apipool-server/examples/proxy_load), e.g. `clients 1000 60` (the load run) or
# `clients 200 600` (the 10-minute soak). Prints the server's VmRSS every SAMPLE_SECS (default
# 10) as JSON lines, then a JSON report: answers by status, errors (non-2xx + no answer +
# timeouts: the upstream has no limit, so each is ours), rps, p50/p99/max latency, RSS
# first/last/max; then the upstream's own counts. Exits 1 when any request failed.
set -euo pipefail
ulimit -n 65536 2>/dev/null || ulimit -n 8192 2>/dev/null || true

MODE=wrk
if [[ "${1:-}" == clients ]]; then
  MODE=clients
  CLIENTS=${2:-1000}
  DUR=${3:-60}
  SAMPLE=${4:-10}
else
  DUR=${1:-10}
fi
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$ROOT"
if [[ -n "${SKIP_BUILD:-}" ]]; then
  :
elif [[ $MODE == clients ]]; then
  cargo build --release --workspace --bins --example proxy_load >&2
else
  cargo build --release --workspace --bins >&2
fi
# shellcheck source=bench-env.sh
source "$ROOT/crates/apipool-server/benches/bench-env.sh"

KEYS=$(seq -s, -f 'load-key-%02g' 0 9)
start_mock --keys "$KEYS"
start_server
IDS=()
for i in $(seq 0 9); do
  k=$(printf 'load-key-%02d' "$i")
  api /keys "{\"identifier\":\"k$i\",\"raw_key\":\"$k\"}"
  IDS+=("\"k$i\"")
done
MEMBERS=$(IFS=,; echo "${IDS[*]}")
api /pools "{\"identifier\":\"load\",\"name\":\"load\",\"rotation_strategy\":\"round_robin\",\"key_identifiers\":[$MEMBERS],\"upstream\":{\"base_url\":\"$MOCK\",\"auth\":\"bearer\"}}"

DIRECT_URL="$MOCK/price?id=bitcoin"
PROXY_URL="$SERVER/api/v1/proxy/load/http/price?id=bitcoin"
# Warm the pool's engine and the connection pools.
curl -fs -o /dev/null -H "authorization: Bearer $TOKEN" "$PROXY_URL"

if [[ $MODE == clients ]]; then
  echo "# $(date -u +%FT%TZ) $(nproc) cores, $CLIENTS clients, ${DUR}s, server RSS every ${SAMPLE}s"
  rc=0
  "$BIN/examples/proxy_load" --url "$PROXY_URL" --token "$TOKEN" --clients "$CLIENTS" \
    --seconds "$DUR" --server-pid "$SPID" --sample-secs "$SAMPLE" || rc=$?
  echo "upstream: $(curl -fs "$MOCK/__stats" | jq -c '{total_requests, by_status, faults}')"
  exit "$rc"
fi

# wrk's latency distribution → milliseconds.
to_ms() {
  awk -v v="$1" 'BEGIN {
    n = v + 0; u = v; sub(/^[0-9.]+/, "", u);
    if (u == "us") n /= 1000; else if (u == "s") n *= 1000; else if (u == "m") n *= 60000;
    printf "%.3f", n }'
}
# CPU time (user + system) a process has used so far, in microseconds; cpu_us PID user|sys
# gives one of the two.
cpu_us() {
  awk -v hz="$(getconf CLK_TCK)" -v part="${2:-}" '{
    t = part == "user" ? $14 : part == "sys" ? $15 : $14 + $15;
    printf "%d", t * 1000000 / hz }' "/proc/$1/stat"
}
run() { # name connections url auth-header [pid of the proxy, default apipool]
  local out m0 s0 m1 s1 u0 u1 ppid=${5:-$SPID}
  m0=$(cpu_us "$MPID"); s0=$(cpu_us "$ppid"); u0=$(cpu_us "$ppid" user)
  out=$(wrk -t1 -c"$2" -d"${DUR}s" --latency -H "$4" "$3")
  m1=$(cpu_us "$MPID"); s1=$(cpu_us "$ppid"); u1=$(cpu_us "$ppid" user)
  local rps p50 p99 total
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  total=$(awk '/requests in/ {print $1}' <<<"$out")
  p50=$(to_ms "$(awk '$1 == "50%" {print $2}' <<<"$out")")
  p99=$(to_ms "$(awk '$1 == "99%" {print $2}' <<<"$out")")
  local errs
  errs=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
  # CPU microseconds per request spent by the upstream and by apipool: unlike requests/s,
  # these barely depend on what else the machine is doing.
  # The proxy's CPU also split into user and kernel time: the kernel's part (the loopback
  # TCP work of two more sockets per request) is what any proxy pays, whatever its code.
  local who
  who=$([[ $ppid == "$SPID" ]] && echo apipool || echo proxy)
  echo "$1 c=$2 rps=$rps p50_ms=$p50 p99_ms=$p99 upstream_cpu_us=$(( (m1 - m0) / total )) ${who}_cpu_us=$(( (s1 - s0) / total )) $(awk -v w="$who" -v u=$((u1 - u0)) -v a=$((s1 - s0)) -v n="$total" 'BEGIN {
    printf "%s_user_us=%.1f %s_sys_us=%.1f", w, u / n, w, (a - u) / n }') ${errs}"
}

ratio() { # direct-line other-line
  awk -v d="$1" -v p="$2" 'BEGIN { split(d, a, /[ =]/); split(p, b, /[ =]/);
    printf "%s c=%s throughput_ratio=%.3f\n", b[1], a[3], b[5]/a[5] }'
}

if [[ -n "${REFERENCE:-}" ]]; then
  REF_DIR="$ROOT/crates/apipool-server/benches/reference-proxy"
  CARGO_TARGET_DIR="$ROOT/target/reference-proxy" cargo build --release --offline --quiet \
    --manifest-path "$REF_DIR/Cargo.toml" >&2
  "$ROOT/target/reference-proxy/release/reference-proxy" "${MOCK#http://}" 127.0.0.1:0 load-key-00 >"$TMP/ref.out" &
  RPID=$!
  PIDS+=("$RPID")
  for _ in $(seq 100); do grep -q listening "$TMP/ref.out" 2>/dev/null && break; sleep 0.05; done
  REF_URL="$(sed -n 's/^listening on //p' "$TMP/ref.out")/price?id=bitcoin"
  if command -v nginx >/dev/null; then
    NPORT=$(free_port)
    cat >"$TMP/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $TMP/nginx.pid;
error_log $TMP/nginx.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  upstream mock { server ${MOCK#http://}; keepalive 256; }
  server {
    listen 127.0.0.1:$NPORT;
    location / {
      proxy_pass http://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer load-key-00";
    }
  }
}
NGINX
    nginx -c "$TMP/nginx.conf" -p "$TMP" &
    PIDS+=("$!")
    for _ in $(seq 100); do [[ -s $TMP/nginx.pid ]] && break; sleep 0.05; done
    sleep 0.2
    NGINX_WORKER=$(pgrep -P "$(cat "$TMP/nginx.pid")" | head -1)
    NGINX_URL="http://127.0.0.1:$NPORT/price?id=bitcoin"
  fi
fi

echo "# $(date -u +%FT%TZ) $(nproc) cores, ${DUR}s per run, wrk -t1"
for c in 1 8 32 64; do
  d=$(run direct "$c" "$DIRECT_URL" "authorization: Bearer load-key-00")
  p=$(run proxy "$c" "$PROXY_URL" "authorization: Bearer $TOKEN")
  echo "$d"
  echo "$p"
  awk -v d="$d" -v p="$p" 'BEGIN {
    split(d, a, /[ =]/); split(p, b, /[ =]/);
    # fields: name c N rps R p50_ms X p99_ms Y
    printf "added c=%s p50_ms=%.3f p99_ms=%.3f throughput_ratio=%.3f\n", a[3], b[7]-a[7], b[9]-a[9], b[5]/a[5] }'
  if [[ -n "${REFERENCE:-}" ]]; then
    r=$(run bare-hyper "$c" "$REF_URL" "x-bench: 1" "$RPID")
    echo "$r"
    ratio "$d" "$r"
    if [[ -n "${NGINX_URL:-}" ]]; then
      r=$(run nginx "$c" "$NGINX_URL" "x-bench: 1" "$NGINX_WORKER")
      echo "$r"
      ratio "$d" "$r"
    fi
  fi
done

# RSS with 1,000 concurrent connections (two wrk threads, 500 each).
wrk -t2 -c1000 -d"$((DUR + 5))s" -H "authorization: Bearer $TOKEN" "$PROXY_URL" >"$TMP/wrk1000.out" &
WPID=$!
sleep "$((DUR / 2 + 3))"
RSS=$(awk '/VmRSS/ {print $2}' "/proc/$SPID/status")
wait "$WPID"
HWM=$(awk '/VmHWM/ {print $2}' "/proc/$SPID/status")
echo "c=1000 $(awk '/Requests\/sec/ {print "rps=" $2}' "$TMP/wrk1000.out") server_VmRSS_MiB=$((RSS / 1024)) server_VmHWM_MiB=$((HWM / 1024)) $(awk '/Non-2xx|Socket errors/ {print}' "$TMP/wrk1000.out" | tr '\n' ' ')"

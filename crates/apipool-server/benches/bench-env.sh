# Sourced by proxy-load.sh, proxy-quota.sh and apipool-cli's batch_10k.sh (not run on its own):
# release binaries from BIN (default: the target dir's release), a
# temporary directory removed on exit with every process started here, then
#   start_mock ARGS...   mock-upstream with ARGS on a free port  → MOCK (URL), MPID
#   start_server         `apipool serve` (fresh SQLite data dir) and an admin login → SERVER, SPID, TOKEN
#   free_port            a port nobody listens on now
#   api PATH JSON        POST JSON to /api/v1/PATH with the admin token (fails on non-2xx)
BIN="${BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release}"
TMP=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start_mock() {
  "$BIN/mock-upstream" "$@" >"$TMP/mock.out" 2>"$TMP/mock.err" &
  MPID=$!
  PIDS+=("$MPID")
  for _ in $(seq 100); do grep -q listening "$TMP/mock.out" 2>/dev/null && break; sleep 0.05; done
  MOCK=$(sed -n 's/^listening on //p' "$TMP/mock.out")
}

start_server() {
  local port
  port=$(free_port)
  SERVER="http://127.0.0.1:$port"
  RUST_LOG="${BENCH_LOG:-warn}" APIPOOL_ADMIN_PASSWORD=bench-admin-password \
    "$BIN/apipool" serve --bind "127.0.0.1:$port" --data-dir "$TMP/data" >"$TMP/server.out" 2>&1 &
  SPID=$!
  PIDS+=("$SPID")
  for _ in $(seq 200); do curl -fs "$SERVER/health" >/dev/null && break; sleep 0.05; done
  TOKEN=$(curl -fs "$SERVER/api/v1/auth/login" -H 'content-type: application/json' \
    -d '{"username":"admin","password":"bench-admin-password"}' | jq -r .access_token)
}

api() { curl -fs -o /dev/null "$SERVER/api/v1$1" -H "authorization: Bearer $TOKEN" -H 'content-type: application/json' -d "$2"; }

-- ARGV: settings header, then n keys as (id, scope index). For each key: availability code and
-- time (as assess), state, until, reason, consecutive failures, calls, successes, failures,
-- rate-limited, leases in flight; then now.
local S = read_settings()
local n = num()
local now = now_us()
local out = {}
for _ = 1, n do
  local id, si = nxt(), num()
  local code, t = assess(S, id, si, now)
  local h, l = key_names(S.base, id)
  local v = redis.call('HMGET', h, 's', 'u', 'r', 'f', 'c', 'ok', 'fl', 'rl')
  out[#out + 1] = code
  out[#out + 1] = t
  for j = 1, 8 do
    out[#out + 1] = tonumber(v[j]) or 0
  end
  out[#out + 1] = redis.call('ZCARD', l)
end
out[#out + 1] = now
return out

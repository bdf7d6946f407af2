-- ARGV: settings header, then n candidates as (id, scope index) in the local strategy's order.
-- Grants the first admissible candidate: {1, its position, now}; else {0, earliest free time, now};
-- {2, 0, now} when every candidate is archived or disabled.
local S = read_settings()
local n = num()
local now = now_us()
local best = -1
for i = 1, n do
  local id, si = nxt(), num()
  local code, u = assess(S, id, si, now)
  if code == 0 then
    local h, l = key_names(S.base, id)
    local keep = math.floor((S.ttl + S.horizon) / 1000) + 1000
    redis.call('ZADD', l, fmt(now + S.ttl), S.lease)
    redis.call('PEXPIRE', l, fmt(keep))
    local v = redis.call('HMGET', h, 's')
    local s = tonumber(v[1]) or 0
    if s == 1 then
      redis.call('HSET', h, 's', 0, 'u', 0)
    elseif s == 2 then
      redis.call('HSET', h, 's', 0, 'u', 0, 'f', 0)
    end
    redis.call('HINCRBY', h, 'c', 1)
    if si > 0 then
      local sc = S.scopes[si]
      local _, sl = scope_names(S.base, sc.name)
      redis.call('ZADD', sl, fmt(now + S.ttl), S.lease)
      redis.call('PEXPIRE', sl, fmt(math.floor((S.ttl + sc.horizon) / 1000) + 1000))
    end
    return { 1, i, now }
  elseif code == 1 and (best < 0 or u < best) then
    best = u
  end
end
if best >= 0 then return { 0, best, now } end
return { 2, 0, now }

-- ARGV: base, lease, id, scope ('' none), outcome (0 dropped, 1 success, 2 rate limited,
-- 3 quota exhausted, 4 invalid key, 5 failed or timed out, 6 not key related), duration (µs, -1
-- none: Retry-After or time to the quota's return), key horizon, scope horizon, ban threshold,
-- ban duration, default cooldown, archive on rate limit (0/1), scope refusal keys, scope refusal
-- window, scope-wide (0/1). Returns now.
local base, lease, id, scope = nxt(), nxt(), nxt(), nxt()
local outcome, dur, horizon, shorizon = num(), num(), num(), num()
local ban_threshold, ban_dur, cooldown, archive_rl = num(), num(), num(), num()
local refusal_keys, refusal_window, scope_wide = num(), num(), num()
local now = now_us()
local h, l, w = key_names(base, id)
-- The call finished now: its place in the window counts from now.
redis.call('ZREM', l, lease)
if horizon > 0 then
  redis.call('ZADD', w, fmt(now), lease)
  redis.call('PEXPIRE', w, fmt(math.floor(horizon / 1000) + 1000))
end
local sh, sl, sw, sr
if scope ~= '' then
  sh, sl, sw, sr = scope_names(base, scope)
  redis.call('ZREM', sl, lease)
  if shorizon > 0 then
    redis.call('ZADD', sw, fmt(now), lease)
    redis.call('PEXPIRE', sw, fmt(math.floor(shorizon / 1000) + 1000))
  end
end
if outcome == 0 or outcome == 6 then return now end

local v = redis.call('HMGET', h, 's', 'u')
local s = tonumber(v[1]) or 0
local u = tonumber(v[2]) or 0
if (s == 1 or s == 2) and u <= now then
  -- An expired cooldown or ban already counts as active.
  if s == 2 then redis.call('HSET', h, 'f', 0) end
  s, u = 0, 0
  redis.call('HSET', h, 's', 0, 'u', 0)
end

local function cool(untl, reason)
  if s == 3 or s == 4 then return end
  if (s == 1 or s == 2) and u >= untl then return end
  redis.call('HSET', h, 's', 1, 'u', fmt(untl), 'r', reason)
end

if outcome == 1 then
  redis.call('HINCRBY', h, 'ok', 1)
  redis.call('HSET', h, 'f', 0)
elseif outcome == 2 then
  redis.call('HINCRBY', h, 'rl', 1)
  if archive_rl == 1 then
    redis.call('HSET', h, 's', 3, 'r', 1)
    return now
  end
  if dur < 0 then dur = cooldown end
  local untl = now + dur
  cool(untl, 0)
  if scope ~= '' then
    -- Several keys of one scope refused within the window (or a scope-wide refusal): the whole
    -- scope cools.
    redis.call('ZADD', sr, fmt(now), id)
    redis.call('ZREMRANGEBYSCORE', sr, '-inf', '(' .. fmt(now - refusal_window))
    redis.call('PEXPIRE', sr, fmt(math.floor(refusal_window / 1000) + 1000))
    if scope_wide == 1 or redis.call('ZCARD', sr) >= refusal_keys then
      local cu = tonumber(redis.call('HGET', sh, 'cu')) or 0
      if untl > cu then redis.call('HSET', sh, 'cu', fmt(untl)) end
    end
  end
elseif outcome == 3 then
  redis.call('HINCRBY', h, 'rl', 1)
  if dur < 0 then dur = cooldown end
  cool(now + dur, 1)
elseif outcome == 4 then
  redis.call('HINCRBY', h, 'fl', 1)
  redis.call('HSET', h, 's', 3, 'r', 0)
elseif outcome == 5 then
  redis.call('HINCRBY', h, 'fl', 1)
  local f = redis.call('HINCRBY', h, 'f', 1)
  if f >= ban_threshold and s == 0 then
    redis.call('HSET', h, 's', 2, 'u', fmt(now + ban_dur))
  end
end
return now

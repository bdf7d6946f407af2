-- apipool: rules shared by every script (prepended to each). Times are microseconds of Redis TIME,
-- so the clocks of the hosts sharing a pool do not matter.
--
-- Keys of one pool (base = "{prefix}:{pool}:"):
--   base.."key:"..id..":h"  HASH  s state (0 active, 1 cooling, 2 banned, 3 archived, 4 disabled),
--                                 u until, r reason, f consecutive failures, c calls, ok successes,
--                                 fl failures, rl rate-limited
--   base.."key:"..id..":l"  ZSET  leases in flight, scored by expiry
--   base.."key:"..id..":w"  ZSET  finished calls still inside a window, scored by completion
--   base.."scope:"..name..":{h,l,w,r}"  the same for a quota scope (h: cu cooling until;
--                                 r: keys refused recently, scored by time)
-- Ids are the keys' safe identifiers (fingerprints), never raw secrets.

local pos = 0
local function nxt()
  pos = pos + 1
  return ARGV[pos]
end
local function num()
  return tonumber(nxt())
end

-- Integers as exact decimal strings (tostring would print large numbers in exponent form).
local function fmt(x)
  return string.format('%d', x)
end

local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local function key_names(base, id)
  local p = base .. 'key:' .. id
  return p .. ':h', p .. ':l', p .. ':w'
end

local function scope_names(base, name)
  local p = base .. 'scope:' .. name
  return p .. ':h', p .. ':l', p .. ':w', p .. ':r'
end

local function read_limits()
  local n = num()
  local lims = {}
  local horizon = 0
  for i = 1, n do
    local limit, interval = num(), num()
    lims[i] = { limit, interval }
    if interval > horizon then horizon = interval end
  end
  return lims, horizon
end

-- The header every acquire/inspect call sends: lease id, lease ttl, release poll, the key limits
-- and in-flight cap, then the scopes the candidates use.
local function read_settings()
  local S = {}
  S.lease = nxt()
  S.ttl = num()
  S.poll = num()
  S.base = nxt()
  S.mif = num()
  S.lims, S.horizon = read_limits()
  S.scopes = {}
  local ns = num()
  for i = 1, ns do
    local sc = { name = nxt(), mif = num() }
    sc.lims, sc.horizon = read_limits()
    S.scopes[i] = sc
  end
  return S
end

-- Leases whose holder died expire; each becomes a finished call at its expiry (it may have
-- reached the upstream). Finished calls older than every window are dropped.
local function sweep(lkey, wkey, now, horizon)
  local dead = redis.call('ZRANGEBYSCORE', lkey, '-inf', fmt(now), 'WITHSCORES')
  if #dead > 0 then
    if horizon > 0 then
      for i = 1, #dead, 2 do
        redis.call('ZADD', wkey, dead[i + 1], dead[i])
      end
    end
    redis.call('ZREMRANGEBYSCORE', lkey, '-inf', fmt(now))
  end
  if horizon > 0 then
    redis.call('ZREMRANGEBYSCORE', wkey, '-inf', fmt(now - horizon))
  end
end

-- When a place frees if only a release can free it: the earliest lease expiry, or a short poll
-- (releases by other processes are not announced).
local function release_wait(lkey, now, poll)
  local t = now + poll
  local e = redis.call('ZRANGE', lkey, 0, 0, 'WITHSCORES')
  if #e > 0 and tonumber(e[2]) < t then t = tonumber(e[2]) end
  return t
end

-- 0 when a call may start now, else the earliest time it may (a lower bound: never early).
-- Sliding windows as in the engine: a finished call holds its place from its completion for one
-- interval, a call in flight holds one now.
local function window_wait(lkey, wkey, lims, mif, now, poll)
  local inflight = redis.call('ZCARD', lkey)
  local wait = 0
  if mif > 0 and inflight >= mif then wait = release_wait(lkey, now, poll) end
  for _, l in ipairs(lims) do
    local limit, interval = l[1], l[2]
    if limit > 0 then
      local t = 0
      if inflight >= limit then
        t = now + interval
      else
        local room = limit - inflight
        local from = '(' .. fmt(now - interval)
        local win = redis.call('ZCOUNT', wkey, from, '+inf')
        if win >= room then
          local e = redis.call('ZRANGEBYSCORE', wkey, from, '+inf', 'WITHSCORES', 'LIMIT', win - room, 1)
          t = tonumber(e[2]) + interval
        end
      end
      if t > wait then wait = t end
    end
  end
  return wait
end

-- Health: 0 usable, 1 waiting (with until), 2 gone (archived or disabled).
local function health(h, now)
  local v = redis.call('HMGET', h, 's', 'u')
  local s = tonumber(v[1]) or 0
  local u = tonumber(v[2]) or 0
  if s == 3 or s == 4 then return 2, 0 end
  if (s == 1 or s == 2) and u > now then return 1, u end
  return 0, 0
end

-- Can candidate (id, scope index) be granted now? 0 yes; 1 not before `until`; 2 never by itself.
local function assess(S, id, si, now)
  local h, l, w = key_names(S.base, id)
  local code, u = health(h, now)
  if code ~= 0 then return code, u end
  sweep(l, w, now, S.horizon)
  local t = window_wait(l, w, S.lims, S.mif, now, S.poll)
  if t > 0 then return 1, t end
  if si > 0 then
    local sc = S.scopes[si]
    local sh, sl, sw = scope_names(S.base, sc.name)
    local cu = tonumber(redis.call('HGET', sh, 'cu')) or 0
    if cu > now then return 1, cu end
    sweep(sl, sw, now, sc.horizon)
    t = window_wait(sl, sw, sc.lims, sc.mif, now, S.poll)
    if t > 0 then return 1, t end
  end
  return 0, 0
end

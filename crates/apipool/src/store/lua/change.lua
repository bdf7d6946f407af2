-- ARGV: base, id, change (1 disable, 2 enable, 3 archive, 4 reset), archive reason.
local base, id, op, reason = nxt(), nxt(), num(), num()
local h = key_names(base, id)
local s = tonumber(redis.call('HGET', h, 's')) or 0
if op == 1 then
  redis.call('HSET', h, 's', 4)
elseif op == 3 then
  redis.call('HSET', h, 's', 3, 'r', reason)
elseif op == 4 or (op == 2 and s == 4) then
  redis.call('HSET', h, 's', 0, 'u', 0, 'f', 0)
end
return s

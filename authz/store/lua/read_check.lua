-- Everything one Check reads about a user and a session, in one round trip.
-- KEYS: 1 r:<sk>  2 rb  3 dv  4 ip  5 lv  6 ls  7 vc:<cur>  8 vc:<prev>  9.. g:<sk>:<level>
-- ARGV: 1 device fingerprint ('' = none)  2 ip fingerprint ('' = none)  3 level
--       4 sensitive ('1'/'0')  5 vc ttl (s)  6 device / 7 ip fingerprint under the previous
--       lookup key ('' = none; checked only when the active one is absent)
-- Reply: {revoked 0/1, rb|false, device known -1/0/1, ip known -1/0/1, level seen 0/1,
--         last sighting|false, current count (0: not sensitive, -1: corrupt counter),
--         previous count|false, grant values|false ...}
-- A key of the wrong type reads as absent (as MGET does): pcall instead of call.

local function get(key)
  local v = redis.pcall('GET', key)
  if type(v) == 'table' then return false end
  return v
end

local function hexists(key, field)
  local v = redis.pcall('HEXISTS', key, field)
  if type(v) == 'table' then return 0 end
  return v
end

local out = {}
out[1] = redis.call('EXISTS', KEYS[1])
-- The revoked-before marker: a key of another type is there but unreadable, which the
-- reader takes as "everything revoked" (fail closed), never as absent.
local rb = redis.pcall('GET', KEYS[2])
if type(rb) == 'table' then rb = 'unreadable' end
out[2] = rb
local function known(key, fp, prev)
  if fp == '' then return -1 end
  local v = hexists(key, fp)
  if v == 0 and prev ~= '' then v = hexists(key, prev) end
  return v
end

out[3] = known(KEYS[3], ARGV[1], ARGV[6])
out[4] = known(KEYS[4], ARGV[2], ARGV[7])
out[5] = hexists(KEYS[5], ARGV[3])
out[6] = get(KEYS[6])
if ARGV[4] == '1' then
  local n = redis.pcall('INCR', KEYS[7])
  if type(n) == 'table' then
    -- Only a bad value (WRONGTYPE, not an integer) is tolerated and reported as corrupt.
    -- Any other error (READONLY on a demoted primary, OOM, MISCONF) fails the whole read:
    -- swallowing it would let a read-only replica answer Checks as if it were the primary.
    local e = n.err or ''
    if string.sub(e, 1, 9) ~= 'WRONGTYPE' and string.sub(e, 1, 4) ~= 'ERR ' then return n end
    n = -1
  elseif n == 1 then
    redis.call('EXPIRE', KEYS[7], ARGV[5])
  end
  out[7] = n
  out[8] = get(KEYS[8])
else
  out[7] = 0
  out[8] = false
end
for i = 9, #KEYS do
  out[#out + 1] = get(KEYS[i])
end
return out

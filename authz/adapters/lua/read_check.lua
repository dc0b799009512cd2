-- Everything one Check reads about a user and a session, in one round trip.
-- KEYS: 1 r:<sk>  2 rb  3 dv  4 ip  5 lv  6 ls  7 vc:<cur>  8 vc:<prev>  9.. g:<sk>:<level>
-- ARGV: 1 device ('' = none)  2 ip ('' = none)  3 level  4 sensitive ('1'/'0')  5 vc ttl (s)
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
out[2] = get(KEYS[2])
if ARGV[1] == '' then out[3] = -1 else out[3] = hexists(KEYS[3], ARGV[1]) end
if ARGV[2] == '' then out[4] = -1 else out[4] = hexists(KEYS[4], ARGV[2]) end
out[5] = hexists(KEYS[5], ARGV[3])
out[6] = get(KEYS[6])
if ARGV[4] == '1' then
  local n = redis.pcall('INCR', KEYS[7])
  if type(n) == 'table' then
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

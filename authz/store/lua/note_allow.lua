-- After an allow (off the critical path): level first seen, last sighting, session
-- last_seen; refreshes the recency of an already known device / IP (never adds one).
-- KEYS: 1 lv  2 ls  3 ss  4 dv  5 ip
-- ARGV: 1 level  2 now  3 sighting (sealed; '' = none)  4 sk
--       5 device / 6 ip for the sessions index (sealed; '' none)
--       7 max sessions  8 session ttl  9 history ttl
--       10 device / 11 ip fingerprint ('' none)  12 device / 13 ip fingerprint under the
--       previous lookup key ('' none): a device known only under it moves to the active one
local now = tonumber(ARGV[2])
ensure_hash(KEYS[1])
redis.call('HSETNX', KEYS[1], ARGV[1], now)
redis.call('EXPIRE', KEYS[1], ARGV[9])
if ARGV[3] ~= '' then
  redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[8])
end
touch_session(KEYS[3], ARGV[4], now, ARGV[6], ARGV[5], '', tonumber(ARGV[7]), ARGV[8])
local known = {{KEYS[4], ARGV[10], ARGV[12]}, {KEYS[5], ARGV[11], ARGV[13]}}
for _, p in ipairs(known) do
  if p[2] ~= '' then
    local hit = redis.pcall('HEXISTS', p[1], p[2]) == 1
    if not hit and p[3] ~= '' and redis.pcall('HEXISTS', p[1], p[3]) == 1 then
      redis.call('HDEL', p[1], p[3])
      hit = true
    end
    if hit then
      redis.call('HSET', p[1], p[2], now)
      redis.call('EXPIRE', p[1], ARGV[9])
    end
  end
end
return 1

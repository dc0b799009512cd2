-- After an allow (off the critical path): level first seen, last sighting, session
-- last_seen; refreshes the recency of an already known device / IP (never adds one).
-- KEYS: 1 lv  2 ls  3 ss  4 dv  5 ip
-- ARGV: 1 level  2 now  3 sighting ('' = none)  4 sk  5 device ('' none)  6 ip ('' none)
--       7 max sessions  8 session ttl  9 history ttl
local now = tonumber(ARGV[2])
ensure_hash(KEYS[1])
redis.call('HSETNX', KEYS[1], ARGV[1], now)
redis.call('EXPIRE', KEYS[1], ARGV[9])
if ARGV[3] ~= '' then
  redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[8])
end
touch_session(KEYS[3], ARGV[4], now, ARGV[6], ARGV[5], '', tonumber(ARGV[7]), ARGV[8])
local known = {{KEYS[4], ARGV[5]}, {KEYS[5], ARGV[6]}}
for _, p in ipairs(known) do
  if p[2] ~= '' and redis.pcall('HEXISTS', p[1], p[2]) == 1 then
    redis.call('HSET', p[1], p[2], now)
    redis.call('EXPIRE', p[1], ARGV[9])
  end
end
return 1

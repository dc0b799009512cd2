-- Record a grant, its sessions-index entry and (optionally) the known device and IP.
-- KEYS: 1 g:<sk>:<level>  2 ss  3 dv  4 ip
-- ARGV: 1 grant (sealed)  2 grant ttl  3 sk  4 now  5 level
--       6 device / 7 ip for the sessions index (sealed; '' none)
--       8 remember device/ip '1'/'0'  9 max sessions  10 session ttl
--       11 max devices  12 max ips  13 history ttl
--       14 device / 15 ip fingerprint ('' none): the known-device / known-IP field names
--       16 device / 17 ip fingerprint under the previous lookup key ('' none): replaced
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
local now = tonumber(ARGV[4])
touch_session(KEYS[2], ARGV[3], now, ARGV[7], ARGV[6], ARGV[5], tonumber(ARGV[9]), ARGV[10])
if ARGV[8] == '1' then
  local pairs_ = {{KEYS[3], ARGV[14], tonumber(ARGV[11]), ARGV[16]},
                  {KEYS[4], ARGV[15], tonumber(ARGV[12]), ARGV[17]}}
  for _, p in ipairs(pairs_) do
    if p[2] ~= '' then
      ensure_hash(p[1])
      if p[4] ~= '' then redis.call('HDEL', p[1], p[4]) end
      redis.call('HSET', p[1], p[2], now)
      bound(p[1], p[3], p[2], ts_number)
      redis.call('EXPIRE', p[1], ARGV[13])
    end
  end
end
return 1

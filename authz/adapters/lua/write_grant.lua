-- Record a grant, its sessions-index entry and (optionally) the known device and IP.
-- KEYS: 1 g:<sk>:<level>  2 ss  3 dv  4 ip
-- ARGV: 1 grant JSON  2 grant ttl  3 sk  4 now  5 level  6 device ('' none)  7 ip ('' none)
--       8 remember device/ip '1'/'0'  9 max sessions  10 session ttl
--       11 max devices  12 max ips  13 history ttl
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
local now = tonumber(ARGV[4])
touch_session(KEYS[2], ARGV[3], now, ARGV[7], ARGV[6], ARGV[5], tonumber(ARGV[9]), ARGV[10])
if ARGV[8] == '1' then
  local pairs_ = {{KEYS[3], ARGV[6], tonumber(ARGV[11])}, {KEYS[4], ARGV[7], tonumber(ARGV[12])}}
  for _, p in ipairs(pairs_) do
    if p[2] ~= '' then
      ensure_hash(p[1])
      redis.call('HSET', p[1], p[2], now)
      bound(p[1], p[3], p[2], ts_number)
      redis.call('EXPIRE', p[1], ARGV[13])
    end
  end
end
return 1

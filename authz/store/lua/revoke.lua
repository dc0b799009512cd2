-- Revoke one session (ARGV[3] = sk) or, when ARGV[3] is '', every session of the user.
-- KEYS: 1 ss  2 r:<sk> (session) | rb (user)
-- ARGV: 1 now  2 marker ttl  3 sk or ''  4 the user's key base "{prefix}u:{<uk>}:" — grant
--       keys are built from it; they carry the same hash tag, so they live in KEYS[1]'s slot.
-- Reply: session: 1 if the session was known (indexed or had grants), else 0;
--        user: the number of indexed sessions.
local base = ARGV[4]
local function drop_grants(sk, raw)
  local n = 0
  local doc = raw and decode(raw) or nil
  if doc and type(doc['levels']) == 'table' then
    for _, level in ipairs(doc['levels']) do
      n = n + redis.call('DEL', base .. 'g:' .. sk .. ':' .. level)
    end
  end
  return n
end
local ss_ok = redis.call('TYPE', KEYS[1])['ok'] == 'hash'
if ARGV[3] ~= '' then
  local sk = ARGV[3]
  redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
  if not ss_ok then return 0 end
  local raw = redis.call('HGET', KEYS[1], sk)
  if not raw then return 0 end
  drop_grants(sk, raw)
  redis.call('HDEL', KEYS[1], sk)
  return 1
end
local prev = tonumber(redis.pcall('GET', KEYS[2])) or 0
redis.call('SET', KEYS[2], math.max(prev, tonumber(ARGV[1])), 'EX', ARGV[2])
if not ss_ok then return 0 end
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do drop_grants(all[i], all[i + 1]) end
redis.call('DEL', KEYS[1])
return #all / 2

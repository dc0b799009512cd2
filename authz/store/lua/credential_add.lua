-- Add one credential to a user's registry, refusing a duplicate and a full registry.
-- KEYS: 1 pk (hash: credential handle -> sealed record)
-- ARGV: 1 handle  2 sealed record  3 max credentials  4 '1' to replace (import, restore)
-- Returns 1 stored, -1 the handle exists (and not replacing), -2 the registry is full.
local exists = redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1
if exists and ARGV[4] ~= '1' then return -1 end
if not exists and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then return -2 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1

-- Remove one credential and return its sealed record (for the removal's audit record).
-- KEYS: 1 pk   ARGV: 1 handle   Returns the record, or false when there was none.
local v = redis.call('HGET', KEYS[1], ARGV[1])
if v then redis.call('HDEL', KEYS[1], ARGV[1]) end
return v

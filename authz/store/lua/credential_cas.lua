-- Compare-and-set one credential record: the signature counter only moves forward from
-- the value the verifier read, so two concurrent assertions cannot both advance it.
-- KEYS: 1 pk   ARGV: 1 handle  2 the sealed record as read  3 the new sealed record
-- Returns 1 written, 0 the record changed (or vanished) since it was read.
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  return 1
end
return 0

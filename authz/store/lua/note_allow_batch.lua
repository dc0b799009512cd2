-- The lessons of several allows in one call: note_allow.lua once per lesson, so the
-- lessons of one event-loop pass cost one round trip (plain Redis only: the lessons name
-- several users' keys, which Redis Cluster refuses in one script).
-- Prepended: common.lua, then note_allow.lua's body as the function note_allow(KEYS, ARGV).
-- KEYS: 5 per lesson, ARGV: 13 per lesson, each in note_allow.lua's order.
local n = math.floor(#KEYS / 5)
for i = 0, n - 1 do
  local k, a = {}, {}
  for j = 1, 5 do k[j] = KEYS[5 * i + j] end
  for j = 1, 13 do a[j] = ARGV[13 * i + j] end
  note_allow(k, a)
end
return n

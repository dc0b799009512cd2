-- Shared helpers, prepended to the write scripts (not a script of its own).

-- A key of another type than a hash is corrupt: replace it rather than fail every write.
local function ensure_hash(key)
  local t = redis.call('TYPE', key)['ok']
  if t ~= 'hash' and t ~= 'none' then redis.call('DEL', key) end
end

local function decode(raw)
  local ok, doc = pcall(cjson.decode, raw)
  if ok and type(doc) == 'table' then return doc end
  return nil
end

-- Keep at most `max` fields, evicting the oldest by ts_of(value) (unparsable = oldest);
-- `keep` is never evicted (the field just written).
local function bound(key, max, keep, ts_of)
  local n = redis.call('HLEN', key)
  if n <= max then return end
  local all = redis.call('HGETALL', key)
  local rows = {}
  for i = 1, #all, 2 do
    if all[i] ~= keep then
      rows[#rows + 1] = {all[i], ts_of(all[i + 1]) or -1}
    end
  end
  table.sort(rows, function(a, b) return a[2] < b[2] end)
  for i = 1, n - max do
    if rows[i] then redis.call('HDEL', key, rows[i][1]) end
  end
end

local function ts_number(v) return tonumber(v) end
local function ts_session(v)
  local doc = decode(v)
  if doc then return tonumber(doc['last_seen']) end
  return nil
end

-- Create or update the sessions-index entry of `sk`; bounded on creation.
-- Returns the entry table.
local function touch_session(key, sk, now, ip, device, level, max, ttl)
  ensure_hash(key)
  local raw = redis.call('HGET', key, sk)
  local doc = raw and decode(raw) or nil
  local created = false
  if doc == nil then
    doc = {created = now, levels = {}}
    created = true
  end
  doc['last_seen'] = now
  if ip ~= '' then doc['ip'] = ip end
  if device ~= '' then doc['device'] = device end
  if type(doc['levels']) ~= 'table' then doc['levels'] = {} end
  if level ~= '' then
    local found = false
    for _, l in ipairs(doc['levels']) do if l == level then found = true end end
    if not found then doc['levels'][#doc['levels'] + 1] = level end
  end
  -- cjson encodes an empty table as {}; the reader accepts both {} and [].
  redis.call('HSET', key, sk, cjson.encode(doc))
  if created then bound(key, max, sk, ts_session) end
  redis.call('EXPIRE', key, ttl)
  return doc
end

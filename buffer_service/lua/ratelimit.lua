-- Admit one event against a rate limit shared by every replica (GCRA, one key per limit).
-- A burst of up to `limit` events passes at once; after that one event per period/limit. One
-- number per key instead of a log of timestamps: a flood costs no more memory than a trickle.
-- KEYS: 1 the limit's key (a conversation's lives in its shard's slot; the global one alone)
-- ARGV: 1 limit, 2 period ms
-- Returns {1 admitted | 0 refused, ms until an event would be admitted again}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local limit = tonumber(ARGV[1])
local period = tonumber(ARGV[2])

-- The stored value is the "theoretical arrival time": when the bucket would be empty again.
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local next_tat = tat + period / limit
if next_tat - now > period then
  return {0, math.ceil(next_tat - period - now)}
end
redis.call('SET', KEYS[1], string.format('%.3f', next_tat), 'PX', math.ceil(next_tat - now))
return {1, 0}

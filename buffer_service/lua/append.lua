-- Append one accepted message to its conversation's buffer and slide the deadline.
-- One script so that de-duplication, the append and the deadline move together: a crash
-- between them would otherwise leave a message buffered with no deadline (never answered)
-- or a duplicate marker with no message (lost).
-- KEYS: 1 due (zset conv -> deadline ms), 2 first (hash conv -> first message ms),
--       3 buf:<conv> (list), 4 ttl:<conv> (sliding TTL key, the expiry wake-up),
--       5 seen:<account>:<message id> (de-duplication marker)
-- ARGV: 1 conv, 2 message json, 3 window ms, 4 max age ms, 5 max size, 6 dedup ttl ms,
--       7 wake channel, 8 max buffer bytes (0: no cap)
-- Returns {1 buffered | 0 duplicate, count, deadline ms, trigger, now ms};
--   trigger 'full' with 0: refused, the buffer holds max buffer bytes already
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- A buffer that nobody flushes (workers down, processing off) must not grow without bound.
-- Checked before the de-duplication marker so a refused message is not remembered as seen.
-- MEMORY USAGE with SAMPLES 0 walks the list's nodes (8 KB each): exact and cheap at this size.
-- pcall: a Redis that forbids MEMORY loses the cap, not its webhooks.
local cap = tonumber(ARGV[8]) or 0
if cap > 0 then
  local used = redis.pcall('MEMORY', 'USAGE', KEYS[3], 'SAMPLES', 0)
  if type(used) == 'number' and used + #ARGV[2] > cap then
    return {0, redis.call('LLEN', KEYS[3]), 0, 'full', now}
  end
end

if not redis.call('SET', KEYS[5], '1', 'NX', 'PX', ARGV[6]) then
  return {0, redis.call('LLEN', KEYS[3]), 0, '', now}
end

local conv = ARGV[1]
local n = redis.call('RPUSH', KEYS[3], ARGV[2])
-- The webhook buffers a message only when its payload shows the bot in charge, which outdates
-- a remembered human takeover (handoff.lua). The record lives beside the buffer: same prefix.
redis.call('DEL', string.sub(KEYS[3], 1, -(#conv + 5)) .. 'handoff:' .. conv)
local first
if n == 1 then
  first = now
  redis.call('HSET', KEYS[2], conv, now)
else
  first = tonumber(redis.call('HGET', KEYS[2], conv)) or now
end

local deadline = now + tonumber(ARGV[3])
local trigger = 'deadline'
local cap = first + tonumber(ARGV[4])
if deadline >= cap then
  deadline = cap
  trigger = 'age'
end
if n >= tonumber(ARGV[5]) then
  deadline = now
  trigger = 'size'
end
if deadline < now then deadline = now end

local added = redis.call('ZADD', KEYS[1], deadline, conv)
redis.call('SET', KEYS[4], '', 'PX', math.max(1, deadline - now))
-- Workers already know every deadline they saw in a sweep; only a deadline they cannot know
-- yet (a new burst, or one made due early) is worth a wake-up message.
if added == 1 or deadline == now then
  redis.call('PUBLISH', ARGV[7], deadline)
end
return {1, n, deadline, trigger, now}

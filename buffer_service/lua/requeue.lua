-- An operator re-queues a failed batch: its attempts start again (MAX_ATTEMPTS counts from the
-- re-queue, also for a reply whose parts made progress: lib.lua attempts_spent) and any worker
-- takes it at once, or, while another batch of the conversation runs, right after that one and
-- before any burst that arrived meanwhile: it holds older messages, and replies go out in order
-- (lib.lua: close_batch hands the conversation to it).
-- KEYS: batch inflight active failed
-- ARGV: batch_id wake prefix
-- Returns 1 when re-queued, 0 when the batch is not a failed one.
if redis.call('HGET', KEYS[1], 'state') ~= 'failed' then return 0 end
local now = now_ms()
local conv = redis.call('HGET', KEYS[1], 'conv')
redis.call('HSET', KEYS[1], 'state', 'queued', 'attempts', 0, 'progress_attempt', 0,
  'requeued_ms', now)
-- Numbered from 0 again: an old attempt's post in doubt must not spare a new attempt.
redis.call('HDEL', KEYS[1], 'posting_attempt')
redis.call('PERSIST', KEYS[1])
redis.call('ZREM', KEYS[4], ARGV[1])
local holder = redis.call('HGET', KEYS[3], conv)
if holder and holder ~= ARGV[1] then
  local hkey = ARGV[3] .. 'batch:' .. holder
  local queue = redis.call('HGET', hkey, 'next')
  redis.call('HSET', hkey, 'next', queue and (queue .. ' ' .. ARGV[1]) or ARGV[1])
  return 1
end
redis.call('HSET', KEYS[3], conv, ARGV[1])
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('PUBLISH', ARGV[2], now)
return 1

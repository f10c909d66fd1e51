-- An operator re-queues a failed batch: its attempts start again and any worker takes it at
-- once (or right after the conversation's current batch, to keep replies in order).
-- KEYS: 1 batch hash, 2 inflight, 3 active, 4 failed   ARGV: 1 batch id, 2 wake channel
-- Returns 1 when re-queued, 0 when the batch is not a failed one.
if redis.call('HGET', KEYS[1], 'state') ~= 'failed' then return 0 end
local now = now_ms()
local conv = redis.call('HGET', KEYS[1], 'conv')
redis.call('HSET', KEYS[1], 'state', 'queued', 'attempts', 0, 'requeued_ms', now)
redis.call('PERSIST', KEYS[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZADD', KEYS[2], now, ARGV[1])
if redis.call('HEXISTS', KEYS[3], conv) == 0 then
  redis.call('HSET', KEYS[3], conv, ARGV[1])
end
redis.call('PUBLISH', ARGV[2], now)
return 1

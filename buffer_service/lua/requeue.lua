-- An operator re-queues a failed batch (lib.lua requeue: its attempts start again, and it goes
-- right after the conversation's current batch, before any burst that arrived meanwhile).
-- KEYS: batch
-- ARGV: batch_id wake prefix
-- Returns 1 when re-queued, 0 when the batch is not a failed one.
if redis.call('HGET', KEYS[1], 'state') ~= 'failed' then return 0 end
requeue(ARGV[3], KEYS[1], ARGV[1], now_ms(), ARGV[2])
return 1

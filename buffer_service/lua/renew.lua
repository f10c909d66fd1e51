-- Extend a batch's lease while its worker still waits on the LLM or Chatwoot. Fenced: a worker
-- whose lease already lapsed and was taken over must learn that it lost the batch.
-- KEYS: batch inflight
-- ARGV: batch_id token lease_ms
-- Returns 1 when renewed, 0 when the token no longer matches.
if not holds(KEYS[1], ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[2], 'XX', now_ms() + tonumber(ARGV[3]), ARGV[1])
return 1

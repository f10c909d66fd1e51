-- An operator purges a failed job: its record and the messages it kept are deleted for good.
-- KEYS: batch messages failed
-- ARGV: batch_id
-- Returns 1 when purged, 0 when the job is not a failed one (retried meanwhile, or unknown).
if redis.call('HGET', KEYS[1], 'state') ~= 'failed' then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
return 1

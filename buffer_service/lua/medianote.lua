-- Say in a job record what the model could not see or hear, and why (media.py), only while the
-- caller holds the batch: a worker whose lease lapsed must not bring back the record of a batch
-- that another worker completed meanwhile (a completed job keeps only its compact record:
-- lib.lua compact), where a bare write would leave a key that never expires.
-- KEYS: batch
-- ARGV: token note
-- Returns 1, or 0 when the token no longer holds the batch.
if not holds(KEYS[1], ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'media', ARGV[2])
return 1

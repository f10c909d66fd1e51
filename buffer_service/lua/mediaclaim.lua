-- Renew or release the claim on one voice note's transcription (transcripts.py), only while it is
-- still the caller's: a claim that lapsed may already be another process's.
-- KEYS: claim
-- ARGV: token ttl_ms
-- token: the caller's claim token; ttl_ms: new lifetime ('' = release).
-- Returns 1 when the claim was the caller's, 0 otherwise.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then return redis.call('DEL', KEYS[1]) end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])

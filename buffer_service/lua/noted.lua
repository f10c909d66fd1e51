-- The handoff's private note is out: Chatwoot took it (handoff.py). Recorded under the lease
-- right after Chatwoot answers, so that a retry after a later step failed (`toggle_status`, a
-- crash) does not write it again. Chatwoot has no idempotency key: a crash between its answer
-- and this record still leaves the note to be written twice (docs/delivery-guarantees.md).
-- KEYS: batch
-- ARGV: token
-- Returns 1, or 0 when the token no longer holds the batch.
if not holds(KEYS[1], ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'note_out', '1')
return 1

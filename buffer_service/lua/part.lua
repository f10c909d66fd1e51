-- A part of the reply is out: Chatwoot took it as message `id` (processor.py). Recorded under
-- the lease before anything else happens, so that a retry neither posts it again nor has to ask
-- Chatwoot: it resumes at the next part (before_post.lua marks each part in flight right before
-- its post) or, all parts out, goes straight on to the handoff (whose private note would
-- otherwise be the newest message an agent bot's token can see) and the finish.
-- KEYS: batch sent seen
-- ARGV: batch_id token parts_out message_id last dedup_ms
-- sent: sent:<conv>; seen: the posted part's seen marker; parts_out: parts out now; message_id:
-- the posted part's; last: 1 when this was the last part; dedup_ms: the seen marker's life.
-- Returns 1, or 0 when the token no longer holds the batch.
if not holds(KEYS[1], ARGV[2]) then return 0 end
-- Known by its id, the part's echo needs no fingerprint any more (as in finish.lua).
if ARGV[4] ~= '0' then
  redis.call('SET', KEYS[3], 'own', 'PX', ARGV[6])
  local fp = redis.call('HGET', KEYS[1], 'fp')
  if fp then redis.call('ZREM', KEYS[2], fp .. ':' .. ARGV[1]) end
end
-- An attempt that got a part out made progress: MAX_ATTEMPTS counts the attempts since
-- (lib.lua attempts_spent), so a Chatwoot that is slow for a share of posts does not fail a
-- reply of several parts that goes out bit by bit. At most
-- (parts + 1) x (MAX_ATTEMPTS + 1) in all (lib.lua: a post in doubt is settled first).
redis.call('HSET', KEYS[1], 'parts_out', ARGV[3], 'last_id', ARGV[4],
  'progress_attempt', redis.call('HGET', KEYS[1], 'attempts') or 0)
-- posted_id: an echo that overtook this record named the same part (note.lua); it is left to
-- mean "the whole reply is out".
redis.call('HDEL', KEYS[1], 'unsure', 'posted_id')
if ARGV[5] == '1' then redis.call('HSET', KEYS[1], 'posted_id', ARGV[4]) end
return 1

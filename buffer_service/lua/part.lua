-- A part of the reply is out: Chatwoot took it as message `id` (processor.py). Recorded under
-- the lease before anything else happens, so that a retry neither posts it again nor has to ask
-- Chatwoot: it resumes at the next part or, all parts out, goes straight on to the handoff
-- (whose private note would otherwise be the newest message an agent bot's token can see) and
-- the finish. The next part, if any, becomes the one in flight, unsure until its outcome is
-- known, its fingerprint remembered for its echo, as before_post.lua does for the first.
-- KEYS: batch sent seen inflight
-- ARGV: batch_id token parts_out message_id next_part own_memory_ms own_kept lease_ms dedup_ms
-- sent: sent:<conv>; seen: the posted part's seen marker; parts_out: parts out now; message_id:
-- the posted part's; next_part: its text ('' after the last); own_memory_ms, own_kept: how long
-- and how many own replies are remembered for their echo; dedup_ms: the seen marker's life.
-- Returns 1, or 0 when the token no longer holds the batch.
if not holds(KEYS[1], ARGV[2]) then return 0 end
local now = now_ms()
-- Known by its id, the part's echo needs no fingerprint any more (as in finish.lua).
if ARGV[4] ~= '0' then
  redis.call('SET', KEYS[3], 'own', 'PX', ARGV[9])
  local fp = redis.call('HGET', KEYS[1], 'fp')
  if fp then redis.call('ZREM', KEYS[2], fp .. ':' .. ARGV[1]) end
end
redis.call('HSET', KEYS[1], 'parts_out', ARGV[3], 'last_id', ARGV[4])
if ARGV[5] == '' then
  redis.call('HSET', KEYS[1], 'posted_id', ARGV[4])
  redis.call('HDEL', KEYS[1], 'unsure')
  return 1
end
local fp = fingerprint(ARGV[5])
redis.call('HSET', KEYS[1], 'fp', fp, 'unsure', '1', 'posting_ms', now)
redis.call('HDEL', KEYS[1], 'posted_id')
own_add(KEYS[2], fp, ARGV[1], now, tonumber(ARGV[6]), tonumber(ARGV[7]))
redis.call('ZADD', KEYS[4], 'XX', now + tonumber(ARGV[8]), ARGV[1])
return 1

-- Record a message the bot does not answer (a human agent's, the bot's own reply coming back as
-- a webhook, a customer's message while a human handles the conversation) in the history, once,
-- so later prompts see both sides. Two more things happen here because only the webhook knows:
-- * The echo of our own reply proves that Chatwoot took the post. A reply recorded with its id
--   left a seen marker 'own' (finish.lua). Otherwise its fingerprint (lib.lua: own_take) names
--   the batch: an unfinished one records the message id, so that its retry finishes instead of
--   posting again; a failed one (its post's outcome was never settled) records the part out
--   (as part.lua does). The echo of an earlier part of a failed reply leaves the batch failed,
--   and an operator's retry posts the parts that are left. The echo of its last part (or of
--   its whole reply) completes it here, with the burst and the whole reply, as it was posted,
--   in the history; unless the reply hands the conversation over (mark.lua): the customer has
--   been told a person will answer, so the handoff is recorded here at once (as handoff.py
--   does first, lib.lua take_charge), and a burst in flight meanwhile is skipped at its
--   before_post instead of answered; the other steps (note, status) are still to come, so the
--   batch is re-queued (lib.lua requeue), and a worker goes straight on to them and the finish
--   (before_post.lua 'posted').
-- * A human agent's message pauses the bot in the conversation. Our own replies look the same
--   when the service posts with a user access token; the two ways above tell them apart.
-- KEYS: seen history pause sent handoff
-- ARGV: entry history_cap history_ttl_ms dedup_ms message_id outgoing_text prefix pause_ms
--       retention_ms wake
-- outgoing_text: the text of an outgoing message ('' otherwise); pause_ms: 0 unless a human
-- agent may have written it; retention_ms: of a job record; prefix: the shard's key prefix;
-- wake: the channel that wakes the workers.
-- Returns 'recorded', 'duplicate', 'own' (the echo of one of our replies) or 'paused'.
local seen = redis.call('GET', KEYS[1])
if seen == 'own' then
  redis.call('SET', KEYS[1], '1', 'KEEPTTL')
  return 'own'
end
if seen then return 'duplicate' end

if ARGV[6] ~= '' then
  local id = own_take(KEYS[4], fingerprint(ARGV[6]))
  if id then
    local P = ARGV[7]
    local bkey = P .. 'batch:' .. id
    local state = redis.call('HGET', bkey, 'state')
    if state == 'failed' then
      local stored = redis.call('HGET', bkey, 'parts')
      local out = (tonumber(redis.call('HGET', bkey, 'parts_out')) or 0) + 1
      redis.call('HSET', bkey, 'parts_out', out, 'last_id', ARGV[5])
      redis.call('HDEL', bkey, 'unsure')
      local now = now_ms()
      local last = not stored or out >= #cjson.decode(stored)
      if last and (redis.call('HGET', bkey, 'handoff') or '') ~= '' then
        redis.call('HSET', bkey, 'posted_id', ARGV[5])
        -- The record handoff.py writes: its reason's kind, as of the record's own version.
        local kind = string.match(redis.call('HGET', bkey, 'handoff'), '^[^:]*')
        take_charge(KEYS[5], 'handoff:' .. kind,
          tonumber(redis.call('HGET', KEYS[5], 'v')) or 0, ARGV[3], false)
        requeue(P, bkey, id, now, ARGV[10])
      elseif last then
        local reply = redis.call('HGET', bkey, 'reply')
        local entry = reply and reply_entry(ARGV[1], reply) or ARGV[1]
        redis.call('HSET', bkey, 'state', 'completed', 'reason', 'confirmed_by_echo',
          'reply_id', ARGV[5], 'finished_ms', now)
        redis.call('HDEL', bkey, 'reply', 'parts', 'unsure')
        redis.call('ZREM', P .. 'failed', id)
        count_outcome(P, bkey, now)
        archive(P, bkey, id, P .. 'msgs:' .. id, KEYS[2], entry, ARGV[2], ARGV[3], ARGV[9],
          P .. 'jobs:completed', now)
      end
    elseif state and state ~= 'completed' and state ~= 'skipped' and state ~= 'superseded' then
      redis.call('HSET', bkey, 'posted_id', ARGV[5])
    end
    redis.call('SET', KEYS[1], '1', 'PX', ARGV[4])
    return 'own'
  end
end

redis.call('SET', KEYS[1], '1', 'PX', ARGV[4])
remember(KEYS[2], ARGV[1], ARGV[2], ARGV[3])
if ARGV[8] ~= '0' then
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[8])
  return 'paused'
end
return 'recorded'

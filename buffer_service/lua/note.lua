-- Record a message the bot does not answer (a human agent's, the bot's own reply coming back as
-- a webhook, a customer's message while a human handles the conversation) in the history, once,
-- so later prompts see both sides. Two more things happen here because only the webhook knows:
-- * The echo of our own reply proves that Chatwoot took the post: its batch records the
--   message id, and a retry after a crash or an unsure post finishes instead of posting again.
--   The finish script adds the reply to the history, after its burst.
-- * A human agent's message pauses the bot in the conversation. Our own replies look the same
--   when the service posts with a user access token; the fingerprint of a posted reply (taken
--   by its first echo) or the seen marker of a finished one tells them apart.
-- KEYS: 1 seen marker, 2 history list, 3 pause:<conv>, 4 own:<conv> (fingerprints of replies
--       the bot posted, lib.lua: own_add)
-- ARGV: 1 entry json, 2 history cap, 3 history ttl ms, 4 dedup ttl ms, 5 message id,
--       6 text of an outgoing message ('' otherwise), 7 shard key prefix,
--       8 pause ms (0 unless a human agent may have written it)
-- Returns 'recorded', 'duplicate', 'own' (the echo of one of our replies) or 'paused'.
if ARGV[6] ~= '' then
  local id = own_take(KEYS[4], fingerprint(ARGV[6]))
  if id then
    local bkey = ARGV[7] .. 'batch:' .. id
    local state = redis.call('HGET', bkey, 'state')
    if state and state ~= 'completed' and state ~= 'skipped' and state ~= 'superseded' then
      redis.call('HSET', bkey, 'posted_id', ARGV[5])
    end
    redis.call('SET', KEYS[1], '1', 'PX', ARGV[4])
    return 'own'
  end
end

if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[4]) then return 'duplicate' end
remember(KEYS[2], ARGV[1], ARGV[2], ARGV[3])
if ARGV[8] ~= '0' then
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[8])
  return 'paused'
end
return 'recorded'

-- Record a message the bot does not answer (a human agent's, the bot's own reply coming back as
-- a webhook, a customer's message while a human handles the conversation) in the history, once,
-- so later prompts see both sides. Two more things happen here because only the webhook knows:
-- * The echo of our own reply, while its batch is still unfinished, proves that Chatwoot took
--   the post: the batch records the message id, and a retry after a crash finishes instead of
--   posting again. The finish script adds the reply to the history, after its burst.
-- * A human agent's message pauses the bot in the conversation. Our own replies look the same
--   when the service posts with a user access token; the seen marker of a finished reply, or
--   the fingerprint of a posted one (for a reply whose id Chatwoot did not return) tells them.
-- KEYS: 1 seen marker, 2 history list, 3 active (hash conv -> batch id), 4 pause:<conv>,
--       5 own:<conv> (fingerprints of replies the bot posted)
-- ARGV: 1 entry json, 2 history cap, 3 history ttl ms, 4 dedup ttl ms, 5 message id,
--       6 text of an outgoing message ('' otherwise), 7 shard key prefix, 8 conv,
--       9 pause ms (0 unless a human agent may have written it)
-- Returns 'recorded', 'duplicate', 'own' (the echo of one of our replies) or 'paused'.
local fp = ARGV[6] ~= '' and fingerprint(ARGV[6])
if fp then
  local id = redis.call('HGET', KEYS[3], ARGV[8])
  if id then
    local bkey = ARGV[7] .. 'batch:' .. id
    if redis.call('HGET', bkey, 'fp') == fp then
      redis.call('HSET', bkey, 'posted_id', ARGV[5])
      return 'own'
    end
  end
  if redis.call('HEXISTS', KEYS[5], fp) == 1 then return 'own' end  -- finished: in the history
end

if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[4]) then return 'duplicate' end
local cap = tonumber(ARGV[2])
if cap > 0 then
  redis.call('RPUSH', KEYS[2], ARGV[1])
  redis.call('LTRIM', KEYS[2], -cap, -1)
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
if ARGV[9] ~= '0' then
  redis.call('SET', KEYS[4], '1', 'PX', ARGV[9])
  return 'paused'
end
return 'recorded'

-- Record a message the bot does not answer (a human agent's, or the bot's own reply coming back
-- as a webhook) in the conversation's history, once, so later prompts see both sides.
-- KEYS: 1 seen marker, 2 history list   ARGV: 1 entry json, 2 cap, 3 history ttl ms, 4 dedup ttl ms
-- Returns 1 when recorded, 0 for a message already seen.
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[4]) then return 0 end
if tonumber(ARGV[2]) > 0 then
  redis.call('RPUSH', KEYS[2], ARGV[1])
  redis.call('LTRIM', KEYS[2], -tonumber(ARGV[2]), -1)
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
return 1

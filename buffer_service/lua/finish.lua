-- End a batch for good (completed, or skipped with a reason): keep its job record (compact when
-- completed: lib.lua), move the burst and the reply into the conversation's history for later
-- prompts, and let the conversation's next batch go.
-- KEYS: batch messages history seen jobs
-- ARGV: batch_id token state reason reply_id entry history_cap history_ttl_ms retention_ms
--       dedup_ms wake prefix note
-- seen: the marker of the posted reply (so its webhook echo is not recorded twice); jobs:
-- jobs:<state> (zset id -> finish time: the index operators list jobs by); entry: the reply's
-- history entry ('' for none); prefix: the shard's key prefix (keys.py); note: for the operator
-- ('' for none), e.g. how much of a reply a takeover cut short went out.
-- Returns 1 when finished, 0 when the token no longer matches.
if not holds(KEYS[1], ARGV[2]) then return 0 end
local now = now_ms()
local conv = redis.call('HGET', KEYS[1], 'conv')

redis.call('HSET', KEYS[1], 'state', ARGV[3], 'reason', ARGV[4], 'reply_id', ARGV[5])
if ARGV[13] ~= '' then redis.call('HSET', KEYS[1], 'note', ARGV[13]) end
redis.call('HDEL', KEYS[1], 'reply', 'parts', 'unsure')
if close_batch(ARGV[12], KEYS[1], ARGV[1], conv, now) then
  wake_up(ARGV[11], now, KEYS[1])
end

-- Known by its id, the reply's echo needs no fingerprint any more: the seen marker ('own')
-- tells the webhook it is the bot's (note.lua). Chatwoot's message id may be unknown (0): then
-- the fingerprint stays for the echo.
if ARGV[5] ~= '0' then
  redis.call('SET', KEYS[4], 'own', 'PX', ARGV[10])
  local fp = redis.call('HGET', KEYS[1], 'fp')
  if fp then redis.call('ZREM', ARGV[12] .. 'sent:' .. conv, fp .. ':' .. ARGV[1]) end
end
archive(ARGV[12], KEYS[1], ARGV[1], KEYS[2], KEYS[3], ARGV[6], ARGV[7], ARGV[8], ARGV[9], KEYS[5], now)
return 1

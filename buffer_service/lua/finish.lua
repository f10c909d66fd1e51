-- End a batch for good (completed, or skipped with a reason): keep a compact job record, move
-- the burst and the reply into the conversation's history for later prompts, and let the
-- conversation's next burst go.
-- KEYS: 1 batch hash, 2 inflight, 3 active, 4 due, 5 msgs list, 6 history list,
--       7 seen marker of the posted reply (so its webhook echo is not recorded twice),
--       8 jobs:<state> (zset id -> finish time: the index operators list jobs by)
-- ARGV: 1 batch id, 2 token, 3 state, 4 reason, 5 reply message id, 6 reply history entry
--       ('' for none), 7 history cap, 8 history ttl ms, 9 record retention ms, 10 dedup ttl ms,
--       11 wake channel
-- Returns 1 when finished, 0 when the token no longer matches.
if not holds(KEYS[1], ARGV[2]) then return 0 end
local now = now_ms()
local conv = redis.call('HGET', KEYS[1], 'conv')

redis.call('HSET', KEYS[1], 'state', ARGV[3], 'reason', ARGV[4], 'reply_id', ARGV[5])
redis.call('HDEL', KEYS[1], 'reply')
if close_batch(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], conv, now) then
  redis.call('PUBLISH', ARGV[11], now)
end

-- The seen marker keeps the reply's webhook echo out of the history (it is added here, after
-- the burst it answers) and tells the webhook the message is the bot's own; it is set even
-- when no history is kept. Chatwoot's message id may be unknown (0): then there is no marker.
local add_reply = ARGV[6] ~= '' and
  (ARGV[5] == '0' or redis.call('SET', KEYS[7], '1', 'NX', 'PX', ARGV[10]))
local cap = tonumber(ARGV[7])
if cap > 0 then
  local msgs = redis.call('LRANGE', KEYS[5], 0, -1)
  if #msgs > 0 then redis.call('RPUSH', KEYS[6], unpack(msgs)) end
  if add_reply then redis.call('RPUSH', KEYS[6], ARGV[6]) end
  redis.call('LTRIM', KEYS[6], -cap, -1)
  redis.call('PEXPIRE', KEYS[6], ARGV[8])
end
redis.call('DEL', KEYS[5])
redis.call('PEXPIRE', KEYS[1], ARGV[9])
-- The index forgets what the records' own expiry forgets.
redis.call('ZADD', KEYS[8], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[8], '-inf', now - tonumber(ARGV[9]))
return 1

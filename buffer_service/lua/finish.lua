-- End a batch for good (completed, or skipped with a reason): keep a compact job record, move
-- the burst and the reply into the conversation's history for later prompts, and let the
-- conversation's next burst go.
-- KEYS: 1 batch hash, 2 inflight, 3 active, 4 due, 5 msgs list, 6 history list,
--       7 seen marker of the posted reply (so its webhook echo is not recorded twice)
-- ARGV: 1 batch id, 2 token, 3 state, 4 reason, 5 reply message id, 6 reply history entry
--       ('' for none), 7 history cap, 8 history ttl ms, 9 record retention ms, 10 dedup ttl ms,
--       11 wake channel
-- Returns 1 when finished, 0 when the token no longer matches.
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[2] then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local conv = redis.call('HGET', KEYS[1], 'conv')

redis.call('HSET', KEYS[1], 'state', ARGV[3], 'reason', ARGV[4], 'reply_id', ARGV[5],
  'token', '', 'finished_ms', now)
redis.call('HDEL', KEYS[1], 'reply')
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('HGET', KEYS[3], conv) == ARGV[1] then
  redis.call('HDEL', KEYS[3], conv)
end
if redis.call('HGET', KEYS[1], 'blocked') == '1' then
  redis.call('HDEL', KEYS[1], 'blocked')
  if redis.call('ZADD', KEYS[4], 'NX', now, conv) == 1 then
    redis.call('PUBLISH', ARGV[11], now)
  end
end

local cap = tonumber(ARGV[7])
if cap > 0 then
  local msgs = redis.call('LRANGE', KEYS[5], 0, -1)
  if #msgs > 0 then redis.call('RPUSH', KEYS[6], unpack(msgs)) end
  if ARGV[6] ~= '' and redis.call('SET', KEYS[7], '1', 'NX', 'PX', ARGV[10]) then
    redis.call('RPUSH', KEYS[6], ARGV[6])
  end
  redis.call('LTRIM', KEYS[6], -cap, -1)
  redis.call('PEXPIRE', KEYS[6], ARGV[8])
end
redis.call('DEL', KEYS[5])
redis.call('PEXPIRE', KEYS[1], ARGV[9])
return 1

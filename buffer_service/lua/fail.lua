-- A step of a batch failed. Below the attempt limit the batch waits for its retry time in the
-- inflight set (the claim script takes it again then); at the limit, or for an error that a
-- retry cannot fix, it becomes a failed job that keeps its messages and the error for an
-- operator. The conversation's next burst waits behind a retrying batch so replies stay in order.
-- KEYS: 1 batch hash, 2 inflight, 3 active, 4 due, 5 failed
-- ARGV: 1 batch id, 2 token, 3 error, 4 retry delay ms, 5 max attempts, 6 permanent (0|1),
--       7 wake channel
-- Returns 'retrying', 'failed', or '' when the token no longer matches.
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[2] then return '' end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts')) or 0
redis.call('HSET', KEYS[1], 'error', ARGV[3], 'token', '', 'error_ms', now)

if ARGV[6] == '0' and attempts < tonumber(ARGV[5]) then
  redis.call('HSET', KEYS[1], 'state', 'retrying')
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[1])
  return 'retrying'
end

local conv = redis.call('HGET', KEYS[1], 'conv')
redis.call('HSET', KEYS[1], 'state', 'failed', 'finished_ms', now)
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[5], now, ARGV[1])
if redis.call('HGET', KEYS[3], conv) == ARGV[1] then
  redis.call('HDEL', KEYS[3], conv)
end
if redis.call('HGET', KEYS[1], 'blocked') == '1' then
  redis.call('HDEL', KEYS[1], 'blocked')
  if redis.call('ZADD', KEYS[4], 'NX', now, conv) == 1 then
    redis.call('PUBLISH', ARGV[7], now)
  end
end
return 'failed'

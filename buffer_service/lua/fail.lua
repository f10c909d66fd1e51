-- A step of a batch failed. Below the attempt limit the batch waits for its retry time in the
-- inflight set (the claim script takes it again then); at the limit, or for an error that a
-- retry cannot fix, it becomes a failed job that keeps its messages, attempts and the error
-- for an operator (BufferStore.requeue). The conversation's next burst waits behind a
-- retrying batch so replies stay in order.
-- A failed post may have created the message all the same: the batch stays `unsure` (its next
-- attempt asks Chatwoot first, before_post.lua) unless the caller knows it did not (refused,
-- never sent).
-- KEYS: batch failed
-- ARGV: batch_id token error retry_ms max_attempts permanent wake not_posted prefix
-- permanent: 0|1; not_posted: 1 when the post certainly created nothing; prefix: the shard's
-- key prefix (keys.py).
-- Returns 'retrying', 'failed', or '' when the token no longer matches.
if not holds(KEYS[1], ARGV[2]) then return '' end
local now = now_ms()
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts')) or 0
redis.call('HSET', KEYS[1], 'error', ARGV[3], 'error_ms', now)
if ARGV[8] == '1' then redis.call('HDEL', KEYS[1], 'unsure') end

if ARGV[6] == '0' and attempts_spent(KEYS[1], attempts) < tonumber(ARGV[5]) then
  local retry_at = now + tonumber(ARGV[4])
  redis.call('HSET', KEYS[1], 'state', 'retrying', 'token', '', 'retry_ms', retry_at)
  redis.call('ZADD', ARGV[9] .. 'inflight', retry_at, ARGV[1])
  return 'retrying'
end

local conv = redis.call('HGET', KEYS[1], 'conv')
redis.call('HSET', KEYS[1], 'state', 'failed')
redis.call('ZADD', KEYS[2], now, ARGV[1])
if close_batch(ARGV[9], KEYS[1], ARGV[1], conv, now) then
  wake_up(ARGV[7], now, KEYS[1])
end
return 'failed'

-- Count one LLM call of a conversation against its hourly allowance, exactly: a log of the calls
-- of the last period (at most `limit` entries), so "N per hour" holds for every hour-long window,
-- which a token bucket would exceed by up to N.
-- KEYS: calls
-- ARGV: limit period_ms call_id
-- calls: the conversation's call log (zset call id -> time ms); call_id: batch id and attempt
-- (a repeated check of the same attempt is not counted twice).
-- Returns {1 allowed | 0 over the limit, ms until the oldest call leaves the window}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local period = tonumber(ARGV[2])

redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - period)
if redis.call('ZSCORE', KEYS[1], ARGV[3]) then return {1, 0} end
if redis.call('ZCARD', KEYS[1]) >= limit then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, tonumber(oldest[2]) + period - now}
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], period)
return {1, 0}

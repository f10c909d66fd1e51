-- An operator flushes one conversation now: its pending burst becomes due at once, marked so
-- that the claim counts it as a manual flush. It still goes through the claim and its lease,
-- so an operator's flush cannot answer a burst twice or overtake a batch in flight.
-- KEYS: due manual buffer
-- ARGV: conv wake
-- Returns the number of messages in the burst (0: nothing is pending).
local n = messages_in(KEYS[3])
if n == 0 then return 0 end
local now = now_ms()
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], '1')
wake_up(ARGV[2], now, KEYS[1])
return n

-- Record a step of a batch (the LLM's reply, the id of the posted message) before the next
-- step, fenced by the token, so that a retry after a crash repeats no side effect that is done.
-- KEYS: 1 batch hash   ARGV: 1 token, then field, value pairs
-- Returns 1 when recorded, 0 when the token no longer matches.
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1

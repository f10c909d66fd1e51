-- A worker that shuts down hands a batch back so that any worker takes it at once, instead of
-- after its lease lapses; the attempt does not count. A post in doubt (`posting` and `unsure`:
-- its POST was sent and not recorded) is not handed back: Chatwoot may have it, and the time
-- until the lease lapses lets the webhook echo that would say so arrive (note.lua) before the
-- next attempt has to ask Chatwoot (a retry still settling an older post asks anyway, and is
-- handed back). A reply in parts
-- between two parts (nothing unsure: part.lua) is handed back with its `parts_out`, and the
-- next worker resumes at the next part at once.
-- KEYS: batch inflight
-- ARGV: batch_id token wake
-- Returns 1 when released, 0 otherwise.
if not holds(KEYS[1], ARGV[2]) then return 0 end
local doubt = redis.call('HMGET', KEYS[1], 'state', 'unsure')
if doubt[1] == 'posting' and doubt[2] == '1' then return 0 end
local now = now_ms()
redis.call('HSET', KEYS[1], 'state', 'released', 'token', '', 'released_ms', now)
redis.call('HINCRBY', KEYS[1], 'attempts', -1)
redis.call('ZADD', KEYS[2], 'XX', now, ARGV[1])
wake_up(ARGV[3], now, KEYS[1])
return 1

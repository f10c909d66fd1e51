-- Remember who handles a conversation, as the latest webhook that showed it says: a human
-- (assignee, status outside the bot's statuses), nobody (WhatsApp's reply window closed), or
-- the bot (reason ''). Webhooks can arrive out of order, so Chatwoot's `updated_at` of the
-- conversation versions the record and an older view never overwrites a newer one.
-- (A buffered customer message clears the record too: append.lua.)
-- KEYS: 1 handoff:<conv> (hash reason, v)
-- ARGV: 1 reason ('' = the bot may answer), 2 version ('' when the payload had none), 3 ttl ms
-- Returns 1 when stored, 0 when ignored (older than what is known, or nothing to clear).
local v = tonumber(ARGV[2])
local known = tonumber(redis.call('HGET', KEYS[1], 'v'))
if v and known and known > v then return 0 end
-- "The bot may answer" is the default; store it only to outrank an older "human" view.
if ARGV[1] == '' and redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'reason', ARGV[1], 'v', v or 0)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1

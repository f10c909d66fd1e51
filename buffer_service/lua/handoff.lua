-- Remember who handles a conversation, as the latest webhook that showed it says: a human
-- (assignee, status outside the bot's statuses), nobody (WhatsApp's reply window closed), or
-- the bot (reason ''). Webhooks overtake each other, so Chatwoot's `updated_at` of the
-- conversation versions the record (lib.lua: take_charge); a buffered customer message counts
-- as a snapshot too (append.lua).
-- KEYS: handoff
-- ARGV: reason version ttl_ms pending
-- handoff: hash reason, v; reason '' = the bot may answer; version: 0 when the payload had
-- none, '' for the record's own (the bot's handoff before Chatwoot has versioned it, which a
-- tie keeps, handoff.py); pending: the snapshot shows the conversation `pending` (1|0).
-- Returns 1 when the record now says `reason`, 0 when a newer snapshot says otherwise.
local v = tonumber(ARGV[2]) or tonumber(redis.call('HGET', KEYS[1], 'v')) or 0
return take_charge(KEYS[1], ARGV[1], v, ARGV[3], ARGV[4] == '1') and 1 or 0

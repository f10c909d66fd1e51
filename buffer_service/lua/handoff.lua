-- Remember who handles a conversation, as the latest webhook that showed it says: a human
-- (assignee, status outside the bot's statuses), nobody (WhatsApp's reply window closed), or
-- the bot (reason ''). Webhooks overtake each other, so Chatwoot's `updated_at` of the
-- conversation versions the record (lib.lua: take_charge); a buffered customer message counts
-- as a snapshot too (append.lua).
-- KEYS: handoff
-- ARGV: reason version ttl_ms
-- handoff: hash reason, v; reason '' = the bot may answer; version 0 when the payload had none.
-- Returns 1 when the record now says `reason`, 0 when a newer snapshot says otherwise.
return take_charge(KEYS[1], ARGV[1], tonumber(ARGV[2]) or 0, ARGV[3]) and 1 or 0

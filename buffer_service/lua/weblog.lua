-- A log's entries gathered in one batch (journal.py: the webhook log, the sweep log), one XADD
-- each, in one call: redis-py would build, pack and parse a pipelined XADD per entry in Python.
-- KEYS: log
-- ARGV: maxlen entries
-- log: the capped stream (bs:log:webhooks, bs:log:sweeps); maxlen: its approximate cap (MAXLEN ~);
-- entries: a JSON array of entries, each the flat array of its fields and values, all strings
-- (a number would come back from cjson as a float: ids past 2^53 would change).
-- Returns the number of entries added.
local entries = cjson.decode(ARGV[2])
for _, fields in ipairs(entries) do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(fields))
end
return #entries

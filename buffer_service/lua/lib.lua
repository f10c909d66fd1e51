-- Helpers every script of the service starts with (scripts.py prepends this file), so that the
-- rules below exist once. Everything here is local: Redis forbids scripts to make globals.

-- Redis's clock, not the caller's: the replicas of the service may disagree about the time.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A Redis Cluster moving the shard's slot to another node (MIGRATING/IMPORTING) has part of its
-- keys on each node. Redis checks only a script's KEYS before running it, and then fails the
-- script where it stands on the first command that touches a key its node lacks, after the
-- writes before it (they are not undone): a key built while the script runs, or one it created.
-- Asking for two keys that never exist makes either node refuse the script here, before any
-- write (the caller gets an error, like TRYAGAIN, and tries again later); a slot that is not
-- moving, or one server, answers 0. scripts.py calls it first in every script given `prefix`.
local function whole_slot(P)
  redis.call('EXISTS', P .. 'moving:0', P .. 'moving:1')
end

-- Fencing: only the holder of the current token may change a batch. A closed batch has the
-- token '', which no caller holds.
local function holds(bkey, token)
  return token ~= '' and redis.call('HGET', bkey, 'token') == token
end

-- Why the bot must stay out of a conversation now, or nil: a human handles it (assignee,
-- status), WhatsApp's reply window is closed, or a human agent wrote in it a moment ago.
local function takeover_reason(handoff_key, pause_key)
  local reason = redis.call('HGET', handoff_key, 'reason')
  if reason and reason ~= '' then return reason end
  if redis.call('EXISTS', pause_key) == 1 then return 'human_agent_replied' end
  return nil
end

-- What identifies our reply when Chatwoot echoes it back: the start of its text without
-- whitespace or backslashes, because the webhook normalises line breaks and a long text may
-- come back truncated.
local function fingerprint(text)
  local bare = string.gsub(text, '[%s\\]', '')
  return redis.sha1hex(string.sub(bare, 1, 64))
end

-- Hourly counters for the monitoring figures (ops.py): add field, amount pairs to the shard's
-- hash of the current hour, kept a week beyond the 24 hours the figures cover.
local function count(prefix, now, ...)
  local key = prefix .. 'stats:' .. math.floor(now / 3600000)
  local args = {...}
  for i = 1, #args, 2 do
    redis.call('HINCRBY', key, args[i], args[i + 1])
  end
  redis.call('PEXPIRE', key, 8 * 86400000)
end

-- GCRA admission against a limit shared by every replica: a burst of up to `limit` events
-- passes at once, then one event per period/limit. The stored value is the "theoretical arrival
-- time" (when the bucket would be empty again): one number per key, so a flood costs no more
-- memory than a trickle. Returns 0 when admitted, else the ms until an event would be again.
local function gcra(key, limit, period, now)
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then tat = now end
  local next_tat = tat + period / limit
  if next_tat - now > period then
    return math.max(1, math.ceil(next_tat - period - now))
  end
  redis.call('SET', key, string.format('%.3f', next_tat), 'PX', math.ceil(next_tat - now))
  return 0
end

-- Set a burst's sliding TTL key to expire in `ms` (its expiry event is the wake-up hint). Its
-- value is never read: a small integer is one of Redis's shared objects, so the key holds no
-- value of its own (~35 B less per open conversation than '').
local function slide(key, ms)
  redis.call('SET', key, 1, 'PX', math.max(1, ms))
end

-- Tell the workers of a time worth waking up for (a deadline they cannot know yet, or work
-- handed back) and of its shard: `key` is any key of the shard (or its prefix), whose hash tag
-- names it (keys.py shard_of_key), so that a worker claims from that shard alone. Versions
-- before sent the time alone, which makes a worker look at every shard.
local function wake_up(channel, ms, key)
  redis.call('PUBLISH', channel, ms .. ' ' .. key)
end

-- Buffer entries come in two formats (BUFFER_FORMAT, config.py), and every reader takes both:
-- * json (versions before compact buffers): one JSON object per message,
--   {"id", "text", "att", "inbox", "name", "ph", "typed"}, with its arrival time "t" (Redis ms)
--   appended last; the first message's time is in the shard's `first` hash.
-- * compact: a head element, then one JSON array per message. The head is what the burst's
--   messages share: "<first message ms>" followed by the JSON array [inbox, name, phone] of the
--   newest message, trailing empty values cut ("1764000000000[1]"); it is the only element that
--   starts with a digit. A message is [id, text, typed, t, attachments], trailing empty ones cut
--   (typed 0: as `text`; t: arrival ms, only for a message past the size cap, whose arrival
--   starts the next burst; attachments as ChatMessage.to_entry writes them, always last).
-- A buffer is in one format: a compact writer appends to a non-empty json buffer in json.

-- The index of the quote that closes the JSON string opening at i.
local function string_end(s, i)
  local j = i + 1
  while true do
    local q = string.find(s, '"', j, true)
    local k, escaped = q - 1, false
    while string.byte(s, k) == 92 do
      escaped = not escaped
      k = k - 1
    end
    if not escaped then return q end
    j = q + 1
  end
end

-- A compact message's elements as JSON text: {id, text, typed, t, attachments}, as many as it
-- has. Attachments are last, so their array runs to the entry's closing bracket.
local function parts(entry)
  local id = string.match(entry, '^%[(%d+),"')
  local q = string_end(entry, #id + 3)
  local out = {id, string.sub(entry, #id + 3, q)}
  local pos = q + 1
  while string.sub(entry, pos, pos) == ',' do
    local c = string.sub(entry, pos + 1, pos + 1)
    local stop
    if c == '"' then
      stop = string_end(entry, pos + 1)
    elseif c == '[' then
      stop = #entry - 1
    else
      stop = pos + #string.match(entry, '^%d+', pos + 1)
    end
    out[#out + 1] = string.sub(entry, pos + 1, stop)
    pos = stop + 1
  end
  return out
end

local function is_head(entry)
  local b = entry and string.byte(entry, 1)
  return b ~= nil and b >= 48 and b <= 57
end

-- The compact head of a buffer (or a batch's messages), or nil for a json one.
local function head_of(key)
  local h = redis.call('LINDEX', key, 0)
  if is_head(h) then return h end
  return nil
end

-- How many messages a buffer holds (its head is none).
local function messages_in(key)
  local n = redis.call('LLEN', key)
  if n > 0 and head_of(key) then return n - 1 end
  return n
end

-- The first message ms of a head, and the head with another first message ms.
local function head_first(h)
  return tonumber(string.match(h, '^%d+'))
end

local function head_at(h, first)
  return first .. string.sub(h, #string.match(h, '^%d+') + 1)
end

-- The inbox that a burst's messages name (the newest that does): the head's, else the last
-- json message's; nil when none does.
local function inbox_of(key)
  local h = head_of(key)
  if h then
    local tail = string.sub(h, #string.match(h, '^%d+') + 1)
    local ok, shared = pcall(cjson.decode, tail)
    return ok and type(shared) == 'table' and tonumber(shared[1]) or nil
  end
  local ok, last = pcall(cjson.decode, redis.call('LINDEX', key, -1) or '')
  return ok and type(last) == 'table' and tonumber(last.inbox) or nil
end

-- A message with its arrival time (json: "t" appended; compact: its 4th element), so that a
-- burst split by the size cap keeps its real age; the history has no use for it.
local function stamped(entry, now)
  if string.sub(entry, 1, 1) == '{' then
    return string.sub(entry, 1, -2) .. ',"t":' .. now .. '}'
  end
  local p = parts(entry)
  p[3] = p[3] or '0'
  p[4] = tostring(now)
  return '[' .. table.concat(p, ',') .. ']'
end

-- The arrival time a message was stamped with, or nil.
local function stamp_of(entry)
  if not entry or is_head(entry) then return nil end
  if string.sub(entry, 1, 1) == '{' then
    local ok, m = pcall(cjson.decode, entry)
    return ok and type(m) == 'table' and tonumber(m.t) or nil
  end
  local t = tonumber(parts(entry)[4])
  if t and t > 0 then return t end
  return nil
end

-- A message as the history keeps it, 7 days: a compact buffer's message as a compact history
-- entry, "<id>:<text>" ("a" in front for the assistant's: ChatMessage.to_history, which also
-- writes the reply's and noted messages' entries of a compact writer; json with attachments),
-- a json one as json, which every version reads (BUFFER_FORMAT=json keeps to it): the
-- id, text, attachments and role that prompts, handoff notes and transcripts read there, not
-- the inbox, contact name, phone and typed text that only the burst itself is read for
-- (claim.lua, processor.py, presence.py, handoff.py). ChatMessage.to_json writes those after
-- id, text and attachments, in that order, and the arrival time comes last; a key with a quote
-- before it cannot be inside a JSON string, and the attachments' own keys are other ones.
-- Entries of any earlier version pass through unchanged.
local function for_history(json)
  local c = string.sub(json, 1, 1)
  if c == '[' then
    local p = parts(json)
    if p[5] then return '{"id":' .. p[1] .. ',"text":' .. p[2] .. ',"att":' .. p[5] .. '}' end
    return p[1] .. ':' .. cjson.decode(p[2])
  elseif c ~= '{' then
    return json
  end
  json = string.gsub(json, ',"t":%d+}$', '}')
  local cut
  for _, key in ipairs({',"inbox":', ',"name":', ',"ph":', ',"typed":'}) do
    local at = string.find(json, key, 1, true)
    if at and (not cut or at < cut) then cut = at end
  end
  return cut and string.sub(json, 1, cut - 1) .. '}' or json
end

-- Keep one message in the conversation's history (prompt context), capped and expiring.
local function remember(hist, entry, cap, ttl)
  if tonumber(cap) > 0 then
    redis.call('RPUSH', hist, for_history(entry))
    redis.call('LTRIM', hist, -tonumber(cap), -1)
    redis.call('PEXPIRE', hist, ttl)
  end
end

-- Forget the buckets of compact records (below) that Redis expired: a bucket lives `retention`
-- ms after its last write, its zset entry and count must go with it, or the figures keep
-- counting records that are gone. Run by each completion (compact) and by `cleanup` for the
-- shards where nothing completed lately (trimdone.lua). `jobs`: the index of whole completed
-- records that a previous version wrote, trimmed too until it is empty.
-- Returns how many records the forgotten buckets and index entries held.
local function forget_done(done, counts, jobs, now, retention)
  local forgotten = redis.call('ZREMRANGEBYSCORE', jobs, '-inf', now - retention)
  while true do
    local gone = redis.call('ZRANGEBYSCORE', done, '-inf', now - retention, 'LIMIT', 0, 1000)
    if #gone == 0 then return forgotten end
    for _, n in ipairs(redis.call('HMGET', counts, unpack(gone))) do
      forgotten = forgotten + (tonumber(n) or 0)
    end
    redis.call('ZREM', done, unpack(gone))
    redis.call('HDEL', counts, unpack(gone))
  end
end

-- A completed job's record, kept JOB_RETENTION_DAYS, is most of what stays in Redis after a
-- burst: so it is one JSON array in a hash of 256 batch sequence numbers, `done:<seq // 256>`
-- (small enough for Redis's compact listpack encoding: no key, expiry or index entry of its
-- own), and the shard's zset `done` lists the buckets by their last write, for listing and
-- trimming, and its hash `donecount` counts their records (what ops.py counts reads: one reply
-- per shard, not one per bucket). Times are ms after the first message; store.py `record` reads
-- it back:
--   [conv, inbox, count, trigger, attempts, first_ms, deadline, claimed, posting, finished,
--    requeued, reply_id, parts_out, reason, media]   (-1: no such time; parts_out: the
--    messages a split reply went out as, 0 for one)
-- The burst and the reply are not repeated: the conversation's history holds them.
local function compact(P, bkey, id, retention, now)
  local h = redis.call('HMGET', bkey, 'conv', 'inbox', 'count', 'trigger', 'attempts', 'first_ms',
    'deadline_ms', 'claimed_ms', 'posting_ms', 'finished_ms', 'requeued_ms', 'reply_id', 'parts_out',
    'reason', 'media')
  local first = tonumber(h[6]) or now
  local function after(v) return v and tonumber(v) and tonumber(v) - first or -1 end
  local rec = cjson.encode({h[1] or '', tonumber(h[2]) or 0, tonumber(h[3]) or 0, h[4] or '',
    tonumber(h[5]) or 0, first, after(h[7]), after(h[8]), after(h[9]), after(h[10]), after(h[11]),
    tonumber(h[12]) or 0, tonumber(h[13]) or 0, h[14] or '', h[15] or ''})
  local seq = tonumber(string.match(id, '%-(%d+)$'))
  local bucket = math.floor(seq / 256)
  local key = P .. 'done:' .. bucket
  local counts = P .. 'donecount'
  redis.call('HINCRBY', counts, bucket, redis.call('HSET', key, seq, rec))
  redis.call('PEXPIRE', key, retention)
  redis.call('ZADD', P .. 'done', now, bucket)
  forget_done(P .. 'done', counts, P .. 'jobs:completed', now, retention)
  redis.call('DEL', bkey)
end

-- The history entry of a whole reply (`text`, as it was posted: all its parts) from the entry
-- of its last part's echo, which names the message, in the format store.py wrote it in
-- (ChatMessage.to_history: compact "a<id>:<text>"; to_json: {"id":…,"text":…,
-- "role":"assistant"}); an entry of another shape is kept as it is.
local function reply_entry(entry, text)
  local mark = string.match(entry, '^a%d+:')
  if mark then return mark .. text end
  local id = string.match(entry, '^{"id":(%d+),"text":')
  if not id then return entry end
  return '{"id":' .. id .. ',"text":' .. cjson.encode(text) .. ',"role":"assistant"}'
end

-- The message id a history entry names, and whether it is a customer's: compact "<id>:<text>"
-- (a customer's) or "a<id>:<text>" (the assistant's), json {"id":<id>,…} (a customer's without
-- a role; a quote inside a json entry's text is escaped, so '"role":"' is the key). nil for
-- any other shape.
local function history_id(entry)
  local a, id = string.match(entry, '^(a?)(%d+):')
  if id then return tonumber(id), a == '' end
  id = string.match(entry, '^{"id":(%d+)[,}]')
  if id then return tonumber(id), not string.find(entry, '"role":"', 1, true) end
  return nil, false
end

-- The message id of a customer's history entry, or nil for the assistant's, an agent's (json
-- with "role") and any other shape.
local function customer_id(entry)
  local id, customer = history_id(entry)
  return customer and id or nil
end

-- Add a finished burst's entries (its messages, then its reply) to the history where they
-- belong: before the first customer message newer than the burst's newest (`newest`, nil: at
-- the end). That is the end, but for a batch finished late (completed by its echo, or
-- re-queued after it failed) while newer bursts were answered: appended, its old question and
-- answer would read as the latest exchange. Chatwoot numbers all its messages in one
-- sequence, so ids order them; replies and agents' messages are not compared (a reply's id is
-- newer than the next burst's messages whenever the customer wrote before it was posted, and
-- the exchange must still read question, answer). So only the customer's entries count, and
-- the list is read whole only when the last of them is newer than the burst: the end of the
-- list is looked at first (a burst archived in order ends it: its messages, then its reply,
-- whatever that reply's id, 0 when Chatwoot did not give one), the whole list when no
-- customer entry is among its last TAIL.
local TAIL = 8
local function add_in_order(hist, entries, newest)
  local later = {}
  local must_read = false
  if newest then
    local tail = redis.call('LRANGE', hist, -TAIL, -1)
    must_read = #tail == TAIL
    for i = #tail, 1, -1 do
      local id = customer_id(tail[i])
      if id then must_read = id > newest break end
    end
  end
  if must_read then
    local all = redis.call('LRANGE', hist, 0, -1)
    local at
    for i, e in ipairs(all) do
      if (customer_id(e) or 0) > newest then at = i break end
    end
    if at then
      for i = at, #all do later[#later + 1] = all[i] end
      if at > 1 then redis.call('LTRIM', hist, 0, at - 2) else redis.call('DEL', hist) end
    end
  end
  for _, e in ipairs(entries) do redis.call('RPUSH', hist, e) end
  for _, e in ipairs(later) do redis.call('RPUSH', hist, e) end
end

-- A finished batch's burst, and its reply (`entry`, '' for none), go to the conversation's
-- history for later prompts, in order (add_in_order). A completed batch's record shrinks to
-- what operators read in `jobs` (compact, below); any other keeps its whole record for
-- `retention` ms, listed in the `jobs` index of its state, which forgets what the records' own
-- expiry forgets. (finish.lua; note.lua for a failed batch that its reply's echo completes.)
-- P: the shard's key prefix.
local function archive(P, bkey, id, msgs, hist, entry, cap, hist_ttl, retention, jobs, now)
  cap = tonumber(cap)
  if cap > 0 then
    local entries, newest = {}, nil
    for _, m in ipairs(redis.call('LRANGE', msgs, 0, -1)) do
      if not is_head(m) then
        local e = for_history(m)
        entries[#entries + 1] = e
        local n = customer_id(e)
        if n and (not newest or n > newest) then newest = n end
      end
    end
    if entry ~= '' then entries[#entries + 1] = entry end
    add_in_order(hist, entries, newest)
    redis.call('LTRIM', hist, -cap, -1)
    redis.call('PEXPIRE', hist, hist_ttl)
  end
  redis.call('DEL', msgs)
  retention = tonumber(retention)
  if redis.call('HGET', bkey, 'state') == 'completed' then
    compact(P, bkey, id, retention, now)
  else
    redis.call('PEXPIRE', bkey, retention)
    redis.call('ZADD', jobs, now, id)
    redis.call('ZREMRANGEBYSCORE', jobs, '-inf', now - retention)
  end
end

-- The attempts a batch used up against MAX_ATTEMPTS: those since its last attempt that got a
-- part of its reply out (part.lua), all of them for a batch that got none out; but not the
-- latest one when its own post is in doubt (`unsure`, posted by attempt `posting_attempt`: a
-- timeout, a lost connection, a 5xx, a worker gone while posting). Whether that attempt failed
-- is known only once the next one asked Chatwoot (before_post.lua): counted at once, a slow
-- Chatwoot that created the message behind a timeout on the last attempt left a `failed` job
-- whose reply the customer has. The next attempt counts whatever it does (asking in vain too),
-- so a batch gets at most one attempt more than MAX_ATTEMPTS, and that one asks Chatwoot
-- before it posts anything.
local function attempts_spent(bkey, attempts)
  local b = redis.call('HMGET', bkey, 'progress_attempt', 'unsure', 'posting_attempt')
  local spent = attempts - (tonumber(b[1]) or 0)
  if b[2] == '1' and tonumber(b[3]) == attempts then spent = spent - 1 end
  return spent
end

-- Who is in charge of a conversation, versioned by Chatwoot's `updated_at` of the snapshot
-- that said so, because webhooks overtake each other. A newer snapshot wins; on a tie the
-- human view wins, so an ambiguous order never makes the bot talk over a person. A snapshot
-- without a version counts as 0, older than any versioned one.
-- The bot's own handoff ('handoff:...') is given back only by a newer snapshot that shows the
-- conversation `pending` (`back`: an agent returned it to the bot): the customer's next message
-- comes with a newer snapshot too, still `open` with nobody assigned yet, which must not wake
-- the bot in the conversation it just handed to a person.
-- Returns true when `reason` ('' = the bot) is now the record.
local function take_charge(key, reason, v, ttl, back)
  local rec = redis.call('HMGET', key, 'reason', 'v')
  local known = tonumber(rec[2])
  if known then
    if v < known or (v == known and (reason == '' or rec[1] == reason)) then
      return rec[1] == reason
    end
    if reason == '' and not back and string.sub(rec[1] or '', 1, 8) == 'handoff:' then
      return false
    end
  elseif reason == '' and v == 0 then
    -- No record already says this (the bot, as of no version): no key for every conversation.
    return true
  end
  redis.call('HSET', key, 'reason', reason, 'v', v)
  redis.call('PEXPIRE', key, ttl)
  return true
end

-- Fingerprints of the replies the bot posted whose echo has not come, so that the echo is
-- recognised as ours: a zset `sent:<conv>` of "<fingerprint>:<batch id>" scored by post time.
-- Each entry lives on its own (at most `keep` entries, none older than `age` ms) and goes when
-- its echo comes or its batch records Chatwoot's message id (finish.lua), so a human agent's
-- message that happens to start like an old bot reply is not taken for the bot's.
local function own_add(key, fp, id, now, age, keep)
  redis.call('ZADD', key, now, fp .. ':' .. id)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - age)
  redis.call('ZREMRANGEBYRANK', key, 0, -(keep + 1))
  redis.call('PEXPIRE', key, age)
end

-- The batch id of a remembered fingerprint, the newest when replies had the same text (and
-- forgets it: an echo comes once), or nil.
local function own_take(key, fp)
  local prefix = fp .. ':'
  for _, member in ipairs(redis.call('ZRANGE', key, 0, -1, 'REV')) do
    if string.sub(member, 1, #prefix) == prefix then
      redis.call('ZREM', key, member)
      return string.sub(member, #prefix + 1)
    end
  end
  return nil
end

-- Count a batch's outcome (its state) in the hour's figures: a completed one with its
-- first-message-to-reply time. (close_batch; note.lua for a failed batch its echo completes.)
local function count_outcome(P, bkey, now)
  local state = redis.call('HGET', bkey, 'state')
  if state == 'completed' then
    local first = tonumber(redis.call('HGET', bkey, 'first_ms')) or now
    count(P, now, state, 1, 'reply_ms', now - first)
  else
    count(P, now, state, 1)
  end
end

-- A batch leaves the pipeline for good or for now (done, skipped, superseded, failed): nobody
-- holds it, and the conversation's next batch may go. That is a batch an operator re-queued
-- while this one ran (`next`, in the order they were re-queued: requeue.lua), else the burst
-- parked while this batch ran, due at once. P is the shard's key prefix.
-- Returns true when something was made due (worth a wake-up).
local function close_batch(P, bkey, id, conv, now)
  redis.call('HSET', bkey, 'token', '', 'finished_ms', now)
  -- Every way out passes here, so the hourly count of outcomes is kept here (its state is set).
  count_outcome(P, bkey, now)
  local inflight, active = P .. 'inflight', P .. 'active'
  redis.call('ZREM', inflight, id)
  local parked = redis.call('HGET', bkey, 'blocked') == '1'
  local queue = redis.call('HGET', bkey, 'next')
  redis.call('HDEL', bkey, 'blocked', 'next')
  if redis.call('HGET', active, conv) ~= id then
    return false
  end
  if queue and queue ~= '' then
    local nid, rest = string.match(queue, '^(%S+)%s*(.*)$')
    local nkey = P .. 'batch:' .. nid
    redis.call('HSET', active, conv, nid)
    redis.call('ZADD', inflight, now, nid)
    if rest ~= '' then redis.call('HSET', nkey, 'next', rest) end
    if parked then redis.call('HSET', nkey, 'blocked', '1') end
    return true
  end
  redis.call('HDEL', active, conv)
  if parked then
    return redis.call('ZADD', P .. 'due', 'NX', now, conv) == 1
  end
  return false
end

-- Put a failed batch back in the pipeline: its attempts start again (MAX_ATTEMPTS counts from
-- here, also for a reply whose parts made progress: attempts_spent) and any worker takes it at
-- once, or, while another batch of the conversation runs, right after that one and before any
-- burst that arrived meanwhile: it holds older messages, and replies go out in order
-- (close_batch hands the conversation to it). An operator's retry (requeue.lua), or the echo
-- that confirmed a handoff's message, whose other steps are left (note.lua).
local function requeue(P, bkey, id, now, wake)
  local conv = redis.call('HGET', bkey, 'conv')
  redis.call('HSET', bkey, 'state', 'queued', 'attempts', 0, 'progress_attempt', 0,
    'requeued_ms', now)
  -- Numbered from 0 again: an old attempt's post in doubt must not spare a new attempt.
  redis.call('HDEL', bkey, 'posting_attempt')
  redis.call('PERSIST', bkey)
  redis.call('ZREM', P .. 'failed', id)
  local active = P .. 'active'
  local holder = redis.call('HGET', active, conv)
  if holder and holder ~= id then
    local hkey = P .. 'batch:' .. holder
    local queue = redis.call('HGET', hkey, 'next')
    redis.call('HSET', hkey, 'next', queue and (queue .. ' ' .. id) or id)
    return
  end
  redis.call('HSET', active, conv, id)
  redis.call('ZADD', P .. 'inflight', now, id)
  wake_up(wake, now, P)
end

-- The fenced step right before a reply is posted: decide, atomically, whether it may go out.
-- * 'lost': another worker holds the batch now.
-- * 'posted': Chatwoot's echo showed an earlier attempt's post went through; only finish.
-- * 'confirm': an earlier attempt may have posted the reply (it timed out, the connection
--   dropped, Chatwoot answered 5xx, or the worker died while posting). The caller must find
--   out from Chatwoot whether the message exists, and calls again with `absent` = 1 only when
--   it does not. Such a reply is never superseded: it may be in front of the customer already.
-- * 'skip': a human handles the conversation, or WhatsApp's reply window is closed. Also between
--   the parts of a reply (and on the retry of a reply half out): the bot never talks over a
--   person, and the rest of the reply is dropped (the caller archives the parts already out).
-- * 'superseded': the customer wrote again while the reply was being written, so the reply is
--   stale. The burst goes back to the front of the conversation's buffer, keeping its first
--   message time (the age cap still holds), and is answered with the new messages in the next
--   flush. Not when old and new together would not fit in one burst, or once the burst is
--   MAX_BUFFER_AGE_MS old: then this reply goes out and the new messages make the next burst.
-- * 'post': the reply is stored with the batch (a retry posts it without asking the LLM
--   again) and marked unsure until the post's outcome is known, the fingerprint of the part
--   about to go (the whole reply when it is not split; part.lua records each part that is out)
--   and the attempt that posts it (lib.lua attempts_spent) are remembered so that its webhook
--   echo is recognised as ours, and the lease is renewed for the post. The first time, the
--   split (`parts`) is stored with the reply: every retry posts the same parts, whatever its
--   own REPLY_SPLIT / REPLY_MAX_PARTS, so `parts_out` indexes the same list. Once a part is out, the rest of the reply is no longer superseded (the customer
--   has its beginning); a takeover still stops it (see 'skip').
-- KEYS: batch due first buffer ttl messages pause handoff sent
-- ARGV: batch_id token reply supersede max_age_ms max_size lease_ms own_memory_ms own_kept
--       retention_ms wake absent prefix part parts
-- batch: the batch hash; messages: msgs:<id>; supersede: 0|1; own_memory_ms, own_kept: how
-- long and how many posted replies are remembered for their echo; retention_ms: of the job
-- record; absent: 1 when the caller made sure Chatwoot has no such message; prefix: the shard's
-- key prefix (keys.py); part: the part to post now; parts: the reply's parts, a JSON list.
-- Returns {verdict, detail}: the posted message id for 'posted', the reason for 'skip', the
-- number of messages now waiting for 'superseded'.
if not holds(KEYS[1], ARGV[2]) then return {'lost', ''} end
local now = now_ms()
local P = ARGV[13]
local posted = redis.call('HGET', KEYS[1], 'posted_id')
if posted then return {'posted', posted} end
if redis.call('HGET', KEYS[1], 'unsure') == '1' then
  if ARGV[12] ~= '1' then return {'confirm', ''} end
  redis.call('HDEL', KEYS[1], 'unsure')
end
local reason = takeover_reason(KEYS[8], KEYS[7])
if reason then return {'skip', reason} end
-- Once a part is out, the rest follows (see 'post' above).
if (tonumber(redis.call('HGET', KEYS[1], 'parts_out')) or 0) == 0 then
  local conv = redis.call('HGET', KEYS[1], 'conv')
  local first = tonumber(redis.call('HGET', KEYS[1], 'first_ms')) or now
  local max_age = tonumber(ARGV[5])
  local waiting = messages_in(KEYS[4])
  local n = waiting + messages_in(KEYS[6])
  if ARGV[4] == '1' and waiting > 0 and now - first < max_age and n <= tonumber(ARGV[6]) then
    -- One head for the joined burst (lib.lua: buffer formats): the held burst's first message
    -- time, the newest message's inbox and contact.
    local newer = head_of(KEYS[4])
    if newer then redis.call('LPOP', KEYS[4]) end
    for _ = 1, redis.call('LLEN', KEYS[6]) do
      redis.call('LMOVE', KEYS[6], KEYS[4], 'RIGHT', 'LEFT')
    end
    local older = head_of(KEYS[4])
    if newer and older then
      redis.call('LSET', KEYS[4], 0, head_at(newer, first))
    elseif newer then
      redis.call('LPUSH', KEYS[4], head_at(newer, first))
    elseif not older then
      redis.call('HSET', KEYS[3], conv, first)
    end
    -- Due when the new messages' window ends, but never past the age cap of the first message.
    -- No due entry: the claim parked the conversation behind this batch, so it is due now.
    local deadline = tonumber(redis.call('ZSCORE', KEYS[2], conv)) or now
    if deadline > first + max_age then deadline = first + max_age end
    if n >= tonumber(ARGV[6]) or deadline < now then deadline = now end
    redis.call('ZADD', KEYS[2], deadline, conv)
    slide(KEYS[5], deadline - now)
    redis.call('HSET', KEYS[1], 'state', 'superseded', 'reason', 'new_messages')
    redis.call('HDEL', KEYS[1], 'reply', 'parts')
    close_batch(P, KEYS[1], ARGV[1], conv, now)
    redis.call('PEXPIRE', KEYS[1], ARGV[10])
    wake_up(ARGV[11], deadline, KEYS[2])
    return {'superseded', n}
  end
end

local fp = fingerprint(ARGV[14])
redis.call('HSET', KEYS[1], 'state', 'posting', 'reply', ARGV[3], 'fp', fp, 'posting_ms', now,
  'unsure', '1', 'posting_attempt', redis.call('HGET', KEYS[1], 'attempts') or 0)
redis.call('HSETNX', KEYS[1], 'parts', ARGV[15])
own_add(KEYS[9], fp, ARGV[1], now, tonumber(ARGV[8]), tonumber(ARGV[9]))
redis.call('ZADD', P .. 'inflight', 'XX', now + tonumber(ARGV[7]), ARGV[1])
return {'post', ''}

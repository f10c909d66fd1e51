-- Claim work of one shard: batches whose lease lapsed or whose retry is due, then due
-- conversations. Claiming moves a conversation's messages into a batch held under a lease
-- with a fencing token, in one step, so a message appended a moment later starts the next
-- burst instead of being lost between a read and a delete.
-- KEYS: due first inflight active seq failed
-- ARGV: prefix shard limit lease_ms window_ms max_size max_age_ms max_attempts inboxes
-- inflight: zset batch id -> lease expiry or retry time; active: hash conv -> batch id (at most
-- one batch per conversation); prefix: this shard's key prefix ("bs:{s3}:", keys.py);
-- inboxes: those with a window, size or age of their own (INBOX_SETTINGS_FILE), JSON
-- {"<inbox id>": [window, size, age]} or ''.
-- Returns {now, next wake ms or -1, batch...}; a batch is
--   {id, token, attempts, conv, first ms, deadline ms, trigger, claimed ms, reply, {messages},
--    takeover reason or ''}; the messages as the buffer holds them, a compact head included
--   (lib.lua: buffer formats; store.py decodes them).
-- The takeover reason (a human handles the conversation) lets the worker drop the batch as
-- skipped before it pays for an LLM call.
local now = now_ms()
local P = ARGV[1]
local limit = tonumber(ARGV[3])
local lease = tonumber(ARGV[4])
local window = tonumber(ARGV[5])
local max_size = tonumber(ARGV[6])
local max_age = tonumber(ARGV[7])
local max_attempts = tonumber(ARGV[8])
local inboxes = ARGV[9] ~= '' and cjson.decode(ARGV[9]) or nil
local out = {now, -1}

-- A burst's window, size and age: its inbox's (the newest message's, as in the job record),
-- else the service's.
local function limits_of(buf)
  local own = inboxes and inbox_of(buf)
  own = own and inboxes[tostring(own)]
  if own then return own[1], own[2], own[3] end
  return window, max_size, max_age
end

local function reason_for(conv)
  return takeover_reason(P .. 'handoff:' .. conv, P .. 'pause:' .. conv) or ''
end

local taken = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, limit)) do
  local bkey = P .. 'batch:' .. id
  local b = redis.call('HMGET', bkey, 'conv', 'attempts', 'first_ms', 'deadline_ms', 'trigger', 'reply',
    'state', 'posted_id')
  local conv = b[1]
  if not conv then
    redis.call('ZREM', KEYS[3], id)
  else
    local holder = redis.call('HGET', KEYS[4], conv)
    local attempts = tonumber(b[2]) or 0
    -- Still 'processing' or 'posting' at its time: the worker stopped without a word (killed,
    -- machine gone, Redis unreachable). 'retrying', 'released', 'queued' were handed back.
    if b[7] == 'processing' or b[7] == 'posting' then
      redis.call('HSET', bkey, 'error', 'lease expired while ' .. b[7] .. ' (attempt ' .. attempts .. ')')
    end
    -- A batch whose post Chatwoot already confirmed (posted_id, from the webhook echo) only
    -- needs finishing, so it is taken whatever its attempt count.
    if holder and holder ~= id then
      -- Not its turn: another batch of the conversation runs (requeue.lua queues a batch
      -- behind the holder instead; this only guards the one-batch-per-conversation rule).
      redis.call('ZADD', KEYS[3], now + 1000, id)
    elseif attempts_spent(bkey, attempts) >= max_attempts and not b[8] then
      redis.call('HSET', bkey, 'state', 'failed')
      redis.call('ZADD', KEYS[6], now, id)
      close_batch(P, bkey, id, conv, now)
    else
      local token = redis.call('INCR', KEYS[5])
      redis.call('HSET', bkey, 'state', 'processing', 'token', token, 'attempts', attempts + 1,
        'claimed_ms', now)
      redis.call('HSET', KEYS[4], conv, id)
      redis.call('ZADD', KEYS[3], now + lease, id)
      taken = taken + 1
      out[#out + 1] = {id, token, attempts + 1, conv, b[3], b[4], b[5], now, b[6] or '',
        redis.call('LRANGE', P .. 'msgs:' .. id, 0, -1), reason_for(conv)}
    end
  end
end

if taken < limit then
  local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', 0, limit - taken)
  for i = 1, #due, 2 do
    local conv = due[i]
    local deadline = tonumber(due[i + 1])
    local holder = redis.call('HGET', KEYS[4], conv)
    local buf = P .. 'buf:' .. conv
    local head = head_of(buf)
    local n = messages_in(buf)
    if holder then
      redis.call('ZREM', KEYS[1], conv)
      redis.call('HSET', P .. 'batch:' .. holder, 'blocked', '1')
    elseif n == 0 then
      redis.call('ZREM', KEYS[1], conv)
      redis.call('HDEL', KEYS[2], conv)
    else
      local window, max_size, max_age = limits_of(buf)
      local seq = redis.call('INCR', KEYS[5])
      local id = ARGV[2] .. '-' .. seq
      local token = redis.call('INCR', KEYS[5])
      local first = head and head_first(head) or tonumber(redis.call('HGET', KEYS[2], conv)) or now
      local msgs = P .. 'msgs:' .. id
      local trigger = 'deadline'
      if n >= max_size then
        trigger = 'size'
      elseif deadline >= first + max_age then
        trigger = 'age'
      end
      -- Made due by an operator (ops.py: flush.lua), or by the unbuffered path (flags.py: a
      -- window of 0 puts the deadline on the first message).
      local manual = redis.call('HDEL', P .. 'manual', conv) == 1
      if trigger == 'deadline' and manual then
        trigger = 'manual'
      elseif trigger == 'deadline' and deadline <= first then
        trigger = 'immediate'
      end
      if n <= max_size then
        redis.call('RENAME', buf, msgs)
        redis.call('HDEL', KEYS[2], conv)
        redis.call('ZREM', KEYS[1], conv)
        redis.call('DEL', P .. 'ttl:' .. conv)
      else
        -- More than one burst's worth: the first max_size messages go now, the rest are the
        -- next burst and get a window of their own. A compact burst keeps its head.
        local skip = head and 1 or 0
        redis.call('RPUSH', msgs, unpack(redis.call('LRANGE', buf, 0, max_size - 1 + skip)))
        redis.call('LTRIM', buf, max_size + skip, -1)
        -- Their age counts from the arrival of the first of them (append.lua stamps it).
        local rest_first = stamp_of(redis.call('LINDEX', buf, 0)) or now
        local rest_deadline = math.min(now + window, rest_first + max_age)
        if n - max_size >= max_size or rest_deadline < now then rest_deadline = now end
        if head then
          redis.call('LPUSH', buf, head_at(head, rest_first))
        else
          redis.call('HSET', KEYS[2], conv, rest_first)
        end
        redis.call('ZADD', KEYS[1], rest_deadline, conv)
        slide(P .. 'ttl:' .. conv, rest_deadline - now)
        n = max_size
      end
      -- The job record names its account and inbox for operators; the inbox rides on each message.
      local inbox = inbox_of(msgs) or ''
      redis.call('HSET', P .. 'batch:' .. id, 'id', id, 'conv', conv, 'state', 'processing',
        'token', token, 'attempts', 1, 'first_ms', first, 'deadline_ms', deadline,
        'claimed_ms', now, 'trigger', trigger, 'count', n,
        'account', string.match(conv, '^(%d+):') or '', 'inbox', inbox)
      count(P, now, 'flushed', 1, 'messages', n, 'late_ms', now - deadline, 't:' .. trigger, 1)
      redis.call('HSET', KEYS[4], conv, id)
      redis.call('ZADD', KEYS[3], now + lease, id)
      out[#out + 1] = {id, token, 1, conv, first, deadline, trigger, now, '',
        redis.call('LRANGE', msgs, 0, -1), reason_for(conv)}
    end
  end
end

local nd = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local ni = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
local nxt = -1
if nd[2] then nxt = tonumber(nd[2]) end
if ni[2] and (nxt < 0 or tonumber(ni[2]) < nxt) then nxt = tonumber(ni[2]) end
out[2] = nxt
return out

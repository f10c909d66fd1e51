-- Helpers every script of the service starts with (store.py prepends this file), so that the
-- rules below exist once. Everything here is local: Redis forbids scripts to make globals.

-- Redis's clock, not the caller's: the replicas of the service may disagree about the time.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
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

-- A batch leaves the pipeline for good or for now (done, skipped, superseded, failed): nobody
-- holds it, and the conversation's next burst, parked while this batch ran, is due at once.
-- Returns true when that parked burst was made due.
local function close_batch(bkey, inflight, active, due, id, conv, now)
  redis.call('HSET', bkey, 'token', '', 'finished_ms', now)
  -- Every way out passes here, so the hourly count of outcomes is kept here (its state is set).
  local prefix = string.sub(bkey, 1, #bkey - #id - 6)
  local state = redis.call('HGET', bkey, 'state')
  if state == 'completed' then
    local first = tonumber(redis.call('HGET', bkey, 'first_ms')) or now
    count(prefix, now, state, 1, 'reply_ms', now - first)
  else
    count(prefix, now, state, 1)
  end
  redis.call('ZREM', inflight, id)
  if redis.call('HGET', active, conv) == id then
    redis.call('HDEL', active, conv)
  end
  if redis.call('HGET', bkey, 'blocked') == '1' then
    redis.call('HDEL', bkey, 'blocked')
    return redis.call('ZADD', due, 'NX', now, conv) == 1
  end
  return false
end


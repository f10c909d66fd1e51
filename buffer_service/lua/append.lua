-- Take one customer message into its conversation: de-duplicate, decide whether the bot may
-- answer it, and append it to the buffer with the deadline slid. One script so that these move
-- together: a crash between them would otherwise leave a message buffered with no deadline
-- (never answered) or a duplicate marker with no message (lost).
-- A message the bot must not answer still reaches the conversation's history, so a later
-- prompt (or the human) sees what the customer wrote: when a human is in charge by a snapshot
-- newer than this message's (lib.lua: take_charge), or when a limit refuses it (rate limit,
-- buffer byte cap; those are counted in the hourly stats too).
-- KEYS: due first buffer ttl seen handoff rate history [global_rate]
-- ARGV: conv message window_ms max_age_ms max_size dedup_ms wake max_bytes version
--       rate_limit rate_period_ms global_limit history_cap history_ttl_ms prefix pending
--       entry burst global_refused
-- due: zset conv -> deadline ms; first: hash conv -> first message ms; buffer: buf:<conv>;
-- ttl: the sliding TTL key (its expiry is the wake-up); seen: the message's de-duplication
-- marker; rate: the conversation's rate limit; global_rate: the global limit's key, only when
-- that limit is set (outside every shard: see keys.py). message: its json; max_bytes: buffer
-- byte cap (0: none); entry: the message in the compact format, '' to write json (message
-- is the json one, also what the history keeps); burst: the compact head's part after the first
-- message time (lib.lua: buffer formats); version: of the conversation snapshot the message came with (0: none);
-- rate_limit, global_limit: messages per period of the conversation, of all together (0: none);
-- prefix: the shard's key prefix (keys.py); pending: the snapshot shows the conversation
-- `pending` (1|0: lib.lua take_charge); global_refused: 1 when the global limit's own call
-- refused this message (a cluster; global_limit is then 0 here).
-- Returns {status, count, deadline ms, detail, now ms}: status 1 buffered (detail: what set the
--   deadline: deadline, age, size), 0 duplicate, -1 kept in the history only (detail: why:
--   rate_limited:conversation, rate_limited:global, buffer_full, or the reason a human is in
--   charge)
local now = now_ms()
local P = ARGV[15]

if not redis.call('SET', KEYS[5], '1', 'NX', 'PX', ARGV[6]) then
  return {0, messages_in(KEYS[3]), 0, '', now}
end

local function kept(why, counted)
  remember(KEYS[8], ARGV[17] ~= '' and ARGV[17] or ARGV[2], ARGV[13], ARGV[14])
  if counted then count(P, now, counted, 1) end
  return {-1, messages_in(KEYS[3]), 0, why, now}
end

if not take_charge(KEYS[6], '', tonumber(ARGV[9]) or 0, ARGV[14], ARGV[16] == '1') then
  return kept(redis.call('HGET', KEYS[6], 'reason'), nil)
end
-- A buffer that nobody flushes (workers down, processing off) must not grow without bound.
-- MEMORY USAGE with SAMPLES 0 walks the list's nodes (8 KB each): exact and cheap at this size.
-- pcall: a Redis that forbids MEMORY loses the cap, not its webhooks.
local cap = tonumber(ARGV[8]) or 0
if cap > 0 then
  local used = redis.pcall('MEMORY', 'USAGE', KEYS[3], 'SAMPLES', 0)
  if type(used) == 'number' and used + #ARGV[2] > cap then return kept('buffer_full', 'buffer_full') end
end
-- The conversation's limit first: a refused flood of one conversation must not use up the
-- global allowance of everyone else.
local period = tonumber(ARGV[11])
for _, limit in ipairs({{KEYS[7], tonumber(ARGV[10]), 'conversation'}, {KEYS[9], tonumber(ARGV[12]), 'global'}}) do
  if limit[2] > 0 and gcra(limit[1], limit[2], period, now) > 0 then
    return kept('rate_limited:' .. limit[3], 'rate_limited')
  end
end
if ARGV[19] == '1' then return kept('rate_limited:global', 'rate_limited') end

local conv = ARGV[1]
local len = redis.call('LLEN', KEYS[3])
local head = len > 0 and head_of(KEYS[3]) or nil
local held = len - (head and 1 or 0)
local n = held + 1
local first
if len == 0 and ARGV[17] ~= '' then
  first = now
  redis.call('RPUSH', KEYS[3], now .. ARGV[18], ARGV[17])
else
  -- A buffer stays in the format it was started in (lib.lua: buffer formats). A compact message
  -- past the size cap starts the next burst, so its arrival time is kept (claim.lua).
  local entry = ARGV[2]
  if head and ARGV[17] ~= '' then entry = ARGV[17] end
  if string.sub(entry, 1, 1) == '{' or held >= tonumber(ARGV[5]) then entry = stamped(entry, now) end
  redis.call('RPUSH', KEYS[3], entry)
  if head then
    first = head_first(head)
    -- The head names the newest message's inbox and contact, as the json messages do.
    if ARGV[17] ~= '' and head ~= first .. ARGV[18] then
      redis.call('LSET', KEYS[3], 0, first .. ARGV[18])
    end
  elseif n == 1 then
    first = now
    redis.call('HSET', KEYS[2], conv, now)
  else
    first = tonumber(redis.call('HGET', KEYS[2], conv)) or now
  end
end

local deadline = now + tonumber(ARGV[3])
local trigger = 'deadline'
local age_cap = first + tonumber(ARGV[4])
if deadline >= age_cap then
  deadline = age_cap
  trigger = 'age'
end
if n >= tonumber(ARGV[5]) then
  deadline = now
  trigger = 'size'
end
if deadline < now then deadline = now end

local added = redis.call('ZADD', KEYS[1], deadline, conv)
slide(KEYS[4], deadline - now)
-- Workers already know every deadline they saw in a sweep; only a deadline they cannot know
-- yet (a new burst, or one made due early) is worth a wake-up message.
if added == 1 or deadline == now then
  wake_up(ARGV[7], deadline, KEYS[1])
end
return {1, n, deadline, trigger, now}

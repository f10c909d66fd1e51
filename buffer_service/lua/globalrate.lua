-- The global rate limit on a Redis Cluster, where its key (in no shard) cannot join the append
-- script's keys: taken before the append, by its own call to the node of its slot, and given
-- back when the append then did not buffer the message (duplicate, a human in charge, the
-- conversation's limit, the byte cap), so that only buffered messages use it up, as on one
-- server. On one server append.lua checks it itself (keys.py).
-- KEYS: rate
-- ARGV: limit period_ms refund
-- rate: the global limit's GCRA state (bs:rl:global); limit: messages per period_ms;
-- refund: 1 gives one message's allowance back (a taken one the append did not use).
-- Returns 0 allowed (or given back), else the ms until one more message would be allowed.
local now = now_ms()
local limit, period = tonumber(ARGV[1]), tonumber(ARGV[2])
if ARGV[3] ~= '1' then
  return gcra(KEYS[1], limit, period, now)
end
-- Moving the theoretical arrival time back one interval undoes one take: the others taken
-- since keep theirs, so the limit is never exceeded.
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat then
  tat = tat - period / limit
  if tat > now then
    redis.call('SET', KEYS[1], string.format('%.3f', tat), 'PX', math.ceil(tat - now))
  else
    redis.call('DEL', KEYS[1])
  end
end
return 0

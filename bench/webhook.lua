-- wrk script: POST realistic Chatwoot message_created webhooks (a ~2 KB body built from a
-- template made by devtools.payloads.message_payload), a new message id per request and
-- a conversation picked at random among WRK_CONVERSATIONS, so every request is stored.
-- Settings come from the environment because wrk checks for delay() before init() sees args:
--   WRK_TEMPLATE       file with the body, "@MID@" and "@CID@" where the ids go
--   WRK_CONVERSATIONS  number of conversations (ids 1..N)
--   WRK_ID_BASE        first message id of this run (runs sharing a Redis must not overlap)
--   WRK_DELAY_MS       pause of each connection before each request; 0 = as fast as possible
--   WRK_SIGNATURES     optional: a file whose first line is an X-Chatwoot-Timestamp and each
--                      further line the X-Chatwoot-Signature of request n (one thread; wrk's Lua
--                      has no HMAC, so bench/ingest.py signs ahead); the conversation is then
--                      (n * 7919) % WRK_CONVERSATIONS + 1 instead of a random one
local f = assert(io.open(os.getenv("WRK_TEMPLATE"), "r"))
local template = f:read("*a")
f:close()
local conversations = tonumber(os.getenv("WRK_CONVERSATIONS"))
local id_base = tonumber(os.getenv("WRK_ID_BASE"))
local pause = tonumber(os.getenv("WRK_DELAY_MS") or "0")
local threads = 0
local counter = 0
local timestamp = nil
local signatures = {}
local signed = os.getenv("WRK_SIGNATURES")
if signed then
  for line in io.lines(signed) do
    if timestamp == nil then timestamp = line else signatures[#signatures + 1] = line end
  end
end

function setup(thread)
  thread:set("thread_no", threads)
  threads = threads + 1
end

function init(args)
  math.randomseed(id_base + (thread_no or 0))
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  counter = counter + 1
  local mid = string.format("%d", id_base + (thread_no or 0) * 100000000 + counter)
  local cid
  if signed then
    cid = string.format("%d", (counter * 7919) % conversations + 1)
    -- past the signed requests a delivery repeats an earlier one (a duplicate, still signed)
    local n = (counter - 1) % #signatures + 1
    if n ~= counter then
      mid = string.format("%d", id_base + n)
      cid = string.format("%d", (n * 7919) % conversations + 1)
    end
    wrk.headers["X-Chatwoot-Timestamp"] = timestamp
    wrk.headers["X-Chatwoot-Signature"] = signatures[n]
  else
    cid = string.format("%d", math.random(conversations))
  end
  local body = template:gsub("@MID@", mid):gsub("@CID@", cid)
  return wrk.format(nil, nil, nil, body)
end

if pause > 0 then
  function delay()
    return pause
  end
end

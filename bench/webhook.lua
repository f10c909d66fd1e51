-- wrk script: POST realistic Chatwoot message_created webhooks (a ~2 KB body built from a
-- template made by devtools.payloads.message_payload), a new message id per request and
-- a conversation picked at random among WRK_CONVERSATIONS, so every request is stored.
-- Settings come from the environment because wrk checks for delay() before init() sees args:
--   WRK_TEMPLATE       file with the body, "@MID@" and "@CID@" where the ids go
--   WRK_CONVERSATIONS  number of conversations (ids 1..N)
--   WRK_ID_BASE        first message id of this run (runs sharing a Redis must not overlap)
--   WRK_DELAY_MS       pause of each connection before each request; 0 = as fast as possible
local f = assert(io.open(os.getenv("WRK_TEMPLATE"), "r"))
local template = f:read("*a")
f:close()
local conversations = tonumber(os.getenv("WRK_CONVERSATIONS"))
local id_base = tonumber(os.getenv("WRK_ID_BASE"))
local pause = tonumber(os.getenv("WRK_DELAY_MS") or "0")
local threads = 0
local counter = 0

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
  local cid = string.format("%d", math.random(conversations))
  local body = template:gsub("@MID@", mid):gsub("@CID@", cid)
  return wrk.format(nil, nil, nil, body)
end

if pause > 0 then
  function delay()
    return pause
  end
end

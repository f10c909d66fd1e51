-- An operator's `cleanup` forgets, in one shard, the completed jobs whose compact records
-- expired (lib.lua forget_done): each completion does it for its own shard, this catches a
-- shard where nothing completed lately.
-- KEYS: done donecount completed
-- ARGV: retention_ms
-- done: the shard's zset of record buckets; donecount: their record counts; completed: the
-- index of whole completed records a previous version wrote (jobs:completed).
-- Returns how many records were forgotten.
return forget_done(KEYS[1], KEYS[2], KEYS[3], now_ms(), tonumber(ARGV[1]))

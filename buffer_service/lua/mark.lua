-- Remember with the batch that its reply hands the conversation over (the model decided so:
-- processor.py), or that it does not (''), so that a retry which reuses the stored reply does
-- what the attempt that wrote it meant.
-- KEYS: batch
-- ARGV: token reason summary
-- reason: the handoff reason ('' = none); summary: for the agents.
-- Returns 1, or 0 when the token no longer holds the batch.
if not holds(KEYS[1], ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'handoff', ARGV[2], 'handoff_summary', ARGV[3])
return 1

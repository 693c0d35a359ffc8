-- retry: re-queue a failed or canceled task by an operator's request, with a fresh retry
-- budget (attempts and lease losses start again from zero; the error history stays).
--
-- KEYS[1] task hash        {rebound:Q}:task:ID
-- KEYS[2] ready zset       {rebound:Q}:ready
-- KEYS[3] failed zset      {rebound:Q}:failed
-- KEYS[4] canceled zset    {rebound:Q}:canceled
-- KEYS[5] counts hash      {rebound:Q}:counts
-- ARGV[1] id
-- ARGV[2] MAX_PRIORITY, for the ready score
--
-- Returns "ok", "missing", or "state:STATE" for a task that is neither failed nor canceled.

local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  return 'missing'
end
if state ~= 'failed' and state ~= 'canceled' then
  return 'state:' .. state
end

local now = now_ms()
local priority = tonumber(redis.call('HGET', KEYS[1], 'priority'))
redis.call('HSET', KEYS[1], 'state', 'pending', 'attempt', 0, 'lease_losses', 0, 'run_at', now,
  'updated', now)
redis.call('HDEL', KEYS[1], 'finished', 'cancel')
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZADD', KEYS[2], ready_score(tonumber(ARGV[2]), priority, now), ARGV[1])
redis.call('HINCRBY', KEYS[5], state, -1)
redis.call('HINCRBY', KEYS[5], 'pending', 1)
return 'ok'

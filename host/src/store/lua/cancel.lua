-- cancel: stop a task. A waiting task (pending, delayed or retrying) is canceled at once; a
-- running one is marked, and the host running it interrupts it and records the cancel.
--
-- KEYS[1] task hash        {rebound:Q}:task:ID
-- KEYS[2] ready zset       {rebound:Q}:ready
-- KEYS[3] scheduled zset   {rebound:Q}:scheduled
-- KEYS[4] canceled zset    {rebound:Q}:canceled   finished tasks, by finish time
-- KEYS[5] counts hash      {rebound:Q}:counts
-- KEYS[6] cancels set      {rebound:Q}:cancels    running tasks asked to stop
-- ARGV[1] id
--
-- Returns "canceled", "running" (the host will stop it), "missing", or "final:STATE".

local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  return 'missing'
end
if state == 'running' then
  redis.call('HSET', KEYS[1], 'cancel', 1)
  redis.call('SADD', KEYS[6], ARGV[1])
  return 'running'
end
if state ~= 'pending' and state ~= 'retrying' then
  return 'final:' .. state
end

local now = now_ms()
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HSET', KEYS[1], 'state', 'canceled', 'finished', now, 'updated', now)
redis.call('ZADD', KEYS[4], now, ARGV[1])
redis.call('HINCRBY', KEYS[5], state, -1)
redis.call('HINCRBY', KEYS[5], 'canceled', 1)
return 'canceled'

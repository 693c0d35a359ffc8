-- claim_task: start one named task now, under a lease, if it is waiting (pending, delayed or
-- retrying): the old framework's "mark processing", for work done outside a plugin.
--
-- KEYS[1] task hash        {rebound:Q}:task:ID
-- KEYS[2] ready zset       {rebound:Q}:ready
-- KEYS[3] scheduled zset   {rebound:Q}:scheduled
-- KEYS[4] running zset     {rebound:Q}:running
-- KEYS[5] counts hash      {rebound:Q}:counts
-- ARGV[1] id
-- ARGV[2] lease owner
-- ARGV[3] lease length in ms
--
-- Returns the task hash's fields and values, or {"missing"} or {"state", STATE}.

local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  return {'missing'}
end
if state ~= 'pending' and state ~= 'retrying' then
  return {'state', state}
end

local now = now_ms()
local deadline = now + tonumber(ARGV[3])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HINCRBY', KEYS[5], state, -1)
redis.call('HINCRBY', KEYS[5], 'running', 1)
redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HINCRBY', KEYS[1], 'token', 1)
redis.call('HSET', KEYS[1], 'state', 'running', 'owner', ARGV[2], 'lease_deadline', deadline,
  'started', now, 'updated', now)
redis.call('ZADD', KEYS[4], deadline, ARGV[1])
return redis.call('HGETALL', KEYS[1])

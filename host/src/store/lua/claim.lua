-- claim: start up to a batch of claimable tasks of one queue, under a lease.
--
-- KEYS[1] ready zset       {rebound:Q}:ready      tasks claimable now, by priority then readiness
-- KEYS[2] scheduled zset   {rebound:Q}:scheduled  delayed and retrying tasks, by run_at
-- KEYS[3] running zset     {rebound:Q}:running    running tasks, by lease deadline
-- KEYS[4] counts hash      {rebound:Q}:counts
-- ARGV[1] most tasks to claim
-- ARGV[2] lease owner (host id)
-- ARGV[3] lease length in ms
-- ARGV[4] task key prefix  {rebound:Q}:task:
-- ARGV[5] MAX_PRIORITY, for the ready score
--
-- Returns one array per claimed task: the task hash's fields and values, as HGETALL gives them.

local now = now_ms()
local max = tonumber(ARGV[1])
local prefix = ARGV[4]
local top = tonumber(ARGV[5])

-- Move tasks whose delay or backoff has passed into the ready set. Bounded per call so a
-- huge backlog of due tasks cannot stall Redis; the next claim moves the rest.
local due = redis.call('ZRANGE', KEYS[2], '-inf', now, 'BYSCORE', 'LIMIT', 0, 1000, 'WITHSCORES')
for i = 1, #due, 2 do
  local id, run_at = due[i], tonumber(due[i + 1])
  local priority = tonumber(redis.call('HGET', prefix .. id, 'priority') or '0')
  redis.call('ZADD', KEYS[1], ready_score(top, priority, run_at), id)
  redis.call('ZREM', KEYS[2], id)
end

local claimed = {}
if max <= 0 then
  return claimed
end
local deadline = now + tonumber(ARGV[3])
local popped = redis.call('ZPOPMIN', KEYS[1], max)
for i = 1, #popped, 2 do
  local id = popped[i]
  local key = prefix .. id
  local state = redis.call('HGET', key, 'state')
  -- A task hash that is gone (expired by retention) leaves nothing to run.
  if state then
    redis.call('HINCRBY', KEYS[4], state, -1)
    redis.call('HINCRBY', KEYS[4], 'running', 1)
    redis.call('HINCRBY', key, 'attempt', 1)
    redis.call('HINCRBY', key, 'token', 1)
    redis.call('HSET', key, 'state', 'running', 'owner', ARGV[2], 'lease_deadline', deadline,
      'started', now, 'updated', now)
    redis.call('ZADD', KEYS[3], deadline, id)
    claimed[#claimed + 1] = redis.call('HGETALL', key)
  end
end
return claimed

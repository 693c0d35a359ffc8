-- requeue: take back running tasks whose lease ran out (their host died or stalled).
--
-- A lost lease is not the task's fault, so the attempt it was in is not charged: the task is
-- claimable again at once with the same attempt number. It is counted, though, and a task
-- that lost its lease more than the allowed number of times fails instead, and one whose
-- cancellation was asked for ends canceled.
--
-- KEYS[1] ready zset       {rebound:Q}:ready
-- KEYS[2] running zset     {rebound:Q}:running
-- KEYS[3] failed zset      {rebound:Q}:failed
-- KEYS[4] counts hash      {rebound:Q}:counts
-- KEYS[5] canceled zset    {rebound:Q}:canceled   finished tasks, by finish time
-- KEYS[6] cancels set      {rebound:Q}:cancels    running tasks asked to stop
-- ARGV[1] most tasks to take back
-- ARGV[2] task key prefix  {rebound:Q}:task:
-- ARGV[3] MAX_PRIORITY, for the ready score
-- ARGV[4] most lease losses a task may have
-- ARGV[5] how many errors the history keeps
--
-- Returns {number requeued, number failed, number canceled}.

local now = now_ms()
local expired = redis.call('ZRANGE', KEYS[2], '-inf', now - 1, 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[1]))
local requeued, failed, canceled = 0, 0, 0

for _, id in ipairs(expired) do
  local key = ARGV[2] .. id
  redis.call('ZREM', KEYS[2], id)
  if redis.call('HGET', key, 'state') == 'running' then
    local owner = redis.call('HGET', key, 'owner') or 'unknown'
    local losses = redis.call('HINCRBY', key, 'lease_losses', 1)
    redis.call('HDEL', key, 'owner', 'lease_deadline')
    redis.call('HSET', key, 'updated', now)
    redis.call('HINCRBY', KEYS[4], 'running', -1)
    if redis.call('HGET', key, 'cancel') then
      end_canceled(key, id, KEYS[5], KEYS[6], KEYS[4], now)
      canceled = canceled + 1
    elseif losses > tonumber(ARGV[4]) then
      local message = 'lost its lease ' .. losses .. ' times (last held by ' .. owner ..
        '); its hosts keep dying or stalling, so it is not run again'
      push_error(key, message, tonumber(ARGV[5]))
      redis.call('HSET', key, 'state', 'failed', 'finished', now)
      redis.call('ZADD', KEYS[3], now, id)
      redis.call('HINCRBY', KEYS[4], 'failed', 1)
      failed = failed + 1
    else
      local priority = tonumber(redis.call('HGET', key, 'priority'))
      redis.call('HINCRBY', key, 'attempt', -1)
      redis.call('HSET', key, 'state', 'pending', 'run_at', now)
      redis.call('ZADD', KEYS[1], ready_score(tonumber(ARGV[3]), priority, now), id)
      redis.call('HINCRBY', KEYS[4], 'pending', 1)
      requeued = requeued + 1
    end
  end
end
return {requeued, failed, canceled}

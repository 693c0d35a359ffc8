-- create: add a new task to its queue, unless a task with the same id is already there.
--
-- KEYS[1] task hash        {rebound:Q}:task:ID
-- KEYS[2] ready zset       {rebound:Q}:ready
-- KEYS[3] scheduled zset   {rebound:Q}:scheduled
-- KEYS[4] counts hash      {rebound:Q}:counts
-- ARGV[1] id
-- ARGV[2] queue
-- ARGV[3] params (JSON text)
-- ARGV[4] priority (integer, MIN_PRIORITY..MAX_PRIORITY)
-- ARGV[5] delay in ms (0 = claimable at once)
-- ARGV[6] retry policy as JSON text, or "" for none
-- ARGV[7] MAX_PRIORITY, for the ready score
-- ARGV[8] GPU requirement as JSON text, or "" for none
--
-- Returns {"ok", now_ms} or {"duplicate"}.

if redis.call('EXISTS', KEYS[1]) == 1 then
  return {'duplicate'}
end

local now = now_ms()
local priority = tonumber(ARGV[4])
local run_at = now + tonumber(ARGV[5])

redis.call('HSET', KEYS[1],
  'id', ARGV[1], 'queue', ARGV[2], 'params', ARGV[3], 'state', 'pending',
  'priority', ARGV[4], 'attempt', 0, 'token', 0, 'run_at', run_at, 'progress', 0,
  'hook_runs', 0, 'created', now, 'updated', now)
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[1], 'retry', ARGV[6])
end
if ARGV[8] ~= '' then
  redis.call('HSET', KEYS[1], 'gpu', ARGV[8])
end

if run_at <= now then
  redis.call('ZADD', KEYS[2], ready_score(tonumber(ARGV[7]), priority, run_at), ARGV[1])
  -- Wake idle hosts of the queue (see watch_submissions); nobody listening costs nothing.
  redis.call('PUBLISH', 'rebound:wake:' .. ARGV[2], ARGV[1])
else
  redis.call('ZADD', KEYS[3], run_at, ARGV[1])
end
redis.call('HINCRBY', KEYS[4], 'pending', 1)
return {'ok', tostring(now)}

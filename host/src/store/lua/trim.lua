-- trim: delete finished tasks older than the retention period.
--
-- KEYS[1] completed zset   {rebound:Q}:completed
-- KEYS[2] failed zset      {rebound:Q}:failed
-- KEYS[3] canceled zset    {rebound:Q}:canceled
-- KEYS[4] counts hash      {rebound:Q}:counts
-- ARGV[1] task key prefix  {rebound:Q}:task:
-- ARGV[2] retention in ms: tasks finished longer ago than this are deleted
-- ARGV[3] most tasks to delete
--
-- Returns the ids deleted, so the caller can drop their id index entries (which live in
-- other slots).

local now = now_ms()
local cutoff = now - tonumber(ARGV[2])
local budget = tonumber(ARGV[3])
local deleted = {}

for i, state in ipairs({'completed', 'failed', 'canceled'}) do
  if budget <= 0 then
    break
  end
  local ids = redis.call('ZRANGE', KEYS[i], '-inf', cutoff, 'BYSCORE', 'LIMIT', 0, budget)
  if #ids > 0 then
    for _, id in ipairs(ids) do
      redis.call('DEL', ARGV[1] .. id)
      deleted[#deleted + 1] = id
    end
    redis.call('ZREM', KEYS[i], unpack(ids))
    redis.call('HINCRBY', KEYS[4], state, -#ids)
    budget = budget - #ids
  end
end
return deleted

-- common: helpers that the store puts in front of every transition script.

-- Redis's clock, in milliseconds since the Unix epoch.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- "lost:STATE" when the caller's fencing token is not that of the task's current run, else
-- nil.
local function lease_not_held(task_key, token)
  local state = redis.call('HGET', task_key, 'state')
  if state ~= 'running' or redis.call('HGET', task_key, 'token') ~= token then
    return 'lost:' .. (state or 'missing')
  end
  return nil
end

-- The ready set's score: priority first (higher first), then readiness time. Both fit
-- exactly in one double: times in ms need 42 bits until the year 2109, priorities 11 more.
local function ready_score(max_priority, priority, ready_at)
  return string.format('%.0f', (max_priority - priority) * 4398046511104 + ready_at)
end

-- Ends a task that was running, and whose cancellation was asked for, as canceled.
local function end_canceled(task_key, id, canceled_key, cancels_key, counts_key, now)
  redis.call('HDEL', task_key, 'cancel')
  redis.call('SREM', cancels_key, id)
  redis.call('HSET', task_key, 'state', 'canceled', 'finished', now)
  redis.call('ZADD', canceled_key, now, id)
  redis.call('HINCRBY', counts_key, 'canceled', 1)
end

-- Appends `message` to a task's error history, keeping the newest `keep` entries.
local function push_error(task_key, message, keep)
  local errors = cjson.decode(redis.call('HGET', task_key, 'errors') or '[]')
  errors[#errors + 1] = message
  while #errors > keep do
    table.remove(errors, 1)
  end
  redis.call('HSET', task_key, 'last_error', message, 'errors', cjson.encode(errors))
end

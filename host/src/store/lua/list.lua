-- list: one page of the tasks of a queue that are in a given state.
--
-- The tasks are found by walking the queue's sorted sets that can hold that state, in order,
-- by rank. A cursor is a position in that walk (set number and rank), so a task that changes
-- state between two pages may be skipped or shown twice; each call reads a bounded number of
-- entries, so a page may hold fewer tasks than asked for and still have a next cursor.
--
-- KEYS[1..n] the sorted sets to walk, in order
-- ARGV[1] the state wanted
-- ARGV[2] set number to start in (1-based)
-- ARGV[3] rank to start at in that set (0-based)
-- ARGV[4] most tasks to return
-- ARGV[5] most entries to read
-- ARGV[6] task key prefix  {rebound:Q}:task:
--
-- Returns {next set number, next rank, task fields...}; next set number 0 means no more.

local set, rank = tonumber(ARGV[2]), tonumber(ARGV[3])
local want, budget = tonumber(ARGV[4]), tonumber(ARGV[5])
local found = {}

while set <= #KEYS and #found < want and budget > 0 do
  local ids = redis.call('ZRANGE', KEYS[set], rank, rank + budget - 1)
  if #ids == 0 then
    set, rank = set + 1, 0
  else
    for _, id in ipairs(ids) do
      rank = rank + 1
      budget = budget - 1
      local key = ARGV[6] .. id
      if redis.call('HGET', key, 'state') == ARGV[1] then
        found[#found + 1] = redis.call('HGETALL', key)
        if #found >= want then
          break
        end
      end
    end
  end
end

if set > #KEYS then
  set = 0
end
local reply = {set, rank}
for _, fields in ipairs(found) do
  reply[#reply + 1] = fields
end
return reply

"""The Lua scripts that move messages between lists.

Every state change of a message is one script, so a crash (of a worker, of the supervisor, or
of the connection) can never split it: the message is in exactly one place before the script
and exactly one place after it. Each script names its keys in ``KEYS[]`` (never built at run
time) so it runs on Redis Cluster, where all our keys share the ``{prefix}`` slot.

Scripts use RPOP/RPUSH/RPOPLPUSH rather than LMOVE so they run on Redis < 6.2 as well.
Time comes from the server (``TIME``), so hosts with skewed clocks agree on due times.
"""

from __future__ import annotations

# Shared Lua helpers, prepended to the scripts that need them.
_NOW_MS = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# Must agree with worker.job.job_id_of(): a JSON object's valid "id", else SHA-1 of the bytes.
_JOB_ID = """
local function job_id(message)
  if string.match(message, '^%s*{') then
    local ok, obj = pcall(cjson.decode, message)
    if ok and type(obj) == 'table' and type(obj.id) == 'string' and #obj.id <= 128
        and string.match(obj.id, '^[A-Za-z0-9._-]+$') then
      return obj.id
    end
  end
  return redis.sha1hex(message)
end
"""

FETCH = _NOW_MS + """
-- fetch: move the next message into this worker's processing list, without blocking.
-- KEYS[1] queue      list  main queue; producers LPUSH, we take from the right (FIFO)
-- KEYS[2] retry      list  retries, taken only when the main queue is empty
-- KEYS[3] delayed    zset  retries waiting for their backoff; member "<token>\\n<message>",
--                          score = due time in ms (server clock)
-- KEYS[4] processing list  this worker's in-flight message (empty when called)
-- ARGV[1] how many due retries to promote at most
-- Returns {1, message, source} or {0, ms until the next delayed retry is due, or -1}.
-- Already holding one (our previous call ran but its reply was lost): hand that back.
local held = redis.call('LINDEX', KEYS[4], -1)
if held then return {1, held, 'held'} end
local message = redis.call('RPOPLPUSH', KEYS[1], KEYS[4])
if message then return {1, message, 'queue'} end
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, member in ipairs(due) do
  redis.call('ZREM', KEYS[3], member)
  local nl = string.find(member, '\\n', 1, true)
  redis.call('LPUSH', KEYS[2], string.sub(member, nl + 1))
end
message = redis.call('RPOPLPUSH', KEYS[2], KEYS[4])
if message then return {1, message, 'retry'} end
local nxt = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
if nxt[2] then return {0, math.max(0, tonumber(nxt[2]) - now)} end
return {0, -1}
"""

START = """
-- start: a worker begins a job; mark it running and tell how many attempts it already used.
-- KEYS[1] job      hash  {prefix}:job:<id>
-- KEYS[2] attempts hash  job id -> failed attempts so far
-- ARGV[1] job id, ARGV[2] job TTL s, ARGV[3] job hash fields as one JSON object of strings
-- A first attempt is a new submission of the job: a completion recorded by an earlier
-- submission must not swallow this one's done event (see DONE's "completed").
local attempts = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if attempts == 0 then redis.call('HDEL', KEYS[1], 'completed') end
local flat = {}
for field, value in pairs(cjson.decode(ARGV[3])) do
  flat[#flat + 1] = field
  flat[#flat + 1] = value
end
redis.call('HSET', KEYS[1], unpack(flat))
redis.call('EXPIRE', KEYS[1], ARGV[2])
return attempts
"""

DONE = """
-- done: the output is stored; record it, acknowledge the message and, when the worker
-- wants more, take the next one from the main queue in the same step (it is idle from
-- this instant: one round trip per job instead of two, and never more than one held).
-- KEYS[1] processing list  the worker's in-flight message (removed here = the ack)
-- KEYS[2] job        hash  {prefix}:job:<id>, its state becomes done
-- KEYS[3] done       list  completion events, newest first, capped
-- KEYS[4] attempts   hash  job id -> attempts; the entry is dropped
-- KEYS[5] queue      list  main queue, for the next message
-- ARGV[1] message, ARGV[2] job id, ARGV[3] event JSON, ARGV[4] job TTL s, ARGV[5] done cap,
-- ARGV[6] job hash fields as one JSON object of strings, ARGV[7] '1' = take the next message
-- A job run again after a failed attempt pushes one event: the first ack sets "completed",
-- which only a new submission (START with no attempts) clears.
-- Returns {removed} or {removed, next message}.
local removed = redis.call('LREM', KEYS[1], 1, ARGV[1])
local flat = {'state', 'done'}
for field, value in pairs(cjson.decode(ARGV[6])) do
  flat[#flat + 1] = field
  flat[#flat + 1] = value
end
redis.call('HSET', KEYS[2], unpack(flat))
if redis.call('HSETNX', KEYS[2], 'completed', '1') == 1 then
  redis.call('LPUSH', KEYS[3], ARGV[3])
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[5]) - 1)
end
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('HDEL', KEYS[4], ARGV[2])
if ARGV[7] == '1' then
  -- A retried call (lost reply) finds the next message already taken: return it again.
  local nxt = redis.call('LINDEX', KEYS[1], -1) or redis.call('RPOPLPUSH', KEYS[5], KEYS[1])
  if nxt then return {removed, nxt} end
end
return {removed}
"""

DEAD = """
-- dead: the job can never succeed; park it in the dead-letter list and acknowledge it.
-- KEYS[1] processing list  the worker's in-flight message (removed)
-- KEYS[2] job        hash  its state becomes dead
-- KEYS[3] dead       list  dead letters, newest first
-- KEYS[4] attempts   hash  the entry is dropped
-- ARGV[1] message, ARGV[2] job id, ARGV[3] dead letter JSON, ARGV[4] job TTL s,
-- ARGV[5..] field, value pairs for the job hash.
local removed = redis.call('LREM', KEYS[1], 1, ARGV[1])
-- Not ours any more (a retried call whose first run succeeded, or recovered by another
-- host meanwhile): whoever holds it now decides its fate; never two dead letters.
if removed == 0 then return 0 end
redis.call('LPUSH', KEYS[3], ARGV[3])
redis.call('HSET', KEYS[2], 'state', 'dead', unpack(ARGV, 5))
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('HDEL', KEYS[4], ARGV[2])
return removed
"""

RETRY = _NOW_MS + """
-- retry: a transient failure; count the attempt, then delay the message or, at the limit,
-- dead-letter it.
-- KEYS[1] processing list  the worker's in-flight message (removed)
-- KEYS[2] delayed    zset  member "<token>\\n<message>", score = due time in ms
-- KEYS[3] attempts   hash  job id -> attempts so far
-- KEYS[4] job        hash  state becomes failed (waiting) or dead
-- KEYS[5] dead       list  dead letters
-- ARGV[1] message, ARGV[2] job id, ARGV[3] max attempts, ARGV[4] backoff base ms,
-- ARGV[5] backoff cap ms, ARGV[6] unique token, ARGV[7] dead letter JSON (attempts filled
-- in here), ARGV[8] job TTL s, ARGV[9..] field, value pairs for the job hash.
-- Returns {attempts, due ms} or {attempts, -1} when dead-lettered.
local removed = redis.call('LREM', KEYS[1], 1, ARGV[1])
if removed == 0 then return {-1, -1} end
local attempts = redis.call('HINCRBY', KEYS[3], ARGV[2], 1)
if attempts >= tonumber(ARGV[3]) then
  local letter = cjson.decode(ARGV[7])
  letter['attempts'] = attempts
  redis.call('LPUSH', KEYS[5], cjson.encode(letter))
  redis.call('HDEL', KEYS[3], ARGV[2])
  redis.call('HSET', KEYS[4], 'state', 'dead', 'attempts', attempts, unpack(ARGV, 9))
  redis.call('EXPIRE', KEYS[4], ARGV[8])
  return {attempts, -1}
end
local delay = math.min(tonumber(ARGV[4]) * 2 ^ (attempts - 1), tonumber(ARGV[5]))
local due = now_ms() + math.floor(delay)
redis.call('ZADD', KEYS[2], due, ARGV[6] .. '\\n' .. ARGV[1])
redis.call('HSET', KEYS[4], 'state', 'failed', 'attempts', attempts, 'retry_at_ms', due,
           unpack(ARGV, 9))
redis.call('EXPIRE', KEYS[4], ARGV[8])
return {attempts, due}
"""

RELEASE = """
-- release: give back what this worker holds, to the front of the queue, without counting an
-- attempt (an operator's abort or a clean exit, not the message's fault).
-- KEYS[1] processing list  the worker's in-flight messages
-- KEYS[2] queue      list  main queue; RPUSH puts them next in line
local n = 0
while true do
  local message = redis.call('RPOP', KEYS[1])
  if not message then break end
  redis.call('RPUSH', KEYS[2], message)
  n = n + 1
end
return n
"""

RECOVER = _JOB_ID + """
-- recover: requeue what a dead worker held, exactly once however many supervisors race.
-- KEYS[1] processing list    the dead worker's in-flight messages
-- KEYS[2] queue      list    main queue; RPUSH puts them next in line
-- KEYS[3] attempts   hash    job id -> attempts; a crash counts as one
-- KEYS[4] heartbeat  string  the worker's liveness key (deleted here)
-- KEYS[5] workers    hash    registry of live workers (the entry is deleted here)
-- ARGV[1] worker id, ARGV[2] '1' = only if the heartbeat has expired (another host's worker),
-- ARGV[3] '1' = count an attempt (a crash) or '0' (killed on purpose during a stop).
-- Returns the number of messages requeued, or -1 when the worker is still alive.
if ARGV[2] == '1' and redis.call('EXISTS', KEYS[4]) == 1 then return -1 end
local n = 0
while true do
  local message = redis.call('RPOP', KEYS[1])
  if not message then break end
  if ARGV[3] == '1' then redis.call('HINCRBY', KEYS[3], job_id(message), 1) end
  redis.call('RPUSH', KEYS[2], message)
  n = n + 1
end
redis.call('DEL', KEYS[4])
redis.call('HDEL', KEYS[5], ARGV[1])
return n
"""

REPLAY_DEAD = """
-- replay_dead: put one dead letter's message back on the queue, once.
-- KEYS[1] dead     list  dead letters (the exact entry is removed)
-- KEYS[2] queue    list  main queue (LPUSH: back of the line, like a producer)
-- KEYS[3] attempts hash  the job's count starts again
-- ARGV[1] dead letter entry, ARGV[2] original message, ARGV[3] job id
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('LPUSH', KEYS[2], ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[3])
return 1
"""

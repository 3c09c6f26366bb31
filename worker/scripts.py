"""The Lua scripts that move messages between lists, and the host claim's.

Every state change of a message is one script, so a crash (of a worker, of the supervisor, or
of the connection) can never split it: the message is in exactly one place before the script
and exactly one place after it. Each script names its keys in ``KEYS[]`` (never built at run
time) so it runs on Redis Cluster, where all our keys share the ``{prefix}`` slot.

Scripts use RPOP/RPUSH/RPOPLPUSH rather than LMOVE so they run on Redis < 6.2 as well.
Time comes from the server (``TIME``), so hosts with skewed clocks agree on due times.
Constant numbers given to ``redis.call`` are written as strings ('0', '-1'): a Lua number is
turned into text with sprintf at every call, a measurable part of a per-job script.

No script decodes JSON. What a producer wrote is never parsed in Lua (cjson refuses what
Python accepts, such as a lone surrogate escape, and an error there would crash the worker
before it could count the attempt); job-hash fields travel as flat field/value arguments.
A message's attempts are counted under its SHA-1 (``redis.sha1hex`` here, hashlib in Python),
the one key every script, the worker and recovery agree on whatever the message holds.

Fencing: a script that finishes a job (DONE, DEAD, RETRY) first removes the message from the
worker's processing list. When it is not there any more, recovery gave it to someone else
(this worker was taken for dead during a stall or a partition): the script then records
nothing, so the copy that was requeued decides the job's fate and there is never a second
done event or dead letter.

Events: each script that changes a job's state also appends the change to the event stream
``{prefix}:events`` (XADD MAXLEN ~ cap) in the same step, so a consumer group never sees a
state the job did not reach, nor misses one it did: ``started`` (START), ``done`` (DONE, once
per job id, with the completion event exactly as pushed to the done list), ``retry`` and
``dead`` (RETRY, DEAD), ``cancelled`` (DEAD, CANCEL), ``queued`` (RELEASE of a given-back job,
REPLAY_DEAD). Each entry has the fields ``type``, ``id``, ``time`` (the caller's, ISO 8601
UTC), ``event`` (a JSON object the caller built, or completed here with what only the script
knows: attempts, a retry's delay) and, on done, dead and cancelled entries, ``callback``.

Cancellation: a job hash's ``cancel`` field asks for the job to end as a dead letter with
reason ``cancelled``. MARK_CANCEL sets it (unless the job has ended), CANCEL takes a queued
message out and dead-letters it, START refuses to start a job that carries it, and every
outcome (DONE, DEAD, RETRY's dead letter, CANCEL) clears it.

Many clips per job: a message with ``clips`` is one job whose clips end one by one. CLIP_END
records a clip's outcome (its completion event or dead letter, its stream entry naming the
clip and the job) while the worker still holds the message, fenced like DONE, and at most
once per clip: the hash ``{prefix}:clips:<job id>`` remembers which clips have ended, so a
copy of the message run again after a crash cuts only the others and never ends a clip twice.
CLIPS_ACK acknowledges the message once every clip has ended. START forgets what the clips of
an ended job did when a new submission of it starts.

The job states the scripts write (``done``, ``failed``, ``dead``) are ``JobState`` values of
worker.protocol (a test holds them to it). The queue module (worker.queue) is the only
caller of these scripts.
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

# Appending an event: KEYS and ARGV positions differ per script, the entry's shape does not.
_EVENT = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local function event(stream, cap, kind, id, time, body, callback)
  if callback then
    redis.call('XADD', stream, 'MAXLEN', '~', cap, '*', 'type', kind, 'id', id, 'time', time,
               'event', body, 'callback', callback)
  else
    redis.call('XADD', stream, 'MAXLEN', '~', cap, '*', 'type', kind, 'id', id, 'time', time,
               'event', body)
  end
end
-- A JSON object given without a leading member, completed with one: '{"a": 1, ...}'.
local function with_member(name, value, object)
  local member = '"' .. name .. '": ' .. value
  if #object > 2 then return '{' .. member .. ', ' .. string.sub(object, 2) end
  return '{' .. member .. '}'
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
local held = redis.call('LINDEX', KEYS[4], '-1')
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

START = _EVENT + """
-- start: a worker begins a job; mark it running and tell how many attempts it already used.
-- KEYS[1] job      hash    {prefix}:job:<id>
-- KEYS[2] attempts hash    message SHA-1 -> failed attempts so far
-- KEYS[3] events   stream  a "started" entry
-- KEYS[4] clips    hash    {prefix}:clips:<id>: a multi-clip job's ended clips
-- ARGV[1] message SHA-1, ARGV[2] job TTL s, ARGV[3] job id, ARGV[4] time, ARGV[5] the
-- event's JSON object (its "attempt" is added here), ARGV[6] events cap, ARGV[7..] field,
-- value pairs for the job hash
-- Returns the attempts used, or -1 when the job was cancelled before it started (nothing is
-- written: the worker dead-letters it as cancelled).
-- A first attempt is a new submission of the job: a completion recorded by an earlier
-- submission must not swallow this one's done event (see DONE's "completed").
if redis.call('HEXISTS', KEYS[1], 'cancel') == 1 then return -1 end
local attempts = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if attempts == 0 then
  redis.call('HDEL', KEYS[1], 'completed')
  -- The same for a multi-clip job's clips, once the job has ended; a copy given back
  -- uncounted (an abort, a paused host) has not, and keeps what its clips did.
  local state = redis.call('HGET', KEYS[1], 'state')
  if state == 'done' or state == 'dead' then
    redis.call('DEL', KEYS[4])
    redis.call('HDEL', KEYS[1], 'clips_done', 'clips_dead')
  end
end
redis.call('HSET', KEYS[1], unpack(ARGV, 7))
redis.call('EXPIRE', KEYS[1], ARGV[2])
event(KEYS[3], ARGV[6], 'started', ARGV[3], ARGV[4], with_member('attempt', attempts + 1,
      ARGV[5]))
return attempts
"""

# Fencing by SHA-1: the worker sends the SHA-1 of the message it holds, never the message
# again (it may be up to max_message_bytes, or far more for one refused as too large).
_TAKE_BACK = """
-- Returns the message taken back and how many the list held with it (false when not there).
local function take_back(list, sha1)
  local held = redis.call('LRANGE', list, '0', '-1')
  for _, message in ipairs(held) do
    if redis.sha1hex(message) == sha1 then
      redis.call('LREM', list, '1', message)
      return message, #held
    end
  end
  return false
end
"""

_TAKE_NEXT = """
-- The next message for a worker that wants one, in its processing list: the one already
-- there (a call made again after a lost reply, whose first run took it), else the next
-- from the queue. ``empty``: the caller just took the list's only message back, so there
-- is nothing to look for.
local function take_next(list, queue, empty)
  if empty then return redis.call('RPOPLPUSH', queue, list) end
  return redis.call('LINDEX', list, '-1') or redis.call('RPOPLPUSH', queue, list)
end
"""

DONE = _TAKE_BACK + _TAKE_NEXT + _EVENT + """
-- done: the output is stored; record it, acknowledge the message and, when the worker
-- wants more, take the next one from the main queue in the same step (it is idle from
-- this instant: one round trip per job instead of two, and never more than one held).
-- KEYS[1] processing list    the worker's in-flight message (removed here = the ack)
-- KEYS[2] job        hash    {prefix}:job:<id>, its state becomes done
-- KEYS[3] done       list    completion events, newest first, capped
-- KEYS[4] attempts   hash    message SHA-1 -> attempts; the entry is dropped
-- KEYS[5] queue      list    main queue, for the next message
-- KEYS[6] events     stream  a "done" entry, with the completion event
-- ARGV[1] message SHA-1, ARGV[2] event JSON, ARGV[3] job TTL s, ARGV[4] the done list's
-- last index (its cap - 1),
-- ARGV[5] '1' = take the next message, ARGV[6] ack token (unique per ack, the same when the
-- call is made again), ARGV[7] job id, ARGV[8] time, ARGV[9] callback URL or '',
-- ARGV[10] events cap, ARGV[11..] field, value pairs for the job hash
-- A job run again after a failed attempt pushes one event: the first ack sets "completed",
-- which only a new submission (START with no attempts) clears.
-- Returns {acked, next message or nothing}: acked 1 = recorded by this call (or by an earlier
-- run of this same call whose reply was lost), 0 = fenced: the message had been recovered
-- and requeued meanwhile, so nothing was recorded.
local acked, empty = 0, false
local taken, held = take_back(KEYS[1], ARGV[1])
if taken then
  acked, empty = 1, held == 1
  redis.call('HSET', KEYS[2], 'state', 'done', 'ack', ARGV[6], unpack(ARGV, 11))
  redis.call('HDEL', KEYS[2], 'cancel')
  if redis.call('HSETNX', KEYS[2], 'completed', '1') == 1 then
    redis.call('LPUSH', KEYS[3], ARGV[2])
    redis.call('LTRIM', KEYS[3], '0', ARGV[4])
    event(KEYS[6], ARGV[10], 'done', ARGV[7], ARGV[8], ARGV[2], ARGV[9])
  end
  redis.call('EXPIRE', KEYS[2], ARGV[3])
  redis.call('HDEL', KEYS[4], ARGV[1])
elseif redis.call('HGET', KEYS[2], 'ack') == ARGV[6] then
  acked = 1  -- this call ran before and its reply was lost
end
if ARGV[5] == '1' then
  local nxt = take_next(KEYS[1], KEYS[5], empty)
  if nxt then return {acked, nxt} end
end
return {acked}
"""

# The message is still held (by SHA-1), without taking it back: a clip ended, not the job.
_HOLDS = """
local function holds(list, sha1)
  for _, message in ipairs(redis.call('LRANGE', list, '0', '-1')) do
    if redis.sha1hex(message) == sha1 then return true end
  end
  return false
end
"""

CLIP_END = _HOLDS + """
-- clip_end: one clip of a multi-clip job has ended (stored, dead-lettered or cancelled);
-- record it once, while the worker still holds the job's message (not acknowledged here).
-- KEYS[1] processing list    the worker's in-flight message (looked for, not removed)
-- KEYS[2] clips      hash    {prefix}:clips:<job id>: clip id -> done, dead or cancelled
-- KEYS[3] job        hash    {prefix}:job:<job id>: clips_done or clips_dead counts it
-- KEYS[4] list       list    {prefix}:done (the completion event) or {prefix}:dead (the
--                            dead letter), newest first, capped
-- KEYS[5] events     stream  a done, dead or cancelled entry: "id" the clip, "job" the job
-- ARGV[1] message SHA-1, ARGV[2] clip id, ARGV[3] outcome (done, dead, cancelled: the
-- entry's type), ARGV[4] the list's entry (JSON), ARGV[5] the list's cap, ARGV[6] the
-- event's JSON, ARGV[7] job id, ARGV[8] time, ARGV[9] callback URL or '', ARGV[10] events
-- cap, ARGV[11] job TTL s
-- Returns 1 = recorded now, 2 = recorded before (this call made again after a lost reply),
-- 0 = fenced: the message was recovered and requeued meanwhile; its copy decides.
-- The hold is checked first: a worker that lost the message is told so even for a clip
-- that has ended (by it before a lost reply, or by the copy), and stops cutting the clips
-- of a message that is no longer its own.
if not holds(KEYS[1], ARGV[1]) then return 0 end
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then return 2 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[11])
local counter = 'clips_dead'
if ARGV[3] == 'done' then counter = 'clips_done' end
redis.call('HINCRBY', KEYS[3], counter, 1)
redis.call('EXPIRE', KEYS[3], ARGV[11])
redis.call('LPUSH', KEYS[4], ARGV[4])
redis.call('LTRIM', KEYS[4], 0, tonumber(ARGV[5]) - 1)
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[10], '*', 'type', ARGV[3], 'id', ARGV[2],
           'time', ARGV[8], 'event', ARGV[6], 'callback', ARGV[9], 'job', ARGV[7])
return 1
"""

CLIPS_ACK = _TAKE_BACK + _TAKE_NEXT + """
-- clips_ack: every clip of a multi-clip job has ended (CLIP_END); acknowledge its message,
-- and take the next one as DONE does. No event: each clip had its own.
-- KEYS[1] processing list    the worker's in-flight message (removed here = the ack)
-- KEYS[2] job        hash    its state becomes done (a clip was stored) or dead (none was)
-- KEYS[3] clips      hash    the ended clips (its TTL renewed)
-- KEYS[4] attempts   hash    message SHA-1 -> attempts; the entry is dropped
-- KEYS[5] queue      list    main queue, for the next message
-- ARGV[1] message SHA-1, ARGV[2] ack token (the same when the call is made again), ARGV[3]
-- job TTL s, ARGV[4] '1' = take the next message, ARGV[5..] field, value pairs for the hash
-- Returns {acked, next message or nothing}, acked as DONE's.
local acked, empty = 0, false
local taken, held = take_back(KEYS[1], ARGV[1])
if taken then
  acked, empty = 1, held == 1
  local stored = tonumber(redis.call('HGET', KEYS[2], 'clips_done') or '0')
  local state = 'dead'
  if stored > 0 then state = 'done' end
  redis.call('HSET', KEYS[2], 'state', state, 'stage', state, 'ack', ARGV[2], unpack(ARGV, 5))
  redis.call('HDEL', KEYS[2], 'cancel')
  redis.call('EXPIRE', KEYS[2], ARGV[3])
  redis.call('EXPIRE', KEYS[3], ARGV[3])
  redis.call('HDEL', KEYS[4], ARGV[1])
elseif redis.call('HGET', KEYS[2], 'ack') == ARGV[2] then
  acked = 1  -- this call ran before and its reply was lost
end
if ARGV[4] == '1' then
  local nxt = take_next(KEYS[1], KEYS[5], empty)
  if nxt then return {acked, nxt} end
end
return {acked}
"""

DEAD = _TAKE_BACK + _EVENT + """
-- dead: the job can never succeed (or was cancelled); park it in the dead-letter list and
-- acknowledge it.
-- KEYS[1] processing list    the worker's in-flight message (removed)
-- KEYS[2] job        hash    its state becomes dead
-- KEYS[3] dead       list    dead letters, newest first, capped
-- KEYS[4] attempts   hash    the entry is dropped
-- KEYS[5] events     stream  a "dead" (or "cancelled") entry
-- ARGV[1] message SHA-1, ARGV[2] dead letter JSON, ARGV[3] job TTL s, ARGV[4] dead cap,
-- ARGV[5] token (unique per outcome, the same when the call is made again),
-- ARGV[6] event type ('dead' or 'cancelled'), ARGV[7] job id, ARGV[8] time, ARGV[9] the
-- event's JSON (the letter without its message), ARGV[10] callback URL or '',
-- ARGV[11] events cap, ARGV[12..] field, value pairs for the job hash.
-- Returns 1 = recorded (now, or by this same call before its reply was lost), 0 = fenced:
-- recovered by another host meanwhile, whose copy decides; never two dead letters.
if not take_back(KEYS[1], ARGV[1]) then
  if redis.call('HGET', KEYS[2], 'ack') == ARGV[5] then return 1 end
  return 0
end
redis.call('LPUSH', KEYS[3], ARGV[2])
redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[4]) - 1)
redis.call('HSET', KEYS[2], 'state', 'dead', 'ack', ARGV[5], unpack(ARGV, 12))
redis.call('HDEL', KEYS[2], 'cancel')
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('HDEL', KEYS[4], ARGV[1])
event(KEYS[5], ARGV[11], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10])
return 1
"""

RETRY = _NOW_MS + _TAKE_BACK + _EVENT + """
-- retry: a transient failure; count the attempt, then delay the message or, at the limit,
-- dead-letter it.
-- KEYS[1] processing list    the worker's in-flight message (removed)
-- KEYS[2] delayed    zset    member "<token>\\n<message>", score = due time in ms
-- KEYS[3] attempts   hash    message SHA-1 -> attempts so far
-- KEYS[4] job        hash    state becomes failed (waiting) or dead
-- KEYS[5] dead       list    dead letters, capped
-- KEYS[6] events     stream  a "retry" or a "dead" entry
-- ARGV[1] message SHA-1, ARGV[2] max attempts, ARGV[3] backoff base ms, ARGV[4] backoff
-- cap ms, ARGV[5] token (unique per outcome, the same when the call is made again),
-- ARGV[6] the dead letter as a JSON object without its "attempts" (filled in here, as
-- text: no JSON is decoded), ARGV[7] job TTL s, ARGV[8] dead cap, ARGV[9] job id,
-- ARGV[10] time, ARGV[11] the retry event's JSON without "attempts" and "delay_ms" (filled
-- in here), ARGV[12] the dead event's JSON (the letter without its message) without
-- "attempts", ARGV[13] callback URL or '', ARGV[14] events cap, ARGV[15..] field, value
-- pairs for the job hash.
-- Returns {attempts, delay ms} or {attempts, -1} when dead-lettered, {-1, -1} when fenced;
-- a call made again after a lost reply answers from what its first run recorded.
local message = take_back(KEYS[1], ARGV[1])
if not message then
  if redis.call('HGET', KEYS[4], 'ack') ~= ARGV[5] then return {-1, -1} end
  local attempts, due, state = unpack(redis.call('HMGET', KEYS[4], 'attempts', 'retry_at_ms',
                                                  'state'))
  if state == 'dead' then return {tonumber(attempts), -1} end
  return {tonumber(attempts), math.max(0, tonumber(due) - now_ms())}
end
local attempts = redis.call('HINCRBY', KEYS[3], ARGV[1], 1)
if attempts >= tonumber(ARGV[2]) then
  redis.call('LPUSH', KEYS[5], with_member('attempts', attempts, ARGV[6]))
  redis.call('LTRIM', KEYS[5], 0, tonumber(ARGV[8]) - 1)
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('HSET', KEYS[4], 'state', 'dead', 'attempts', attempts, 'ack', ARGV[5],
             unpack(ARGV, 15))
  redis.call('HDEL', KEYS[4], 'cancel')
  redis.call('EXPIRE', KEYS[4], ARGV[7])
  event(KEYS[6], ARGV[14], 'dead', ARGV[9], ARGV[10], with_member('attempts', attempts,
        ARGV[12]), ARGV[13])
  return {attempts, -1}
end
local delay = math.floor(math.min(tonumber(ARGV[3]) * 2 ^ (attempts - 1), tonumber(ARGV[4])))
local due = now_ms() + delay
redis.call('ZADD', KEYS[2], due, ARGV[5] .. '\\n' .. message)
redis.call('HSET', KEYS[4], 'state', 'failed', 'attempts', attempts, 'retry_at_ms', due,
           'ack', ARGV[5], unpack(ARGV, 15))
redis.call('EXPIRE', KEYS[4], ARGV[7])
event(KEYS[6], ARGV[14], 'retry', ARGV[9], ARGV[10], with_member('attempts', attempts,
      with_member('delay_ms', delay, ARGV[11])))
return {attempts, delay}
"""

RELEASE = _EVENT + """
-- release: give back what this worker holds, to the front of the queue, without counting an
-- attempt (an operator's abort, a clean exit, a host that pauses: not the message's fault).
-- KEYS[1] processing list    the worker's in-flight messages
-- KEYS[2] queue      list    main queue; RPUSH puts them next in line
-- KEYS[3] job        hash    (optional) the given-back job's hash, set in the same step (no
--                            other worker can have started it yet)
-- KEYS[4] events     stream  (with KEYS[3]) a "queued" entry for that job
-- ARGV[1] job id, ARGV[2] time, ARGV[3] the event's JSON, ARGV[4] events cap, ARGV[5..]
-- field, value pairs for that hash (no ARGV without KEYS[3])
local n = 0
while true do
  local message = redis.call('RPOP', KEYS[1])
  if not message then break end
  redis.call('RPUSH', KEYS[2], message)
  n = n + 1
end
if n > 0 and KEYS[3] and #ARGV > 4 then
  redis.call('HSET', KEYS[3], unpack(ARGV, 5))
  event(KEYS[4], ARGV[4], 'queued', ARGV[1], ARGV[2], ARGV[3])
end
return n
"""

RECOVER = """
-- recover: requeue what a dead worker held, exactly once however many supervisors race.
-- KEYS[1] processing list    the dead worker's in-flight messages
-- KEYS[2] queue      list    main queue; RPUSH puts them next in line
-- KEYS[3] attempts   hash    message SHA-1 -> attempts; a crash counts as one
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
  if ARGV[3] == '1' then redis.call('HINCRBY', KEYS[3], redis.sha1hex(message), 1) end
  redis.call('RPUSH', KEYS[2], message)
  n = n + 1
end
redis.call('DEL', KEYS[4])
redis.call('HDEL', KEYS[5], ARGV[1])
return n
"""

REPLAY_DEAD = _EVENT + """
-- replay_dead: put one dead letter's message back on the queue, once.
-- KEYS[1] dead     list    dead letters (the exact entry is removed)
-- KEYS[2] queue    list    main queue (LPUSH: back of the line, like a producer)
-- KEYS[3] attempts hash    the message's count starts again
-- KEYS[4] events   stream  a "queued" entry
-- ARGV[1] dead letter entry, ARGV[2] original message, ARGV[3] job id, ARGV[4] time,
-- ARGV[5] the event's JSON, ARGV[6] events cap
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('LPUSH', KEYS[2], ARGV[2])
redis.call('HDEL', KEYS[3], redis.sha1hex(ARGV[2]))
event(KEYS[4], ARGV[6], 'queued', ARGV[3], ARGV[4], ARGV[5])
return 1
"""

MARK_CANCEL = """
-- mark_cancel: ask for a job to be cancelled, unless it has ended.
-- KEYS[1] job  hash  {prefix}:job:<id>: its "cancel" field is set
-- ARGV[1] the mark (the time it was asked), ARGV[2] TTL s for a hash that did not exist (a
-- message pushed without one, taken by a worker that has not started it yet)
-- Returns the job's state before ('' when it had no hash); a done or dead job is left as it
-- is (a new submission of it starts afresh).
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'done' or state == 'dead' then return state end
local existed = redis.call('EXISTS', KEYS[1])
redis.call('HSET', KEYS[1], 'cancel', ARGV[1])
if existed == 0 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return state or ''
"""

CANCEL = _EVENT + """
-- cancel: take one queued message out of its list (or the delayed retries) and dead-letter
-- it with reason "cancelled", in one step; nothing when a worker took it first. A message
-- of many clips is one letter and one "cancelled" entry per clip (each clip ends once).
-- KEYS[1] where      list or zset  the queue, the retry list, or the delayed zset
-- KEYS[2] job        hash          its state becomes dead, its "cancel" mark is cleared
-- KEYS[3] dead       list          dead letters, newest first, capped
-- KEYS[4] attempts   hash          the message's entry (failed attempts) is dropped
-- KEYS[5] events     stream        a "cancelled" entry per letter
-- ARGV[1] 'zset' or 'list', ARGV[2] the exact list entry or zset member, ARGV[3] message
-- SHA-1, ARGV[4] job TTL s, ARGV[5] time, ARGV[6] callback URL or '', ARGV[7] dead cap,
-- ARGV[8] events cap, ARGV[9] n letters, then n times: the id it names, the dead letter's
-- JSON without "attempts", the event's JSON without "attempts", the job id for a clip's
-- letter ('' for the message's own: its entry then has no "job"); then field, value pairs
-- for the job hash
-- Returns 1 = cancelled, 0 = no longer there.
local removed
if ARGV[1] == 'zset' then removed = redis.call('ZREM', KEYS[1], ARGV[2])
else removed = redis.call('LREM', KEYS[1], 1, ARGV[2]) end
if removed == 0 then return 0 end
local attempts = tonumber(redis.call('HGET', KEYS[4], ARGV[3]) or '0')
local n = tonumber(ARGV[9])
for i = 0, n - 1 do
  local at = 10 + 4 * i
  redis.call('LPUSH', KEYS[3], with_member('attempts', attempts, ARGV[at + 1]))
  local body = with_member('attempts', attempts, ARGV[at + 2])
  if ARGV[at + 3] == '' then
    event(KEYS[5], ARGV[8], 'cancelled', ARGV[at], ARGV[5], body, ARGV[6])
  else
    redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[8], '*', 'type', 'cancelled', 'id',
               ARGV[at], 'time', ARGV[5], 'event', body, 'callback', ARGV[6], 'job',
               ARGV[at + 3])
  end
end
redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[7]) - 1)
redis.call('HDEL', KEYS[4], ARGV[3])
redis.call('HSET', KEYS[2], 'state', 'dead', 'attempts', attempts, unpack(ARGV, 10 + 4 * n))
redis.call('HDEL', KEYS[2], 'cancel')
redis.call('EXPIRE', KEYS[2], ARGV[4])
return 1
"""

CLAIM_HOST = """
-- claim_host: hold (or refresh) the claim on a host_id for one supervisor
-- (supervisor.recovery: one supervisor per host_id).
-- KEYS[1] host claim  hash  {prefix}:host:<host_id>: token, pid, hostname, scope (machine
--                           and pid namespace), created (process start), beat (claims and
--                           refreshes so far); TTL heartbeat_ttl
-- ARGV[1] our token, ARGV[2] TTL in ms, ARGV[3] the token of a holder known dead ('' = none),
-- ARGV[4..] field, value pairs that describe us.
-- Returns 1 (refreshed: it was ours), 2 (taken: it was free or its holder dead), 0 (another's).
local holder = redis.call('HGET', KEYS[1], 'token')
local result = 1
if holder ~= ARGV[1] then
  if holder and holder ~= ARGV[3] then return 0 end
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'token', ARGV[1], unpack(ARGV, 4))
  result = 2
end
redis.call('HINCRBY', KEYS[1], 'beat', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return result
"""

UNCLAIM_HOST = """
-- unclaim_host: give up our claim on a host_id (a clean stop), and only ours.
-- KEYS[1] host claim  hash  {prefix}:host:<host_id>; ARGV[1] our token
if redis.call('HGET', KEYS[1], 'token') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

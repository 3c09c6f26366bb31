"""Floors: the least a Python consumer of a Redis list can do, to measure ours against.

Run with clip-supervisor's own interpreter (so the same Python and redis-py), as a script:
``python bench/floors.py MODE REDIS_URL ...``. Only the standard library and redis-py.

- ``loop URL QUEUE PROC``: BLMOVE one message into PROC, LREM it, repeat: the bare reliable
  queue loop (two round trips per job, nothing recorded).
- ``ack-loop URL QUEUE PROC DONE``: BLMOVE, then LREM + LPUSH DONE in one MULTI: the least a
  consumer that reports completion can do (the latency floor).
- ``script-loop URL QUEUE PROC DONE``: one script per job that acknowledges the previous
  message (LREM, LPUSH of a completion event onto DONE, capped) and moves the next one in:
  what a design with one round trip per job under load can reach (BLMOVE when idle).
- ``prefork URL QUEUE N``: a parent that forks N children idle in BLMOVE and, on TERM, TERMs
  them and reaps them: the least an idle prefork pool can do to stop.
- ``reaper URL QUEUE PREFIX ATTEMPTS``: a parent whose child takes one message into
  PREFIX<pid> and holds it; when the child dies the parent (woken by SIGCHLD) reaps it,
  requeues the message and counts the attempt in one script, then forks a new child.
"""

from __future__ import annotations

import os
import select
import signal
import sys

import redis

BLOCK_SECONDS = 1.0

REQUEUE = """
local message = redis.call('RPOP', KEYS[1])
if message then
  redis.call('HINCRBY', KEYS[3], message, 1)
  redis.call('RPUSH', KEYS[2], message)
end
return message
"""


def client(url: str) -> redis.Redis:
    r = redis.Redis.from_url(url, socket_timeout=BLOCK_SECONDS + 5)
    r.client_setname(f"bench-floor-{os.getpid()}")
    return r


def loop(url: str, queue: str, proc: str) -> None:
    r = client(url)
    while True:
        message = r.blmove(queue, proc, BLOCK_SECONDS, "RIGHT", "LEFT")
        if message is not None:
            r.lrem(proc, 1, message)


def ack_loop(url: str, queue: str, proc: str, done: str) -> None:
    r = client(url)
    while True:
        message = r.blmove(queue, proc, BLOCK_SECONDS, "RIGHT", "LEFT")
        if message is not None:
            pipe = r.pipeline(transaction=True)
            pipe.lrem(proc, 1, message)
            pipe.lpush(done, message)
            pipe.execute()


ACK_AND_FETCH = """
if ARGV[1] ~= '' then
  redis.call('LREM', KEYS[2], 1, ARGV[1])
  redis.call('LPUSH', KEYS[3], ARGV[2])
  redis.call('LTRIM', KEYS[3], 0, 999999)
end
return redis.call('RPOPLPUSH', KEYS[1], KEYS[2])
"""


def script_loop(url: str, queue: str, proc: str, done: str) -> None:
    r = client(url)
    ack_and_fetch = r.register_script(ACK_AND_FETCH)
    held: bytes = b""
    while True:
        message = ack_and_fetch(keys=[queue, proc, done], args=[held, b'{"done":' + held + b"}"])
        if message is None:
            message = r.blmove(queue, proc, BLOCK_SECONDS, "RIGHT", "LEFT")
        held = message or b""


def prefork(url: str, queue: str, n: int) -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    children = []
    for i in range(n):
        pid = os.fork()
        if pid == 0:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
            try:
                loop(url, queue, f"{queue}:processing:{i}")
            finally:
                os._exit(0)
        children.append(pid)
    signal.sigwait({signal.SIGTERM})
    for pid in children:
        os.kill(pid, signal.SIGTERM)
    for pid in children:
        os.waitpid(pid, 0)


def reaper(url: str, queue: str, prefix: str, attempts: str) -> None:
    r = client(url)
    requeue = r.register_script(REQUEUE)
    rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)

    def spawn() -> int:
        pid = os.fork()
        if pid == 0:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            mine = client(url)
            mine.blmove(queue, f"{prefix}{os.getpid()}", 0, "RIGHT", "LEFT")
            while True:
                signal.pause()
        return pid

    children = {spawn()}
    while True:
        select.select([rfd], [], [], 1.0)
        try:
            while os.read(rfd, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            children.discard(pid)
            requeue(keys=[f"{prefix}{pid}", queue, attempts])
            children.add(spawn())


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    mode, *rest = argv
    if mode == "loop":
        loop(*rest)
    elif mode == "ack-loop":
        ack_loop(*rest)
    elif mode == "script-loop":
        script_loop(*rest)
    elif mode == "prefork":
        prefork(rest[0], rest[1], int(rest[2]))
    elif mode == "reaper":
        reaper(*rest)
    else:
        print(f"unknown mode {mode!r}\n{__doc__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

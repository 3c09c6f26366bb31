"""Worker slots: a stable identity per worker position, and its restart state machine.

A slot outlives the processes that fill it. When its worker dies the master knows at once
which processing list to recover (the worker id is derived from the slot's pid and start
time), and the slot decides when to start the next one:

    EMPTY --spawn--> STARTING --min_uptime--> RUNNING --exit--> EMPTY (respawn now)
    STARTING --exit (crash)--> BACKOFF --delay--> EMPTY     delay doubles, capped
    STARTING --exit (MAX_START_FAILURES-th crash in a row)--> FATAL --HUP or TTIN--> EMPTY
    any --TERM sent--> STOPPING --exit--> EMPTY (or RETIRED when the pool shrinks)

A worker that dies before ``min_uptime`` counts as a failed start, like supervisord's
``startsecs``; one that ran long enough resets the failure count. After MAX_START_FAILURES
failed starts in a row the slot gives up (supervisord's FATAL): whatever makes its workers
die at boot (a work_dir it cannot create, a broken install) will not go away by itself
often enough to be worth a fork every restart_backoff_max, and the operator is told
(log, ``clip_slots_fatal``, /healthz, the dashboard) instead of a slot that quietly never
works. The master revives it on HUP or TTIN.
"""

from __future__ import annotations

import enum
import math
import os
import signal
from dataclasses import dataclass

from worker.protocol import (
    EXIT_ABORTED,
    EXIT_BOOT_ERROR,
    EXIT_OK,
    EXIT_PARENT_GONE,
    EXIT_RECYCLE,
    worker_dir_name,
    worker_id_for,
)
from worker.runner import LoopClock

CLEAN_EXITS = frozenset({EXIT_OK, EXIT_RECYCLE, EXIT_ABORTED, EXIT_PARENT_GONE})
BACKOFF_BASE = 0.5
# Failed starts in a row before a slot is FATAL (0.5 s ... ~2 min of backoff); the default
# of [supervisor] max_start_failures.
MAX_START_FAILURES = 10
_CAUSES = {EXIT_OK: "stopped", EXIT_RECYCLE: "recycled", EXIT_ABORTED: "aborted",
           EXIT_PARENT_GONE: "parent_gone", EXIT_BOOT_ERROR: "boot_error"}


class SlotState(enum.Enum):
    EMPTY = "empty"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    BACKOFF = "backoff"
    FATAL = "fatal"  # gave up after MAX_START_FAILURES failed starts; HUP or TTIN revives it


@dataclass
class Exit:
    """A decoded wait status."""

    code: int | None
    signal: int | None

    @classmethod
    def from_status(cls, status: int) -> Exit:
        if os.WIFSIGNALED(status):
            return cls(code=None, signal=os.WTERMSIG(status))
        return cls(code=os.WEXITSTATUS(status), signal=None)

    @property
    def clean(self) -> bool:
        return self.signal is None and self.code in CLEAN_EXITS

    @property
    def cause(self) -> str:
        """A short label for metrics: the signal's name, or what the exit code means."""
        if self.signal is not None:
            return signal.Signals(self.signal).name.lower()
        return _CAUSES.get(self.code, f"exit_{self.code}")

    def describe(self) -> str:
        if self.signal is not None:
            name = signal.Signals(self.signal).name
            if self.signal == signal.SIGKILL:
                return f"killed by {name} (out of memory? see dmesg)"
            return f"killed by {name}"
        names = {EXIT_OK: "stopped", EXIT_RECYCLE: "recycled", EXIT_ABORTED: "aborted its job",
                 EXIT_PARENT_GONE: "lost its supervisor", EXIT_BOOT_ERROR: "could not start"}
        return f"exited with code {self.code}" + (
            f" ({names[self.code]})" if self.code in names else "")


@dataclass
class Slot:
    index: int
    state: SlotState = SlotState.EMPTY
    pid: int | None = None
    started_ms: int = 0
    spawned_at: float = 0.0
    failures: int = 0
    next_start: float = 0.0
    killed_on_purpose: bool = False
    wedged: bool = False  # killed by the master: its main loop was silent too long
    generation: int = 0
    clock: LoopClock | None = None  # the worker's last sign of life, shared with it
    last_failure: str = ""  # how the last failed start ended (Exit.describe)
    fatal_since: float = 0.0  # wall clock, when the slot went FATAL

    def worker_id(self, host_id: str) -> str:
        assert self.pid is not None
        return worker_id_for(host_id, self.pid, self.started_ms)

    def worker_dir(self, work_dir: str) -> str:
        assert self.pid is not None
        return os.path.join(work_dir, worker_dir_name(self.pid, self.started_ms))

    def new_clock(self, now: float) -> LoopClock:
        """The shared clock of the next worker, made before it is forked."""
        self.close_clock()
        self.clock = LoopClock(now)
        return self.clock

    def close_clock(self) -> None:
        if self.clock is not None:
            self.clock.close()
            self.clock = None

    def spawned(self, pid: int, started_ms: int, now: float, generation: int) -> None:
        self.pid, self.started_ms, self.spawned_at = pid, started_ms, now
        self.state = SlotState.STARTING
        self.killed_on_purpose = False
        self.wedged = False
        self.generation = generation

    def tick(self, now: float, min_uptime: float) -> None:
        if self.state is SlotState.STARTING and now - self.spawned_at >= min_uptime:
            self.state = SlotState.RUNNING
            self.failures = 0

    def exited(self, how: Exit, now: float, min_uptime: float, backoff_max: float,
               wall_time: float = 0.0, max_failures: int = MAX_START_FAILURES) -> float:
        """Record the worker's death; return the delay before the slot may start again
        (0: now; inf: never, the slot is FATAL)."""
        uptime = now - self.spawned_at
        failed_start = how.code == EXIT_BOOT_ERROR or (
            not how.clean and not self.killed_on_purpose and uptime < min_uptime)
        self.pid = None
        self.close_clock()
        if failed_start:
            self.failures += 1
            self.last_failure = how.describe()
            if max_failures and self.failures >= max_failures:
                self.state = SlotState.FATAL
                self.fatal_since = wall_time
                return math.inf
            delay = backoff_delay(self.failures, backoff_max)
            self.state = SlotState.BACKOFF
            self.next_start = now + delay
            return delay
        if uptime >= min_uptime:
            self.failures = 0
        self.state = SlotState.EMPTY
        self.next_start = now
        return 0.0

    def due(self, now: float) -> bool:
        return self.state is SlotState.EMPTY or (
            self.state is SlotState.BACKOFF and now >= self.next_start)

    def revive(self, now: float) -> None:
        """A FATAL slot starts again at once, its failure count reset."""
        self.state, self.failures, self.next_start = SlotState.EMPTY, 0, now


def backoff_delay(failures: int, cap: float) -> float:
    """0.5 s, 1 s, 2 s, ... capped: a worker that cannot start never fork-bombs the host."""
    return min(cap, BACKOFF_BASE * 2 ** max(0, failures - 1))

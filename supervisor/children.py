"""Worker slots: a stable identity per worker position, and its restart state machine.

A slot outlives the processes that fill it. When its worker dies the master knows at once
which processing list to recover (the worker id is derived from the slot's pid and start
time), and the slot decides when to start the next one:

    EMPTY --spawn--> STARTING --min_uptime--> RUNNING --exit--> EMPTY (respawn now)
    STARTING --exit (crash)--> BACKOFF --delay--> EMPTY     delay doubles, capped
    any --TERM sent--> STOPPING --exit--> EMPTY (or RETIRED when the pool shrinks)

A worker that dies before ``min_uptime`` counts as a failed start, like supervisord's
``startsecs``; one that ran long enough resets the failure count.
"""

from __future__ import annotations

import enum
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

CLEAN_EXITS = frozenset({EXIT_OK, EXIT_RECYCLE, EXIT_ABORTED, EXIT_PARENT_GONE})
BACKOFF_BASE = 0.5
_CAUSES = {EXIT_OK: "stopped", EXIT_RECYCLE: "recycled", EXIT_ABORTED: "aborted",
           EXIT_PARENT_GONE: "parent_gone", EXIT_BOOT_ERROR: "boot_error"}


class SlotState(enum.Enum):
    EMPTY = "empty"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    BACKOFF = "backoff"


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
    generation: int = 0

    def worker_id(self, host_id: str) -> str:
        assert self.pid is not None
        return worker_id_for(host_id, self.pid, self.started_ms)

    def worker_dir(self, work_dir: str) -> str:
        assert self.pid is not None
        return os.path.join(work_dir, worker_dir_name(self.pid, self.started_ms))

    def spawned(self, pid: int, started_ms: int, now: float, generation: int) -> None:
        self.pid, self.started_ms, self.spawned_at = pid, started_ms, now
        self.state = SlotState.STARTING
        self.killed_on_purpose = False
        self.generation = generation

    def tick(self, now: float, min_uptime: float) -> None:
        if self.state is SlotState.STARTING and now - self.spawned_at >= min_uptime:
            self.state = SlotState.RUNNING
            self.failures = 0

    def exited(self, how: Exit, now: float, min_uptime: float, backoff_max: float) -> float:
        """Record the worker's death; return the delay before the slot may start again."""
        uptime = now - self.spawned_at
        failed_start = how.code == EXIT_BOOT_ERROR or (
            not how.clean and not self.killed_on_purpose and uptime < min_uptime)
        self.pid = None
        if failed_start:
            self.failures += 1
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


def backoff_delay(failures: int, cap: float) -> float:
    """0.5 s, 1 s, 2 s, ... capped: a worker that cannot start never fork-bombs the host."""
    return min(cap, BACKOFF_BASE * 2 ** max(0, failures - 1))

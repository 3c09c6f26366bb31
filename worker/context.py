"""What the steps of one job share: built once per job by the pipeline, passed to each step.

Reading the source (worker.source, worker.relay, worker.gcs), running ffmpeg (worker.media)
and storing the clip (worker.storage) all work against the same deadline, the same abort
check (a QUIT, the supervisor gone), the same waker, the same limits on what a source may
cost, and report through the same stage and progress callbacks. One ``JobContext`` carries
all of it, so no step threads a dozen of them through its calls, and a step that wants one
more (the room check of a download) finds it here.

``Identity`` lives here too: what a source says it is, which the readers learn and the
source cache compares, without either importing the other.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import Aborted, Transient
from .wake import Waker


@dataclass(frozen=True)
class FetchLimits:
    """What one source may cost: seconds to connect, seconds without a byte, bytes in all;
    and whether non-public addresses may be fetched (the address guard)."""

    connect_timeout: float
    stall_timeout: float
    max_bytes: int
    allow_private: bool


@dataclass(frozen=True)
class Identity:
    """What a source says it is: its size and a validator (a strong ETag, else
    Last-Modified; a Cloud Storage object's generation)."""

    size: int
    validator: str


def _never() -> bool:
    return False


def _ignore(*_: object) -> None:
    return None


@dataclass
class JobContext:
    """One job's deadline, abort check, waker, limits and callbacks, and its stage timings.

    ``room(n)`` is asked before a download of ``n`` bytes writes its first byte; it raises
    the job's failure when work_dir has no room for it (worker.pipeline).
    """

    deadline: float  # time.monotonic() by which the job must be done
    limits: FetchLimits
    waker: Waker = field(default_factory=Waker)
    should_abort: Callable[[], bool] = _never
    on_stage: Callable[[str, bool], None] = _ignore
    on_progress: Callable[[float, str], None] = _ignore
    room: Callable[[int], None] = _ignore
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    current: str = ""  # the stage the job is in
    _since: float = field(default_factory=time.monotonic)

    def remaining(self) -> float:
        """Seconds left before the job's deadline (<= 0 once it passed)."""
        return self.deadline - time.monotonic()

    def check(self, doing: str) -> None:
        """Raise Aborted when the job must stop now, a ``timeout`` once its deadline passed;
        ``doing`` names what was under way (``fetching <url>``)."""
        if self.should_abort():
            raise Aborted()
        if time.monotonic() > self.deadline:
            raise Transient("timeout", f"{doing} exceeded the job's timeout")

    def stage(self, name: str, at_once: bool = False) -> None:
        """Enter stage ``name`` (``fetch``, ``clip``, ``store``; ``""``: the job is over),
        timing the one it leaves. Entering the stage the job is in changes nothing.
        ``at_once``: the job's record is to show it now, not at the job's next step (what
        follows may wait on the network with no step between: an upload)."""
        if name == self.current:
            return
        now = time.monotonic()
        if self.current:
            self.timings[self.current] = round(now - self._since, 3)
        self.current, self._since = name, now
        if name:
            self.on_stage(name, at_once)

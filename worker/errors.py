"""Job failures, each with a machine-readable reason and a retry decision.

A stage raises ``Permanent`` when running the job again cannot help (bad input, 404, not a
video): the message is dead-lettered at once. It raises ``Transient`` when the world may
change (network, 5xx, timeouts, a full disk): the message is retried with backoff until
``max_attempts``. Anything else escaping a stage is a bug; the worker treats it as transient
so that a bug never loses a message, and logs the traceback.
"""

from __future__ import annotations


class JobFailed(Exception):
    permanent = False

    def __init__(self, reason: str, error: str) -> None:
        super().__init__(f"{reason}: {error}")
        self.reason = reason
        self.error = error


class Permanent(JobFailed):
    permanent = True


class Transient(JobFailed):
    permanent = False


class HostFault(Transient):
    """A fault of this host, not of the job: work_dir or the output folder full or read-only,
    ffmpeg missing. The worker gives the message back uncounted (another host, or this one
    once the fault clears, runs it) and pauses fetching with backoff until a job gets past
    the fault again."""


class Aborted(Exception):
    """The job was abandoned on purpose (QUIT/INT, parent gone): requeue without counting."""

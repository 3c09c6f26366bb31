"""Redis key names: the contract with producers and with every host of the pool.

Only the queue module (worker.queue) builds them; everything else asks it. Every key sits
under one hash tag, ``{prefix}``, so a Redis Cluster keeps all of them in one slot and
multi-key scripts and MULTI blocks stay legal there.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str = "clips"

    @property
    def base(self) -> str:
        return "{" + self.prefix + "}"

    @property
    def queue(self) -> str:
        return f"{self.base}:queue"

    @property
    def retry(self) -> str:
        return f"{self.base}:retry"

    @property
    def delayed(self) -> str:
        return f"{self.base}:delayed"

    @property
    def workers(self) -> str:
        return f"{self.base}:workers"

    @property
    def attempts(self) -> str:
        return f"{self.base}:attempts"

    @property
    def done(self) -> str:
        return f"{self.base}:done"

    @property
    def dead(self) -> str:
        return f"{self.base}:dead"

    @property
    def events(self) -> str:
        """A stream of every job's state changes (worker.queue: the ``events_*`` methods)."""
        return f"{self.base}:events"

    @property
    def cancels(self) -> str:
        """The pub/sub channel a cancel names its job on, for the worker that runs it."""
        return f"{self.base}:cancels"

    @property
    def webhook_failures(self) -> str:
        """Webhook deliveries given up, newest first: a list of JSON records, capped."""
        return f"{self.base}:webhook_failures"

    @property
    def webhook_failure_counts(self) -> str:
        """How many webhook deliveries were given up so far: a hash, outcome -> count."""
        return f"{self.base}:webhook_failures:count"

    @property
    def processing_pattern(self) -> str:
        return f"{self.base}:processing:*"

    def processing(self, worker_id: str) -> str:
        return f"{self.base}:processing:{worker_id}"

    def heartbeat(self, worker_id: str) -> str:
        return f"{self.base}:heartbeat:{worker_id}"

    def job(self, job_id: str) -> str:
        return f"{self.base}:job:{job_id}"

    def clips(self, job_id: str) -> str:
        """A multi-clip job's clips that have ended: clip id -> done, dead or cancelled."""
        return f"{self.base}:clips:{job_id}"

    def host(self, host_id: str) -> str:
        """The claim of the one supervisor that runs with this host_id (supervisor.recovery)."""
        return f"{self.base}:host:{host_id}"

    def worker_id_of(self, processing_key: str) -> str:
        return processing_key[len(self.processing("")):]

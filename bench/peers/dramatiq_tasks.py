"""Dramatiq: a no-op actor on a Redis broker (``dramatiq bench.peers.dramatiq_tasks``)."""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker

broker = RedisBroker(url=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:1/0"))
dramatiq.set_broker(broker)


@dramatiq.actor(max_retries=0)
def noop() -> None:
    return None

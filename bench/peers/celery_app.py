"""Celery: a no-op task on a Redis broker, acks_late with a prefetch of one.

``celery -A bench.peers.celery_app worker -P prefork -c 2``; no result backend (Celery's
default; Dramatiq keeps no results either, RQ keeps its job hashes by default).
"""

from __future__ import annotations

import os

from celery import Celery

app = Celery("bench", broker=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:1/0"))
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
)


@app.task(name="noop")
def noop() -> None:
    return None

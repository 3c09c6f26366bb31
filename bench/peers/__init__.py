"""The peers' no-op tasks (RQ, Dramatiq, Celery), for bench.queue_overhead.

Each reads the private Redis URL from BENCH_REDIS_URL; the task bodies do nothing, so what is
measured is each framework's own fetch, bookkeeping and acknowledgement per job.
"""

"""Prometheus metrics recorded by the workers (served by the master, see supervisor.metrics).

Workers are separate processes, so the counters use prometheus-client's multiprocess mode:
when ``PROMETHEUS_MULTIPROC_DIR`` is set (the master sets it before forking, only when
``[metrics] listen`` is configured) each process writes its values to memory-mapped files
there and the master sums them at scrape time. Without it they are plain in-process
counters that nobody reads, which costs next to nothing.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from . import promsafe

promsafe.install()  # before any metric exists: no SIGBUS on a full file system

DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, float("inf"))

JOBS = Counter("clip_jobs_total", "Jobs finished by a worker, by outcome "
               "(done, dead, retried, aborted).", ["outcome"])
DEAD = Counter("clip_dead_letters_total", "Jobs dead-lettered, by reason.", ["reason"])
JOB_SECONDS = Histogram("clip_job_duration_seconds", "Wall time of jobs that finished done.",
                        buckets=DURATION_BUCKETS)
STAGE_SECONDS = Histogram("clip_stage_duration_seconds", "Wall time of each pipeline stage.",
                          ["stage"], buckets=DURATION_BUCKETS)
BYTES_IN = Counter("clip_source_bytes_total", "Bytes of sources fetched.")
BYTES_OUT = Counter("clip_output_bytes_total", "Bytes of clips stored.")
REDIS_ERRORS = Counter("clip_redis_errors_total", "Redis operations that failed and were "
                       "retried, by process role.", ["role"])
HOST_FAULTS = Counter("clip_host_faults_total", "Times a worker paused fetching for a fault "
                      "of its host (work_dir or output folder full or read-only, ffmpeg "
                      "missing), by reason.", ["reason"])
PAUSED = Gauge("clip_workers_paused", "Workers paused by a fault of their host.",
               multiprocess_mode="livesum")
FENCED = Counter("clip_fenced_acks_total", "Outcomes not recorded because the job's message "
                 "had been requeued while its worker ran it (taken for dead during a stall "
                 "or partition); the requeued copy decides.")
CUTS = Counter("clip_cuts_total", "Clips stored, by how they were cut (copy, smart, encode; "
               "smart jobs a source could not be joined for count as encode).", ["cut"])
SMART_FALLBACKS = Counter("clip_smart_fallbacks_total", "Smart-cut jobs cut in encode mode "
                          "because their source could not be joined safely.")
REENCODED_SECONDS = Counter("clip_reencoded_seconds_total", "Seconds of clips re-encoded "
                            "(all of an encode clip, the head and tail of a smart one).")

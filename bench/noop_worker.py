"""One clip-supervisor worker running no-op jobs already queued, timing its own CPU per job.

Run with clip-supervisor's interpreter (the tree under test is the one its venv imports):
``python bench/noop_worker.py --config F --warm W --jobs N --out RESULT.json``. The config
sets ``[job] pipeline = noop`` and ``[supervisor] max_jobs_per_worker = W + N``, so the
worker's own loop (``Worker.run``: FETCH, intake, the DONE script that takes the next
message, the per-job log line) runs W jobs to warm up, then N timed ones, and exits as a
recycled worker would. The CPU is this process's (``RUSAGE_SELF``: the main loop and the
idle heartbeat and cancel-listener threads). Used by ``python -m bench.noop_cpu``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--warm", type=int, required=True)
    parser.add_argument("--jobs", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    # The tree this interpreter's clip-supervisor was installed from, whichever checkout
    # this script sits in (``--against`` runs it with another tree's venv).
    import clip_supervisor

    clip_supervisor.activate()
    from worker import config as config_mod
    from worker import logs
    from worker.runner import Worker

    config = config_mod.load(args.config)
    logs.setup("worker", config.supervisor.logfile, config.supervisor.log_level)
    marks: list[tuple[float, float, float]] = []

    def mark() -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        marks.append((usage.ru_utime, usage.ru_stime, time.monotonic()))

    class Timed(Worker):
        def _handle(self, raw: bytes) -> None:
            if self.jobs_done == args.warm:  # the first timed job starts here
                mark()
            super()._handle(raw)

    worker = Timed(config)
    code = worker.run()
    mark()  # after the last job's ack, before the interpreter's exit
    if len(marks) != 2 or worker.jobs_done != args.warm + args.jobs:
        print(f"noop_worker: {worker.jobs_done} jobs done, {args.warm + args.jobs} expected "
              f"(exit code {code})", file=sys.stderr)
        return 1
    (u0, s0, t0), (u1, s1, t1) = marks
    with open(args.out, "w") as fh:
        json.dump({"jobs": args.jobs, "user": u1 - u0, "system": s1 - s0, "wall": t1 - t0}, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())

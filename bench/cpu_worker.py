"""One clip-supervisor worker (``python -m worker``'s code) under cProfile, on CPU time.

Run with clip-supervisor's interpreter: ``python bench/cpu_worker.py --config F --out P``.
It stops on TERM like any worker, then writes the pstats file P. Only the main thread (the
job loop) is profiled, not the heartbeat thread. Used by ``python -m bench.hotspots cpu``.
"""

from __future__ import annotations

import argparse
import cProfile
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from worker import config as config_mod
    from worker import logs
    from worker.runner import Worker

    config = config_mod.load(args.config)
    logs.setup("worker", config.supervisor.logfile, config.supervisor.log_level)
    worker = Worker(config)
    profile = cProfile.Profile(time.process_time)
    profile.enable()
    try:
        code = worker.run()
    finally:
        profile.disable()
        profile.dump_stats(args.out)
    return code


if __name__ == "__main__":
    sys.exit(main())

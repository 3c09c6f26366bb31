"""``python -m worker``: one worker on its own, without a supervisor (for debugging).

Stops on TERM (after its job) or INT/QUIT (at once, giving its job back).
"""

import argparse
import sys

from . import config as config_mod
from . import logs
from .config import ConfigError
from .fsafe import UnsafePath, prepare_work_dir
from .runner import Worker


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m worker")
    parser.add_argument("--config", help="INI file")
    parser.add_argument("--redis-url")
    args = parser.parse_args()
    overrides = {"redis.url": args.redis_url} if args.redis_url else {}
    try:
        config = config_mod.load(args.config or config_mod.default_path(), overrides=overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 1
    try:
        prepare_work_dir(config)  # the same checks as `clip-supervisor run`
        logs.setup("worker", config.supervisor.logfile, config.supervisor.log_level)
    except UnsafePath as exc:
        print(f"python -m worker: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"python -m worker: cannot start: {exc.strerror} ({exc.filename})",
              file=sys.stderr)
        return 1
    return Worker(config).run()


sys.exit(main())

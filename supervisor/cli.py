"""The ``clip-supervisor`` command: run, stop, status, reload and the queue tools.

Every command reads the same configuration (``--config``, else /etc/clip-supervisor.conf
when it exists, else the built-in defaults, then ``CLIP_SUPERVISOR_*`` variables). Errors
an operator can cause (bad config, Redis unreachable, pid file held) print one clear line
and exit non-zero; they never show a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence

import psutil

import worker
from worker import config as config_mod
from worker import logs
from worker.config import MODES, Config, ConfigError
from worker.fsafe import UnsafePath, prepare_work_dir
from worker.queue import ANY_REDIS_ERROR, REDIS_ERRORS, JobQueue, connect

from . import admin
from .pidfile import DEFAULT_PIDFILE, AlreadyRunning, PidFile, holder, read_pid, remove_stale

PROG = "clip-supervisor"


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="F",
                        help="INI file (default /etc/clip-supervisor.conf when it exists)")
    common.add_argument("--redis-url", metavar="U", help="override [redis] url")
    pid = argparse.ArgumentParser(add_help=False)
    pid.add_argument("--pidfile", metavar="P", help="override [supervisor] pidfile")

    parser = argparse.ArgumentParser(prog=PROG, description="Clip videos from a Redis queue "
                                     "with a pool of supervised worker processes.")
    parser.add_argument("--version", action="version", version=f"{PROG} {worker.version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", parents=[common, pid], help="run the supervisor")
    run.add_argument("--workers", metavar="N", help="worker processes (auto = one per CPU)")
    run.add_argument("--daemon", action="store_true", help="detach and run in the background")
    run.add_argument("--logfile", metavar="L", help="override [supervisor] logfile")
    run.add_argument("--log-format", choices=("text", "json"), default="text")
    run.add_argument("--check-config", action="store_true",
                     help="only load and check the configuration, then exit 0 (or 1)")

    stop = sub.add_parser("stop", parents=[common, pid], help="stop a running daemon")
    stop.add_argument("--timeout", type=float, metavar="S",
                      help="seconds to wait (default graceful_timeout + 10)")
    sub.add_parser("status", parents=[common, pid], help="is it running? (LSB exit codes)")
    sub.add_parser("reload", parents=[common, pid], help="send HUP: reload and replace workers")

    enq = sub.add_parser("enqueue", parents=[common], help="push one job, print its id")
    enq.add_argument("url")
    enq.add_argument("--start", type=float, metavar="S")
    span = enq.add_mutually_exclusive_group()
    span.add_argument("--end", type=float, metavar="E")
    span.add_argument("--duration", type=float, metavar="D")
    enq.add_argument("--output", metavar="O")
    enq.add_argument("--mode", choices=MODES)
    enq.add_argument("--format", dest="fmt", metavar="F")
    enq.add_argument("--id", dest="job_id", metavar="ID")
    enq.add_argument("--callback", metavar="URL",
                     help="an https URL the job's outcome is POSTed to (a signed webhook)")
    enq.add_argument("--clips", metavar="JSON",
                     help='many clips of URL, read once: a JSON list such as '
                     '\'[{"start": 5, "duration": 10}, {"id": "end", "start": 50}]\'')
    enq.add_argument("--wait", action="store_true",
                     help="follow the job; exit 0 done, 2 dead-lettered, 3 timed out")
    enq.add_argument("--timeout", type=float, metavar="S", help="with --wait: give up after S")

    cancel = sub.add_parser("cancel", parents=[common],
                            help="cancel jobs: a queued one never runs, a running one is "
                            "aborted; both end as dead letters (cancelled)")
    cancel.add_argument("ids", nargs="+", metavar="ID")

    st = sub.add_parser("stats", parents=[common], help="queue depths and workers")
    st.add_argument("--json", action="store_true")
    st.add_argument("--watch", nargs="?", const=2.0, type=float, metavar="SECONDS")

    dead = sub.add_parser("dead", parents=[common], help="inspect and replay dead letters")
    dead_sub = dead.add_subparsers(dest="action", required=True, metavar="ACTION")
    dlist = dead_sub.add_parser("list", parents=[common], help="show dead letters")
    dlist.add_argument("--json", action="store_true")
    dlist.add_argument("--limit", type=int, default=0)
    dretry = dead_sub.add_parser("retry", parents=[common], help="requeue dead letters")
    dretry.add_argument("ids", nargs="*", metavar="ID")
    dretry.add_argument("--all", action="store_true")
    dead_sub.add_parser("purge", parents=[common], help="delete all dead letters")

    sub.add_parser("sample-config", help="print the documented sample configuration (every "
                   "key, its default and what it does), e.g. > /etc/clip-supervisor.conf")

    demo = sub.add_parser("demo", parents=[common],
                          help="run the whole main job on a generated sample, end to end")
    demo.add_argument("--jobs", type=int, default=6)
    demo.add_argument("--workers", default="2")
    demo.add_argument("--output-dir", default="./clip-supervisor-demo")
    return parser


def _load(args: argparse.Namespace) -> Config:
    overrides = {}
    for flag, key in (("redis_url", "redis.url"), ("workers", "supervisor.workers"),
                      ("pidfile", "supervisor.pidfile"), ("logfile", "supervisor.logfile")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = str(value)
    path = args.config if args.config else config_mod.default_path()
    return config_mod.load(path, overrides=overrides)


def _fail(message: str, code: int = 1) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "sample-config":  # needs no configuration: it shows how to write one
        return cmd_sample_config()
    try:
        config = _load(args)
    except ConfigError as exc:
        if args.command not in ("stop", "status", "reload"):
            return _fail(f"config error: {exc}")
        # Managing a running daemon must not depend on the file it will read next: fall
        # back to the built-in defaults (and --pidfile), so status keeps its LSB meaning.
        print(f"{PROG}: config error: {exc}; using the default pid file", file=sys.stderr)
        overrides = {"supervisor.pidfile": args.pidfile} if args.pidfile else {}
        config = config_mod.load(None, env={}, overrides=overrides)
    handler = globals()[f"cmd_{args.command}"]
    try:
        return int(handler(args, config))
    except REDIS_ERRORS as exc:
        return _fail(f"cannot reach Redis at {config.redis.url.split('@')[-1]}: {exc}")
    except KeyboardInterrupt:
        return 130


# --- run / stop / status / reload ------------------------------------------------------------


def _pidfile_path(config: Config, daemon: bool = True) -> str:
    return config.supervisor.pidfile or (DEFAULT_PIDFILE if daemon else "")


def cmd_run(args: argparse.Namespace, config: Config) -> int:
    from . import daemonize, metrics, notify

    if config.job.pipeline == "ffmpeg" and shutil.which(config.job.ffmpeg) is None:
        return _fail(f"config error: [job] ffmpeg = {config.job.ffmpeg!r}: no such program "
                     "(apt-get install ffmpeg, or set the path)")
    if args.check_config:  # a bad configuration never gets here: main() reports it
        problem = _work_dir_problem(config, create=False)
        if problem:
            return _fail(problem)
        print(f"configuration ok ({config.path or 'built-in defaults'})")
        return 0
    daemonize.ensure_standard_fds()
    if config.path is not None:
        # A daemon works from /, and HUP reads the file again: keep its absolute path.
        config.path = args.config = os.path.abspath(config.path)
    sup = config.supervisor
    path = _pidfile_path(config, daemon=args.daemon)
    log = logging.getLogger("clip-supervisor.master")
    report = daemonize.ReadyPipe(None)
    if args.daemon:
        try:
            daemonize.preflight(path, sup.logfile)
        except daemonize.StartFailed as exc:
            return _fail(str(exc))
        if not sup.logfile:
            print(f"{PROG}: warning: no logfile configured: the daemon's log is discarded",
                  file=sys.stderr)
        report = daemonize.ReadyPipe(daemonize.daemonize(sup.logfile))

    pidfile = PidFile(path) if path else None

    def cannot_start(message: str) -> int:
        if not args.daemon:
            return _fail(message)
        log.error("cannot start: %s", message)
        if pidfile is not None:  # before the launcher hears of it and returns
            pidfile.release()
        report.failed(f"{PROG}: {message}")
        return 1

    try:
        logs.setup("master", sup.logfile, sup.log_level, args.log_format)
    except OSError as exc:
        return cannot_start(f"cannot open log file {sup.logfile}: {exc.strerror}")
    try:
        if pidfile is not None:
            pidfile.acquire()
    except AlreadyRunning as exc:
        return cannot_start(str(exc))
    except OSError as exc:
        return cannot_start(f"cannot create pid file {path}: {exc.strerror}")
    try:
        problem = _work_dir_problem(config, create=True)
        if problem:
            return cannot_start(problem)
        metrics.prepare(config)  # before prometheus-client is imported (with the worker code)
        from .master import Master

        master = Master(config)
        # HUP reloads with the same precedence as this start: file, environment, flags.
        master.reload_config = lambda: _load(args)
        try:
            master.start_metrics()
        except OSError as exc:
            return cannot_start(f"cannot listen on {config.metrics.listen}: {exc.strerror}")
        return master.run(on_ready=lambda: (report.ready(), notify.ready()),
                          on_failed=report.failed)
    except Exception as exc:  # a bug: keep the traceback in the log, not on an operator's screen
        log.exception("master crashed")
        report.failed(f"{PROG}: master crashed: {exc} (traceback in the log)")
        return 1
    finally:
        if pidfile is not None:
            pidfile.release()


def _work_dir_problem(config: Config, create: bool) -> str:
    """Make work_dir and the cache's folder (or, without ``create``, check what exists of
    them); empty when all is well, else one line for the operator."""
    try:
        prepare_work_dir(config, create=create)
    except UnsafePath as exc:
        return str(exc)
    except OSError as exc:
        verb = "create" if create else "use"
        return f"cannot {verb} work_dir {config.job.work_dir}: {exc.strerror}"
    return ""


def _holder_or_fail(path: str) -> tuple[bool, int | None] | None:
    try:
        return holder(path)
    except OSError as exc:
        _fail(f"cannot read pid file {path}: {exc.strerror}")
        return None


def cmd_stop(args: argparse.Namespace, config: Config) -> int:
    path = _pidfile_path(config)
    found = _holder_or_fail(path)
    if found is None:
        return 1
    exists, pid = found
    if pid is None:
        stale = exists and remove_stale(path)
        print("not running" + (f" (removed stale pid file {path})" if stale else ""))
        return 0
    if pid < 0:
        return _fail(f"{path} is locked by a process that wrote no pid in it; not signalling")
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return _fail(f"{path} is locked, but the pid it names ({pid}) does not exist")
    except PermissionError:
        return _fail(f"cannot signal pid {pid}: permission denied")
    timeout = args.timeout if args.timeout is not None else \
        config.supervisor.graceful_timeout + 10
    # The lock, not kill -0: a stopped master may stay a zombie until init reaps it.
    deadline = time.monotonic() + timeout
    while holder(path)[1] == pid:
        if time.monotonic() >= deadline:
            print(f"{PROG}: still running (pid {pid}) after {timeout:g} s", file=sys.stderr)
            return 1
        time.sleep(0.05)
    print(f"stopped (pid {pid})")
    return 0


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    path = _pidfile_path(config)
    try:
        exists, pid = holder(path)
    except OSError as exc:
        print(f"unknown: cannot read pid file {path}: {exc.strerror}")
        return 4  # LSB: status unknown
    if pid is None:
        if exists:
            print(f"not running, but pid file {path} exists (stale, pid {read_pid(path)})")
            return 1
        print("not running")
        return 3
    if pid < 0:
        print(f"running (pid unknown: {path} is locked but names no pid)")
        return 0
    try:
        workers = [c.pid for c in psutil.Process(pid).children()
                   if c.status() != psutil.STATUS_ZOMBIE]
    except psutil.Error:
        workers = []
    print(f"running (pid {pid}, {len(workers)} workers, {_in_flight(config, workers)})")
    return 0


def _in_flight(config: Config, pids: list[int]) -> str:
    """How many of these workers hold a message, from Redis; never fails a status call."""
    try:
        queue = JobQueue(connect(config, socket_timeout=1.0), config)
        ids = [wid for wid, info in queue.registered_workers().items()
               if info.get("pid") in pids]
        count = sum(seen.holding for seen in
                    queue.activity(dict.fromkeys(ids)).values()) if ids else 0
    except (*ANY_REDIS_ERROR, ValueError) as exc:
        return f"jobs in flight unknown: {type(exc).__name__}"
    return f"{count} job{'s' if count != 1 else ''} in flight"


def cmd_reload(args: argparse.Namespace, config: Config) -> int:
    path = _pidfile_path(config)
    found = _holder_or_fail(path)
    if found is None:
        return 1
    pid = found[1]
    if pid is None:
        print("not running")
        return 3
    if pid < 0:
        return _fail(f"{path} is locked by a process that wrote no pid in it; not signalling")
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        print("not running")
        return 3
    except PermissionError:
        return _fail(f"cannot signal pid {pid}: permission denied")
    print(f"reloading (pid {pid})")
    return 0


# --- queue commands ----------------------------------------------------------------------------


def _queue(config: Config) -> JobQueue:
    return JobQueue(connect(config), config)


def cmd_enqueue(args: argparse.Namespace, config: Config) -> int:
    from clip_supervisor.client import Client, JobRefused

    clips = None
    if args.clips is not None:
        try:
            clips = json.loads(args.clips)
        except ValueError as exc:
            return _fail(f"--clips is not JSON: {exc}", 2)
        if not isinstance(clips, list) or not all(isinstance(c, dict) for c in clips):
            return _fail("--clips must be a JSON list of objects", 2)
    client = Client.from_config(config)
    try:
        job = client.enqueue(args.url, start=args.start, end=args.end, duration=args.duration,
                             output=args.output, mode=args.mode, format=args.fmt,
                             id=args.job_id, callback=args.callback, clips=clips)
    except JobRefused as exc:
        return _fail(f"refused ({exc.reason}): {exc.error}")
    print(job.id, flush=True)
    if not args.wait:
        return 0
    return admin.follow_job(job.id, job.follow(args.timeout), sys.stdout, args.timeout)


def cmd_cancel(args: argparse.Namespace, config: Config) -> int:
    queue = _queue(config)
    code = 0
    for job_id in args.ids:
        outcome = admin.cancel(queue, job_id)
        print(admin.describe_cancel(job_id, outcome), flush=True)
        if not outcome.cancelled:
            code = 1
    return code


def cmd_stats(args: argparse.Namespace, config: Config) -> int:
    queue = _queue(config)
    while True:
        data = admin.stats(queue)
        if args.json:
            print(json.dumps(data, indent=2 if sys.stdout.isatty() else None))
        else:
            if args.watch and sys.stdout.isatty():
                print("\x1b[H\x1b[2J", end="")
            print(admin.format_stats(data))
        if not args.watch:
            return 0
        sys.stdout.flush()
        time.sleep(args.watch)


def cmd_dead(args: argparse.Namespace, config: Config) -> int:
    queue = _queue(config)
    if args.action == "list":
        letters = admin.dead_letters(queue, args.limit)
        if args.json:
            print(json.dumps([letter for _, letter in letters], indent=2))
            return 0
        if not letters:
            print("no dead letters")
        for _, letter in letters:
            error = str(letter.get("error", "")).strip().splitlines()
            print(f"{letter.get('time', '?')}  {letter.get('id', '?')}  "
                  f"{letter.get('reason', '?')}  attempts={letter.get('attempts', '?')}  "
                  f"{error[-1][:120] if error else ''}")
        return 0
    if args.action == "retry":
        if not args.ids and not args.all:
            return _fail("dead retry: give job ids or --all", 2)
        count, missing = admin.retry_dead(queue, None if args.all else args.ids)
        print(f"requeued {count} dead letter(s)")
        for job_id in missing:
            print(f"not requeued: {job_id}", file=sys.stderr)
        return 1 if missing else 0
    count = admin.purge_dead(queue)
    print(f"purged {count} dead letter(s)")
    return 0


def cmd_sample_config() -> int:
    try:
        with open(config_mod.SAMPLE_PATH, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        return _fail(f"cannot read the sample configuration {config_mod.SAMPLE_PATH}: "
                     f"{exc.strerror}")
    sys.stdout.write(text)
    return 0


def cmd_demo(args: argparse.Namespace, config: Config) -> int:
    from .demo import run_demo

    return run_demo(config, jobs=args.jobs, workers=args.workers,
                    output_dir=os.path.abspath(args.output_dir))


if __name__ == "__main__":
    sys.exit(main())

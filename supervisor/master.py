"""The master: keeps N workers alive, recovers what dead ones held, stops gracefully.

The loop, in the manner of gunicorn's arbiter: signal handlers only record the signal (and
Python's wake-up fd makes the loop's ``select`` return); the loop then waits on that pipe
with a timeout, handles the recorded signals with ``handle_<name>`` methods, reaps every
dead child with ``waitpid(-1, WNOHANG)``, recovers their messages, keeps the worker count,
and runs periodic recovery of other hosts' dead workers. It never blocks on a job.

It also watches its workers' liveness, as gunicorn's arbiter does: each worker's main loop
marks a clock shared with the master (worker.runner.LoopClock) at every sign of life, and a
worker silent longer than it ever legitimately is (worker.runner.silence_limit) is wedged
(a DNS lookup that never answers, a lock never released, a read without timeout): it is
killed, and its message requeued as a crash. A slot whose workers keep failing at boot
goes FATAL (supervisor.children) until HUP or TTIN.

System calls the loop makes go through ``System`` so the decisions can be unit-tested
(tests/test_master.py drives ``turn`` with a fake one).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil
import redis
import setproctitle
from prometheus_client import Counter, Gauge

from worker import cache, logs, preload
from worker import config as config_mod
from worker.config import Config, ConfigError
from worker.metrics import REDIS_ERRORS as REDIS_ERRORS_TOTAL
from worker.protocol import pid_alive
from worker.queue import REDIS_ERRORS, JobQueue, connect
from worker.runner import Worker, silence_limit

from . import recovery
from .children import Exit, Slot, SlotState
from .metrics import worker_exited as worker_metrics_done
from .webhooks import DelivererProcess

log = logging.getLogger("clip-supervisor.master")

HANDLED = [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTTIN,
           signal.SIGTTOU, signal.SIGUSR1, signal.SIGCHLD]
STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
WORKER_EXITS = Counter("clip_worker_exits_total", "Worker processes that exited, by cause "
                       "(stopped, recycled, aborted, parent_gone, boot_error, exit_N, "
                       "sigkill, ..., killed_by_us, wedged).", ["cause"])
SLOTS_FATAL = Gauge("clip_slots_fatal", "Worker slots that gave up after failing to start "
                    "max_start_failures times in a row (HUP or TTIN revives them).",
                    multiprocess_mode="livesum")
FAST_STOP_TIMEOUT = 5.0  # seconds workers get to give back their jobs on a fast stop
# A start that waits longer than this for another machine's host claim to expire is reported
# as started (a daemon's launcher gives up after 30 s); it then forks once it holds the claim.
READY_WAIT = 10.0
HARD_MEMORY_FACTOR = 2  # × max_worker_memory_mb: the worker is killed mid-job
# A longer gap between two turns of our own loop (we were stopped, or starved) means the
# workers' silence was not watched meanwhile: it counts again from the end of the gap.
WATCH_GAP = 5.0


class State:
    RUNNING = "running"
    STOPPING = "stopping"  # graceful: workers finish their jobs
    STOPPING_FAST = "stopping fast"  # workers abort and give back their jobs


@dataclass
class System:
    """The seam between the loop and the kernel."""

    fork = staticmethod(os.fork)
    kill = staticmethod(os.kill)
    waitpid = staticmethod(os.waitpid)
    monotonic = staticmethod(time.monotonic)
    time = staticmethod(time.time)


@dataclass
class PendingRecovery:
    worker_id: str
    count_attempt: bool
    worker_dir: str


@dataclass
class Master:
    config: Config
    system: System = field(default_factory=System)
    slots: list[Slot] = field(default_factory=list)
    state: str = State.RUNNING
    signals: list[int] = field(default_factory=list)
    pending: list[PendingRecovery] = field(default_factory=list)
    stop_deadline: float = 0.0
    generation: int = 0
    exit_code: int = 0
    # How HUP reads the configuration again: the CLI passes one that applies the same
    # environment and command-line overrides as the start did.
    reload_config: Callable[[], Config] | None = None

    def __post_init__(self) -> None:
        self.pid = os.getpid()
        self.target = self.config.supervisor.workers
        # Short timeouts: the loop must keep turning (reaping, signals) while Redis is away.
        self.queue = JobQueue(connect(self.config, socket_timeout=1.0), self.config)
        self._pipe: tuple[int, int] | None = None
        self._next_scan = 0.0
        self._started_recovery = False
        sup = self.config.supervisor
        self.claim = recovery.HostClaim(self.config.host_id,
                                        sup.heartbeat_ttl, sup.heartbeat_interval)
        self.guard = recovery.ContactGuard(sup.heartbeat_ttl, sup.heartbeat_interval)
        self._on_ready: Callable[[], None] | None = None
        self._on_failed: Callable[[str], None] | None = None
        self._ready_by = 0.0
        self._redis_failing = False
        self.last_tick = self.system.monotonic()
        self._next_memory_check = 0.0
        self._watched_at = self._watch_from = self.last_tick
        # The FATAL slots as the listener's threads read them (replaced, never changed).
        self.fatal: list[dict[str, Any]] = []
        self.metrics: Any = None  # a supervisor.metrics.MetricsServer when listening
        # The webhook deliverer, a child of ours like the workers (supervisor.webhooks).
        self.webhooks = DelivererProcess(self.config)

    # --- signals -------------------------------------------------------------------------------

    def _record(self, signum: int, frame: object) -> None:
        self.signals.append(signum)

    def install_signals(self) -> None:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._pipe = (r, w)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        for sig in HANDLED:
            signal.signal(sig, self._record)

    # --- main loop -----------------------------------------------------------------------------

    def start_metrics(self) -> None:
        """Serve /metrics and /healthz when ``[metrics] listen`` is set (binds now)."""
        if not self.config.metrics.listen:
            return
        from .metrics import MetricsServer

        self.metrics = MetricsServer(
            self.config, loop_tick=lambda: self.last_tick,
            live_workers=lambda: sum(1 for slot in self.slots if slot.pid is not None))
        self.metrics.dashboard.fatal_slots = lambda: self.fatal  # the page's and /healthz's
        self.metrics.start()

    def run(self, on_ready: Callable[[], None] | None = None,
            on_failed: Callable[[str], None] | None = None) -> int:
        """The master's life. ``on_ready`` is called once this start can no longer be refused:
        the host claim is ours, or Redis is unreachable (retried; the claim comes first when
        it answers); ``on_failed`` with one line when another supervisor holds the claim."""
        self.install_signals()  # work_dir was made and checked before (worker.fsafe)
        self.plan_starts()
        self._on_ready, self._on_failed = on_ready, on_failed
        self._ready_by = self.system.monotonic() + READY_WAIT
        log.info("master started (pid %d, %d workers, redis %s, prefix %s, host_id %s)",
                 self.pid, self.target, _safe_url(self.config.redis.url),
                 self.config.redis.prefix, self.config.host_id)
        self._title()  # before the first fork: ps names the master as soon as it has workers
        # What the workers of a killed master left half-written (no worker of ours runs yet;
        # a worker of another master on this host is alive, and its files are kept)
        self._remove_cache_left(lambda pid: not pid_alive(pid))
        while not self.turn():
            self.sleep(self.next_timeout())
        self.finish_pending_recoveries()
        with contextlib.suppress(*REDIS_ERRORS, redis.RedisError):  # else it expires by itself
            self.claim.release(self.queue)
        if self.metrics is not None:
            self.metrics.stop()
        log.info("master stopped")
        return self.exit_code

    def plan_starts(self) -> None:
        """The start plans of ffmpeg and ffprobe (worker.preload), made or read back before
        the first worker, which inherits them; again after a reload."""
        job = self.config.job
        if job.fast_start and job.pipeline == "ffmpeg":
            # A stop asked for meanwhile ends the making (the signal waits in self.signals)
            preload.prepare([job.ffmpeg, job.ffprobe],
                            stop=lambda: any(s in STOPS for s in self.signals))
        else:
            preload.use({})

    def turn(self) -> bool:
        """One turn of the loop (no waiting in it); True once the master may exit."""
        self.last_tick = self.system.monotonic()
        self.dispatch_signals()
        self.reap()
        # The claim first: nothing is forked or recovered before we know that no other
        # supervisor runs with our host_id.
        self.redis_housekeeping()
        if self.state == State.RUNNING and self.claim.held:
            self.spawn_due()
            self.webhooks.keep(self.system.fork, self.system.monotonic(), self.close_in_child)
        self.check_memory()
        self.check_liveness()
        if self.state != State.RUNNING and self.stop_progress():
            return True
        self._title()
        return False

    def _ready(self) -> None:
        if self._on_ready is not None:
            report, self._on_ready = self._on_ready, None
            report()

    def sleep(self, timeout: float) -> None:
        assert self._pipe is not None
        try:
            ready, _, _ = select.select([self._pipe[0]], [], [], max(0.0, timeout))
        except InterruptedError:
            return
        if ready:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._pipe[0], 4096):
                    pass

    def next_timeout(self) -> float:
        now = self.system.monotonic()
        timeout = 1.0
        for slot in self.slots:
            if slot.state is SlotState.BACKOFF:
                timeout = min(timeout, slot.next_start - now)
            if slot.state is SlotState.STARTING:
                timeout = min(timeout, slot.spawned_at + self.config.supervisor.min_uptime - now)
        if self.state != State.RUNNING:
            timeout = min(timeout, self.stop_deadline - now)
        if self.pending:
            timeout = min(timeout, 0.5)
        return max(0.01, timeout)

    def dispatch_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            name = signal.Signals(signum).name.lower()
            handler = getattr(self, f"handle_{name[3:]}", None)
            if handler is not None:
                handler()

    # --- signal handlers (run by the loop, not in signal context) ------------------------------

    def handle_chld(self) -> None:
        pass  # the loop reaps after every wake-up

    def handle_term(self) -> None:
        self.stop(graceful=True)

    def handle_int(self) -> None:
        # A second INT (an impatient operator at the terminal) means: now.
        self.stop(graceful=self.state == State.RUNNING)

    def handle_quit(self) -> None:
        self.stop(graceful=False)

    def handle_ttin(self) -> None:
        """One worker more; or, when slots are FATAL, those slots try again instead."""
        if self.state != State.RUNNING:
            return
        if self.revive_fatal("TTIN"):
            return
        self.target += 1
        log.info("TTIN: workers %d", self.target)

    def handle_ttou(self) -> None:
        if self.state != State.RUNNING:
            return
        if self.target <= 1:
            log.info("TTOU ignored: already at 1 worker")
            return
        self.target -= 1
        log.info("TTOU: workers %d", self.target)
        self.retire_extra()

    def handle_usr1(self) -> None:
        """Reopen log files after logrotate moved them: the daemon's stdout and stderr (first:
        it creates the new file with the log's mode), ours, then the workers' (each reopens
        between two steps of its loop)."""
        logs.reopen()
        log.info("USR1: log files reopened")
        self.signal_workers(signal.SIGUSR1)

    def handle_hup(self) -> None:
        """Reload the configuration, then replace every worker gracefully: each finishes its
        job, exits, and its slot starts a new worker with the new configuration at once. A
        configuration that does not load changes nothing."""
        if self.state != State.RUNNING:
            return
        load = self.reload_config or (lambda: config_mod.load(self.config.path))
        try:
            new = load()
        except ConfigError as exc:
            log.error("HUP: keeping the running configuration: %s", exc)
            return
        old = self.config
        # The pid file lock and the ids of running workers cannot move under a live master.
        # What running workers are known by (their pid file, ids, keys, folders) cannot
        # move under them: a worker started before the reload must still be recoverable.
        for section, key in (("supervisor", "pidfile"), ("supervisor", "host_id"),
                             ("redis", "url"), ("redis", "prefix"), ("job", "work_dir")):
            was = getattr(getattr(old, section), key)
            if getattr(getattr(new, section), key) != was:
                log.warning("HUP: [%s] %s changes only at restart; keeping %r", section, key,
                            was)
                setattr(getattr(new, section), key, was)
        if new.redis != old.redis:
            self.queue = JobQueue(connect(new, socket_timeout=1.0), new)
        ttl, interval = new.supervisor.heartbeat_ttl, new.supervisor.heartbeat_interval
        if (ttl, interval) != (old.supervisor.heartbeat_ttl, old.supervisor.heartbeat_interval):
            self.claim.retime(ttl, interval)
            self.guard = recovery.ContactGuard(ttl, interval)  # and its clock starts again
        if new.supervisor.logfile != old.supervisor.logfile or \
                new.supervisor.log_level != old.supervisor.log_level:
            try:
                if new.supervisor.logfile:  # fail here, before the old handler is closed
                    os.close(logs.open_log(new.supervisor.logfile))  # never through a link
            except OSError as exc:
                log.error("HUP: cannot open log file %s (%s); keeping %s",
                          new.supervisor.logfile, exc.strerror, old.supervisor.logfile)
                new.supervisor.logfile = old.supervisor.logfile
                new.supervisor.log_level = old.supervisor.log_level
            else:
                logs.setup(logs.role(), new.supervisor.logfile, new.supervisor.log_level,
                           logs.log_format())
                logs.reopen_streams(new.supervisor.logfile)
        self.config = new
        self.plan_starts()
        self.webhooks.reload(new)
        self.target = new.supervisor.workers
        self.generation += 1
        log.info("HUP: configuration reloaded; replacing workers (now %d)", self.target)
        self.revive_fatal("HUP")
        self.retire_extra()
        for slot in self.slots:
            if slot.pid is not None and slot.state is not SlotState.STOPPING:
                self.stop_slot(slot, signal.SIGTERM)

    # --- stopping ------------------------------------------------------------------------------

    def stop(self, graceful: bool) -> None:
        now = self.system.monotonic()
        if graceful:
            if self.state != State.RUNNING:
                return
            self.state = State.STOPPING
            self.stop_deadline = now + self.config.supervisor.graceful_timeout
            log.info("graceful stop: waiting up to %.0f s for jobs in progress",
                     self.config.supervisor.graceful_timeout)
            self.signal_workers(signal.SIGTERM)
        else:
            if self.state == State.STOPPING_FAST:
                return
            self.state = State.STOPPING_FAST
            self.stop_deadline = now + min(FAST_STOP_TIMEOUT,
                                           self.config.supervisor.graceful_timeout)
            log.info("fast stop: aborting jobs in progress and requeueing them")
            self.signal_workers(signal.SIGQUIT)

    def stop_progress(self) -> bool:
        """True once every worker is gone; kills the rest when the deadline passes."""
        alive = [slot for slot in self.slots if slot.pid is not None]
        if not alive and self.webhooks.pid is None:
            return True
        if self.system.monotonic() >= self.stop_deadline:
            if self.webhooks.pid is not None:
                log.warning("the webhook deliverer (pid %d) did not stop in time: killing it "
                            "(what it held stays pending in Redis)", self.webhooks.pid)
                self._kill(self.webhooks.pid, signal.SIGKILL)
            for slot in alive:
                log.warning("worker %d (pid %d) did not stop in time: killing it", slot.index,
                            slot.pid)
                slot.killed_on_purpose = True
                self._kill(slot.pid, signal.SIGKILL)
            self.stop_deadline = self.system.monotonic() + 5.0
        return False

    def signal_workers(self, sig: int) -> None:
        self.webhooks.signal(sig)  # TERM, QUIT: it stops too; USR1: it reopens its log
        for slot in self.slots:
            if slot.pid is not None:
                if sig in (signal.SIGTERM, signal.SIGQUIT):
                    slot.state = SlotState.STOPPING
                self._kill(slot.pid, sig)

    def stop_slot(self, slot: Slot, sig: int) -> None:
        slot.state = SlotState.STOPPING
        if slot.pid is not None:
            self._kill(slot.pid, sig)

    def retire_extra(self) -> None:
        """Shrink to ``target``: the highest slots finish their jobs, then are removed."""
        for slot in self.slots[self.target:]:
            if slot.pid is not None and slot.state is not SlotState.STOPPING:
                self.stop_slot(slot, signal.SIGTERM)

    def _kill(self, pid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):  # already dead: the next reap collects it
            self.system.kill(pid, sig)

    # --- workers -------------------------------------------------------------------------------

    def spawn_due(self) -> None:
        now = self.system.monotonic()
        while len(self.slots) < self.target:
            self.slots.append(Slot(index=len(self.slots) + 1))
        # Slots above the target are dropped once their worker has exited.
        while len(self.slots) > self.target and self.slots[-1].pid is None:
            if self.slots.pop().state is SlotState.FATAL:
                self._fatal_changed()
        for slot in self.slots[: self.target]:
            slot.tick(now, self.config.supervisor.min_uptime)
            if slot.pid is None and slot.due(now):
                self.spawn_worker(slot)

    def spawn_worker(self, slot: Slot) -> None:
        started_ms = int(self.system.time() * 1000)
        slot.new_clock(self.system.monotonic())
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        try:
            pid = self.system.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            log.error("cannot fork a worker: %s", exc)
            slot.spawned_at = self.system.monotonic()  # a failed start, at once
            self._start_failed(slot, Exit(code=1, signal=None))
            return
        if pid == 0:
            self._become_worker(slot, started_ms, blocked)  # never returns
        # The child puts itself in a group of its own too: whichever runs first wins, so a
        # Ctrl-C that comes before the child is scheduled cannot reach it through our group.
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        slot.spawned(pid, started_ms, self.system.monotonic(), self.generation)
        log.info("spawned worker %d (pid %d)", slot.index, pid)

    def _become_worker(self, slot: Slot, started_ms: int, mask: set) -> None:
        code = 1
        try:
            # A process group of its own: a terminal's Ctrl-C (INT to the foreground group)
            # must reach only the master, which stops its workers gracefully; INT sent to a
            # worker itself still means "abort".
            os.setpgid(0, 0)
            self.close_in_child()
            logs.set_role(f"worker {slot.index}")
            worker = Worker(self.config, slot.index, started_ms, parent_pid=self.pid,
                            liveness=slot.clock)
            worker.install_signals()
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            code = worker.run()
        except BaseException:
            log.exception("worker %d crashed", slot.index)
            code = 1
        finally:
            logging.shutdown()
            os._exit(code)

    def close_in_child(self) -> None:
        """In a forked child: let go of the master's wake-up pipe and listening socket."""
        if self._pipe is not None:
            for fd in self._pipe:
                os.close(fd)
        if self.metrics is not None:
            self.metrics.close_in_child()

    def reap(self) -> None:
        while True:
            try:
                pid, status = self.system.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            if pid == 0:
                return
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is None:
                self.webhooks.reaped(pid, status, self.system.monotonic())
                continue
            self.worker_exited(slot, Exit.from_status(status))

    def worker_exited(self, slot: Slot, how: Exit) -> None:
        assert slot.pid is not None
        worker_id = slot.worker_id(self.config.host_id)
        worker_dir = slot.worker_dir(self.config.job.work_dir)
        # A wedged worker we killed counts as a crash: a job that always wedges its worker
        # ends as poison instead of wedging one worker after another.
        count = not how.clean and not slot.killed_on_purpose
        level = logging.INFO if how.clean or slot.killed_on_purpose else logging.WARNING
        log.log(level, "worker %d (pid %d) %s", slot.index, slot.pid,
                "was killed: wedged" if slot.wedged else how.describe())
        WORKER_EXITS.labels("killed_by_us" if slot.killed_on_purpose else
                            "wedged" if slot.wedged else how.cause).inc()
        worker_metrics_done(slot.pid)
        # Recover first, respawn after: the message is back on the queue before anyone new
        # could be looking for work.
        self.pending.append(PendingRecovery(worker_id, count, worker_dir))
        self.run_pending_recoveries()
        if not how.clean:  # a worker that exits cleanly has finished its writes
            pid = slot.pid
            self._remove_cache_left(lambda p: p == pid)
        self._start_failed(slot, how)

    def _remove_cache_left(self, dead: Callable[[int], bool]) -> None:
        """Remove the source cache's files that dead workers left half-written (see
        worker.cache.remove_left). A failure is logged, never the master's end."""
        if not self.config.job.cache_max_bytes:
            return
        try:
            removed = cache.remove_left(self.config.job.cache_folder, dead)
        except Exception as exc:  # a folder that cannot be read: the workers' sweep remains
            log.warning("source cache %s: cannot remove what dead workers left: %s",
                        self.config.job.cache_folder, exc)
            return
        if removed:
            log.info("source cache: removed %d file(s) dead workers left half-written",
                     removed)

    def _start_failed(self, slot: Slot, how: Exit) -> None:
        """Tell the slot its worker is gone; report a failed start, a slot gone FATAL."""
        sup = self.config.supervisor
        delay = slot.exited(how, self.system.monotonic(), sup.min_uptime,
                            sup.restart_backoff_max, self.system.time(), sup.max_start_failures)
        if slot.state is SlotState.FATAL:
            log.error("worker %d failed to start %d times in a row (last: %s): giving up on "
                      "this slot (FATAL); fix the cause, then send HUP or TTIN to the master",
                      slot.index, slot.failures, slot.last_failure)
            self._fatal_changed()
        elif delay > 0 and self.state == State.RUNNING:
            log.warning("worker %d failed to start %d time(s); next try in %.1f s",
                        slot.index, slot.failures, delay)

    def revive_fatal(self, why: str) -> bool:
        """Give every FATAL slot a new start (HUP, TTIN); True if there was one."""
        fatal = [slot for slot in self.slots if slot.state is SlotState.FATAL]
        for slot in fatal:
            slot.revive(self.system.monotonic())
        if fatal:
            log.info("%s: worker slot(s) %s out of FATAL: starting again", why,
                     ", ".join(str(slot.index) for slot in fatal))
            self._fatal_changed()
        return bool(fatal)

    def _fatal_changed(self) -> None:
        self.fatal = [{"slot": slot.index, "failures": slot.failures,
                       "since": slot.fatal_since, "last_failure": slot.last_failure}
                      for slot in self.slots if slot.state is SlotState.FATAL]
        SLOTS_FATAL.set(len(self.fatal))

    def check_liveness(self) -> None:
        """Kill a worker whose main loop has been silent longer than it ever legitimately
        is (worker.runner.silence_limit, from what it was doing: idle, a job, paused). Its
        last sign of life is in memory it shares with us, so this needs no Redis: a master
        cut off from Redis kills no healthy worker, and a worker stuck in a Redis call is
        seen. The kill counts as a crash when its message is recovered."""
        now = self.system.monotonic()
        if now - self._watched_at > WATCH_GAP:
            self._watch_from = now  # we were not watching: their silence counts from now
        self._watched_at = now
        for slot in self.slots:
            if slot.pid is None or slot.clock is None or slot.killed_on_purpose or slot.wedged:
                continue
            last, activity = slot.clock.read()
            silent = now - max(last, self._watch_from)
            limit = silence_limit(self.config, activity)
            if silent > limit:
                log.error("worker %d (pid %d) is wedged: its main loop has been silent for "
                          "%.0f s (%s; limit %.0f s): killing it, its message is requeued as "
                          "a crash", slot.index, slot.pid, silent, activity.name.lower(),
                          limit)
                slot.wedged = True
                self._kill(slot.pid, signal.SIGKILL)

    def check_memory(self) -> None:
        """The hard memory limit: a worker whose process tree (ffmpeg included) holds more than
        HARD_MEMORY_FACTOR times ``max_worker_memory_mb`` of private memory is killed at once,
        job and all; its message is requeued as a crash, so a job that always blows up ends
        as poison. (The soft limit is the worker's own RSS: it recycles itself between
        jobs.) Private memory (RSS less shared pages) because ffmpeg's shared libraries alone
        count ~45 MiB of RSS in every process."""
        limit = self.config.supervisor.max_worker_memory_mb
        now = self.system.monotonic()
        if not limit or now < self._next_memory_check:
            return
        self._next_memory_check = now + self.config.supervisor.heartbeat_interval
        hard = limit * HARD_MEMORY_FACTOR * 1024 * 1024
        for slot in self.slots:
            if slot.pid is None or slot.killed_on_purpose:
                continue
            try:
                process = psutil.Process(slot.pid)
                rss = sum(_private(p) for p in (process, *process.children(recursive=True)))
            except psutil.Error:
                continue
            if rss > hard:
                log.warning("worker %d (pid %d) uses %d MiB with its children, far above "
                            "max_worker_memory_mb %d: killing it", slot.index, slot.pid,
                            rss >> 20, limit)
                self._kill(slot.pid, signal.SIGKILL)

    # --- Redis-side recovery -------------------------------------------------------------------

    def run_pending_recoveries(self) -> None:
        while self.pending:
            item = self.pending[0]
            try:
                recovery.recover_worker(self.queue, item.worker_id,
                                        count_attempt=item.count_attempt)
            except (*REDIS_ERRORS, redis.RedisError) as exc:  # replies like MASTERDOWN too
                self._redis_error(exc)
                return
            recovery.clean_worker_dir(item.worker_dir)
            self.pending.pop(0)

    def redis_housekeeping(self) -> None:
        """Every ``heartbeat_interval``: hold the host claim, then recover this host's dead
        workers (once, at start) and other hosts' expired ones (when the contact guard
        allows: see supervisor.recovery)."""
        if self.pending:
            self.run_pending_recoveries()
        now = self.system.monotonic()
        if now < self._next_scan:
            return
        if not self.claim.held and self.state != State.RUNNING:
            return  # stopping without the claim (never had it, or lost it): hands off
        self._next_scan = now + self.config.supervisor.heartbeat_interval
        try:
            if not self.hold_claim(now):
                return
            self.guard.contact(now, self.system.monotonic())
            if not self._started_recovery:
                removed = recovery.clean_stale_dirs(self.config.job.work_dir)
                if removed:
                    log.info("removed %d work folder(s) of dead workers", removed)
                n = recovery.recover_at_start(self.queue, self.config.host_id)
                if n:
                    log.info("recovered %d message(s) left by this host's dead workers", n)
                self._started_recovery = True
            if self.guard.trusted(self.system.monotonic()):
                live = {slot.worker_id(self.config.host_id) for slot in self.slots if slot.pid}
                recovery.recover_expired(self.queue, live)
            if self._redis_failing:
                log.info("Redis is reachable again")
                self._redis_failing = False
        except (*REDIS_ERRORS, redis.RedisError) as exc:
            self.guard.lost("Redis unavailable")
            self._redis_error(exc)
            self._ready()  # an unreachable Redis is no reason not to start: we retry
        finally:
            took = self.system.monotonic() - now
            if took > self.guard.stall_limit:
                self.guard.lost(f"a recovery scan took {took:.1f} s")

    def hold_claim(self, now: float) -> bool:
        """Claim or refresh our host_id; True while it is ours."""
        state = self.claim.step(self.queue, now)
        if state is recovery.Claim.HELD:
            self._ready()
            return True
        if state is recovery.Claim.WAITING:
            if now >= self._ready_by:
                self._ready()
            return False
        message = self.claim.conflict()
        self.exit_code = 1
        if state is recovery.Claim.REFUSED:
            self.refuse_start(message)
        else:  # LOST: another supervisor took it while we could not refresh it
            log.error("lost the claim on host_id %s: %s; stopping (exit 1): this supervisor "
                      "recovers nothing more, its workers finish their jobs",
                      self.config.host_id, message)
            self.stop(graceful=True)
        return False

    def refuse_start(self, message: str) -> None:
        """Another supervisor runs with our host_id: exit 1 before forking or recovering."""
        log.error("cannot start: %s", message)
        if self._on_failed is not None:  # a --daemon start: its launcher prints the line
            self._on_failed(f"clip-supervisor: {message}")
            self._on_ready = None
        if not _stderr_is_log(self.config.supervisor.logfile):
            print(f"clip-supervisor: {message}", file=sys.stderr, flush=True)
        self.state = State.STOPPING_FAST
        self.stop_deadline = self.system.monotonic()

    def _redis_error(self, exc: Exception) -> None:
        REDIS_ERRORS_TOTAL.labels("master").inc()
        if not self._redis_failing:
            log.warning("Redis unavailable (%s); will retry", exc)
        self._redis_failing = True

    def finish_pending_recoveries(self, timeout: float = 1.0) -> None:
        # Brief on purpose: what cannot be requeued now stays in its processing list, under a
        # registry entry of this host, and the next start recovers it (recover_at_start).
        deadline = self.system.monotonic() + timeout
        while self.pending and self.system.monotonic() < deadline:
            self.run_pending_recoveries()
            if self.pending:
                time.sleep(0.2)
        if self.pending:
            log.warning("could not check the processing lists of %d exited worker(s) (Redis "
                        "unavailable); the next supervisor start recovers anything left",
                        len(self.pending))

    def _title(self) -> None:
        alive = sum(1 for slot in self.slots if slot.pid is not None)
        suffix = "" if self.state == State.RUNNING else f" {self.state}"
        if self.state == State.RUNNING and not self.claim.held:
            suffix = " claiming host_id"
        if self.fatal:
            suffix += f" {len(self.fatal)} fatal"
        setproctitle.setproctitle(
            f"clip-supervisor: master [workers {alive}/{self.target}]{suffix}")


def _private(process: psutil.Process) -> int:
    info = process.memory_info()
    return info.rss - getattr(info, "shared", 0)


def _stderr_is_log(logfile: str) -> bool:
    """Does our log already go to stderr (no log file, or a daemon's stderr is the log)?"""
    if not logfile:
        return True
    try:
        err, log_stat = os.fstat(2), os.stat(logfile)
    except OSError:
        return False
    return (err.st_dev, err.st_ino) == (log_stat.st_dev, log_stat.st_ino)


def _safe_url(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url

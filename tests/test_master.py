"""The master's decisions, one loop turn at a time, through its ``System`` seam.

A fake System forks nothing (fork hands out pids no process can have), records the signals
the master sends, reports the exits a test decides, and keeps a clock the test moves; the
queue side is real (a private redis-server): recovery is checked in Redis itself. These
are unit tests of pure decisions; the end-to-end versions with real processes are in
tests/test_reliability.py and tests/test_liveness.py.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY

from supervisor import master as master_mod
from supervisor.children import MAX_START_FAILURES, SlotState
from supervisor.master import Master, State
from worker import config as config_mod
from worker.protocol import EXIT_BOOT_ERROR, EXIT_OK, EXIT_RECYCLE
from worker.queue import sha1
from worker.runner import Activity, silence_limit

FIRST_PID = 100_000  # above any pid_max: no real process has it


class FakeSystem:
    def __init__(self) -> None:
        self.now = 1000.0
        self.next_pid = FIRST_PID
        self.live: set[int] = set()
        self.forked: list[int] = []
        self.sent: list[tuple[int, int]] = []
        self.exits: list[tuple[int, int]] = []

    def fork(self) -> int:
        pid, self.next_pid = self.next_pid, self.next_pid + 1
        self.live.add(pid)
        self.forked.append(pid)
        return pid

    def kill(self, pid: int, sig: int) -> None:
        if pid not in self.live:
            raise ProcessLookupError(pid)
        self.sent.append((pid, sig))

    def waitpid(self, pid: int, options: int) -> tuple[int, int]:
        if self.exits:
            return self.exits.pop(0)
        if not self.live:
            raise ChildProcessError()
        return 0, 0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1_700_000_000.0 + self.now

    # --- what the test decides --------------------------------------------------------

    def exit(self, pid: int, code: int | None = None, sig: int | None = None) -> None:
        """The child ``pid`` ends: with exit code ``code``, or killed by ``sig``."""
        self.live.discard(pid)
        self.exits.append((pid, sig if sig is not None else (code or 0) << 8))

    def signals_to(self, pid: int) -> list[int]:
        return [sig for p, sig in self.sent if p == pid]


@pytest.fixture
def make(redis_server, tmp_path, monkeypatch) -> Iterator:
    monkeypatch.setattr(master_mod.setproctitle, "setproctitle", lambda title: None)
    made: list[Master] = []

    def make_master(**settings: str) -> Master:
        overrides = {"redis.url": redis_server.url, "job.work_dir": str(tmp_path / "work"),
                     "storage.output_base": f"file://{tmp_path}/out",
                     "supervisor.workers": "2", "supervisor.min_uptime": "2",
                     "supervisor.heartbeat_interval": "1", "supervisor.heartbeat_ttl": "3",
                     "supervisor.graceful_timeout": "30",
                     "supervisor.restart_backoff_max": "4"}
        overrides.update({key.replace("__", "."): value for key, value in settings.items()})
        config = config_mod.load(None, env={}, overrides=overrides)
        os.makedirs(config.job.work_dir, exist_ok=True)
        m = Master(config, system=FakeSystem())  # type: ignore[arg-type]
        m.reload_config = lambda: config_mod.load(None, env={}, overrides=overrides)
        made.append(m)
        return m

    yield make_master
    for m in made:
        for slot in m.slots:
            slot.close_clock()


def sys_of(m: Master) -> FakeSystem:
    return m.system  # type: ignore[return-value]


def run_for(m: Master, seconds: float, step: float = 0.5, alive: bool = True) -> None:
    """Turn the loop while the clock moves ``seconds`` on, ``step`` at a time; with
    ``alive``, every worker's loop shows a sign of life (idle) at each step, as a real one
    does at each turn."""
    end = sys_of(m).now + seconds
    while sys_of(m).now < end - 1e-9:
        sys_of(m).now = min(end, sys_of(m).now + step)
        if alive:
            for slot in m.slots:
                if slot.pid is not None and slot.clock is not None:
                    slot.clock.mark(sys_of(m).now, Activity.IDLE)
        m.turn()


def started(m: Master) -> list[int]:
    """Turn once (the host claim, then the pool); the pids of the workers alive."""
    m.turn()
    return [slot.pid for slot in m.slots if slot.pid is not None]


def hold(m: Master, pid: int, message: bytes) -> None:
    """Put ``message`` in the processing list of the worker ``pid``, as its BLMOVE would."""
    slot = next(s for s in m.slots if s.pid == pid)
    m.queue.client.lpush(m.queue.keys.processing(slot.worker_id(m.config.host_id)), message)


def queued(m: Master) -> list[bytes]:
    return m.queue.client.lrange(m.queue.keys.queue, 0, -1)


def attempts(m: Master, message: bytes) -> int:
    return int(m.queue.client.hget(m.queue.keys.attempts, sha1(message)) or 0)


def exits(cause: str) -> float:
    return REGISTRY.get_sample_value("clip_worker_exits_total", {"cause": cause}) or 0.0


def fatal_gauge() -> float:
    return REGISTRY.get_sample_value("clip_slots_fatal") or 0.0


# --- reap and requeue ------------------------------------------------------------------------


def test_a_crashed_worker_has_its_message_requeued_counted_and_is_replaced_at_once(make):
    m = make()
    first, second = started(m)
    run_for(m, 3)  # past min_uptime: both running
    assert all(slot.state is SlotState.RUNNING for slot in m.slots)
    hold(m, first, b"job-a")
    killed = exits("sigkill")

    sys_of(m).exit(first, sig=signal.SIGKILL)
    m.turn()

    assert queued(m) == [b"job-a"] and attempts(m, b"job-a") == 1
    assert exits("sigkill") == killed + 1
    replacement = m.slots[0].pid
    assert replacement not in (None, first, second) and m.slots[0].state is SlotState.STARTING


def test_a_worker_that_exits_cleanly_has_its_message_given_back_uncounted(make):
    m = make()
    first, _ = started(m)
    run_for(m, 3)
    hold(m, first, b"job-b")
    sys_of(m).exit(first, code=EXIT_RECYCLE)
    m.turn()
    assert queued(m) == [b"job-b"] and attempts(m, b"job-b") == 0
    assert m.slots[0].pid not in (None, first)  # replaced at once, no backoff


# --- backoff -----------------------------------------------------------------------------------


def test_a_slot_failing_at_start_waits_half_a_second_then_doubling_up_to_the_cap(make):
    m = make(supervisor__workers="1", supervisor__restart_backoff_max="4")
    (pid,) = started(m)
    waits = []
    for _ in range(6):
        sys_of(m).exit(pid, code=EXIT_BOOT_ERROR)
        failed_at = sys_of(m).now
        m.turn()
        assert m.slots[0].state is SlotState.BACKOFF and m.slots[0].pid is None
        forks = len(sys_of(m).forked)
        while len(sys_of(m).forked) == forks:
            run_for(m, 0.125, step=0.125)  # exact in binary: no drift
        waits.append(round(sys_of(m).now - failed_at, 2))
        pid = m.slots[0].pid
    assert waits == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_a_crash_after_min_uptime_restarts_at_once_and_resets_the_failures(make):
    m = make(supervisor__workers="1")
    (pid,) = started(m)
    sys_of(m).exit(pid, sig=signal.SIGSEGV)  # at once: a failed start
    m.turn()
    assert m.slots[0].failures == 1
    run_for(m, 0.5)
    pid = m.slots[0].pid
    run_for(m, 3)  # ran long enough
    assert m.slots[0].state is SlotState.RUNNING and m.slots[0].failures == 0
    sys_of(m).exit(pid, sig=signal.SIGSEGV)
    m.turn()
    assert m.slots[0].pid not in (None, pid)


# --- stopping ----------------------------------------------------------------------------------


def test_term_waits_for_jobs_then_kills_at_the_graceful_deadline_without_counting(make):
    m = make()
    first, second = started(m)
    run_for(m, 3)
    hold(m, second, b"long-job")
    by_us = exits("killed_by_us")

    m.signals.append(signal.SIGTERM)
    assert not m.turn()
    assert m.state == State.STOPPING
    assert sys_of(m).signals_to(first) == sys_of(m).signals_to(second) == [signal.SIGTERM]
    sys_of(m).exit(first, code=EXIT_OK)  # finished its job
    run_for(m, 29.5)
    assert signal.SIGKILL not in sys_of(m).signals_to(second)  # the deadline is 30 s

    run_for(m, 1)
    assert sys_of(m).signals_to(second)[-1] == signal.SIGKILL
    sys_of(m).exit(second, sig=signal.SIGKILL)
    assert m.turn()  # every worker gone: the master may exit
    assert queued(m) == [b"long-job"] and attempts(m, b"long-job") == 0
    assert exits("killed_by_us") == by_us + 1
    assert len(sys_of(m).forked) == 2  # nothing was started while stopping


def test_quit_asks_workers_to_give_back_their_jobs_and_kills_them_after_five_seconds(make):
    m = make()
    first, second = started(m)
    m.signals.append(signal.SIGQUIT)
    m.turn()
    assert m.state == State.STOPPING_FAST
    assert sys_of(m).signals_to(first) == [signal.SIGQUIT]
    run_for(m, 5.5)
    assert sys_of(m).signals_to(first)[-1] == signal.SIGKILL


# --- TTIN / TTOU -------------------------------------------------------------------------------


def test_ttin_adds_a_worker_and_ttou_retires_the_highest_after_its_job(make):
    m = make()
    started(m)
    m.signals.append(signal.SIGTTIN)
    m.turn()
    assert m.target == 3 and len([s for s in m.slots if s.pid]) == 3
    third = m.slots[2].pid
    assert third is not None

    m.signals.append(signal.SIGTTOU)
    m.turn()
    assert m.target == 2 and sys_of(m).signals_to(third) == [signal.SIGTERM]
    assert m.slots[2].state is SlotState.STOPPING and len(m.slots) == 3  # finishing its job
    sys_of(m).exit(third, code=EXIT_OK)
    m.turn()
    assert len(m.slots) == 2 and len(sys_of(m).forked) == 3  # gone, and not replaced

    m.signals.extend([signal.SIGTTOU, signal.SIGTTOU])
    m.turn()
    assert m.target == 1  # never below one worker


# --- FATAL -------------------------------------------------------------------------------------


def _fail_until_fatal(m: Master, slot_index: int = 0) -> None:
    for _ in range(MAX_START_FAILURES):
        slot = m.slots[slot_index]
        while slot.pid is None:
            run_for(m, 0.25, step=0.25)
        sys_of(m).exit(slot.pid, code=EXIT_BOOT_ERROR)
        m.turn()


def test_a_slot_failing_at_start_n_times_in_a_row_goes_fatal_and_ttin_revives_it(make):
    m = make(supervisor__workers="2", supervisor__restart_backoff_max="1")
    started(m)
    _fail_until_fatal(m, 1)
    slot = m.slots[1]
    assert slot.state is SlotState.FATAL and slot.failures == MAX_START_FAILURES
    forks = len(sys_of(m).forked)
    run_for(m, 600, step=5)
    assert len(sys_of(m).forked) == forks  # no more tries
    assert m.slots[0].state is SlotState.RUNNING  # the other slot is not affected
    assert [(f["slot"], f["failures"]) for f in m.fatal] == [(2, MAX_START_FAILURES)]
    assert "could not start" in m.fatal[0]["last_failure"]
    assert fatal_gauge() == 1

    m.signals.append(signal.SIGTTIN)
    m.turn()
    assert m.target == 2  # TTIN revived the slot instead of adding one
    assert slot.state is SlotState.STARTING and slot.failures == 0
    assert m.fatal == [] and fatal_gauge() == 0


def test_hup_revives_a_fatal_slot(make):
    m = make(supervisor__workers="1", supervisor__restart_backoff_max="1")
    started(m)
    _fail_until_fatal(m)
    assert m.slots[0].state is SlotState.FATAL and fatal_gauge() == 1
    m.signals.append(signal.SIGHUP)
    m.turn()
    assert m.slots[0].pid is not None and m.fatal == [] and fatal_gauge() == 0


def test_a_fork_that_fails_is_a_failed_start(make):
    m = make(supervisor__workers="1")

    def no_fork() -> int:
        raise OSError(11, "Resource temporarily unavailable")

    sys_of(m).fork = no_fork  # type: ignore[method-assign]
    m.turn()
    assert m.slots[0].state is SlotState.BACKOFF and m.slots[0].failures == 1


# --- wedged workers ------------------------------------------------------------------------


def test_a_worker_silent_past_its_limit_is_killed_and_its_job_requeued_as_a_crash(make):
    m = make(supervisor__workers="1")
    (pid,) = started(m)
    slot = m.slots[0]
    idle, busy = silence_limit(m.config, Activity.IDLE), silence_limit(m.config, Activity.BUSY)
    assert idle < busy
    # An idle worker that keeps turning is never killed
    run_for(m, idle * 3)
    assert sys_of(m).signals_to(pid) == []
    # Busy, it may be silent longer than idle...
    assert slot.clock is not None
    slot.clock.mark(sys_of(m).now, Activity.BUSY)
    hold(m, pid, b"wedging-job")
    run_for(m, idle + 5, alive=False)
    assert sys_of(m).signals_to(pid) == []
    # ...but not longer than its limit
    wedged = exits("wedged")
    run_for(m, busy - idle - 5 + 1, alive=False)
    assert sys_of(m).signals_to(pid) == [signal.SIGKILL] and slot.wedged
    sys_of(m).exit(pid, sig=signal.SIGKILL)
    m.turn()
    assert exits("wedged") == wedged + 1
    assert queued(m) == [b"wedging-job"] and attempts(m, b"wedging-job") == 1
    assert slot.pid not in (None, pid) and not slot.wedged  # replaced at once


def test_silence_while_the_master_itself_was_stopped_is_not_held_against_a_worker(make):
    m = make(supervisor__workers="1")
    (pid,) = started(m)
    idle = silence_limit(m.config, Activity.IDLE)
    # The whole pool was stopped (SIGSTOP, a frozen container): our clock jumps
    sys_of(m).now += 10 * idle
    m.turn()
    assert sys_of(m).signals_to(pid) == []
    # The worker's silence counts from the end of the gap
    run_for(m, idle - 1, alive=False)
    assert sys_of(m).signals_to(pid) == []
    run_for(m, 2, alive=False)
    assert sys_of(m).signals_to(pid) == [signal.SIGKILL]


def test_a_paused_worker_may_sleep_between_probes(make):
    m = make(supervisor__workers="1")
    (pid,) = started(m)
    slot = m.slots[0]
    assert slot.clock is not None
    slot.clock.mark(sys_of(m).now, Activity.PAUSED)
    run_for(m, 61, alive=False)  # PAUSE_MAX, the longest sleep between two probes
    assert sys_of(m).signals_to(pid) == []
    assert silence_limit(m.config, Activity.PAUSED) > 60


def test_max_start_failures_is_a_setting_and_zero_means_never_fatal(make):
    m = make(supervisor__workers="1", supervisor__restart_backoff_max="1",
             supervisor__max_start_failures="3")
    started(m)
    for _ in range(3):
        slot = m.slots[0]
        while slot.pid is None:
            run_for(m, 0.25, step=0.25)
        sys_of(m).exit(slot.pid, code=EXIT_BOOT_ERROR)
        m.turn()
    assert m.slots[0].state is SlotState.FATAL and m.slots[0].failures == 3
    never = make(supervisor__workers="1", supervisor__restart_backoff_max="1",
                 supervisor__max_start_failures="0", supervisor__host_id="another-host")
    started(never)
    for _ in range(MAX_START_FAILURES + 2):
        slot = never.slots[0]
        while slot.pid is None:
            run_for(never, 0.25, step=0.25)
        sys_of(never).exit(slot.pid, code=EXIT_BOOT_ERROR)
        never.turn()
    assert never.slots[0].state is not SlotState.FATAL

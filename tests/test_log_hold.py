"""Routine log lines held back while a worker runs jobs back to back (logs.hold)."""

from __future__ import annotations

import calendar
import json
import logging
import signal
import time

import pytest

from worker import config as config_mod
from worker import logs, metrics
from worker.keys import Keys
from worker.protocol import EXIT_RECYCLE


@pytest.fixture
def log_file(tmp_path):
    path = tmp_path / "daemon.log"
    logs.setup("worker 0", str(path), "INFO")
    yield path
    logs.hold(False)
    logging.shutdown()
    logs.setup("main", "", "INFO")


def _lines(path) -> list[str]:
    return [line.split("] ", 1)[1] for line in path.read_text().splitlines()]


def test_held_lines_wait_for_a_warning_and_keep_their_order(log_file):
    log = logging.getLogger("clip-supervisor.worker")
    logs.hold(True)
    log.info("job a done")
    log.info("job b done")
    # Held: nothing written yet
    assert log_file.read_text() == ""
    # A warning writes what waited first, then itself
    log.warning("job c dead")
    assert _lines(log_file) == ["job a done", "job b done", "job c dead"]
    # Releasing writes what waits at once, and lines are written as they come again
    log.info("job d done")
    logs.hold(False)
    log.info("job e done")
    assert _lines(log_file)[-2:] == ["job d done", "job e done"]


def test_held_lines_wait_no_longer_than_the_bound(log_file, monkeypatch):
    log = logging.getLogger("clip-supervisor.worker")
    logs.hold(True)
    log.info("first")
    assert log_file.read_text() == ""
    # The next line after HOLD_SECONDS writes both
    time.sleep(logs.HOLD_SECONDS + 0.05)
    log.info("second")
    assert _lines(log_file) == ["first", "second"]
    # So does the HOLD_LINES-th line
    for i in range(logs.HOLD_LINES):
        log.info("line %d", i)
    assert len(_lines(log_file)) == 2 + logs.HOLD_LINES
    # And logging's shutdown (a worker's exit) writes what waits
    log.info("last")
    logging.shutdown()
    assert _lines(log_file)[-1] == "last"


def test_a_deferred_line_keeps_its_time_and_fields_and_comes_before_later_lines(tmp_path):
    # Given JSON lines, held, and a line deferred while job "a" was bound
    path = tmp_path / "daemon.log"
    logs.setup("worker 0", str(path), "INFO", fmt="json")
    log = logging.getLogger("clip-supervisor.worker")
    try:
        logs.hold(True)
        logs.bind(job_id="a", stage="done")
        before = time.time()
        logs.defer(log, "job %s done in %.2f s", "a", 0.5)
        after = time.time()
        # When job "b" is bound, and the deferred line is made a moment later
        logs.bind(job_id="b", stage="fetch")
        while time.time() < after + 0.05:  # the line is made later than it was asked for
            time.sleep(0.01)
        assert path.read_text() == ""
        logs.write_deferred()
        assert path.read_text() == ""  # made, and held with the other routine lines
        # And a warning of job b follows
        log.warning("job b: odd")
        entries = [json.loads(line) for line in path.read_text().splitlines()]
        # Then the deferred line comes first, with job a's fields and the time of the call
        assert [(e["job_id"], e["stage"], e["message"]) for e in entries] == [
            ("a", "done", "job a done in 0.50 s"), ("b", "fetch", "job b: odd")]
        stamp = calendar.timegm(time.strptime(entries[0]["time"][:19], "%Y-%m-%dT%H:%M:%S")) \
            + int(entries[0]["time"][20:23]) / 1000
        assert before - 0.001 <= stamp <= after
    finally:
        logs.hold(False)
        logs.unbind()
        logging.shutdown()
        logs.setup("main", "", "INFO")


def test_deferred_lines_are_written_by_any_later_write_and_one_at_a_time(log_file):
    log = logging.getLogger("clip-supervisor.worker")
    # Not holding: a deferred line is written at once
    logs.defer(log, "job %s done", "x")
    assert _lines(log_file) == ["job x done"]
    # Holding: a line deferred while another waits makes the waiting one first (so a
    # caller that never waits for Redis keeps at most one), and releasing writes both
    logs.hold(True)
    logs.defer(log, "job %s done", "y")
    logs.defer(log, "job %s done", "z")
    assert len(logs._deferred) == 1
    log.info("job w done")  # a plain line after them comes after them
    assert _lines(log_file) == ["job x done"]
    logs.hold(False)
    assert _lines(log_file) == ["job x done", "job y done", "job z done", "job w done"]
    # A deferred line below the log level is not made at all
    logging.getLogger().setLevel("WARNING")
    logs.hold(True)
    logs.defer(log, "job %s done", "q")
    assert not logs._deferred
    # And logging's shutdown (a worker's exit) writes a deferred line
    logging.getLogger().setLevel("INFO")
    logs.defer(log, "job %s done", "last")
    logging.shutdown()
    assert _lines(log_file)[-1] == "job last done"


def _run_here(worker) -> int:
    """Run a worker's loop in this process, on the main thread (it installs signal
    handlers), and put the test process's signal handling back afterwards."""
    signals = {sig: signal.getsignal(sig) for sig in (
        signal.SIGTERM, signal.SIGQUIT, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2,
        signal.SIGRTMIN + 1, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD)}
    try:
        return worker.run()
    finally:
        signal.set_wakeup_fd(-1)
        for sig, handler in signals.items():
            signal.signal(sig, handler)
        logs.hold(False)


def test_a_worker_holds_lines_only_between_jobs_taken_back_to_back(redis_server, tmp_path):
    # Given a worker running no-op jobs, 30 queued at once, then one alone
    from worker.runner import Worker

    path = tmp_path / "daemon.log"
    cfg = config_mod.load(None, env={
        "CLIP_SUPERVISOR_REDIS_URL": redis_server.url,
        "CLIP_SUPERVISOR_JOB_PIPELINE": "noop",
        "CLIP_SUPERVISOR_JOB_WORK_DIR": str(tmp_path / "work"),
        "CLIP_SUPERVISOR_STORAGE_OUTPUT_BASE": f"file://{tmp_path}/out",
        "CLIP_SUPERVISOR_SUPERVISOR_MAX_JOBS_PER_WORKER": "31"})
    logs.setup("worker 0", str(path), "INFO")
    keys, r = Keys("clips"), redis_server.client()
    job = {"url": "http://127.0.0.1:9/v.mp4", "duration": 1}
    r.lpush(keys.queue, *[json.dumps({**job, "id": f"burst-{i}"}) for i in range(30)])
    worker = Worker(cfg)
    counted = metrics.JOBS.labels("done")._value.get()
    seen: list[tuple[str, bool]] = []
    done = worker._done

    def watched(job, *args, **kwargs):
        done(job, *args, **kwargs)
        seen.append((job.id, f"job {job.id} done" in path.read_text()))
        if job.id == "burst-29":  # the queue is empty: the next one comes alone
            r.lpush(keys.queue, json.dumps({**job_fields, "id": "alone"}))

    job_fields = job
    worker._done = watched
    # Its loop runs here, on the main thread (signals), and ends as recycled after 31 jobs
    assert _run_here(worker) == EXIT_RECYCLE
    assert len(seen) == 31
    # Then a job taken with the previous one's ack did not write its line at once, the
    # last of the burst (nothing in hand after it) and the lone job did, and every line is
    # in the file, in order, once the worker is done
    written_at_once = dict(seen)
    assert not written_at_once["burst-0"]
    assert written_at_once["burst-29"] and written_at_once["alone"]
    text = path.read_text()
    positions = [text.index(f"job {name} done") for name in
                 [f"burst-{i}" for i in range(30)] + ["alone"]]
    assert positions == sorted(positions)
    # And every job was counted (a job ended back to back is counted during the next one's
    # ack, the last before the worker waits)
    assert metrics.JOBS.labels("done")._value.get() - counted == 31
    logging.shutdown()
    logs.setup("main", "", "INFO")


def test_held_lines_are_written_before_a_clip_starts(redis_server, tmp_path):
    # Given a worker whose jobs run a pipeline (here a stand-in), three queued at once
    from worker.pipeline import Result
    from worker.runner import Worker

    path = tmp_path / "daemon.log"
    cfg = config_mod.load(None, env={
        "CLIP_SUPERVISOR_REDIS_URL": redis_server.url,
        "CLIP_SUPERVISOR_JOB_WORK_DIR": str(tmp_path / "work"),
        "CLIP_SUPERVISOR_STORAGE_OUTPUT_BASE": f"file://{tmp_path}/out",
        "CLIP_SUPERVISOR_SUPERVISOR_MAX_JOBS_PER_WORKER": "3"})
    logs.setup("worker 0", str(path), "INFO")
    keys, r = Keys("clips"), redis_server.client()
    r.lpush(keys.queue, *[json.dumps({"id": f"c{i}", "url": "http://127.0.0.1:9/v.mp4",
                                      "duration": 1}) for i in range(3)])
    before_clip: list[str] = []

    class Clip:
        def run(self, job, deadline):
            before_clip.append(path.read_text())
            return Result(output=job.output)

    worker = Worker(cfg)
    worker.pipeline = Clip()
    assert _run_here(worker) == EXIT_RECYCLE
    # When each clip starts, Then the line of the job before it (taken with its ack) is in
    # the file already
    assert "job c1 done" not in before_clip[1] and "job c0 done" in before_clip[1]
    assert "job c1 done" in before_clip[2]
    logging.shutdown()
    logs.setup("main", "", "INFO")

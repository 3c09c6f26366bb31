"""What an operator writes and reads. The documented sample configuration,
etc/clip-supervisor.conf, stays complete and true: it loads, names every option of
worker.config with a comment, and shows the defaults. A misspelled ``CLIP_SUPERVISOR_*``
variable stops the start with one line, as a misspelled key does. JSON log lines carry
``job_id``, ``worker_id``, ``stage`` and ``reason`` as fields of their own."""

from __future__ import annotations

import configparser
import json
import logging
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from worker import config as config_mod
from worker import logs

SAMPLE = os.path.join(ROOT, "etc", "clip-supervisor.conf")


def _commented_keys() -> set[tuple[str, str]]:
    """(section, key) of every assignment directly preceded by a comment line."""
    found = set()
    section = ""
    previous = ""
    with open(SAMPLE, encoding="utf-8") as fh:
        for line in fh:
            text = line.strip()
            if text.startswith("[") and text.endswith("]"):
                section = text[1:-1]
            elif "=" in text and not text.startswith(("#", ";")) and \
                    previous.startswith(("#", ";")):
                found.add((section, text.split("=", 1)[0].strip()))
            previous = text
    return found


def test_sample_config_loads_and_sets_every_option():
    # Given the sample and the list of every option the loader knows
    options = config_mod.options()
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(SAMPLE, encoding="utf-8")

    # When it is loaded (with no environment overrides)
    loaded = config_mod.load(SAMPLE, env={})

    # Then every option appears in its section, with a comment
    missing = [f"[{s}] {k}" for s, k, _, _ in options if not parser.has_option(s, k)]
    assert not missing, f"options missing from {SAMPLE}: {missing}"
    uncommented = [f"[{s}] {k}" for s, k, _, _ in options if (s, k) not in _commented_keys()]
    assert not uncommented, f"options without a comment line: {uncommented}"
    assert loaded.path == SAMPLE


def test_sample_config_shows_the_built_in_defaults():
    # Given the sample and no file at all
    sample = config_mod.load(SAMPLE, env={})
    builtin = config_mod.load(None, env={})

    # Then both give the same configuration, section by section
    for section, key, default, _ in config_mod.options():
        assert getattr(getattr(sample, section), key) == getattr(getattr(builtin, section), key), \
            f"[{section}] {key}: the sample does not show the default {default!r}"


def test_the_default_work_dir_is_in_no_folder_every_user_can_write():
    # Given the sample (which leaves work_dir to the built-in default)
    work_dir = config_mod.load(SAMPLE, env={}).job.work_dir

    # Then no folder above it lets every user make entries (as /var/tmp and /tmp do): none
    # of them could make work_dir first, or swap it for a link
    folder = os.path.dirname(work_dir)
    while True:
        if os.path.isdir(folder):
            assert not os.stat(folder).st_mode & 0o002, f"{folder} (above {work_dir})"
        if folder == "/":
            break
        folder = os.path.dirname(folder)


def test_a_host_id_that_would_break_worker_ids_is_refused():
    # Worker ids are "<host_id>:<pid>:<start-ms>": a colon in host_id made recovery at start
    # split them wrongly and leave such a host's unregistered lists alone for ever
    for bad in ("a:b", "two words", "x" * 65):
        with pytest.raises(config_mod.ConfigError, match=r"\[supervisor\] host_id"):
            config_mod.load(None, env={"CLIP_SUPERVISOR_SUPERVISOR_HOST_ID": bad})
    assert config_mod.load(None, env={"CLIP_SUPERVISOR_SUPERVISOR_HOST_ID": "enc-01.eu"}
                           ).host_id == "enc-01.eu"


# --- the environment -------------------------------------------------------------------------


def test_every_key_has_its_variable_and_nothing_else_is_accepted():
    # Given one variable per key, and the init script's own variable
    env = {name: "" for name in config_mod.env_names()}
    assert "CLIP_SUPERVISOR_REDIS_URL" in env and "CLIP_SUPERVISOR_JOB_WORK_DIR" in env

    # When a known variable and CLIP_SUPERVISOR_DEFAULTS are set, the load goes through
    assert config_mod.load(None, env={"CLIP_SUPERVISOR_JOB_TIMEOUT": "45",
                                      "CLIP_SUPERVISOR_DEFAULTS": "/etc/default/x",
                                      "OTHER_PROGRAM_SETTING": "1"}).job.timeout == 45

    # Then a misspelled one is refused, naming the likely key, and a made-up one as well
    with pytest.raises(config_mod.ConfigError) as caught:
        config_mod.load(None, env={"CLIP_SUPERVISOR_REDIS_URI": "redis://db:6379/0"})
    assert str(caught.value) == ("unknown environment variable CLIP_SUPERVISOR_REDIS_URI "
                                 "(did you mean CLIP_SUPERVISOR_REDIS_URL?)")
    with pytest.raises(config_mod.ConfigError, match=r"CLIP_SUPERVISOR_A .*1 more: "
                       r"CLIP_SUPERVISOR_B$"):
        config_mod.load(None, env={"CLIP_SUPERVISOR_B": "1", "CLIP_SUPERVISOR_A": "1"})


def _supervisor(*args: str, extra_env: dict[str, str]) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CLIP_SUPERVISOR_")}
    return subprocess.run([sys.executable, "-m", "supervisor", *args], cwd=ROOT,
                          env={**environ, **extra_env}, capture_output=True, text=True,
                          timeout=60)


def test_a_misspelled_variable_stops_the_start_with_one_line(env):
    # Given a supervisor's configuration, and an operator who misspelled the Redis variable
    typo = {"CLIP_SUPERVISOR_REDIS_URI": env.redis.url}

    # When it is started, and asked to check its configuration
    run = _supervisor("run", "--config", env.conf, extra_env=typo)
    check = _supervisor("run", "--check-config", "--config", env.conf, extra_env=typo)

    # Then both stop at once with one line naming the variable, as for an unknown key
    expected = ("clip-supervisor: config error: unknown environment variable "
                "CLIP_SUPERVISOR_REDIS_URI (did you mean CLIP_SUPERVISOR_REDIS_URL?)\n")
    for done in (run, check):
        assert (done.returncode, done.stdout, done.stderr) == (1, "", expected)
    assert not env.r.hlen(env.keys.workers)  # no worker ever registered
    # And "status" keeps its LSB meaning (3: not running), saying why it ignores the file
    status = _supervisor("status", "--config", env.conf, extra_env=typo)
    assert status.returncode == 3 and "CLIP_SUPERVISOR_REDIS_URI" in status.stderr
    # And the init script's own variable is no configuration key, but no error either
    ok = _supervisor("run", "--check-config", "--config", env.conf,
                     extra_env={"CLIP_SUPERVISOR_DEFAULTS": "/etc/default/clip-supervisor",
                                "CLIP_SUPERVISOR_JOB_TIMEOUT": "30"})
    assert ok.returncode == 0, ok.stderr


# --- JSON log lines --------------------------------------------------------------------------


def _format(message: str, **extra: object) -> dict:
    record = logging.LogRecord("t", logging.INFO, __file__, 1, message, None, None)
    record.__dict__.update(extra)
    return json.loads(logs.JsonFormatter().format(record))


def test_bound_fields_are_json_fields_and_one_call_can_name_its_own():
    try:
        # Given a worker that bound its id, then a job and its stage
        logs.bind(worker_id="enc-1:42:1700000000000")
        logs.bind(job_id="talk-intro", stage="clip")

        # Then each line names them as fields, and extra= of one call wins for that line
        line = _format("x")
        assert {k: line[k] for k in ("worker_id", "job_id", "stage", "message")} == {
            "worker_id": "enc-1:42:1700000000000", "job_id": "talk-intro", "stage": "clip",
            "message": "x"}
        assert "reason" not in _format("x")
        assert _format("y", reason="not_found", stage="dead")["stage"] == "dead"
        assert _format("y", reason="not_found")["reason"] == "not_found"
        # And unbinding the job leaves the worker's id; None removes one field
        logs.unbind("job_id", "stage")
        logs.bind(reason=None)
        assert logs.bound() == {"worker_id": "enc-1:42:1700000000000"}
        line = _format("z")
        assert "job_id" not in line and line["worker_id"] == "enc-1:42:1700000000000"
        # And a new process identity (a forked worker) starts with nothing bound
        role = logs.role()
        logs.set_role("worker 3")
        logs.set_role(role)
        assert logs.bound() == {}
        with pytest.raises(TypeError, match="unknown field"):
            logs.bind(job="x")
    finally:
        logs.unbind()


def test_json_log_lines_name_the_job_worker_stage_and_reason(env):
    # Given a supervisor with one worker, logging JSON
    env.settings["supervisor"]["workers"] = 1
    proc = env.start("--log-format", "json")
    env.wait_workers(proc, 1)

    # When one job is clipped and one names a source that does not exist
    env.push({"id": "good-1", "url": env.url("ten.mp4"), "start": 1, "duration": 2},
             {"id": "gone-1", "url": env.url("missing.mp4")})
    env.wait_finished(2)
    worker_id = env.done_events()[0]["worker"]
    assert env.stop(proc) == 0

    # Then every line is JSON, and a log store can filter on the job, worker, stage, reason
    entries = [json.loads(line) for line in env.log_text().splitlines() if line.strip()]
    done = [e for e in entries if e.get("job_id") == "good-1" and " done " in e["message"]]
    assert done and done[0]["worker_id"] == worker_id and done[0]["stage"] == "done", done
    dead = [e for e in entries if e.get("job_id") == "gone-1" and " dead " in e["message"]]
    assert dead and dead[0]["reason"] == "not_found" and dead[0]["stage"] == "dead", dead
    assert dead[0]["worker_id"] == worker_id
    # And a worker names itself in every line it writes, from its "ready" on
    ready = next(e for e in entries if re.match(r"worker \d+ ready ", e["message"]))
    assert ready["worker_id"] == worker_id and "job_id" not in ready
    mine = [e for e in entries if e["pid"] == ready["pid"]]
    assert all(e.get("worker_id") == worker_id for e in mine[mine.index(ready):]), mine
    # And the master's lines carry no job: nothing leaks from a worker
    assert not [e for e in entries if e["role"] == "master" and "job_id" in e]

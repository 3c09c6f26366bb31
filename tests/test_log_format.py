"""The log line formatters write what logging's own would, at a fraction of the cost.

A worker writes one line per job, so worker.logs formats the time of a line once per second
and turns off the caller, thread and multiprocessing lookups no line shows. These tests
pin the text they write: the same as ``logging.Formatter(TEXT_FORMAT)``, second boundaries
and all, and a JSON ``time`` in UTC with milliseconds.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

from worker import logs


def _record(created: float, message: str = "job %s done", *args: object) -> logging.LogRecord:
    record = logging.LogRecord("clip-supervisor.worker", logging.INFO, __file__, 1, message,
                               args or ("a1",), None)
    record.created = created
    record.msecs = int((created - int(created)) * 1000)
    record.role = "worker 1"
    return record


def test_text_lines_are_what_logging_formatter_writes_across_seconds():
    # Given one formatter kept across lines (as a handler keeps it), and logging's own
    fast, plain = logs.TextFormatter(), logging.Formatter(logs.TEXT_FORMAT)
    # When lines fall in one second, then in the next ones (the cached second changes)
    for created in (1700000000.0005, 1700000000.5, 1700000000.999, 1700000001.0,
                    1700000001.001, 1700003600.25, 1.5):
        record = _record(created)
        # Then each line is the very text logging.Formatter writes
        assert fast.format(record) == plain.format(_record(created))


def test_json_time_is_utc_with_milliseconds_across_seconds():
    formatter = logs.JsonFormatter()
    for created, expected in ((1700000000.0005, "2023-11-14T22:13:20.000Z"),
                              (1700000000.999, "2023-11-14T22:13:20.999Z"),
                              (1700000001.25, "2023-11-14T22:13:21.250Z")):
        line = json.loads(formatter.format(_record(created)))
        assert line["time"] == expected
        assert line["message"] == "job a1 done" and line["role"] == "worker 1"


def test_a_configured_process_still_writes_one_whole_line_per_call(tmp_path):
    # Given a process set up as a worker is, logging to a file
    path = tmp_path / "clip-supervisor.log"
    code = (
        "import logging\n"
        "from worker import logs\n"
        f"logs.setup('worker 3', {str(path)!r}, 'INFO')\n"
        "log = logging.getLogger('clip-supervisor.worker')\n"
        "for i in range(3):\n"
        "    log.info('job %s done in %.2f s -> %s', f'j{i}', 0.5, 'file:///o.mp4')\n"
        "try:\n"
        "    1 / 0\n"
        "except ZeroDivisionError:\n"
        "    log.exception('worker 3 crashed')\n"
        "logging.debug('not written')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    # Then each job's line is there, whole, naming the role and pid; the traceback follows
    lines = path.read_text().splitlines()
    jobs = [line for line in lines if " done in " in line]
    assert [line.split("] ", 1)[1] for line in jobs] == [
        f"job j{i} done in 0.50 s -> file:///o.mp4" for i in range(3)]
    assert all(" INFO    worker 3[" in line for line in jobs)
    assert any("ZeroDivisionError" in line for line in lines)
    assert "not written" not in path.read_text()

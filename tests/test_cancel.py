"""Cancelling jobs: queued ones never run, running ones stop within a second, finished ones
are left alone. Real Redis, real ffmpeg, the real supervisor."""

from __future__ import annotations

import json
import os
import time

import pytest

from clip_supervisor import Client, JobCancelled
from clip_supervisor.client import message
from tests.conftest import child_named, free_port, gone, wait_for
from worker.protocol import JobState
from worker.queue import Held, now_iso

TOKEN = "cancel-test-token-0c4e1f9a"


def _client(env) -> Client:
    return Client(env.redis.url, config_file=env.conf)


def _events(env, job_id: str) -> list[dict]:
    return [{k.decode(): v.decode() for k, v in fields.items()}
            for _, fields in env.r.xrange(env.keys.events)
            if fields[b"id"] == job_id.encode()]


def test_a_queued_job_is_taken_out_and_never_runs(env):
    client = _client(env)
    # Given jobs waiting in the queue, in the retry list and in the delayed retries
    keep = client.enqueue(env.url("ten.mp4"), duration=1, id="keep")
    drop = client.enqueue(env.url("ten.mp4"), duration=1, id="drop",
                          callback="http://127.0.0.1:9/hook")
    due = message(env.url("ten.mp4"), duration=1, id="due")
    env.r.lpush(env.keys.retry, due)
    later = message(env.url("ten.mp4"), duration=1, id="later")
    env.r.lpush(env.keys.processing("w"), later)
    client.queue.retry(Held("w", later, "later"), {"id": "later", "reason": "fetch_failed",
                                             "error": "reset", "time": now_iso()}, {})
    assert env.r.zcard(env.keys.delayed) == 1

    # When they are cancelled
    assert drop.cancel() is True
    assert client.cancel("due") is True
    outcome = client.cancel_job("later")
    assert outcome.cancelled and outcome.removed == 1 and not outcome.running

    # Then each is a dead letter with reason cancelled (its message kept: replayable), out
    # of every list, and its end is in the stream
    letters = {letter["id"]: letter for letter in env.dead_letters()}
    assert set(letters) == {"drop", "due", "later"}
    assert all(letter["reason"] == "cancelled" for letter in letters.values())
    assert json.loads(letters["drop"]["message"])["id"] == "drop"
    assert letters["later"]["attempts"] == 1  # the failed attempt it had made
    assert env.r.llen(env.keys.retry) == 0 and env.r.zcard(env.keys.delayed) == 0
    assert [json.loads(m)["id"] for m in env.r.lrange(env.keys.queue, 0, -1)] == ["keep"]
    end = _events(env, "drop")[-1]
    assert end["type"] == "cancelled" and end["callback"] == "http://127.0.0.1:9/hook"
    assert json.loads(end["event"])["reason"] == "cancelled"
    assert "message" not in json.loads(end["event"])
    with pytest.raises(JobCancelled) as cancelled:
        drop.wait(timeout=5)
    assert cancelled.value.reason == "cancelled"
    assert drop.status()["state"] is JobState.DEAD

    # and once a supervisor runs, only the other job is done
    proc = env.start()
    keep.wait(timeout=60)
    assert [e["id"] for e in env.done_events()] == ["keep"]
    assert sorted(os.listdir(env.out)) == ["keep.mp4"]
    # A cancel of an ended job changes nothing
    assert drop.cancel() is False and keep.cancel() is False
    assert env.stop(proc) == 0


@pytest.mark.settings({"supervisor": {"workers": 1}, "job": {"encode_preset": "slower"}})
def test_a_running_encode_is_stopped_within_a_second(env, heavy_video):
    client = _client(env)
    port = free_port()
    env.settings["metrics"] = {"listen": f"127.0.0.1:{port}", "auth_token": TOKEN}
    proc = env.start()
    (pid,) = env.wait_workers(proc, 1)
    # Given an encode that has been running for a while
    job = client.enqueue(env.url(heavy_video), mode="encode", id="enc")

    child = wait_for(lambda: child_named(pid, "ffmpeg"), 20, what="the worker's ffmpeg")
    wait_for(lambda: [e["type"] for e in _events(env, "enc")].count("progress") >= 2, 30,
             what="the encode's progress on the stream")

    # When it is cancelled
    asked = time.monotonic()
    outcome = client.cancel_job("enc")
    assert outcome.cancelled and outcome.running and outcome.state == JobState.RUNNING
    wait_for(lambda: gone(child.pid) and env.r.llen(env.keys.dead) == 1, 5, interval=0.005,
             what="ffmpeg gone and the dead letter")
    latency = time.monotonic() - asked

    # Then within a second its ffmpeg is gone and it is a dead letter (cancelled)
    assert latency < 1.0, latency
    with pytest.raises(JobCancelled):
        job.wait(timeout=5)
    (letter,) = env.dead_letters()
    assert letter["id"] == "enc" and letter["reason"] == "cancelled"
    # nothing is stored, nothing is left in the worker's folder, nothing is requeued
    assert not os.path.exists(os.path.join(env.out, "enc.mp4"))
    (folder,) = [name for name in os.listdir(env.work) if name.startswith(f"w-{pid}-")]
    assert os.listdir(os.path.join(env.work, folder)) == []
    # Its progress reached the stream at most once a second
    kinds = [(entry_id.decode(), fields[b"type"].decode())
             for entry_id, fields in env.r.xrange(env.keys.events) if fields[b"id"] == b"enc"]
    assert [kind for _, kind in kinds][:2] == ["queued", "started"]
    assert kinds[-1][1] == "cancelled"
    times = [int(entry_id.split("-")[0]) for entry_id, kind in kinds if kind == "progress"]
    assert len(times) >= 2 and all(b - a >= 900 for a, b in zip(times, times[1:],
                                                                 strict=False))
    # and the worker goes on with the next job
    behind = client.enqueue(env.url("ten.mp4"), duration=1, id="behind")
    behind.wait(timeout=60)
    assert not os.path.exists(os.path.join(env.out, "enc.mp4"))
    assert os.listdir(env.out) == ["behind.mp4"]
    wait_for(lambda: "job enc dead (cancelled)" in env.log_text(), 10, what="the log line")
    print(f"cancel of a running encode: ffmpeg gone and dead letter after "
          f"{latency * 1000:.0f} ms")
    assert env.stop(proc) == 0


def test_a_finished_job_is_left_alone_and_the_cli_and_dashboard_say_so(env):
    import urllib.error
    import urllib.request

    port = free_port()
    env.settings["metrics"] = {"listen": f"127.0.0.1:{port}", "auth_token": TOKEN}
    client = _client(env)
    proc = env.start()
    env.wait_workers(proc, 2)
    job = client.enqueue(env.url("ten.mp4"), duration=1, id="finished")
    done = job.wait(timeout=60)

    # A cancel of a done job returns False and changes nothing
    assert job.cancel() is False
    cli = env.cli("cancel", "finished", "nobody", check=False)
    assert cli.returncode == 1
    assert cli.stdout.splitlines() == ["finished: not cancelled: it has ended (done)",
                                       "nobody: not cancelled: no such job queued or running"]
    assert job.status()["state"] is JobState.DONE and env.dead_letters() == []
    assert env.done_events() == [done] and os.path.exists(os.path.join(env.out,
                                                                       "finished.mp4"))

    # The dashboard's action needs the token, and says the same
    def post(job_id: str, token: str | None) -> tuple[int, dict]:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["X-Clip-Token"] = token
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/job/{job_id}/cancel",
                                     data=b"{}", headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    wait_for(lambda: _answers(port), 10, what="the dashboard")
    assert post("finished", None)[0] == 401
    assert post("finished", TOKEN) == (200, {"id": "finished", "cancelled": False,
                                             "removed": 0, "running": False,
                                             "state": "done"})
    assert env.stop(proc) == 0
    # A queued job, from the CLI (no worker runs now)
    queued = client.enqueue_many([{"url": env.url("ten.mp4"), "id": f"q{n}"} for n in (1, 2)])
    cli = env.cli("cancel", "q1")
    assert cli.stdout == "q1: cancelled: taken out of the queue, dead-lettered (cancelled)\n"
    with pytest.raises(JobCancelled):
        queued[0].wait(timeout=5)
    assert {letter["id"] for letter in env.dead_letters()} == {"q1"}
    assert "dashboard" in env.log_text() and "finished: not cancelled" in env.log_text()


def _answers(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.settings({"supervisor": {"workers": 1}, "job": {"encode_preset": "slower"}})
def test_the_job_page_cancels_a_running_job_with_the_token(env, heavy_video):
    from playwright.sync_api import expect, sync_playwright  # the test extra, as test_dashboard's

    port = free_port()
    env.settings["metrics"] = {"listen": f"127.0.0.1:{port}", "auth_token": TOKEN}
    client = _client(env)
    proc = env.start()
    env.wait_workers(proc, 1)
    # Given a running encode whose source arrives over 40 s (so it is still running however
    # fast the machine, while a browser starts), and an operator on its job page who has
    # entered the token
    job = client.enqueue(env.url(heavy_video, slow=40), mode="encode", id="page-enc")
    wait_for(lambda: job.status().get("state") == JobState.RUNNING, 20, what="the encode")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"])
        try:
            page = browser.new_page()
            page.set_default_timeout(15000)
            page.on("dialog", lambda dialog: dialog.accept())  # "Cancel job page-enc?"
            page.goto(f"http://127.0.0.1:{port}/job/page-enc")
            button = page.locator("#job-cancel")
            page.fill("#token", TOKEN)
            page.click("#token-use")
            # (a locator's state, not wait_for_function: the page's CSP forbids the eval the
            # latter polls with)
            expect(button).to_be_enabled(timeout=15_000)

            # When the operator clicks Cancel job
            button.click()

            # Then the job ends as a cancelled dead letter, and the page shows it
            page.locator("#notice", has_text="its worker aborts it").wait_for()
            with pytest.raises(JobCancelled):
                job.wait(timeout=10)
            page.locator("#job-state", has_text="dead").wait_for()
            expect(button).to_be_disabled(timeout=15_000)
        finally:
            browser.close()
    assert [letter["reason"] for letter in env.dead_letters()] == ["cancelled"]
    assert "dashboard: 127.0.0.1 asked to cancel: page-enc: cancelling" in env.log_text()
    assert env.stop(proc) == 0

"""Signed webhooks (supervisor.webhooks): what a receiver gets, and that it gets it at least
once. A real loopback receiver written here checks every signature on its own (HMAC-SHA256
recomputed from the secret); the delivery logic runs against a small in-memory outbox in
the unit tests, and the real supervisor, real Redis and its event stream in the end-to-end
ones (a receiver holding the first call while the supervisor is SIGKILLed)."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from prometheus_client import REGISTRY

from supervisor import admin, webhooks
from supervisor.webhooks import Deliverer, Refused, check_target, retry_delay, signature
from tests.conftest import free_port, gone, kill_tree, wait_for
from tests.test_observability import _get, _sample
from worker import config as config_mod
from worker.config import ConfigError
from worker.queue import JobQueue
from worker.source import address_allowed

SECRET = "s3cret-for-the-tests-0123456789"


# --- a receiver that checks signatures on its own ---------------------------------------------


@dataclass
class Call:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    def verified(self, secret: str = SECRET, tolerance: float = 300) -> dict:
        """What a receiver does: recompute the HMAC of "<t>.<body>", compare in constant
        time, refuse an old timestamp; the parsed body."""
        parts = dict(item.split("=", 1) for item in self.headers["X-Clip-Signature"].split(","))
        expected = hmac.new(secret.encode(), parts["t"].encode() + b"." + self.body,
                            hashlib.sha256).hexdigest()
        assert hmac.compare_digest(expected, parts["v1"]), "signature does not match"
        assert abs(time.time() - int(parts["t"])) < tolerance, "timestamp too old"
        return json.loads(self.body)


@dataclass
class Receiver:
    """A loopback HTTP server; ``answers`` says what each call in turn gets: a status, or
    ("sleep", seconds, status), or ("hold", threading.Event, status), or ("redirect", to).
    Once they run out, 200."""

    answers: list[Any] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)

    def __post_init__(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.calls.append(Call(self.path, dict(self.headers), body, time.time()))
                answer = receiver.answers.pop(0) if receiver.answers else 200
                if isinstance(answer, tuple) and answer[0] == "sleep":
                    time.sleep(answer[1])
                    answer = answer[2]
                elif isinstance(answer, tuple) and answer[0] == "hold":
                    answer[1].wait(30)
                    answer = answer[2]
                if isinstance(answer, tuple) and answer[0] == "redirect":
                    self.send_response(302)
                    self.send_header("Location", answer[1])
                else:
                    self.send_response(answer)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


# --- an in-memory outbox for the unit tests ---------------------------------------------------


class Outbox:
    """The stream methods of JobQueue the deliverer uses, on a list: one consumer group,
    entries pending per consumer until acknowledged. Give-ups are recorded in ``failures``,
    or through ``queue`` (a real JobQueue) when one is given."""

    def __init__(self, queue: JobQueue | None = None) -> None:
        self.entries: list[tuple[str, dict[str, str]]] = []
        self.delivered = 0  # index of the first entry never delivered to the group
        self.pending: dict[str, str] = {}  # entry id -> consumer
        self.acked: list[str] = []
        self.failures: list[tuple[str, dict[str, Any]]] = []
        self.queue = queue
        self.lock = threading.Lock()

    def add(self, kind: str, job_id: str, event: dict, callback: str = "",
            at_ms: int | None = None) -> str:
        with self.lock:
            ms = at_ms if at_ms is not None else int(time.time() * 1000)
            entry_id = f"{ms}-{len(self.entries)}"
            self.entries.append((entry_id, {"type": kind, "id": job_id,
                                            "time": "2030-01-01T00:00:00Z",
                                            "event": json.dumps(event), "callback": callback}))
            return entry_id

    def events_ensure_group(self, group: str, start_id: str = "$") -> bool:
        return False

    def events_read_group(self, group: str, consumer: str, count: int = 100,
                          block_ms: int = 0) -> list:
        with self.lock:
            new = self.entries[self.delivered:self.delivered + count]
            self.delivered += len(new)
            for entry_id, _ in new:
                self.pending[entry_id] = consumer
        if not new and block_ms:
            time.sleep(min(block_ms, 50) / 1000)
        return new

    def events_pending(self, group: str, consumer: str, after: str = "0",
                       count: int = 100) -> list:
        with self.lock:
            return [(i, f) for i, f in self.entries
                    if self.pending.get(i) == consumer and _after(i, after)][:count]

    def events_ack(self, group: str, *ids: str) -> int:
        with self.lock:
            self.acked += ids
            return sum(self.pending.pop(i, None) is not None for i in ids)

    def events_claim_stale(self, group: str, consumer: str, min_idle_ms: int,
                           count: int = 100) -> list:
        return []

    def webhook_failed(self, outcome: str, record: dict[str, Any]) -> None:
        if self.queue is not None:
            self.queue.webhook_failed(outcome, record)
        self.failures.append((outcome, record))


def _after(entry_id: str, after: str) -> bool:
    def key(i: str) -> tuple[int, int]:
        ms, _, seq = i.partition("-")
        return int(ms), int(seq or 0)
    return key(entry_id) > key(after)


def _config(**notify: Any) -> config_mod.Config:
    private = notify.pop("allow_private", True)
    env = {"CLIP_SUPERVISOR_NOTIFY_SECRET": SECRET,
           "CLIP_SUPERVISOR_JOB_ALLOW_PRIVATE_NETWORKS": "true" if private else "false"}
    env.update({f"CLIP_SUPERVISOR_NOTIFY_{k.upper()}": str(v) for k, v in notify.items()})
    return config_mod.load(None, env=env)


def _count(outcome: str) -> float:
    return REGISTRY.get_sample_value("clip_webhook_deliveries_total",
                                     {"outcome": outcome}) or 0.0


def _run_until(deliverer: Deliverer, predicate, timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        deliverer.turn(block_ms=20)


# --- unit tests of the delivery logic ---------------------------------------------------------


def test_a_done_event_reaches_its_callback_signed_and_is_acknowledged(receiver):
    # Given a done event in the outbox whose job names the receiver as its callback
    outbox = Outbox()
    event = {"id": "job-1", "output": "file:///clips/job-1.mp4", "duration": 2.0}
    entry = outbox.add("done", "job-1", event, callback=receiver.url())
    deliverer = Deliverer(outbox, _config(), consumer="host-a")

    # When the deliverer runs until the entry is acknowledged
    _run_until(deliverer, lambda: entry in outbox.acked, what="the ack")

    # Then one POST came, whose signature the receiver verifies on its own
    assert len(receiver.calls) == 1
    call = receiver.calls[0]
    body = call.verified()
    assert call.path == "/hook" and call.headers["Content-Type"] == "application/json"
    # And it names the job and carries the event, under a unique event id
    assert call.headers["X-Clip-Event-Id"] == entry == body["id"]
    assert body["job_id"] == "job-1" and body["type"] == "done" and body["event"] == event
    # And a wrong secret does not verify
    with pytest.raises(AssertionError, match="signature"):
        call.verified(secret="another-secret-of-16-chars")
    assert outbox.pending == {} and deliverer.held == {}


def test_only_final_states_are_delivered_and_the_default_url_stands_in(receiver):
    # Given [notify] url, and entries: progress (never sent), dead without a callback (sent
    # to the default), cancelled with one (sent to it)
    outbox = Outbox()
    progress = outbox.add("progress", "job-2", {"progress": 0.5}, callback=receiver.url())
    dead = outbox.add("dead", "job-2", {"reason": "not_found"})
    cancelled = outbox.add("cancelled", "job-3", {"reason": "cancelled"},
                           callback=receiver.url("/own"))
    deliverer = Deliverer(outbox, _config(url=receiver.url("/default")), consumer="host-a")

    # When they are all settled
    _run_until(deliverer, lambda: {progress, dead, cancelled} <= set(outbox.acked))

    # Then the receiver heard of the two final ones, each at its own URL
    seen = {c.verified()["type"]: c.path for c in receiver.calls}
    assert seen == {"dead": "/default", "cancelled": "/own"}


def test_failed_calls_are_retried_with_backoff_under_the_same_event_id(receiver):
    # Given a receiver that answers 500, then 503, then 200
    receiver.answers = [500, 503, 200]
    outbox = Outbox()
    entry = outbox.add("done", "job-4", {"id": "job-4"}, callback=receiver.url())
    deliverer = Deliverer(outbox, _config(), consumer="host-a")
    failed = _count("failed")

    # When the deliverer runs until the entry is acknowledged
    _run_until(deliverer, lambda: entry in outbox.acked, timeout=15, what="the ack")

    # Then three calls came, the same event each time, at least a second apart
    assert len(receiver.calls) == 3
    assert {c.headers["X-Clip-Event-Id"] for c in receiver.calls} == {entry}
    assert len({c.body for c in receiver.calls}) == 1
    assert all(c.verified() for c in receiver.calls)
    gaps = [b.at - a.at for a, b in zip(receiver.calls, receiver.calls[1:], strict=False)]
    assert all(gap >= 0.9 for gap in gaps), gaps
    # And the two failures were counted; nothing was acknowledged before the 200
    assert _count("failed") - failed == 2 and outbox.acked == [entry]


def test_a_receiver_slower_than_the_timeout_is_called_again(receiver):
    # Given [notify] timeout = 0.5 s and a receiver that takes 6 s to answer the first call
    receiver.answers = [("sleep", 6.0, 200)]
    outbox = Outbox()
    entry = outbox.add("done", "job-5", {"id": "job-5"}, callback=receiver.url())
    deliverer = Deliverer(outbox, _config(timeout=0.5), consumer="host-a")

    # When the deliverer runs
    started = time.monotonic()
    _run_until(deliverer, lambda: entry in outbox.acked, timeout=10, what="the ack")

    # Then the first call was cut at the timeout, and the second one delivered
    assert len(receiver.calls) == 2
    assert receiver.calls[1].at - receiver.calls[0].at < 5  # not waiting for the slow one
    assert time.monotonic() - started < 5.5


def test_a_call_that_keeps_failing_is_given_up_at_max_age(receiver, caplog):
    # Given [notify] max_age = 2 s and a receiver that always answers 500
    receiver.answers = [500] * 100
    outbox = Outbox()
    entry = outbox.add("dead", "job-6", {"reason": "not_found"}, callback=receiver.url())
    deliverer = Deliverer(outbox, _config(max_age=2, timeout=1), consumer="host-a")
    gave_up = _count("gave_up")

    # When the deliverer runs
    _run_until(deliverer, lambda: entry in outbox.acked, timeout=10, what="the give-up")

    # Then it tried a few times, then gave up: logged, counted, no longer pending
    assert 2 <= len(receiver.calls) <= 4
    assert _count("gave_up") - gave_up == 1
    assert any("given up" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)
    assert outbox.pending == {}


def test_an_event_older_than_max_age_when_read_is_given_up_without_a_call(receiver):
    # Given an entry written two days ago (the deliverer was off since)
    outbox = Outbox()
    old = outbox.add("done", "job-7", {}, callback=receiver.url(),
                     at_ms=int((time.time() - 2 * 86400) * 1000))
    deliverer = Deliverer(outbox, _config(), consumer="host-a")

    # When the deliverer runs
    _run_until(deliverer, lambda: old in outbox.acked)

    # Then nobody was called
    assert receiver.calls == []


def test_a_private_callback_target_is_refused_when_private_networks_are_not_allowed(receiver):
    # Given private networks not allowed, and a callback whose host is loopback
    outbox = Outbox()
    by_address = outbox.add("done", "job-8", {}, callback=f"https://127.0.0.1:{receiver.port}/")
    by_name = outbox.add("done", "job-9", {}, callback=f"https://localhost:{receiver.port}/")
    plain = outbox.add("done", "job-10", {}, callback=receiver.url())
    deliverer = Deliverer(outbox, _config(allow_private=False), consumer="host-a")
    refused = _count("refused")

    # When the deliverer runs
    _run_until(deliverer, lambda: {by_address, by_name, plain} <= set(outbox.acked))

    # Then no connection was made, and each was refused at once (never retried)
    assert receiver.calls == []
    assert _count("refused") - refused == 3


def test_a_redirect_is_not_followed(receiver):
    # Given a receiver that redirects the call elsewhere
    receiver.answers = [("redirect", receiver.url("/elsewhere"))]
    outbox = Outbox()
    entry = outbox.add("done", "job-11", {}, callback=receiver.url())
    deliverer = Deliverer(outbox, _config(), consumer="host-a")

    # When the deliverer runs
    _run_until(deliverer, lambda: entry in outbox.acked)

    # Then the signed body went to the URL the job named only
    assert [c.path for c in receiver.calls] == ["/hook"]


def _queue(redis_server) -> JobQueue:
    """A JobQueue on the test's redis-server, failing fast once that server is stopped."""
    config = config_mod.load(None, env={}, overrides={"redis.url": redis_server.url})
    return JobQueue(redis_server.client(socket_timeout=2, socket_connect_timeout=1), config)


def test_give_ups_are_recorded_in_redis_with_the_receiver_s_origin_only(receiver,
                                                                        redis_server):
    # Given [notify] max_age = 2 s, a receiver that always answers 500 at a URL whose path
    # and query hold a token, and a callback so malformed that no call can be made (a raw
    # message cancelled while queued is never checked by intake)
    receiver.answers = [500] * 100
    queue = _queue(redis_server)
    outbox = Outbox(queue)
    failing = outbox.add("dead", "job-20", {"reason": "not_found"},
                         callback=receiver.url("/hook/tok-path?token=hush-123"))
    malformed = outbox.add("cancelled", "job-21", {}, callback="http://[::1/x?token=hush-456")
    deliverer = Deliverer(outbox, _config(max_age=2, timeout=1), consumer="host-a")

    # When the deliverer runs until both are settled
    _run_until(deliverer, lambda: {failing, malformed} <= set(outbox.acked), timeout=10,
               what="both give-ups")

    # Then Redis counts them by outcome and keeps a record of each, newest first
    seen = admin.webhook_failures(queue)
    assert seen["total"] == 2 and seen["by_outcome"] == {"gave_up": 1, "refused": 1}
    by_job = {r["job_id"]: r for r in seen["recent"]}
    assert [r["job_id"] for r in seen["recent"]] == ["job-20", "job-21"]
    gave_up = by_job["job-20"]
    assert gave_up["event_id"] == failing and gave_up["type"] == "dead"
    assert gave_up["outcome"] == "gave_up" and gave_up["error"] == "HTTP 500"
    assert gave_up["attempts"] == len(receiver.calls) >= 2
    assert gave_up["origin"] == f"http://127.0.0.1:{receiver.port}"
    assert admin.epoch_of(gave_up["time"]) == pytest.approx(time.time(), abs=10)
    refused = by_job["job-21"]
    assert refused["outcome"] == "refused" and refused["attempts"] == 1
    assert refused["origin"] == webhooks.MALFORMED and "malformed URL" in refused["error"]
    # And neither the path nor the query of a callback is in Redis
    stored = b"".join(queue.webhook_failures(10)[1]).decode()
    assert "hush" not in stored and "tok-path" not in stored


def test_a_give_up_that_redis_cannot_record_is_logged_and_delivery_goes_on(receiver,
                                                                          redis_server,
                                                                          caplog):
    # Given a Redis that is down when a delivery is given up (refused: a malformed URL),
    # and another event for a receiver that answers
    queue = _queue(redis_server)
    redis_server.stop()
    outbox = Outbox(queue)
    refused = outbox.add("done", "job-22", {}, callback="http://[::1/hook")
    delivered = outbox.add("done", "job-23", {}, callback=receiver.url())
    deliverer = Deliverer(outbox, _config(), consumer="host-a")

    # When the deliverer runs
    _run_until(deliverer, lambda: {refused, delivered} <= set(outbox.acked),
               what="both settled")

    # Then the refusal was logged, its record's loss too, and the other event delivered
    assert outbox.failures == []
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"webhook {refused} of job job-22 (done) to {webhooks.MALFORMED} refused" in m
               for m in messages), messages
    assert any(f"webhook {refused} of job job-22: its give-up was not recorded in Redis" in m
               for m in messages), messages
    assert [c.verified()["job_id"] for c in receiver.calls] == ["job-23"]
    # And the deliverer is still at work: a new event is delivered too
    later = outbox.add("done", "job-24", {}, callback=receiver.url())
    _run_until(deliverer, lambda: later in outbox.acked, what="the later event")


def test_the_record_list_is_capped_and_the_counts_keep_the_whole_tally(redis_server):
    # Given a queue that keeps the newest 3 records
    queue = _queue(redis_server)
    queue.WEBHOOK_FAILURES_KEPT = 3

    # When 5 give-ups are recorded
    for i in range(5):
        queue.webhook_failed("refused" if i == 2 else "gave_up", {"job_id": f"job-{i}"})

    # Then the newest 3 are kept, newest first, and every one is counted
    seen = admin.webhook_failures(queue, limit=10)
    assert [r["job_id"] for r in seen["recent"]] == ["job-4", "job-3", "job-2"]
    assert seen["total"] == 5 and seen["by_outcome"] == {"gave_up": 4, "refused": 1}
    assert [r["job_id"] for r in admin.webhook_failures(queue, limit=2)["recent"]] == [
        "job-4", "job-3"]


def test_entries_held_by_a_previous_run_are_called_again_first(receiver):
    # Given an entry delivered to this host's consumer by a run that died before its ack
    outbox = Outbox()
    entry = outbox.add("done", "job-12", {}, callback=receiver.url())
    assert outbox.events_read_group("webhooks", "host-a") and outbox.pending
    # When a new deliverer of the same host starts
    deliverer = Deliverer(outbox, _config(), consumer="host-a")
    _run_until(deliverer, lambda: entry in outbox.acked)
    # Then it delivered that entry
    assert [c.headers["X-Clip-Event-Id"] for c in receiver.calls] == [entry]


def test_a_stop_lets_the_call_in_flight_finish_and_acknowledges_it(receiver):
    # Given a deliverer running, and a receiver that takes 0.5 s to answer
    receiver.answers = [("sleep", 0.5, 204)]
    outbox = Outbox()
    entry = outbox.add("done", "job-13", {}, callback=receiver.url())
    deliverer = Deliverer(outbox, _config(timeout=5), consumer="host-a")
    runner = threading.Thread(target=deliverer.run)
    runner.start()

    # When it is told to stop while the call is in flight
    wait_for(lambda: receiver.calls, 10, what="the call")
    deliverer.stopping = True
    runner.join(10)

    # Then it waited for the answer and acknowledged the entry before returning
    assert not runner.is_alive() and outbox.acked == [entry]


# --- pure logic -------------------------------------------------------------------------------


def test_the_signature_is_hmac_sha256_of_time_dot_body():
    body = b'{"id":"1-0"}'
    expected = hmac.new(b"k" * 16, b"1700000000." + body, hashlib.sha256).hexdigest()
    assert signature("k" * 16, body, 1700000000) == f"t=1700000000,v1={expected}"


def test_the_retry_delay_doubles_from_one_second_to_ten_minutes():
    # Waiting as long as the event is old: 1, 1, 2, 4, 8 ... s, capped at 600
    age, schedule = 0.0, []
    for _ in range(14):
        delay = retry_delay(age)
        schedule.append(delay)
        age += delay
    assert schedule[:6] == [1, 1, 2, 4, 8, 16]
    assert schedule[-1] == 600 and max(schedule) == 600


@pytest.mark.parametrize("address, allowed", [
    ("93.184.216.34", True), ("2606:2800:220:1:248:1893:25c8:1946", True),
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("::1", False),
    ("fd00::1", False), ("fe80::1%eth0", False), ("::ffff:10.0.0.1", False),
    ("64:ff9b::a00:1", False), ("224.0.0.1", False),
])
def test_the_guard_decides_on_callback_addresses_as_on_sources(address, allowed):
    assert address_allowed(address) is allowed


def test_a_name_that_resolves_to_a_private_address_is_refused_before_connecting(monkeypatch):
    # Given a public-looking name whose DNS answer is the metadata server
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", 443))])

    def no_connection(*args: object, **kwargs: object) -> None:
        raise AssertionError("connected")
    monkeypatch.setattr(socket, "create_connection", no_connection)

    # Then the call is refused, and with private networks allowed it would be made
    with pytest.raises(Refused, match="non-public"):
        webhooks.post("https://hooks.example/x", b"{}", {}, 1.0, allow_private=False)
    with pytest.raises(AssertionError, match="connected"):
        webhooks.post("https://hooks.example/x", b"{}", {}, 1.0, allow_private=True)


@pytest.mark.parametrize("url, private, ok", [
    ("https://hooks.example/x?y=1", False, True), ("http://hooks.example/", False, False),
    ("http://hooks.example/", True, True), ("ftp://hooks.example/", True, False),
    ("https:///nohost", False, False), ("https://h:99999/", False, False),
])
def test_webhook_urls_are_http_s_only_plain_http_where_private_networks_are(url, private, ok):
    if ok:
        assert check_target(url, private)[1] == "hooks.example"
    else:
        with pytest.raises(Refused):
            check_target(url, private)


@pytest.mark.parametrize("env, message", [
    ({"CLIP_SUPERVISOR_NOTIFY_URL": "https://hooks.example/"}, "needs \\[notify\\] secret"),
    ({"CLIP_SUPERVISOR_NOTIFY_SECRET": "short"}, "at least 16"),
    ({"CLIP_SUPERVISOR_NOTIFY_SECRET": SECRET,
      "CLIP_SUPERVISOR_NOTIFY_URL": "http://hooks.example/"}, "must be https"),
    ({"CLIP_SUPERVISOR_NOTIFY_URL": "hooks.example"}, "expected an https"),
    ({"CLIP_SUPERVISOR_NOTIFY_SECRET": SECRET, "CLIP_SUPERVISOR_NOTIFY_MAX_AGE": "5",
      "CLIP_SUPERVISOR_NOTIFY_TIMEOUT": "10"}, "must not exceed"),
    ({"CLIP_SUPERVISOR_NOTIFY_CONCURRENCY": "0"}, "integer >= 1"),
])
def test_notify_settings_are_checked_at_load(env, message):
    with pytest.raises(ConfigError, match=message):
        config_mod.load(None, env=env)


# --- end to end: the real supervisor, Redis and its event stream ------------------------------

NOTIFY = {"notify": {"secret": SECRET, "timeout": 2}, "supervisor": {"workers": 1}}


def _deliverer_pid(proc) -> int | None:
    import psutil

    try:
        for child in psutil.Process(proc.pid).children():
            if "webhooks" in " ".join(child.cmdline()):
                return child.pid
    except psutil.Error:
        return None
    return None


def _pending(env) -> int:
    try:
        return int(env.r.xpending(env.keys.base + ":events", "webhooks")["pending"])
    except Exception:  # the group is not there yet
        return -1


@pytest.mark.settings(NOTIFY)
def test_a_job_s_outcome_reaches_its_callback_through_the_real_supervisor(env, receiver):
    # Given a supervisor with [notify] secret, and a job naming the receiver as callback
    proc = env.start()
    env.push({"id": "hooked-1", "url": env.url("ten.mp4"), "start": 1, "duration": 2,
              "callback": receiver.url()},
             {"id": "hooked-2", "url": env.url("missing.mp4"), "callback": receiver.url()})

    # When both jobs end
    wait_for(lambda: len(receiver.calls) >= 2, 60, what="two webhook calls")

    # Then each outcome arrived signed, naming its job
    bodies = {b["job_id"]: b for b in (c.verified() for c in receiver.calls)}
    assert bodies["hooked-1"]["type"] == "done" and bodies["hooked-2"]["type"] == "dead"
    assert bodies["hooked-2"]["event"]["reason"] == "not_found"
    wait_for(lambda: _pending(env) == 0, 10, what="the acks")
    assert env.stop(proc) == 0


@pytest.mark.settings(NOTIFY)
def test_an_event_is_delivered_after_the_supervisor_is_killed_mid_call(env, receiver):
    # Given a receiver that holds the first call until told to answer
    release = threading.Event()
    receiver.answers = [("hold", release, 200)]
    proc = env.start()
    wait_for(lambda: _deliverer_pid(proc), 20, what="the webhook deliverer")

    # When a job's outcome is in the stream and its call is in flight
    env.push({"id": "hooked-3", "url": env.url("missing.mp4"), "callback": receiver.url()})
    wait_for(lambda: receiver.calls, 30, what="the first call")
    first = receiver.calls[0].headers["X-Clip-Event-Id"]
    # And the supervisor is SIGKILLed (its deliverer dies with it)
    deliverer = _deliverer_pid(proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    wait_for(lambda: deliverer is None or gone(deliverer), 10, what="the deliverer to die")
    release.set()
    kill_tree(proc.pid)
    assert _pending(env) == 1  # the entry was never acknowledged

    # Then a new supervisor calls again, with the same event id, and acknowledges it
    proc = env.start()
    wait_for(lambda: len(receiver.calls) >= 2, 30, what="the call after the restart")
    assert {c.headers["X-Clip-Event-Id"] for c in receiver.calls} == {first}
    assert receiver.calls[1].verified()["job_id"] == "hooked-3"
    wait_for(lambda: _pending(env) == 0, 10, what="the ack")
    assert env.stop(proc) == 0


@pytest.mark.settings({"notify": {"secret": SECRET, "timeout": 1, "max_age": 2},
                       "supervisor": {"workers": 1}})
def test_given_up_deliveries_show_in_stats_the_metric_and_the_dashboard_api(env, receiver):
    # Given a supervisor with webhooks and its metrics listener, a receiver that answers 500
    # at a URL holding a token, and a callback port where nothing listens (refused)
    port = free_port()
    env.settings["metrics"] = {"listen": f"127.0.0.1:{port}"}
    base = f"http://127.0.0.1:{port}"
    receiver.answers = [500] * 100
    closed = free_port()
    proc = env.start()
    # (and its deliverer runs beside the one worker, which alone counts as a worker)
    deliverer = wait_for(lambda: _deliverer_pid(proc), 20, what="the webhook deliverer")
    assert env.wait_workers(proc, 1) == env.workers(proc) and deliverer not in env.workers(proc)

    # When two jobs end whose outcome cannot be delivered until [notify] max_age
    env.push({"id": "unheard-500", "url": env.url("missing.mp4"),
              "callback": receiver.url("/hook/tok-path?token=hush-789")},
             {"id": "unheard-refused", "url": env.url("missing.mp4"),
              "callback": f"http://127.0.0.1:{closed}/hook"})
    wait_for(lambda: env.r.llen(env.keys.webhook_failures) == 2, 30, what="two give-ups")

    # Then stats counts them and lists each: job, event type, receiver's origin, error
    text = env.cli("stats").stdout
    assert "webhook failures 2 (gave_up 2)" in text, text
    lines = {line.split()[1]: line for line in text.splitlines() if "attempt(s)" in line}
    assert set(lines) == {"unheard-500", "unheard-refused"}, text
    assert f"dead to http://127.0.0.1:{receiver.port}  gave_up after" in lines["unheard-500"]
    assert lines["unheard-500"].endswith(": HTTP 500")
    assert f"dead to http://127.0.0.1:{closed}  gave_up" in lines["unheard-refused"]
    assert "Connection refused" in lines["unheard-refused"]
    assert "hush" not in text and "tok-path" not in text
    data = json.loads(env.cli("stats", "--json").stdout)["webhook_failures"]
    assert data["total"] == 2 and data["by_outcome"] == {"gave_up": 2}
    assert {r["job_id"] for r in data["recent"]} == {"unheard-500", "unheard-refused"}
    assert all(r["attempts"] >= 2 for r in data["recent"])
    # And the metric of the deliveries counts both give-ups
    wait_for(lambda: _sample(_get(base + "/metrics")[1], "clip_webhook_deliveries_total",
                             outcome="gave_up") == 2, 10, what="2 give-ups in /metrics")
    # And the dashboard's API says what the CLI says
    status, body = _get(base + "/api/stats")
    assert status == 200 and json.loads(body)["webhook_failures"] == data
    assert env.stop(proc) == 0

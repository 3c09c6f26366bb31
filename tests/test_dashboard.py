"""The web dashboard on the metrics listener: what an operator sees in a real browser
(headless Chromium driven by Playwright), and what its actions may and may not do.

Each test runs the supervisor as a real process with real jobs; the browser is Debian's
Chromium (scripts/test.sh installs it), never a browser that Playwright downloads.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import sync_playwright  # the test extra (setup.cfg)

from tests.conftest import ROOT, Env, free_port, wait_for
from worker.protocol import JOB_FIELDS, JobState

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
TOKEN = "dashboard-test-token-5f2c9a71e0"
# The suite always takes the screenshot; it lands in docs/ (the README shows it) only when
# asked, so a test run leaves the checkout clean: UPDATE_SCREENSHOT=1 ./scripts/test.sh -k page
SCREENSHOT = os.path.join(ROOT, "docs", "dashboard.png") if os.environ.get(
    "UPDATE_SCREENSHOT") else os.path.join(tempfile.gettempdir(), "clip-supervisor-dashboard.png")

if not os.access(CHROMIUM, os.X_OK):
    raise RuntimeError(f"{CHROMIUM} is required for the dashboard tests (scripts/test.sh "
                       "installs Debian's chromium)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    tab.set_default_timeout(15000)
    yield tab
    context.close()


def _listen(env: Env, token: str | None = TOKEN) -> str:
    port = free_port()
    env.settings["metrics"] = {"listen": f"127.0.0.1:{port}"}
    if token is not None:
        env.settings["metrics"]["auth_token"] = token
    return f"http://127.0.0.1:{port}"


def _request(url: str, data: bytes | None = None, headers: dict[str, str] | None = None,
             method: str | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except urllib.error.URLError:
        return 0, None
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode()


def _announce_huge_body(url: str, headers: dict[str, str]) -> int:
    """POST headers that announce a 1 MB body, without sending it: the answer's status."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.putrequest("POST", parts.path)
        for name, value in {**headers, "Content-Length": str(1 << 20)}.items():
            conn.putheader(name, value)
        conn.endheaders()
        return conn.getresponse().status
    finally:
        conn.close()


def _redis_state(env: Env) -> tuple[list[bytes], ...]:
    """What an action could change: the dead, main and retry lists, and the attempts."""
    k = env.keys
    return (env.r.lrange(k.dead, 0, -1), env.r.lrange(k.queue, 0, -1),
            env.r.lrange(k.retry, 0, -1), sorted(env.r.hgetall(k.attempts).items()))


def _dead_ids(env: Env) -> list[str]:
    return [letter["id"] for letter in env.dead_letters()]


def _notice(page: Any, text: str) -> None:
    """Wait until the page's notice line says ``text``."""
    page.locator("#notice", has_text=text).wait_for()


def _fast_stop(proc) -> None:
    # QUIT aborts jobs in flight (slow sources) and requeues them, instead of waiting.
    if proc.poll() is None:
        proc.send_signal(signal.SIGQUIT)
    assert proc.wait(20) == 0


def _missing_source(env: Env) -> tuple[str, str]:
    """A source URL that answers 404 until the test creates the file (then it is a video)."""
    name = f"late-{uuid.uuid4().hex[:8]}.mp4"
    return name, env.url(name)


# --- in the browser ---------------------------------------------------------------------------


# A slow x264 preset keeps the encode on screen for several polls, however fast the machine.
@pytest.mark.settings({"job": {"encode_preset": "slower"}})
def test_page_shows_both_workers_a_rising_progress_bar_and_the_dead_letter(env, page,
                                                                           heavy_video):
    # Given two workers, two quick jobs, one bad job, then an encode and a slow download
    base = _listen(env)
    env.push({"id": "quick-1", "url": env.url("ten.mp4"), "duration": 1},
             {"id": "quick-2", "url": env.url("ten.mp4"), "start": 2, "duration": 1},
             {"id": "bad-source", "url": env.url("missing.mp4")},
             {"id": "encode-heavy", "url": env.url(heavy_video), "mode": "encode"},
             {"id": "slow-download", "url": env.url("ten.mp4", slow=12), "duration": 1})
    proc = env.start()
    env.wait_finished(3, timeout=30)

    # When an operator opens the dashboard
    page.goto(base + "/")

    # Then both workers are listed, the encode's progress bar rises while they work
    workers = page.locator("#workers tbody tr[data-worker]")
    wait_for(lambda: workers.count() == 2, 10, what="two worker rows")
    bar = page.locator("#workers tbody tr:has(a:text-is('encode-heavy')) [role=progressbar]")
    seen: list[float] = []
    shot = 0.0  # the encode's progress in the screenshot (docs/dashboard.png)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        # One read that does not wait: the row leaves the page when the encode ends, and a
        # count() then get_attribute() pair would wait out the locator's timeout for it.
        values = bar.evaluate_all("els => els.map(e => e.getAttribute('aria-valuenow'))")
        if values:
            value = float(values[0] or 0)
            if 0 < value < 100 and (not seen or value != seen[-1]):
                seen.append(value)
            # A screenshot as soon as both are busy, again if a later one looks better
            if (not shot and 0 < value < 100 or shot < 20 <= value <= 80) and \
                    page.locator("#workers [role=progressbar]").count() == 2:
                page.screenshot(path=SCREENSHOT, full_page=True)
                shot = value
        if len(seen) >= 3 and shot >= 20 or \
                env.r.hget(env.keys.job("encode-heavy"), "state") == b"done":
            break
        time.sleep(0.1)
    assert len(seen) >= 2 and seen == sorted(seen), f"progress seen in the page: {seen}"
    assert shot, "never saw both workers busy with the encode mid-way"
    assert os.path.getsize(SCREENSHOT) > 10_000
    hosts = workers.locator("td:first-child").all_text_contents()
    assert set(hosts) == {json.loads(v)["host"] for v in env.r.hvals(env.keys.workers)}
    pids = {int(t) for t in workers.locator("td:nth-child(2)").all_text_contents()}
    assert pids == set(env.workers(proc))
    slow_row = page.locator("#workers tbody tr:has(a:text-is('slow-download'))")
    assert "fetch" in slow_row.inner_text()

    # And the dead letter shows its reason, the completions their stages, the chart its bars
    dead_row = page.locator("#dead tbody tr[data-job='bad-source']")
    assert "not_found" in dead_row.inner_text() and "404" in dead_row.inner_text()
    done_row = page.locator("#done tbody tr[data-job='quick-1']")
    assert f"file://{env.out}/quick-1.mp4" in done_row.inner_text()
    assert "clip" in done_row.inner_text() and "fetch" in done_row.inner_text()
    assert page.locator("#q-dead").inner_text() == "1"
    assert page.locator("#chart rect.bar-done").count() >= 1
    assert page.locator("#chart rect.bar-failed").count() >= 1
    _fast_stop(proc)


def test_retry_from_the_page_needs_the_token_and_then_requeues_the_letter(env, page,
                                                                          media_dir):
    # Given a job dead-lettered because its source was missing, which exists now
    base = _listen(env)
    name, url = _missing_source(env)
    env.push({"id": "comeback", "url": url, "duration": 1})
    proc = env.start()
    wait_for(lambda: "comeback" in _dead_ids(env), 20, what="the dead letter")
    shutil.copy(os.path.join(media_dir, "ten.mp4"), os.path.join(media_dir, name))
    try:
        page.goto(base + "/")
        retry = page.locator("#dead tbody tr[data-job='comeback'] button.retry")
        retry.wait_for()
        before = _redis_state(env)

        # When the operator clicks retry without a token
        retry.click()

        # Then the server refuses it and nothing changes in Redis
        _notice(page, "refused (401)")
        assert _redis_state(env) == before
        assert "refused retry from 127.0.0.1: missing X-Clip-Token header" in env.log_text()

        # When the operator enters a wrong token and retries
        page.fill("#token", "not-the-token-at-all")
        page.click("#token-use")
        retry.click()

        # Then it is refused too, and nothing changes
        _notice(page, "refused (403)")
        assert _redis_state(env) == before
        assert "refused retry from 127.0.0.1: wrong token" in env.log_text()

        # When the operator enters the right token and retries
        page.fill("#token", TOKEN)
        page.click("#token-use")
        retry.click()

        # Then the letter leaves the dead list, the job runs again and is done this time
        _notice(page, "requeued 1")
        assert "comeback" not in _dead_ids(env)
        wait_for(lambda: any(e["id"] == "comeback" for e in env.done_events()), 30,
                 what="the retried job done")
        assert "127.0.0.1 requeued 1 dead letter(s) (comeback)" in env.log_text()
        page.locator("#dead tbody td.empty").wait_for()  # and the page follows
    finally:
        os.remove(os.path.join(media_dir, name))
    assert env.stop(proc) == 0


def test_a_cross_site_page_cannot_trigger_actions(env, page):
    # Given dead letters and an operator's browser that holds the dashboard's token
    base = _listen(env)
    env.push({"id": "stays-dead", "url": env.url("missing.mp4")})
    proc = env.start()
    wait_for(lambda: "stays-dead" in _dead_ids(env), 20, what="the dead letter")
    page.goto(base + "/")
    page.fill("#token", TOKEN)
    page.click("#token-use")
    before = _redis_state(env)

    # When a page of another site posts a form to the dashboard (even with the token as a
    # field) and tries a fetch() that sets the token header
    evil = f"""<!doctype html><body>
      <form id=f method=POST action="{base}/api/dead/purge"
            enctype="application/x-www-form-urlencoded">
        <input name=token value="{TOKEN}"><input name=X-Clip-Token value="{TOKEN}">
      </form>
      <script>
        window.fetchResult = fetch("{base}/api/dead/retry-all", {{method: "POST",
            headers: {{"Content-Type": "application/json", "X-Clip-Token": "{TOKEN}"}},
            body: "{{}}"}}).then(r => "answered " + r.status, e => "blocked: " + e);
      </script></body>"""
    page.route("http://evil.example/**", lambda route: route.fulfill(
        status=200, content_type="text/html", body=evil))
    page.goto("http://evil.example/")
    assert page.evaluate("window.fetchResult").startswith("blocked")
    with page.expect_navigation(url=f"{base}/api/dead/purge") as navigation:
        page.evaluate("document.getElementById('f').submit()")

    # Then the form post reaches the server and is refused, and nothing changes in Redis
    assert navigation.value.status == 403
    wait_for(lambda: "refused purge from 127.0.0.1: cross-site request" in env.log_text(),
             5, what="the refusal in the log")
    assert _redis_state(env) == before
    assert "stays-dead" in _dead_ids(env)
    assert env.stop(proc) == 0


def test_job_page_and_search_show_every_field_as_text(env, page):
    # Given a job done and a job whose URL carries markup, dead-lettered
    base = _listen(env)
    markup = "<img src=x onerror=document.title='owned'>"
    env.push({"id": "page-ok", "url": env.url("ten.mp4"), "duration": 1},
             {"id": "page-xss", "url": env.url("missing.mp4") + "?" + markup})
    proc = env.start()
    env.wait_finished(2, timeout=30)

    # When the operator searches by job id
    page.goto(base + "/")
    page.locator("#dead tbody tr[data-job='page-xss']").wait_for()
    page.fill("#search", "page-o")

    # Then only the matching rows remain
    page.locator("#dead tbody td.empty").wait_for()
    assert page.locator("#done tbody tr[data-job]").evaluate_all(
        "rows => rows.map(r => r.dataset.job)") == ["page-ok"]
    page.fill("#search", "page-xss")
    page.locator("#done tbody td.empty").wait_for()
    dead_row = page.locator("#dead tbody tr[data-job='page-xss']")
    dead_row.wait_for()

    # And the markup in the URL is shown as text, never as an element
    assert markup in dead_row.inner_text()
    assert page.locator("#dead img").count() == 0

    # When the operator follows the link to the dead job's page
    page.click("#search-open")
    page.wait_for_url(f"{base}/job/page-xss")

    # Then its dead letter, message included, is shown as text too
    page.locator("#job-dead tbody tr pre").first.wait_for()
    assert markup in page.locator("#job-view").inner_text()
    assert page.locator("main img").count() == 0
    assert page.title() != "owned"

    # When the operator opens the page of the job done
    page.goto(base + "/job/page-ok")

    # Then every field of {clips}:job:page-ok is there with its value
    fields = {k.decode(): v.decode() for k, v in env.r.hgetall(env.keys.job("page-ok")).items()}
    assert fields["state"] == "done"
    page.locator("#job-fields tr[data-field='output']").wait_for()
    shown = page.locator("#job-fields tbody tr[data-field]").evaluate_all(
        "rows => Object.fromEntries(rows.map(r => [r.dataset.field, "
        "r.cells[1].textContent]))")
    for key, value in fields.items():
        assert shown.get(key) == value, key
    assert page.locator("#job-state").inner_text().startswith("done")
    assert page.locator("#job-state").get_attribute("class") == "badge done"
    assert page.locator("#job-fields tr[data-field='state'] td").first.get_attribute(
        "title") == JOB_FIELDS["state"]
    assert env.stop(proc) == 0


@pytest.mark.settings({"supervisor": {"workers": 1}})
def test_page_shows_webhook_failures_their_count_and_each_one_as_text(env, page):
    from worker import config as config_mod
    from worker.queue import JobQueue

    # Given a dashboard open while no webhook delivery was ever given up
    base = _listen(env, token=None)
    queue = JobQueue(env.redis.client(), config_mod.load(
        None, env={}, overrides={"redis.url": env.redis.url}))
    proc = env.start()
    wait_for(lambda: _request(base + "/healthz")[0] == 200, 10, what="the listener")
    page.goto(base + "/")
    page.locator("#webhooks tbody td.empty", has_text="no webhook failures").wait_for()
    assert page.locator("#webhooks-total").inner_text() == "0"

    # When the deliverer records two give-ups, one whose error quotes markup
    markup = "<img src=x onerror=document.title='owned'>"
    queue.webhook_failed("gave_up", {"job_id": "hooked-1", "event_id": "1-0", "type": "done",
                                     "origin": "https://hooks.example", "attempts": 12,
                                     "error": "HTTP 500"})
    queue.webhook_failed("refused", {"job_id": "hooked-2", "event_id": "2-0", "type": "dead",
                                     "origin": "https://other.example:8443", "attempts": 1,
                                     "error": "HTTP 302 " + markup})

    # Then the page shows their count by outcome and a row for each, newest first
    rows = page.locator("#webhooks tbody tr[data-event]")
    wait_for(lambda: rows.count() == 2, 10, what="two webhook failure rows")
    assert page.locator("#webhooks-total").inner_text() == "2"
    assert page.locator("#webhooks-count").inner_text().startswith(
        "(2 given up: gave_up 1, refused 1")
    assert rows.evaluate_all("rows => rows.map(r => r.dataset.job)") == ["hooked-2",
                                                                         "hooked-1"]
    cells = page.locator("#webhooks tbody tr[data-event='1-0'] td").all_text_contents()
    assert cells[1:] == ["hooked-1", "done", "https://hooks.example", "gave_up", "12",
                         "HTTP 500"]
    newest = page.locator("#webhooks tbody tr[data-event='2-0']")
    assert newest.locator("a").get_attribute("href") == "/job/hooked-2"
    # And the error's markup is text, never an element
    assert markup in newest.inner_text() and page.locator("#webhooks img").count() == 0
    assert page.title() != "owned"
    assert env.stop(proc) == 0


# --- over HTTP ----------------------------------------------------------------------------------


def test_api_stats_is_what_the_cli_prints(env):
    # Given two jobs in flight (slow downloads) and a dead letter
    base = _listen(env, token=None)
    env.push(*[{"id": f"inflight-{i}", "url": env.url("ten.mp4", slow=8), "duration": 1}
               for i in range(3)])
    env.r.lpush(env.keys.dead, json.dumps({"id": "old", "reason": "bad_range"}))
    proc = env.start()
    wait_for(lambda: all(json.loads(v).get("job") for v in env.r.hvals(env.keys.workers))
             and env.r.hlen(env.keys.workers) == 2, 10, what="heartbeats naming two jobs")

    # When both the CLI and the API are asked
    cli = json.loads(env.cli("stats", "--json").stdout)
    status, api = _request(base + "/api/stats")

    # Then they say the same, but for the time of asking
    assert status == 200
    assert abs(api.pop("time") - cli.pop("time")) < 10
    for api_worker, cli_worker in zip(api["workers"], cli["workers"], strict=True):
        for moving in ("uptime", "loop_silent"):  # beaten anew in between
            assert abs(api_worker.pop(moving) - cli_worker.pop(moving)) < 10
    assert api == cli
    assert api["queues"]["queue"] == 1 and api["queues"]["dead"] == 1
    assert {w["job"] for w in api["workers"]} <= {"inflight-0", "inflight-1", "inflight-2"}
    assert all(w["stage"] == "fetch" and w["alive"] for w in api["workers"])
    _fast_stop(proc)


@pytest.mark.settings({"supervisor": {"workers": 1, "restart_backoff_max": 0.2}})
def test_a_fatal_slot_shows_a_banner_until_ttin_revives_it(env, page):
    # Given a supervisor whose page is open
    base = _listen(env, token=None)
    proc = env.start()
    (pid,) = env.wait_workers(proc, 1)
    page.goto(base + "/")
    page.locator("#workers tbody tr[data-worker]").wait_for()
    assert page.locator("#fatal").is_hidden()

    # When its workers cannot start any more (their work folder cannot be created)
    os.rename(env.work, env.work + ".moved")
    with open(env.work, "w") as fh:
        fh.write("not a folder")
    os.kill(pid, signal.SIGKILL)

    # Then once the slot gives up, a banner names the host and the slot, why, and what to do
    banner = page.locator("#fatal .fatal-slot")
    banner.wait_for(timeout=30000)
    text = banner.text_content() or ""
    status, slots = _request(base + "/api/slots")
    assert status == 200 and [f["slot"] for f in slots["fatal"]] == [1]
    assert text.startswith(f"{slots['host']} worker slot 1 gave up (FATAL)"), text
    assert "after failing to start 10 times in a row; last: exited with code 4 (could not " \
           "start). Fix the cause, then send HUP or TTIN" in text

    # And once fixed, TTIN starts the slot again (no extra worker) and the banner goes
    os.unlink(env.work)
    os.rename(env.work + ".moved", env.work)
    proc.send_signal(signal.SIGTTIN)
    page.locator("#fatal").wait_for(state="hidden")
    env.wait_workers(proc, 1)
    assert "TTIN: worker slot(s) 1 out of FATAL" in env.log_text()
    assert env.stop(proc) == 0


def test_without_auth_token_the_dashboard_is_read_only(env):
    # Given a dashboard with no [metrics] auth_token, and a dead letter
    base = _listen(env, token=None)
    env.r.lpush(env.keys.dead, json.dumps({"id": "kept", "reason": "not_found",
                                           "message": "http://127.0.0.1:9/x.mp4"}))
    proc = env.start()
    wait_for(lambda: _request(base + "/healthz")[0] == 200, 10, what="the listener")
    before = _redis_state(env)

    # When an action is posted, with any token
    status, body = _request(base + "/api/dead/retry-all", b"{}",
                            {"Content-Type": "application/json", "X-Clip-Token": "anything"})

    # Then it is refused and nothing changes; the page is told it is read-only
    assert status == 403 and "read-only" in body["error"]
    assert _redis_state(env) == before
    info = _request(base + "/api/info")[1]
    assert info["actions"] is False
    # and it is given the job vocabulary of worker.protocol, which it names nowhere itself
    assert info["job_states"] == [state.value for state in JobState]
    assert info["job_fields"] == JOB_FIELDS and "idle" in info["stages"]
    assert "refused retry-all from 127.0.0.1: read-only" in env.log_text()
    assert env.stop(proc) == 0


def test_actions_over_http_check_method_origin_type_host_and_token(env):
    # Given a dashboard with a token and two dead letters
    base = _listen(env)
    for job_id in ("a", "b"):
        env.r.lpush(env.keys.dead, json.dumps({"id": job_id, "reason": "not_found",
                                               "message": "http://127.0.0.1:9/x.mp4"}))
    proc = env.start()
    wait_for(lambda: _request(base + "/healthz")[0] == 200, 10, what="the listener")
    before = _redis_state(env)
    good = {"Content-Type": "application/json", "X-Clip-Token": TOKEN}

    # When actions come by GET, from another origin, as a form, or under a foreign host name
    refusals = [
        _request(base + "/api/dead/purge", headers=good),
        _request(base + "/api/dead/purge", b"{}", {**good, "Origin": "http://evil.example"}),
        _request(base + "/api/dead/purge", b"{}", {**good, "Sec-Fetch-Site": "cross-site"}),
        _request(base + "/api/dead/purge", b"token=" + TOKEN.encode(),
                 {"Content-Type": "application/x-www-form-urlencoded",
                  "X-Clip-Token": TOKEN}),
        _request(base + "/api/dead/purge", b"{}", {**good, "Host": "rebound.example"}),
        _request(base + "/api/dead/purge", b"{}", {**good, "X-Clip-Token": TOKEN[:-1]}),
        (_announce_huge_body(base + "/api/dead/purge", good), None),
    ]

    # Then each is refused and nothing changes
    assert [status for status, _ in refusals] == [405, 403, 403, 415, 403, 403, 413]
    assert _redis_state(env) == before
    assert _request(base + "/api/stats", headers={"Host": "rebound.example:80"})[0] == 403

    # When a same-origin client (or curl) sends the token: retry one, then purge the rest
    status, body = _request(base + "/api/dead/retry", json.dumps({"id": "a"}).encode(),
                            {**good, "Origin": base})
    assert (status, body) == (200, {"requeued": 1, "missing": []})
    assert _dead_ids(env) == ["b"]
    assert _request(base + "/api/dead/purge", b"", good) == (200, {"purged": 1})

    # Then Redis follows, and the log tells who did what
    assert env.r.llen(env.keys.dead) == 0
    log = env.log_text()
    assert "dashboard: 127.0.0.1 requeued 1 dead letter(s) (a)" in log
    assert "dashboard: 127.0.0.1 purged 1 dead letter(s)" in log
    assert "refused /api/dead/purge from 127.0.0.1: foreign Host header rebound.example" in log
    assert "refused purge from 127.0.0.1: cross-origin request from http://evil.example" in log
    assert env.stop(proc) == 0


def test_throughput_counts_done_and_dead_per_minute_of_the_last_hour(redis_server, tmp_path):
    from supervisor import admin
    from worker import config as config_mod
    from worker.queue import JobQueue

    # Given done events and dead letters now, 30 minutes ago and 2 hours ago
    config = config_mod.load(None, env={}, overrides={"redis.url": redis_server.url})
    queue = JobQueue(redis_server.client(), config)
    now = time.time()

    def at(offset: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - offset))

    for offset in (7200, 1800, 1800, 0, 0, 0):  # pushed oldest first, as workers do
        queue.client.lpush(queue.keys.done, json.dumps({"id": "d", "time": at(offset)}))
    for offset in (7200, 1800, 0):
        queue.client.lpush(queue.keys.dead, json.dumps({"id": "x", "time": at(offset)}))
    queue.client.lpush(queue.keys.dead, b"not json at all")

    # When the chart's data is computed
    data = admin.throughput(queue, now=now)

    # Then the last minute and the one 30 minutes ago hold them; two hours ago is out
    assert data["minutes"] == 60 and len(data["done"]) == 60
    assert data["done"][-1] == 3 and data["failed"][-1] == 1
    assert data["done"][-31] == 2 and data["failed"][-31] == 1
    assert sum(data["done"]) == 5 and sum(data["failed"]) == 2

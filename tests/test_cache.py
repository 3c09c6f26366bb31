"""The host's source cache: many clips from one source read it whole once, then locally.

End to end with a real supervisor, Redis, ffmpeg and the loopback HTTP server: the ski-rental
rule (read in place until that has cost the source's size, then download and keep it), the
one-byte confirmation before a kept copy is used, a source that changed or vanished, a source
without validators, and the size cap. Then the cache's own rules on a real folder.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import threading
import time

import pytest

from tests.conftest import ffprobe_duration, wait_for
from worker import cache as cache_mod
from worker.cache import Identity, SourceCache

ONE_WORKER = {"supervisor": {"workers": 1}}


def _run(env, *jobs: dict, timeout: float = 90) -> list[dict]:
    """Run jobs through one real supervisor, to their end; their done events, in order."""
    env.push(*jobs)
    proc = env.start()
    env.wait_finished(len(jobs), timeout)
    assert env.stop(proc) == 0
    events = {e["id"]: e for e in env.done_events()}
    assert len(events) == len(jobs), env.dead_letters()
    return [events[job["id"]] for job in jobs]


def _kept(env) -> list[str]:
    """The files in the cache of the env's work folder."""
    folder = os.path.join(env.work, "cache")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return [os.path.join(folder, n) for n in names if n.endswith(".data")]


def _source(env, media_dir, name: str, like: str = "ten.mp4") -> str:
    """A file of this test's own on the server (so that the test may change it)."""
    path = os.path.join(media_dir, name)
    shutil.copyfile(os.path.join(media_dir, like), path)
    return path


@pytest.mark.settings(ONE_WORKER)
def test_clips_from_one_source_read_in_place_until_that_costs_its_size(env, media_dir):
    # Given a server that answers Range requests, and 6 clips of 5 s from a 10 s source
    key = "many"
    size = os.path.getsize(os.path.join(media_dir, "ten.mp4"))
    url = f"http://127.0.0.1:{env.http.port}/paced/1e9/{key}/ten.mp4"
    jobs = [{"id": f"c{i}", "url": url, "start": 2 + (i % 2), "duration": 5}
            for i in range(6)]
    events = _run(env, *jobs)

    # Then the first clips read their share in place, until those reads add up to the
    # source's size; the next downloads it whole; all the others use the kept copy
    reads = [e["source_read"] for e in events]
    i = reads.index("download") if "download" in reads else len(reads)
    assert i >= 1 and set(reads[:i]) == {"ranges"}, reads
    rented = sum(e["source_bytes"] for e in events[:i])
    # renting stops once it has cost the size
    assert rented - events[i - 1]["source_bytes"] < size <= rented, (reads, rented, size)
    assert reads[i:] == ["download"] + ["cache"] * (len(reads) - i - 1), reads
    assert events[i]["source_bytes"] == size
    assert all(e["source_bytes"] == 0 for e in events[i + 1:])
    # the kept copy was confirmed with one byte per clip, and nothing else was asked for
    hits = len(reads) - i - 1
    assert hits >= 2, reads
    assert env.http.ranges[key].count("bytes=0-0") == hits, env.http.ranges[key]
    assert env.http.sent[key] <= rented + size + hits + 256 * 1024
    # and a clip from the kept copy is the very clip that reading in place made: each clip
    # read in place against a cached one of the same start (the clips alternate 2 s and
    # 3 s; how many were read in place before the buy depends on the reads' cost)
    pairs = [(a, b) for a in range(i) for b in range(i + 1, len(jobs))
             if jobs[a]["start"] == jobs[b]["start"]]
    assert pairs and {a for a, _ in pairs} == set(range(i)), (reads, pairs)
    for a, b in pairs:
        assert reads[a] == "ranges" and reads[b] == "cache"
        assert filecmp.cmp(os.path.join(env.out, f"c{a}.mp4"),
                           os.path.join(env.out, f"c{b}.mp4"), shallow=False), (a, b)
    assert 4.9 <= ffprobe_duration(os.path.join(env.out, f"c{len(jobs) - 1}.mp4")) <= 6.1
    # (a worker logs a job just after its ack: wait for the line, do not read it once)
    wait_for(lambda: "(cache, 0 source bytes)" in env.log_text(), 10, what="the log line")


@pytest.mark.settings({**ONE_WORKER, "job": {"range_requests": "false"}})
def test_a_kept_copy_is_not_used_once_the_source_changed(env, media_dir):
    # Given a source downloaded whole (range_requests = false), and so kept
    path = _source(env, media_dir, "changing.mp4")
    url = f"http://127.0.0.1:{env.http.port}/changing.mp4"
    (first,) = _run(env, {"id": "before", "url": url, "start": 1, "duration": 3})
    assert first["source_read"] == "download"

    # When the file on the server is replaced by a longer video
    shutil.copyfile(os.path.join(media_dir, "twenty.mp4"), path + ".new")
    os.replace(path + ".new", path)
    os.utime(path, (os.stat(path).st_atime, os.stat(path).st_mtime + 5))

    # Then the next clip reads the new video (15 s to 18 s exist only there), and keeps it
    env.r.delete(env.keys.done)
    after = _run(env, {"id": "after", "url": url, "start": 15, "duration": 3},
                 {"id": "again", "url": url, "start": 16, "duration": 3})
    assert [e["source_read"] for e in after] == ["download", "cache"]
    assert 2.9 <= ffprobe_duration(os.path.join(env.out, "after.mp4")) <= 4.1
    assert 2.9 <= ffprobe_duration(os.path.join(env.out, "again.mp4")) <= 4.1
    assert "changed since it was kept" in env.log_text()


@pytest.mark.settings({**ONE_WORKER, "job": {"range_requests": "false", "max_attempts": 1}})
def test_a_kept_copy_of_a_source_that_is_gone_is_not_used(env):
    # Given a kept source that its server answers 404 for after the first request
    url = f"http://127.0.0.1:{env.http.port}/vanish/gone/ten.mp4"
    env.push({"id": "first", "url": url, "duration": 2},
             {"id": "second", "url": url, "duration": 2})
    proc = env.start()
    env.wait_finished(2)
    assert env.stop(proc) == 0
    # Then the second clip is not cut from the copy: the source said it is not there
    assert [e["id"] for e in env.done_events()] == ["first"]
    (letter,) = env.dead_letters()
    assert letter["reason"] == "not_found" and "HTTP 404" in letter["error"], letter
    assert not os.path.exists(os.path.join(env.out, "second.mp4"))


@pytest.mark.settings({**ONE_WORKER, "job": {"range_requests": "false"}})
def test_a_source_without_validators_is_never_kept(env, media_dir):
    # /norange/ answers with neither ETag nor Last-Modified: a copy could not be confirmed
    url = f"http://127.0.0.1:{env.http.port}/norange/ten.mp4"
    events = _run(env, *({"id": f"n{i}", "url": url, "duration": 2} for i in range(3)))
    assert [e["source_read"] for e in events] == ["download"] * 3
    size = os.path.getsize(os.path.join(media_dir, "ten.mp4"))
    assert [e["source_bytes"] for e in events] == [size] * 3
    assert _kept(env) == []


def test_the_cache_keeps_within_its_size_least_recently_used_first(env, media_dir):
    # Given a cache that holds one of two sources, not both
    a, b = (os.path.getsize(os.path.join(media_dir, n)) for n in ("ten.mp4", "twenty.mp4"))
    env.settings["supervisor"]["workers"] = 1
    env.settings["job"].update(range_requests="false", cache_max_bytes=max(a, b) + 1000)
    ten, twenty = (f"http://127.0.0.1:{env.http.port}/{n}" for n in ("ten.mp4", "twenty.mp4"))
    events = _run(env, {"id": "a1", "url": ten, "duration": 1},
                  {"id": "a2", "url": ten, "duration": 1},
                  {"id": "b1", "url": twenty, "duration": 1},  # evicts ten
                  {"id": "b2", "url": twenty, "duration": 1},
                  {"id": "a3", "url": ten, "duration": 1})  # evicts twenty
    assert [e["source_read"] for e in events] == [
        "download", "cache", "download", "cache", "download"]
    assert [os.path.getsize(path) for path in _kept(env)] == [a]


@pytest.mark.settings({**ONE_WORKER, "job": {"range_requests": "false", "cache_max_bytes": "0"}})
def test_cache_max_bytes_0_turns_the_cache_off(env):
    url = f"http://127.0.0.1:{env.http.port}/ten.mp4"
    events = _run(env, {"id": "o1", "url": url, "duration": 1},
                  {"id": "o2", "url": url, "duration": 1})
    assert [e["source_read"] for e in events] == ["download", "download"]
    assert not os.path.exists(os.path.join(env.work, "cache"))


def test_a_broken_cache_dir_costs_a_warning_not_a_job(env):
    # Given a cache_dir that cannot be made (its parent is a file)
    blocker = os.path.join(env.tmp, "not-a-folder")
    open(blocker, "w").close()
    env.settings["supervisor"]["workers"] = 1
    env.settings["job"].update(range_requests="false", cache_dir=f"{blocker}/cache")
    url = f"http://127.0.0.1:{env.http.port}/ten.mp4"
    # Then the jobs are done as without a cache, and the worker says why once
    events = _run(env, *({"id": f"b{i}", "url": url, "duration": 1} for i in range(3)))
    assert [e["source_read"] for e in events] == ["download"] * 3
    assert env.log_text().count("is off for this worker") == 1


# --- the cache's rules, on a real folder ----------------------------------------------


def _file(folder, name: str, size: int) -> str:
    path = os.path.join(folder, f"src-{name}")
    with open(path, "wb") as fh:
        fh.write(os.urandom(size))
    return path


def _keep(c: SourceCache, folder, name: str, size: int = 3000) -> bool:
    """Keep a download of ``size`` bytes as source ``name``; its job then ends (the job's
    folder goes, so the kept file is the only name left of it)."""
    src = _file(folder, name, size)
    kept = c.keep(name, src, Identity(size, f'"{name}"'))
    os.unlink(src)
    return kept


def test_renting_adds_up_per_version_and_says_when_to_buy(tmp_path):
    c = SourceCache(str(tmp_path / "c"), max_bytes=10_000, keep_free=0)
    v1, v2 = Identity(1000, '"v1"'), Identity(1000, '"v2"')
    c.rent("u", v1, 600)
    assert not c.worth_buying("u")
    c.rent("u", v1, 400)
    assert c.worth_buying("u")  # 1000 of 1000: buy
    c.rent("u", v2, 600)
    assert not c.worth_buying("u")  # a new version starts over
    c.rent("other", v1, 600)
    assert not c.worth_buying("other")  # each URL has its own account
    # no validator, or a source over the cache's size: never bought
    c.rent("u2", Identity(1000, ""), 5000)
    c.rent("big", Identity(20_000, '"b"'), 50_000)
    c.rent("u3", None, 5000)
    assert not any(c.worth_buying(u) for u in ("u2", "big", "u3"))


def test_a_kept_file_is_linked_checked_and_forgotten(tmp_path):
    c = SourceCache(str(tmp_path / "c"), max_bytes=10_000, keep_free=0)
    src = _file(tmp_path, "download", 3000)
    assert c.lookup("u") is None
    assert c.keep("u", src, Identity(3000, '"e"'))
    entry = c.lookup("u")
    assert entry is not None and entry.identity == Identity(3000, '"e"')
    dest = str(tmp_path / "job-source")
    assert c.use(entry, dest) and filecmp.cmp(src, dest, shallow=False)
    # a link outlives eviction: ffmpeg may still be reading it
    c.forget("u")
    assert c.lookup("u") is None and os.path.getsize(dest) == 3000
    assert not c.use(entry, str(tmp_path / "late"))  # gone meanwhile: not used
    # a download without validator or over the cap is not kept
    assert not c.keep("v", src, Identity(3000, "")) and not c.keep("v", src, None)
    assert not c.keep("w", _file(tmp_path, "big", 20_000), Identity(20_000, '"b"'))
    # private files in a private folder, nothing left on its way in
    assert c.keep("u", src, Identity(3000, '"e"'))
    assert os.stat(c.directory).st_mode & 0o777 == 0o700
    for name in os.listdir(c.directory):
        assert os.stat(os.path.join(c.directory, name)).st_mode & 0o077 == 0, name
    assert not [n for n in os.listdir(c.directory) if n.startswith(".tmp-")]


def test_a_replaced_or_damaged_kept_file_is_not_used(tmp_path):
    c = SourceCache(str(tmp_path / "c"), max_bytes=10_000, keep_free=0)
    assert _keep(c, tmp_path, "u")
    old = c.lookup("u")
    assert c.keep("u", _file(tmp_path, "u2", 2000), Identity(2000, '"new"'))
    assert not c.use(old, str(tmp_path / "a"))  # the entry looked up is another version
    new = c.lookup("u")
    with open(new.path, "r+b") as fh:  # cut short (say, by a crash before it was synced)
        fh.truncate(100)
    assert not c.use(new, str(tmp_path / "b")) and c.lookup("u") is None
    assert _keep(c, tmp_path, "x")
    os.unlink(c.lookup("x").path)  # removed from outside: the record goes too
    assert not c.use(c.lookup("x"), str(tmp_path / "c2")) and c.lookup("x") is None


def test_the_least_recently_used_file_goes_first(tmp_path):
    c = SourceCache(str(tmp_path / "c"), max_bytes=10_000, keep_free=0)
    for name in "abc":
        assert _keep(c, tmp_path, name)
        os.utime(c.lookup(name).path, (0, {"a": 100, "b": 200, "c": 300}[name]))
    assert c.use(c.lookup("a"), str(tmp_path / "use-a"))  # a is now the most recent
    assert _keep(c, tmp_path, "d")
    assert [n for n in "abcd" if c.lookup(n)] == ["a", "c", "d"]


def test_the_cache_gives_way_when_the_work_folder_runs_short(tmp_path, monkeypatch):
    c = SourceCache(str(tmp_path / "c"), max_bytes=20_000, keep_free=0)
    for name in "abc":
        assert _keep(c, tmp_path, name)
        os.utime(c.lookup(name).path, (0, {"a": 100, "b": 200, "c": 300}[name]))
    busy = str(tmp_path / "job-c")
    assert c.use(c.lookup("c"), busy)  # a job reads c: evicting it would free nothing
    # pure logic from here: the file system reports what the kept files leave free
    real = shutil.disk_usage
    base = {"free": 1000}

    def usage(path):
        on_disk = sum(3000 for n in "abc" if c.lookup(n)) + (3000 if os.path.exists(busy)
                                                            and not c.lookup("c") else 0)
        return real(path)._replace(free=base["free"] + 9000 - on_disk)

    monkeypatch.setattr(cache_mod.shutil, "disk_usage", usage)
    c.make_room(4000, str(tmp_path))  # one eviction frees enough: the oldest goes
    assert [n for n in "abc" if c.lookup(n)] == ["b", "c"]
    c.make_room(20_000, str(tmp_path))  # out of reach, even with b gone: nothing evicted
    assert [n for n in "abc" if c.lookup(n)] == ["b", "c"]
    # a file that would leave the work folder short is not kept, and evicts nothing
    c.keep_free = 50_000
    c.rent("e", Identity(3000, '"e"'), 3000)
    assert c.worth_buying("e")
    assert not _keep(c, tmp_path, "e")
    assert [n for n in "abce" if c.lookup(n)] == ["b", "c"]
    assert not c.worth_buying("e")  # and its reads start over: no download per clip


def test_old_records_and_files_of_dead_workers_are_swept(tmp_path):
    c = SourceCache(str(tmp_path / "c"), max_bytes=10_000, keep_free=0)
    assert _keep(c, tmp_path, "kept")
    c.rent("rented", Identity(5000, '"r"'), 100)
    folder = c.directory
    dead = subprocess_pid_gone()
    left = _file(folder, "x", 10)
    os.rename(left, os.path.join(folder, f".tmp-{dead}-abc.data"))  # a worker's SIGKILL
    with c.buying("held"), c.buying("free"):
        pass
    old = time.time() - 2 * cache_mod.RECORD_TTL
    for name in os.listdir(folder):
        if not name.startswith(".lock"):
            os.utime(os.path.join(folder, name), (old, old))
    with c.buying("held") as mine:  # held by a worker now: its lock file must stay
        assert mine
        c.rent("another", Identity(5000, '"a"'), 1)  # any change sweeps, once in a while
    names = set(os.listdir(folder))
    assert f".tmp-{dead}-abc.data" not in names
    assert f"{c.key('rented')}.json" not in names  # a day without use
    assert f"{c.key('held')}.buy" in names and f"{c.key('free')}.buy" not in names
    assert c.lookup("kept") is not None  # kept files are evicted by size, not age
    # and not again before PRUNE_EVERY
    os.utime(os.path.join(folder, f"{c.key('another')}.json"), (old, old))
    c.rent("yet-another", Identity(5000, '"y"'), 1)
    assert f"{c.key('another')}.json" in os.listdir(folder)


def subprocess_pid_gone() -> int:
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_cache_that_fails_is_off_and_never_fails_a_job(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    c = SourceCache(str(blocker / "cache"), max_bytes=10_000, keep_free=0)
    src = _file(tmp_path, "s", 100)
    c.rent("u", Identity(100, '"v"'), 100)
    assert c.off and "source cache" in caplog.text and "is off" in caplog.text
    assert c.lookup("u") is None and not c.worth_buying("u")
    assert not c.keep("u", src, Identity(100, '"v"'))
    with c.buying("u") as mine:
        assert not mine
    c.make_room(10, str(tmp_path))
    assert caplog.text.count("is off") == 1  # said once


def test_a_cache_dir_on_another_file_system_is_refused(tmp_path):
    shm = "/dev/shm"
    if not os.path.isdir(shm) or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system here")
    folder = os.path.join(shm, f"clip-cache-test-{os.getpid()}")
    try:
        c = SourceCache(folder, max_bytes=10_000, keep_free=0, work_dir=str(tmp_path))
        assert not c.keep("u", _file(tmp_path, "s", 100), Identity(100, '"v"'))
        assert c.off
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_one_worker_at_a_time_downloads_a_source_for_the_cache(tmp_path):
    c = SourceCache(str(tmp_path / "c"), max_bytes=10_000, keep_free=0)
    other = SourceCache(str(tmp_path / "c"), max_bytes=10_000, keep_free=0)
    got: list[bool] = []

    def try_other() -> None:
        with other.buying("u") as theirs:
            got.append(theirs)

    with c.buying("u") as mine:
        assert mine
        thread = threading.Thread(target=try_other)
        thread.start()
        thread.join()
        with other.buying("v") as theirs:
            assert theirs  # another source: no wait
    assert got == [False]
    with other.buying("u") as theirs:
        assert theirs  # released

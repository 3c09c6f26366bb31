"""``clip-supervisor demo``: the whole main job, end to end, on one machine.

It generates a sample video, serves it on loopback, uses the configured Redis (or starts a
private redis-server when none answers), enqueues a mix of jobs under the ``clips-demo``
prefix, runs the real supervisor (``clip-supervisor run``) until every job is done or dead,
stops it with SIGTERM, and shows where the clips are.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from worker import config as config_mod
from worker.config import Config
from worker.queue import JobQueue, answers, connect

from .sample import make_video

PREFIX = "clips-demo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(config: Config, jobs: int, workers: str, output_dir: str) -> int:
    for tool in ("ffmpeg", "ffprobe"):
        if shutil.which(tool) is None:
            print(f"demo: {tool} is not installed (apt-get install ffmpeg)", file=sys.stderr)
            return 1
    tmp = tempfile.mkdtemp(prefix="clip-supervisor-demo-")
    procs: list[subprocess.Popen] = []
    try:
        return _demo(config, jobs, workers, output_dir, tmp, procs)
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def _demo(config: Config, jobs: int, workers: str, output_dir: str, tmp: str,
          procs: list[subprocess.Popen]) -> int:
    print("demo: generating a 20 s sample video ...")
    make_video(os.path.join(tmp, "sample.mp4"), 20, size="640x360")
    server = subprocess.Popen([sys.executable, "-m", "supervisor.sample", "serve", tmp],
                              stdout=subprocess.PIPE, text=True)
    procs.append(server)
    port = int(server.stdout.readline())  # type: ignore[union-attr]
    url = f"http://127.0.0.1:{port}/sample.mp4"
    print(f"demo: serving it at {url}")

    redis_url = config.redis.url
    if not answers(redis_url):
        if shutil.which("redis-server") is None:
            print("demo: no Redis answers and redis-server is not installed "
                  "(apt-get install redis-server)", file=sys.stderr)
            return 1
        rport = _free_port()
        procs.append(subprocess.Popen(
            ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL))
        redis_url = f"redis://127.0.0.1:{rport}/0"
        deadline = time.monotonic() + 10
        while not answers(redis_url):
            if time.monotonic() > deadline:
                print("demo: redis-server did not start", file=sys.stderr)
                return 1
            time.sleep(0.05)
        print(f"demo: no Redis at {config.redis.url}; started one at {redis_url}")
    else:
        print(f"demo: using Redis at {redis_url} (keys under {{{PREFIX}}})")

    os.makedirs(output_dir, exist_ok=True)
    conf = os.path.join(tmp, "demo.conf")
    with open(conf, "w") as fh:
        fh.write(f"""[supervisor]
workers = {workers}
graceful_timeout = 20
heartbeat_interval = 1
heartbeat_ttl = 5
[redis]
url = {redis_url}
prefix = {PREFIX}
[job]
work_dir = {tmp}/work
allow_private_networks = true
[storage]
output_base = file://{output_dir}
""")
    demo_config = config_mod.load(conf, env={})
    queue = JobQueue(connect(demo_config), demo_config)
    queue.clear()

    messages: list[bytes] = [url.encode()]  # the original producers' format: a bare URL
    for i in range(1, jobs):
        start = (i * 3) % 15
        body = {"id": f"demo-{i}", "url": url, "start": start, "duration": 4,
                "mode": "encode" if i % 3 == 0 else "copy"}
        messages.append(json.dumps(body).encode())
    for message in messages:
        queue.enqueue(message)
    print(f"demo: enqueued {len(messages)} jobs under {{{PREFIX}}}")

    sup = subprocess.Popen([sys.executable, "-m", "supervisor", "run", "--config", conf])
    procs.append(sup)
    deadline = time.monotonic() + 300
    finished = 0
    while finished < len(messages):
        if sup.poll() is not None:
            print("demo: the supervisor exited early", file=sys.stderr)
            return 1
        if time.monotonic() > deadline:
            print("demo: jobs did not finish in 300 s", file=sys.stderr)
            return 1
        depths = queue.overview()[0]
        finished = depths["done"] + depths["dead"]
        time.sleep(0.2)
    sup.send_signal(signal.SIGTERM)
    code = sup.wait(60)
    print(f"\ndemo: all {len(messages)} jobs finished; supervisor stopped with exit code {code}")
    for entry in reversed(queue.entries("done", 0, -1)):
        event = json.loads(entry)
        print(f"  done  {event['id'][:16]:<16} {event['duration']:6.2f} s  "
              f"{event['output'].removeprefix('file://')}")
    dead = queue.entries("dead", 0, -1)
    for entry in dead:
        letter = json.loads(entry)
        print(f"  dead  {letter['id'][:16]:<16} {letter['reason']}: {letter['error'][:80]}")
    print(f"\nclips are in {demo_config.storage.output_base.removeprefix('file://')}")
    return 0 if code == 0 and not dead else 1

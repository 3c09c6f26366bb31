"""What one Redis call costs the client: redis-py against a raw socket, per call.

Run with clip-supervisor's interpreter (its redis-py): ``python bench/client_cost.py URL``;
``python -m bench.hotspots client`` starts a private redis-server and runs it. Prints wall,
user and system time per call, for calls shaped like the worker's: a plain command, a script
with the FETCH script's 5 arguments and one with the DONE script's ~35.
"""

from __future__ import annotations

import resource
import socket
import sys
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import redis

CALLS = 3000


def cost(label: str, call: Callable[[], object]) -> None:
    for _ in range(200):  # warm-up
        call()
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(CALLS):
        call()
    wall, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
    print(f"  {label:52s} wall {1e6 * wall / CALLS:6.0f} us  user "
          f"{1e6 * (after.ru_utime - before.ru_utime) / CALLS:5.0f} us  system "
          f"{1e6 * (after.ru_stime - before.ru_stime) / CALLS:5.0f} us")


def main(url: str) -> None:
    r = redis.Redis.from_url(url, socket_timeout=5, health_check_interval=30)
    script = r.register_script("return 1")
    small = ["a"]
    large = [f"value-{i}" for i in range(31)]
    print(f"redis-py {redis.__version__}, {CALLS} calls each:")
    cost("LREM (redis-py)", lambda: r.lrem("k", 1, "x"))
    cost("EVALSHA, 4 keys + 1 arg (FETCH-shaped)", lambda: script(keys=list("abcd"),
                                                                   args=small))
    cost("EVALSHA, 4 keys + 31 args (DONE-shaped)", lambda: script(keys=list("abcd"),
                                                                    args=large))
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379))
    sock.settimeout(5)
    lrem = b"*4\r\n$4\r\nLREM\r\n$1\r\nk\r\n$1\r\n1\r\n$1\r\nx\r\n"

    def raw() -> None:
        sock.sendall(lrem)
        sock.recv(64)

    cost("LREM (raw socket: the floor of a round trip)", raw)


if __name__ == "__main__":
    main(sys.argv[1])

"""Idle shutdown: SIGTERM to the master until it has exited, with 2 and 16 idle workers.

Each run starts clip-supervisor, waits until every worker is registered and blocked in
BLMOVE (CLIENT LIST) plus 0.3 s, sends SIGTERM and times ``waitpid`` of the master. The floor
is bench/floors.py ``prefork N``: a parent whose N children sit in BLMOVE, and which on TERM
TERMs them (default action: die) and reaps them: what any prefork pool pays to stop.
Ratio = floor / ours at 16 workers (medians).

Usage: python -m bench.shutdown [--workers 2,16] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import signal
import time

from bench import harness as h

TARGET_SECONDS = 1.0


def ours(tmp: str, url: str, n: int, run: int) -> float:
    sup = h.Supervisor(os.path.join(tmp, f"sup-{n}-{run}"), url, n, prefix=f"sd{n}r{run}",
                       supervisor={"graceful_timeout": 30})
    sup.start(ready_timeout=60)
    server_wait(url, n)
    return sup.stop()


def floor(tmp: str, url: str, n: int, run: int) -> float:
    proc = h.spawn([h.clip_python(), os.path.join(h.BENCH, "floors.py"), "prefork", url,
                    f"fl{n}r{run}:queue", str(n)], log=os.path.join(tmp, f"floor-{n}.log"))
    server_wait(url, n)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    h.wait_exit(proc, 30)
    return time.monotonic() - started


_server: h.RedisServer | None = None


def server_wait(url: str, n: int) -> None:
    assert _server is not None
    h.wait_until(lambda: _server.blocked_clients("blmove") >= n, 60, interval=0.01,
                 what=f"{n} clients idle in BLMOVE")
    time.sleep(0.3)


def main() -> None:
    global _server
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", default="2,16")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]

    tmp = h.tmpdir("shutdown")
    _server = h.RedisServer(os.path.join(tmp, "redis"))
    results: dict[str, dict[str, list[float]]] = {}
    for n in counts:
        mine, base = [], []
        for run in range(args.runs):
            mine.append(ours(tmp, _server.url, n, run))
            base.append(floor(tmp, _server.url, n, run))
            h.note(f"{n} workers, run {run + 1}: clip-supervisor {mine[-1]:.3f} s, "
                   f"floor {base[-1]:.3f} s")
        results[str(n)] = {"ours": mine, "floor": base}

    top = str(max(counts))
    worst = max(max(v["ours"]) for v in results.values())
    ratio = h.median(results[top]["floor"]) / h.median(results[top]["ours"])
    parts = [f"{n} workers {h.median(v['ours']):.3f} s (max {max(v['ours']):.3f} s, floor "
             f"{h.median(v['floor']):.3f} s)" for n, v in results.items()]
    met = worst < TARGET_SECONDS
    line = (f"shutdown: idle SIGTERM-to-exit {'; '.join(parts)}; ratio {ratio:.2f} = floor / "
            f"ours at {top} workers (medians of {args.runs}) | target < {TARGET_SECONDS:g} s "
            f"at {top} workers (worst run): {h.verdict(met)}")
    h.emit("shutdown", line, {"runs": args.runs, "results": results, "ratio": ratio,
                              "worst": worst, "target": TARGET_SECONDS, "met": met})


if __name__ == "__main__":
    main()

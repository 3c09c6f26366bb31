"""The latest results (bench/results/*.json) as a Markdown table, for docs/PERFORMANCE.md.

Usage: python -m bench.report [--out FILE]   (standard output by default)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections.abc import Callable
from typing import Any

from bench.harness import RESULTS

Row = tuple[str, str, str, str, str, str]  # what, measured, floor, ratio, target, status


OURS_AND_FLOORS = ("ours", "ours-quiet", "bare", "onetrip")  # queue-noop's systems, not peers


def _ok(met: bool) -> str:
    return "met" if met else "**missed**"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def clips(d: dict[str, Any]) -> list[Row]:
    med = sorted(d["ours_seconds"])[len(d["ours_seconds"]) // 2]
    flo = sorted(d["floor_seconds"])[len(d["floor_seconds"]) // 2]
    cpu = f" (CPU-time ratio {d['cpu_ratio']:.2f})" if "cpu_ratio" in d else ""
    source = d.get("source", "http")
    against = d.get("against", "floor")
    target = d.get("target", 0.95)
    where = "file:// source" if source == "file" else "over HTTP"
    rows: list[Row] = [
        (f"clip throughput, {d['mode']} {where} ({d['clips']} clips, {d['workers']} workers"
         + ("" if d.get("cache", "cold") == "cold" or source == "file"
            else f", source cache {d['cache']}")
         + ")",
         f"{med:.2f} s", f"{flo:.2f} s (ffmpeg, two at a time, local file)",
         f"{d['ratio']:.2f}{cpu}", f">= {target} x floor" if against == "floor" else "-",
         _ok(d["met"]) if against == "floor" else "-")]
    if d.get("url_ratio") is not None:
        url = sorted(d["url_seconds"])[len(d["url_seconds"]) // 2]
        url_cpu = sorted(d["url_cpu_ratios"])[len(d["url_cpu_ratios"]) // 2]
        rows.append(("the same against ffmpeg on the URL", f"{med:.2f} s",
                     f"{url:.2f} s (ffmpeg on the same URL, two at a time)",
                     f"{d['url_ratio']:.2f} (CPU-time ratio {url_cpu:.2f})",
                     f">= {target} x ffmpeg on the URL", _ok(d["met"])))
    walls = d.get("what_if_wall_ratios", {})
    for label, ratios in d.get("what_if_cpu_ratios", {}).items():
        wall = (f"wall {sorted(walls[label])[len(walls[label]) // 2]:.2f}, "
                if label in walls else "")
        rows.append((f"what-if, shell pipeline on the HTTP URL: {label}", "-", "same floor",
                     f"{wall}CPU-time {sorted(ratios)[len(ratios) // 2]:.2f}", "-", "-"))
    return rows


def queue(d: dict[str, Any]) -> list[Row]:
    cpu = f" (CPU-time ratio {d['cpu_ratio']:.2f})" if "cpu_ratio" in d else ""
    rows: list[Row] = [(f"no-op queue throughput ({d['jobs']} jobs, 2 processes)",
                        f"{d['ours_rate']:,.0f} jobs/s",
                        f"{d['bare_rate']:,.0f} jobs/s (bare BLMOVE+LREM)",
                        f"{d['ratio']:.2f}{cpu}",
                        f">= {d.get('target', 0.7)} x bare loop, log level "
                        f"{d.get('log_level', 'info')}", _ok(d["met"]))]
    if d.get("quiet_ratios"):
        quiet = d["quiet_ratios"]
        rows.append((f"the same at log level {d['compare_log_level']} (no line per job)",
                     "-", "the bare loop, same rounds",
                     f"{sorted(quiet)[len(quiet) // 2]:.2f}", "-", "-"))
    if d["results"].get("onetrip"):
        rows.append(("what-if: ack + fetch next in one script (floors.py script-loop)",
                     f"{d['onetrip_ratio'] * d['bare_rate']:,.0f} jobs/s",
                     "the bare loop, same rounds", f"{d['onetrip_ratio']:.2f}", "-", "-"))
    peers = []
    for name, res in d["results"].items():
        if name in OURS_AND_FLOORS:
            continue
        label = d["labels"].get(name, name)
        if "error" in res:
            peers.append(f"{label}: not measured")
        else:
            peers.append(f"{label} {res['steady_rate']:,.0f}/s")
    if peers:
        slowest_gap = min((d["ours_rate"] / r["steady_rate"] for n, r in d["results"].items()
                           if n not in OURS_AND_FLOORS and "error" not in r), default=0)
        rows.append(("no-op queue throughput vs peers", f"{d['ours_rate']:,.0f} jobs/s",
                     "; ".join(peers), f"{slowest_gap:.1f}x the fastest peer",
                     "ahead of every peer", _ok(d["ahead_of_peers"])))
    return rows


def latency(d: dict[str, Any]) -> list[Row]:
    return [("enqueue-to-start, idle worker (noop, 1 worker)",
             f"p50 {_ms(d['start_p50'])}, p99 {_ms(d['start_p99'])}",
             f"p50 {_ms(d['floor_p50'])}, p99 {_ms(d['floor_p99'])} (BLMOVE + MULTI ack)",
             f"{d['ratio']:.2f}", "p50 < 5 ms", _ok(d["met"]))]


def shutdown(d: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for n, v in d["results"].items():
        ours = sorted(v["ours"])[len(v["ours"]) // 2]
        floor = sorted(v["floor"])[len(v["floor"]) // 2]
        rows.append((f"idle SIGTERM-to-exit, {n} workers", f"{ours:.3f} s (max "
                     f"{max(v['ours']):.3f} s)", f"{floor:.3f} s (prefork of BLMOVE loops)",
                     f"{floor / ours:.2f}", "< 1 s at 16 workers" if n == "16" else "-",
                     _ok(max(v["ours"]) < 1.0) if n == "16" else "-"))
    return rows


def requeue(d: dict[str, Any]) -> list[Row]:
    ours = sorted(d["ours"])[len(d["ours"]) // 2]
    floor = sorted(d["floor"])[len(d["floor"]) // 2]
    return [("worker SIGKILL-to-requeue", f"{_ms(ours)} (max {_ms(max(d['ours']))})",
             f"{_ms(floor)} (SIGCHLD, waitpid, one script)", f"{d['ratio']:.2f}", "< 1 s",
             _ok(d["met"]))]


def footprint(d: dict[str, Any]) -> list[Row]:
    mem = d["memory"]
    idle, used, floor = mem["idle_after_start"], mem["idle_after_5_clips"], mem["floor"]
    worker = max(w["rss_mb"] for w in idle["workers"])
    worker_uss = max(w["uss_mb"] for w in idle["workers"])
    master = max(idle["master"]["rss_mb"], used["master"]["rss_mb"])
    rt = d["round_trips"]["per_job"]
    return [
        ("master RSS", f"{master:.1f} MB (USS {idle['master']['uss_mb']:.1f} MB)", "-", "-",
         "< 40 MB", _ok(d["met_master"])),
        ("idle worker RSS", f"{worker:.1f} MB (USS {worker_uss:.1f} MB; "
         f"{max(w['rss_mb'] for w in used['workers']):.1f} MB after 5 clips)",
         f"{floor['rss_mb']:.1f} MB (python + redis-py in BLMOVE)",
         f"{d['ratio_memory']:.2f}", "< 60 MB", _ok(d["met_worker"])),
        ("Redis round trips per job", f"noop {rt['batch']:.2f} loaded, {rt['single']:.2f} one "
         f"at a time; {rt['ffmpeg']:.1f} per real clip; idle {rt['idle_per_second']:.1f}/s",
         "2 (BLMOVE + LREM)", f"{d['ratio_round_trips']:.2f}", "-", "-"),
    ]


def long_source(d: dict[str, Any]) -> list[Row]:
    share = d["share_bytes"]
    rows: list[Row] = []

    def part(res: dict[str, Any], key: str) -> str:
        return (f"{res[key + '_bytes'] / 1e6:.2f} MB ({res[key + '_bytes'] / share:.1f}x share)"
                f" in {res[key + '_seconds']:.2f} s")

    def ranges_row(res: dict[str, Any], what: str, ours: str, direct: str,
                   remote: bool) -> Row:
        return (what, f"{part(res, ours)} (ranges)",
                f"{part(res, direct)} (ffmpeg -ss on the URL)",
                f"{res[direct + '_seconds'] / res[ours + '_seconds']:.2f}",
                "bytes <= 2 x share" if remote else "-",
                _ok(res[ours + "_bytes"] <= 2 * share) if remote else "-")

    for label, res in d["results"].items():
        speed = f"{res['rate'] * 8 / 1e6:g} Mbit/s" if res["rate"] else "unpaced"
        remote = label == "remote"
        rows.append(ranges_row(res, f"10 s from a 10 min source, {label} ({speed}), index at "
                               "the front", "ours", "direct", remote))
        if "ours_tail_bytes" in res:
            rows.append(ranges_row(res, f"the same, index at the end ({speed})", "ours_tail",
                                   "tail", remote))
        if "download_bytes" in res:
            rows.append((f"the same, range_requests = false ({speed})",
                         f"{part(res, 'download')} (whole download)", "-", "-", "-", "-"))
    return rows


def launch(d: dict[str, Any]) -> list[Row]:
    median, extra = d["median_cpu_ms"], d["extra_cpu_ms"]
    return [(f"starting a program that dies with its parent: {name}",
             f"{median[name]:.2f} ms CPU per start ({extra[name]:+.2f})",
             f"{median['bare']:.2f} ms (bare Popen, nothing makes it die with us)", "-", "-",
             "-") for name in median if name != "bare"]


def log_line(d: dict[str, Any]) -> list[Row]:
    median = d["median_us"]
    return [("CPU per per-job log line", f"{median['daemon']:.2f} us (json "
             f"{median['json']:.2f} us; below the level {median['below the level']:.2f} us)",
             f"{median['logging defaults']:.2f} us (logging's Formatter and defaults)",
             f"{median['logging defaults'] / median['daemon']:.2f}", "-", "-")]


def noop_cpu(d: dict[str, Any]) -> list[Row]:
    def median(side: str, key: str) -> float:
        return statistics.median(r[key] for r in d["results"][side])

    base = "base" in d["results"]
    return [("worker CPU per no-op job (1 worker, queue drained)",
             f"{median('this', 'us_per_job'):.0f} us (redis-server "
             f"{median('this', 'redis_us_per_job'):.0f} us)",
             f"{median('base', 'us_per_job'):.0f} us (the tree of --against)" if base else "-",
             f"{statistics.median(d['ratios']):.2f}" if base else "-", "-", "-")]


def noop_instructions(d: dict[str, Any]) -> list[Row]:
    per_job = d["per_job"]
    base = per_job.get("base")
    return [("worker instructions per no-op job (callgrind)", f"{per_job['this']:,.0f}",
             f"{base:,.0f} (the tree of --against)" if base else "-",
             f"{per_job['this'] / base:.3f}" if base else "-", "-", "-")]


KINDS: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "clips-copy": clips, "clips-copy-file": clips, "clips-copy-cache-off": clips,
    "clips-copy-cache-warm": clips,
    "clips-encode": clips, "queue-noop": queue, "latency": latency,
    "shutdown": shutdown, "requeue": requeue, "footprint": footprint,
    "long-source": long_source, "launch": launch, "log-line": log_line,
    "noop-cpu": noop_cpu, "noop-instructions": noop_instructions}


def table() -> str:
    lines = ["| benchmark | clip-supervisor | floor / peers | ratio | target | status | "
             "load | command |", "|---|---|---|---|---|---|---|---|"]
    for name, render in KINDS.items():
        path = os.path.join(RESULTS, f"{name}.json")
        if not os.path.exists(path):
            lines.append(f"| {name} | not run | | | | | | |")
            continue
        with open(path) as fh:
            record = json.load(fh)
        machine = record["machine"]
        load = (f"{machine['loadavg_start']:.1f}-{machine['loadavg_end']:.1f}"
                if "loadavg_start" in machine else "")
        for i, row in enumerate(render(record["data"])):
            command = f"`{record['command']}`" if i == 0 and "command" in record else ""
            lines.append("| " + " | ".join([*row, load if i == 0 else "", command]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out")
    args = parser.parse_args()
    text = table()
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()

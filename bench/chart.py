"""docs/performance.png from bench/results/: throughput against the floors and the peers.

Left: clip throughput as a share of its floor (copy from file:// against plain ffmpeg on the
local file, copy over HTTP against ffmpeg on the same URL, encode against plain ffmpeg),
each with its target. Right: no-op queue throughput (jobs/s) of clip-supervisor, the bare
BLMOVE+LREM loop and the peers, with the 0.9 x bare target.

Usage: python -m bench.chart [--out docs/performance.png]
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the headless backend

from bench.harness import RESULTS, ROOT  # noqa: E402

OURS = "#1f77b4"
FLOOR = "#7f7f7f"
PEER = "#ff7f0e"
WHAT_IF = "#aec7e8"
IDEA = "#98df8a"


def load(name: str) -> dict[str, Any] | None:
    path = os.path.join(RESULTS, f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)


# The clip results drawn, each against the floor its target is set against.
CLIP_BARS = (("clips-copy-file", "copy, file://\nvs ffmpeg, local file"),
             ("clips-copy", "copy, HTTP\nvs ffmpeg on the URL"),
             ("clips-encode", "encode, HTTP\nvs ffmpeg, local file"))


def clips_panel(ax: Any) -> None:
    labels, wall, cpu, targets = [], [], [], []
    for name, label in CLIP_BARS:
        record = load(name)
        if not record:
            continue
        d = record["data"]
        on_url = d.get("against") == "url"
        labels.append(label)
        wall.append(d["url_ratio"] if on_url else d["ratio"])
        urls = sorted(d.get("url_cpu_ratios") or [0.0])
        cpu.append(urls[len(urls) // 2] if on_url else d.get("cpu_ratio", 0.0))
        targets.append(d.get("target", 0.95))
    x = list(range(len(labels)))
    width = 0.36
    left = ax.bar([i - width / 2 for i in x], wall, width, color=OURS, label="wall time")
    right = ax.bar([i + width / 2 for i in x], cpu, width, color=WHAT_IF, label="CPU time")
    ax.set_xticks(x, labels, fontsize=8)
    ax.axhline(1.0, color=FLOOR, linewidth=1, label="floor")
    for i, target in enumerate(targets):
        ax.hlines(target, i - 0.45, i + 0.45, color="red", linestyle="--", linewidth=1,
                  label="target" if i == 0 else None)
        ax.annotate(f"{target:g}", (i + 0.45, target), fontsize=7, color="red", va="bottom")
    for bars in (left, right):
        for bar in bars:
            ax.annotate(f"{bar.get_height():.2f}",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=9)
    ax.set_ylim(0, max([1.3, *[r * 1.15 for r in wall + cpu]]))
    ax.set_ylabel("floor / clip-supervisor")
    ax.set_title("Clip throughput vs plain ffmpeg, two at a time\n(10 s clips of a 60 s 720p "
                 "source)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", ncol=3)


def queue_panel(ax: Any) -> None:
    record = load("queue-noop")
    if not record:
        ax.set_title("no queue results")
        return
    d = record["data"]
    names, rates, colors = ["bare BLMOVE+LREM", "clip-supervisor"], \
        [d["bare_rate"], d["ours_rate"]], [FLOOR, OURS]
    if d["results"].get("onetrip"):
        names.append("what-if: ack+fetch\nin one script")
        rates.append(d["onetrip_ratio"] * d["bare_rate"])
        colors.append(IDEA)
    for name, res in d["results"].items():
        if name in ("ours", "ours-quiet", "bare", "onetrip"):
            continue
        names.append(d["labels"].get(name, name) + ("" if "error" not in res else " (n/a)"))
        rates.append(0.0 if "error" in res else res["steady_rate"])
        colors.append(PEER)
    y = list(range(len(names)))[::-1]
    ax.barh(y, rates, color=colors)
    ax.set_yticks(y, names, fontsize=9)
    target = d.get("target", 0.7)
    ax.axvline(target * d["bare_rate"], color="red", linestyle="--", linewidth=1,
               label=f"target {target:g} x bare loop")
    for yi, rate in zip(y, rates, strict=True):
        ax.annotate(f"{rate:,.0f}", (rate, yi), xytext=(3, 0), textcoords="offset points",
                    va="center", fontsize=9)
    ax.set_xlim(0, max(rates) * 1.2)
    ax.set_xlabel("no-op jobs per second (2 worker processes, steady rate)")
    ax.set_title(f"Queue overhead: {d['jobs']:,} no-op jobs, same private Redis", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "performance.png"))
    args = parser.parse_args()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6),
                                      gridspec_kw={"width_ratios": [1, 1.6]})
    clips_panel(left)
    queue_panel(right)
    stamp = ", ".join(sorted({r["time"][:10] for r in map(load, ("clips-copy", "queue-noop"))
                              if r}))
    fig.suptitle(f"clip-supervisor benchmarks (bench/run_all.sh, 2-core machine, {stamp})",
                 fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()

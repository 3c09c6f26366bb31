#!/usr/bin/env bash
# Runs every benchmark (each prints one result line with a ratio against a floor measured in
# the same run), then writes bench/results/summary.md (the table for docs/PERFORMANCE.md) and
# docs/performance.png. --quick: fewer clips, jobs, samples and rounds (about 3-4 minutes;
# the full run takes about 10 on 2 cores). A benchmark that fails is reported and the others
# still run; the exit status is then 1.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=bench/.venv/bin/python
if [ ! -x "$PY" ]; then
  echo "run bench/setup.sh first" >&2
  exit 1
fi
quick=0
[ "${1:-}" = "--quick" ] && quick=1
mkdir -p bench/results
lines=bench/results/lines.txt
: > "$lines"
failed=0

run() {
  echo "+ $PY -m $*" >&2
  local out
  if out=$("$PY" -m "$@"); then
    echo "$out" | tee -a "$lines"
  else
    echo "FAILED: $*" | tee -a "$lines"
    failed=1
  fi
}

if [ $quick -eq 1 ]; then
  run bench.clips --mode copy --rounds 2 --what-if
  run bench.clips --mode copy --source file --rounds 2
  run bench.clips --mode encode --clips 4 --chunk 2
  run bench.queue_overhead --jobs 2000 --rounds 2 --max-seconds 30 --compare-log-level warning
  run bench.noop_cpu --jobs 1000 --rounds 2
  run bench.latency --samples 100
  run bench.shutdown --runs 1
  run bench.requeue --rounds 3
  run bench.footprint --batch 500 --single 50
  run bench.long_source --rounds 1
  run bench.pipeline_cpu --clips 10
  run bench.launch --starts 100 --rounds 2
  run bench.ffmpeg_phase --clips 10 --rounds 2
  run bench.log_line --rounds 2
else
  run bench.clips --mode copy --what-if
  run bench.clips --mode copy --source file
  run bench.clips --mode copy --cache off
  run bench.clips --mode copy --cache warm
  run bench.clips --mode encode
  run bench.queue_overhead --compare-log-level warning
  run bench.noop_cpu
  run bench.latency
  run bench.shutdown
  run bench.requeue
  run bench.footprint
  run bench.long_source
  run bench.pipeline_cpu
  run bench.launch
  run bench.ffmpeg_phase
  run bench.log_line
fi
"$PY" -m bench.report --out bench/results/summary.md && "$PY" -m bench.chart >/dev/null
echo "summary: bench/results/summary.md, chart: docs/performance.png" >&2
exit $failed

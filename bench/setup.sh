#!/usr/bin/env bash
# Prepares the benchmarks: checks the external programs, creates bench/.venv (the harness,
# the peers RQ/Dramatiq/Celery, matplotlib, py-spy, pyinstrument: none of them becomes a
# dependency of clip-supervisor), and makes sure clip-supervisor is installed in its own venv
# (CLIP_VENV, else the repository's .venv, made by scripts/setup.sh when missing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
missing=()
for tool in ffmpeg ffprobe redis-server xargs python3; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bench/setup.sh: missing ${missing[*]}; run scripts/setup.sh (it installs them)" >&2
  exit 1
fi
[ -x bench/.venv/bin/python ] || python3 -m venv bench/.venv
bench/.venv/bin/pip install -q --upgrade pip >/dev/null
bench/.venv/bin/pip install -q -r bench/requirements.txt
if [ -n "${CLIP_VENV:-}" ]; then
  [ -x "$CLIP_VENV/bin/clip-supervisor" ] || {
    echo "bench/setup.sh: no clip-supervisor in CLIP_VENV=$CLIP_VENV" >&2; exit 1; }
elif [ ! -x .venv/bin/clip-supervisor ]; then
  bash scripts/setup.sh
fi
echo "bench/setup.sh: ready; run bench/run_all.sh [--quick]"

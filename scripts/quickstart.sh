#!/usr/bin/env bash
# Fresh Debian machine -> the main job, end to end: installs ffmpeg, redis-server and the
# package, then runs `clip-supervisor demo` (a local redis-server if none answers, a sample
# video served on loopback, a few clips cut by 2 supervised workers into ./clip-supervisor-demo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh .
exec .venv/bin/clip-supervisor demo "$@"

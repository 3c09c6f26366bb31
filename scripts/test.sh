#!/usr/bin/env bash
# Fresh Debian machine -> the whole test suite: installs ffmpeg, redis-server and the package
# with its test extras, checks style with ruff, then runs pytest (arguments are passed on).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh ".[test]"
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"

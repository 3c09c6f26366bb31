#!/usr/bin/env bash
# Installs what clip-supervisor needs on Debian/Ubuntu: ffmpeg, redis-server, python3-venv, gcc
# (only those missing; gcc builds die-with-parent, see setup.py), then the package into
# ./.venv.
#   scripts/setup.sh [PIP_TARGET [NEED=PACKAGE ...]]
# PIP_TARGET defaults to "." (test.sh passes ".[test]"); each NEED=PACKAGE adds a Debian
# package to install when NEED (a command, or an absolute path) is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
target="${1:-.}"
shift || true
need=()
for pair in ffmpeg=ffmpeg ffprobe=ffmpeg redis-server=redis-server cc=gcc "$@"; do
  what="${pair%%=*}" package="${pair#*=}"
  if [[ "$what" == /* ]]; then
    [ -e "$what" ] || need+=("$package")
  else
    command -v "$what" >/dev/null 2>&1 || need+=("$package")
  fi
done
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  echo "setup: installing ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# redis-server's Debian package starts a system service; we never rely on it.
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q -e "$target"

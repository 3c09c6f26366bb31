#!/usr/bin/env bash
# Fresh Debian machine -> the whole test suite: installs ffmpeg, redis-server and the package
# with its test extras, plus the tools some tests drive (logrotate, openssl, systemd-analyze,
# start-stop-daemon, the LSB init functions, chromium for the dashboard), checks style with
# ruff, then runs pytest (arguments are passed on).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh ".[test]"
need=()
command -v logrotate >/dev/null 2>&1 || need+=(logrotate)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v start-stop-daemon >/dev/null 2>&1 || need+=(dpkg)
[ -e /lib/lsb/init-functions ] || need+=(sysvinit-utils lsb-base)
# The dashboard tests drive Debian's Chromium through Playwright (never `playwright install`).
[ -x /usr/bin/chromium ] || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  echo "test: installing ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"

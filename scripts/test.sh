#!/usr/bin/env bash
# Fresh Debian machine -> the whole test suite: installs ffmpeg, redis-server and the package
# with its test extras, plus the tools some tests drive (logrotate, openssl, systemd-analyze,
# start-stop-daemon, the LSB init functions, faketime for a host whose clock is off,
# promtool (Debian's prometheus package) for the alert rules, unshare, lintian and strip
# for the Debian package, Debian's Chromium for the dashboard tests, driven through
# Playwright: never `playwright install`; an AArch64 cross compiler and qemu-user for
# die-with-parent's other build), checks style with ruff, then runs pytest (arguments are
# passed on).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh ".[test]" logrotate=logrotate openssl=openssl \
  systemd-analyze=systemd start-stop-daemon=dpkg /lib/lsb/init-functions=sysvinit-utils \
  /usr/bin/chromium=chromium faketime=faketime promtool=prometheus unshare=util-linux \
  lintian=lintian strip=binutils /usr/share/python-wheels=python3-venv \
  aarch64-linux-gnu-gcc=gcc-aarch64-linux-gnu qemu-aarch64=qemu-user
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"

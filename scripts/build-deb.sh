#!/usr/bin/env bash
# Builds the Debian package of clip-supervisor from this source tree:
#   scripts/build-deb.sh [OUTDIR]      (default: dist/)
# and prints the path of OUTDIR/clip-supervisor_<version>_<arch>.deb.
#
# The package holds a virtual environment in /opt/clip-supervisor, made with the system's
# python3 (so it depends on that Python version, e.g. python3.11) and filled by pip from
# this tree and PyPI; /usr/bin/clip-supervisor links to its command. Around it: the init
# script, the systemd unit, /etc/default/clip-supervisor, the logrotate rule and the
# configuration (conffiles), and maintainer scripts that create the clip-supervisor system
# user and its folders (packaging/). dpkg-deb builds it; no debhelper is needed.
#
# Environment:
#   PYTHON                 interpreter for the venv (default: /usr/bin/python3, Debian's)
#   BUILD_VERSION_SUFFIX   appended to the version, e.g. "+1" for a rebuild that must
#                          upgrade the last one (Debian orders 0.1.0 < 0.1.0+1)
#   DEB_MAINTAINER         the Maintainer field
set -euo pipefail
umask 022
cd "$(dirname "${BASH_SOURCE[0]}")/.."
src=$PWD
outdir=${1:-dist}
python=${PYTHON:-/usr/bin/python3}
maintainer=${DEB_MAINTAINER:-clip-supervisor maintainers <clip-supervisor@users.noreply.github.com>}
suffix=${BUILD_VERSION_SUFFIX:-}
prefix=/opt/clip-supervisor

die() { echo "build-deb: $*" >&2; exit 1; }

for tool in dpkg-deb dpkg gzip strip; do
  command -v "$tool" >/dev/null || die "$tool is missing (a Debian system is needed)"
done
[ -x "$python" ] || die "$python not found (set PYTHON)"
case "$suffix" in
  *[!A-Za-z0-9.+~]*) die "BUILD_VERSION_SUFFIX may hold only letters, digits and . + ~" ;;
esac
# The venv links to the versioned interpreter (python3.11, not python3), so an upgrade of
# Debian's default python3 cannot swap the interpreter under the installed packages.
pyver=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
interpreter=/usr/bin/python$pyver
[ -x "$interpreter" ] || die "$interpreter not found"
"$interpreter" -c 'import ensurepip, venv' 2>/dev/null \
  || die "$interpreter cannot make a venv (apt-get install python3-venv)"
arch=$(dpkg --print-architecture)

stage=$(mktemp -d "${TMPDIR:-/tmp}/clip-supervisor-deb.XXXXXX")
trap 'rm -rf "$stage"' EXIT
root=$stage/root
venv=$root$prefix

# 1. The venv, filled from a copy of the tree (pip builds in the source folder: never
#    leave build/ or egg-info behind in a checkout others work in).
mkdir -p "$stage/src"
tar -C "$src" --exclude=./.git --exclude=.venv --exclude=./dist --exclude=./build \
  --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache \
  --exclude=.ruff_cache -cf - . | tar -C "$stage/src" -xf -
"$interpreter" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --no-compile --disable-pip-version-check \
  "$stage/src"
# pip and setuptools are build tools: the service needs neither, and what is not shipped
# needs no security updates.
"$venv/bin/python" -m pip uninstall --quiet --yes pip setuptools >/dev/null
# The one source of the version is setup.cfg's [metadata] version: read it back from the
# installed distribution's metadata (PEP 440 pre-releases sort before the release in
# Debian only with a tilde: 1.0rc1 -> 1.0~rc1).
pyversion=$("$venv/bin/python" -c \
  'from importlib.metadata import version; print(version("clip-supervisor"))')
version=$(printf '%s' "$pyversion" | sed -E 's/([0-9])(a|b|rc|\.dev)([0-9]+)/\1~\2\3/g')
version=$version$suffix
case "$version" in
  [0-9]*) ;;
  *) die "version '$version' does not start with a digit" ;;
esac
"$venv/bin/python" "$venv/bin/clip-supervisor" --help >/dev/null \
  || die "the installed command does not run"

# 2. Make the venv live at $prefix: pip wrote the build folder into the scripts' #! lines,
#    the activate scripts and pyvenv.cfg. Bytecode is compiled by postinst (lintian forbids
#    shipping __pycache__, and the daemon's user could not write it under /opt).
grep -rlIF "$venv" "$venv" | while IFS= read -r file; do
  sed -i "s|$venv|$prefix|g" "$file"
done
find "$venv" -name __pycache__ -type d -prune -exec rm -rf {} +
find "$venv" -name '*.pyc' -delete
find "$venv" -name direct_url.json -delete  # names the temporary source folder
# Only our command is an entry point; the console scripts of the bundled packages (idna,
# normalizer, ...) and PowerShell's activate script are not part of the package.
find "$venv/bin" -maxdepth 1 -type f ! -name clip-supervisor ! -name 'activate*' -delete
rm -f "$venv/bin/Activate.ps1"
# Libraries are read, not run (dlopen needs no x bit); debug symbols are dead weight, as
# dh_strip would have it.
find "$venv/lib" -type f -exec chmod 0644 {} +
# Save die-with-parent, the program every ffmpeg starts through (setup.py builds it; without
# it the worker falls back to setpriv, ~1 ms more per clip).
helper=$(find "$venv/lib" -path '*/clip_supervisor/root/worker/die-with-parent' -type f)
[ -n "$helper" ] || die "die-with-parent was not built (is a C compiler installed?)"
chmod 0755 "$helper"
find "$venv/lib" -type f -name '*.so*' -exec strip --strip-unneeded {} +
if grep -rlF "$stage" "$venv" >/dev/null; then
  die "the build folder is still named in: $(grep -rlF "$stage" "$venv" | head -3)"
fi

# 3. The rest of the file system.
install -d "$root/usr/bin" "$root/etc/init.d" "$root/etc/default" "$root/etc/logrotate.d" \
  "$root/lib/systemd/system" "$root/usr/share/doc/clip-supervisor" \
  "$root/usr/share/lintian/overrides" "$root/usr/share/man/man1"
ln -s "$prefix/bin/clip-supervisor" "$root/usr/bin/clip-supervisor"
install -m 0755 etc/init.d/clip-supervisor "$root/etc/init.d/clip-supervisor"
install -m 0644 etc/systemd/clip-supervisor.service "$root/lib/systemd/system/"
install -m 0644 etc/logrotate.d/clip-supervisor "$root/etc/logrotate.d/clip-supervisor"
# The sample files, set for the package: the daemon runs as the clip-supervisor user, whose
# work_dir (and source cache) is /var/lib/clip-supervisor/work, beside the clips.
edit() {  # edit FILE SED-EXPRESSION DEST: fail when the expression changes nothing
  sed -e "$2" "$1" >"$3"
  ! cmp -s "$1" "$3" || die "$1 no longer has the line '$2' changes"
}
edit etc/default/clip-supervisor 's|^#USER=$|USER=clip-supervisor|' "$stage/default"
edit "$stage/default" 's|^#GROUP=$|GROUP=clip-supervisor|' "$root/etc/default/clip-supervisor"
edit etc/clip-supervisor.conf 's|^work_dir =$|work_dir = /var/lib/clip-supervisor/work|' \
  "$root/etc/clip-supervisor.conf"
chmod 0644 "$root/etc/default/clip-supervisor"
# The configuration may hold the Redis password and the dashboard token: postinst gives it
# to group clip-supervisor, mode 0640.
chmod 0640 "$root/etc/clip-supervisor.conf"
install -m 0644 packaging/lintian-overrides "$root/usr/share/lintian/overrides/clip-supervisor"
gzip -9n <packaging/clip-supervisor.1 >"$root/usr/share/man/man1/clip-supervisor.1.gz"
gzip -9n <README.md >"$root/usr/share/doc/clip-supervisor/README.md.gz"

# copyright: ours (MIT, the text of LICENSE) and the bundled Python packages'.
{
  cat packaging/copyright.head
  if [ -f LICENSE ]; then
    sed -e 's/^$/./' -e 's/^/ /' LICENSE
  else
    echo " The MIT License: see LICENSE in the source."
  fi
  echo
  echo "Files: opt/clip-supervisor/lib/*"
  echo "Copyright: the authors of each bundled Python package"
  echo "License: various"
  echo " Each bundled package's license is in its *.dist-info folder (METADATA and any"
  echo " LICENSE file): $("$venv/bin/python" -c '
import importlib.metadata as m
names = sorted({d.metadata["Name"] for d in m.distributions()} - {"clip-supervisor"})
print(", ".join(names))' | fold -s -w 76 | sed '2,$s/^/ /')."
} >"$root/usr/share/doc/clip-supervisor/copyright"
when=$(git -C "$src" log -1 --format=%cD 2>/dev/null || date -R)
printf 'clip-supervisor (%s) unstable; urgency=medium\n\n  * Built by scripts/build-deb.sh from version %s.\n\n -- %s  %s\n' \
  "$version" "$pyversion" "$maintainer" "$when" \
  | gzip -9n >"$root/usr/share/doc/clip-supervisor/changelog.gz"

# 4. Control files.
install -d "$root/DEBIAN"
for script in postinst prerm postrm; do
  install -m 0755 "packaging/$script" "$root/DEBIAN/$script"
done
printf '%s\n' /etc/clip-supervisor.conf /etc/default/clip-supervisor \
  /etc/init.d/clip-supervisor /etc/logrotate.d/clip-supervisor >"$root/DEBIAN/conffiles"
pypackage=python$pyver
dpkg-query -W -f='${Status}' "$pypackage" 2>/dev/null | grep -q 'ok installed' \
  || die "$interpreter does not come from Debian's $pypackage package"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s|@VERSION@|$version|" -e "s|@ARCH@|$arch|" -e "s|@SIZE@|$size|" \
  -e "s|@PYTHON@|$pypackage|" -e "s|@MAINTAINER@|$maintainer|" packaging/control \
  >"$root/DEBIAN/control"
(cd "$root" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | sort -z \
  | xargs -0 md5sum) >"$root/DEBIAN/md5sums"
chmod 0644 "$root/DEBIAN/control" "$root/DEBIAN/conffiles" "$root/DEBIAN/md5sums"

mkdir -p "$outdir"
deb="$outdir/clip-supervisor_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"

"""Starting ffmpeg for less: its shared libraries searched in a cheaper order.

Most of a copy clip's CPU is ffmpeg starting, and most of that is the dynamic loader.
Debian's ffmpeg needs 215 shared libraries and is linked with BIND_NOW, so before ``main``
the loader resolves every symbol reference of every library (~43,000 lookups). Each lookup
walks the global search list (the program, then its libraries breadth first) until one
defines the symbol: ~90 libraries a lookup on average, because many references end deep in
the list (libcrypto's and libepoxy's references to their own exported symbols walk ~150
each). ``perf`` puts half of ``ffmpeg -version``'s CPU in that walk (``do_lookup_x``).

``LD_PRELOAD`` puts libraries at the front of the list, right after the program. Preloading
the libraries where many lookups end makes those walks short and every other one a step
longer; a greedy choice on the loader's own counts (``choose``) takes the libraries that
gain the most. On Debian 12's ffmpeg 5.1 that cuts the loader's walks to about a quarter
and a copy clip's CPU by about a quarter (105 to 78 ms; docs/PERFORMANCE.md 4.1).

What must not change is which definition a reference binds to: a library moved to the
front wins every symbol it shares with a library that was ahead of it (two libraries of
PulseAudio define the same functions; C++ libraries carry their own copies of templates).
So a plan is kept only when the loader's record of its bindings (``LD_DEBUG=bindings``)
with the preload is the same as without it, reference by reference. A library whose move
changes one is dropped and the check runs again; a plan that does not settle is no plan.
Among themselves the preloaded libraries keep their order of the search list.

The plan is made once per host and program, in the master before the first worker (about a
second: two runs of ``ffmpeg -version`` with the loader's debug output), and kept in
``plan_path()`` with the size and modification time of the program, of every library in
its search list and of ``/etc/ld.so.cache``: an upgrade of any of them makes it anew at the
next start (not device and inode, which an image's layers change from run to run). A
program that is a script is not planned (its loader is its interpreter's). Workers inherit the plans through fork and add ``LD_PRELOAD`` to the
environment of the program's runs (``env_for``); a program without a plan, or a process
whose environment already sets ``LD_PRELOAD`` or ``LD_LIBRARY_PATH`` differently, starts as
it is. ``[job] fast_start = false`` turns it off.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterable

from . import fsafe

log = logging.getLogger(__name__)

FORMAT = 1  # of the plan file
PLAN_FILE = "ffmpeg-start.json"
RUN_TIMEOUT = 30.0  # seconds for one run of ``<program> -version`` with the loader's output
MAX_ROUNDS = 6  # checks of the bindings before a plan that keeps changing them is dropped
MIN_GAIN = 0.001  # a library is preloaded only if it saves this share of the walks
LD_CACHE = "/etc/ld.so.cache"

# "binding file /lib/x/libavdevice.so.59 [0] to /lib/x/libc.so.6 [0]: normal symbol `strlen'
# [GLIBC_2.2.5]" (glibc's rtld, LD_DEBUG=bindings)
_BINDING = re.compile(r"binding file (\S+) \[\d+\] to (\S+) \[\d+\]: (\w+) symbol `([^']*)'"
                      r"(?: \[([^\]]*)\])?")

Binding = tuple[str, str, str, str, str]  # referrer, definer, kind, symbol, version
Identity = list[int]  # st_size, st_mtime_ns (an image's layers change device and inode)

# program path -> the libraries to preload (set in the master, inherited by the workers)
_plans: dict[str, tuple[str, ...]] = {}
_envs: dict[str, dict[str, str]] = {}


def parse_scope(text: str) -> list[str]:
    """The main program's global search list from ``LD_DEBUG=scopes`` output ([] if none)."""
    for line in text.splitlines():
        _, sep, rest = line.partition("scope 0:")
        if sep:
            return rest.split()
    return []


def parse_bindings(text: str) -> set[Binding]:
    return {(m[1], m[2], m[3], m[4], m[5] or "") for m in _BINDING.finditer(text)}


def _candidate(path: str) -> bool:
    """A library that may be preloaded: a file by absolute path, not the loader itself."""
    name = os.path.basename(path)
    return os.path.isabs(path) and not name.startswith(("ld-linux", "ld64.so", "ld.so"))


def choose(scope: list[str], bindings: Iterable[Binding], exclude: frozenset[str] = frozenset(),
           include: frozenset[str] = frozenset(), min_gain: float = MIN_GAIN) -> list[str]:
    """The libraries to preload, in their order of ``scope``: greedily, the one whose move
    to the front saves the most steps of the loader's walks, while one saves ``min_gain``
    of them. A lookup that ends at position p of the list takes p + 1 steps; a preloaded
    library sits after the program, so each one preloaded is a step more for every lookup
    that ends after the program but ahead of it, and one less for those that end behind
    its old place."""
    position = {path: i for i, path in enumerate(scope)}
    ends: Counter[str] = Counter()
    for _, definer, *_ in bindings:
        if definer in position:
            ends[definer] += 1
    total = sum(ends[d] * (position[d] + 1) for d in ends)
    chosen = {p for p in include if p in position and position[p] > 0 and _candidate(p)}
    while True:
        # where each library now sits: the program, the chosen ones in their order, the rest
        order = [scope[0]] + [p for p in scope[1:] if p in chosen] + \
            [p for p in scope[1:] if p not in chosen]
        now = {path: i for i, path in enumerate(order)}
        ahead = [0]  # ahead[i]: lookups that end before position i
        for path in order:
            ahead.append(ahead[-1] + ends[path])
        best, best_gain = None, min_gain * total
        for lib in ends:
            if lib in chosen or lib in exclude or position[lib] == 0 or not _candidate(lib):
                continue
            # moved to just after the chosen ones ahead of it in the list: what ends between
            # there and its old place moves one step back; it moves to the front
            new = 1 + sum(1 for p in chosen if position[p] < position[lib])
            behind = ahead[now[lib]] - ahead[new]
            gain = ends[lib] * (now[lib] - new) - behind
            if gain > best_gain:
                best, best_gain = lib, gain
        if best is None:
            return [p for p in scope if p in chosen]
        chosen.add(best)


def _changes(base: set[Binding], new: set[Binding]) -> tuple[list[str], list[str | None]]:
    """For each binding of ``new`` that ``base`` made to another definer: that new definer
    (it took the binding) and the old one (None when ``base`` did not make it at all)."""
    before: dict[tuple[str, str, str, str], str] = {}
    for referrer, definer, kind, symbol, version in base:
        before[(referrer, kind, symbol, version)] = definer
    took: list[str] = []
    lost: list[str | None] = []
    for referrer, definer, kind, symbol, version in new:
        took.append(definer)
        lost.append(before.get((referrer, kind, symbol, version)))
    return took, lost


def _identity(path: str) -> Identity | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _run(program: str, debug: str, preload: list[str] | None = None) -> tuple[str, str]:
    """``program -version`` with the loader's ``debug`` output: (stdout, the loader's text)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_DEBUG", "LD_DEBUG_OUTPUT")}
    env["LD_DEBUG"] = debug
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    with subprocess.Popen([program, "-hide_banner", "-version"], env=env,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as proc:
        try:
            out, err = proc.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, program)
    # the loader's lines start with the pid: only the program's own (not a child's)
    own = f"{proc.pid}:"
    text = "\n".join(line for line in err.decode("utf-8", "replace").splitlines()
                     if line.lstrip().startswith(own))
    return out.decode("utf-8", "replace"), text


def make(program: str) -> dict | None:
    """A plan for ``program`` (an absolute path): {"preload": [...], "scope": {path: identity}}
    with an empty preload when nothing gains or nothing is sure; None when the loader gives
    no account of itself (not glibc, a static program, a run that fails)."""
    try:
        with open(program, "rb") as fh:
            if fh.read(4) != b"\x7fELF":  # a script: its loader would be its interpreter's
                return None
        out, text = _run(program, "scopes,bindings")
    except (OSError, subprocess.SubprocessError) as exc:
        log.info("ffmpeg start plan: cannot run %s -version (%s)", program, exc)
        return None
    scope = parse_scope(text)
    bindings = parse_bindings(text)
    if not scope or not bindings:
        return None
    identities = {p: _identity(p) for p in scope if os.path.isabs(p)}
    if any(i is None for i in identities.values()):
        return None
    excluded: frozenset[str] = frozenset()
    included: frozenset[str] = frozenset()
    for _ in range(MAX_ROUNDS):
        preload = choose(scope, bindings, excluded, included)
        if not preload:
            break
        try:
            out2, text2 = _run(program, "bindings", preload)
        except (OSError, subprocess.SubprocessError) as exc:
            log.info("ffmpeg start plan: %s does not run with its libraries preloaded (%s)",
                     program, exc)
            preload = []
            break
        changed = parse_bindings(text2) ^ bindings
        if not changed and out2 == out:
            break
        # A library that took a binding from one ahead of it in the list: that one is
        # preloaded too (so it stays ahead), or, when it cannot be (the program), the thief
        # stays in its place. The choice is then made again.
        took, lost = _changes(bindings, parse_bindings(text2) - bindings)
        if not took:
            preload = []
            break
        excluded |= {t for t, owner in zip(took, lost, strict=True)
                     if owner is None or not _candidate(owner)}
        included |= {o for o in lost if o is not None and _candidate(o)}
        included -= excluded
    else:
        preload = []
    return {"preload": preload, "scope": identities}


def plan_path(environ: dict[str, str] | None = None, euid: int | None = None) -> str:
    """Where the plans are kept: the host's cache folder of clip-supervisor
    (``$XDG_CACHE_HOME/clip-supervisor``, else /var/cache/clip-supervisor as root, else
    ``~/.cache/clip-supervisor``)."""
    environ = os.environ if environ is None else environ
    euid = os.geteuid() if euid is None else euid
    xdg = environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        folder = os.path.join(os.path.normpath(xdg), "clip-supervisor")
    elif euid == 0:
        folder = "/var/cache/clip-supervisor"
    else:
        folder = os.path.join(environ.get("HOME", "") or os.path.expanduser("~"), ".cache",
                              "clip-supervisor")
    return os.path.join(folder, PLAN_FILE)


def _key(program: str) -> str:
    """What a plan is kept under: the program, and the environment that steers its loader."""
    return f"{program}\0{os.environ.get('LD_LIBRARY_PATH', '')}"


def _still_good(plan: dict, program: str) -> bool:
    """The program, its libraries and the loader's cache are the files the plan was made
    for (an upgrade of any of them changes its identity)."""
    try:
        scope = plan["scope"]
        if plan.get("program") != _identity(program) or plan.get("ld_cache") != \
                _identity(LD_CACHE):
            return False
        if not all(isinstance(p, str) and os.path.isabs(p) and p in scope
                   for p in plan["preload"]):
            return False
        return all(_identity(path) == identity for path, identity in scope.items())
    except (KeyError, TypeError, AttributeError):
        return False


def _read(path: str) -> dict:
    """The kept plans; {} when there are none, or the file is not ours alone."""
    try:
        fd = fsafe.open_nofollow(path, os.O_RDONLY, what="ffmpeg start plan")
    except OSError:
        return {}
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if st.st_uid != os.geteuid() or st.st_mode & 0o022 or st.st_size > 16 << 20:
            log.warning("ffmpeg start plan %s is not ours alone: not used", path)
            return {}
        try:
            kept = json.loads(fh.read())
        except ValueError:
            return {}
    if not isinstance(kept, dict) or kept.get("format") != FORMAT or \
            not isinstance(kept.get("plans"), dict):
        return {}
    return kept["plans"]


def _write(path: str, plans: dict) -> None:
    folder = os.path.dirname(path)
    fd = fsafe.private_dir(folder, "cache folder")
    try:
        tmp = f".tmp-{os.getpid()}-{PLAN_FILE}"
        out = fsafe.open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600,
                                  dir_fd=fd)
        with os.fdopen(out, "w") as fh:
            json.dump({"format": FORMAT, "plans": plans}, fh)
        os.rename(tmp, PLAN_FILE, src_dir_fd=fd, dst_dir_fd=fd)
    finally:
        os.close(fd)


def prepare(programs: Iterable[str], path: str | None = None) -> dict[str, tuple[str, ...]]:
    """Make (or read back) the plans of ``programs`` (names on PATH or paths) and use them
    in this process and the workers it forks. Never raises: a program without a plan starts
    as it is."""
    _plans.clear()
    _envs.clear()
    if "LD_PRELOAD" in os.environ:
        log.info("ffmpeg is started as it is: LD_PRELOAD is set (%s)", os.environ["LD_PRELOAD"])
        return {}
    path = path or plan_path()
    kept = _read(path)
    changed = False
    for name in programs:
        found = shutil.which(name)
        if found is None:
            continue
        program = os.path.realpath(found)
        key = _key(program)
        plan = kept.get(key)
        if not isinstance(plan, dict) or not _still_good(plan, program):
            made = make(program)
            if made is None:
                continue
            plan = {"program": _identity(program), "ld_cache": _identity(LD_CACHE), **made}
            kept[key] = plan
            changed = True
            log.info("ffmpeg start plan for %s: %d of its %d libraries preloaded", program,
                     len(plan["preload"]), len(plan["scope"]))
        if plan["preload"]:  # by the name the worker finds it by (shutil.which) too
            _plans[program] = _plans[found] = tuple(plan["preload"])
    if changed:
        try:
            _write(path, kept)
        except OSError as exc:  # UnsafePath included: made again at the next start
            log.warning("cannot keep the ffmpeg start plan in %s: %s", path, exc)
    return dict(_plans)


def env_for(program: str, base: dict[str, str] | None) -> dict[str, str] | None:
    """The environment to start ``program`` (a resolved path) with: ``base`` (None: ours)
    with its plan's LD_PRELOAD; ``base`` itself when it has no plan."""
    preload = _plans.get(program)
    if preload is None:
        return base
    if base is None:
        env = _envs.get(program)
        if env is None:
            env = _envs[program] = {**os.environ, "LD_PRELOAD": ":".join(preload)}
        return env
    return {**base, "LD_PRELOAD": ":".join(preload)}


def use(plans: dict[str, tuple[str, ...]]) -> None:
    """Use ``plans`` (as ``prepare`` returns them) in this process: for tests and tools."""
    _plans.clear()
    _envs.clear()
    _plans.update(plans)

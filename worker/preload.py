"""Starting ffmpeg for less: its shared libraries searched in a cheaper order.

Most of a copy clip's CPU is ffmpeg starting, and most of that is the dynamic loader.
Debian's ffmpeg needs 215 shared libraries and is linked with BIND_NOW, so before ``main``
the loader resolves ~43,000 symbol references. Each lookup walks the global search list
(the program, then its libraries breadth first) until one defines the symbol: ~90
libraries a lookup on average, because many references end deep in the list (libcrypto's
and libepoxy's references to their own exported symbols walk ~150 each). ``perf`` puts half
of ``ffmpeg -version``'s CPU in that walk (``do_lookup_x``).

``LD_PRELOAD`` puts libraries at the front of the list, right after the program, in the
order given. Preloading the libraries where many lookups end makes those walks short and
every other one a step longer; a greedy choice on the loader's own counts (``choose``)
takes the libraries that gain the most. On Debian 12's ffmpeg 5.1 a copy clip then costs
about a fifth less CPU (docs/PERFORMANCE.md 4.1).

What must not change is which definition any lookup finds: a library moved to the front
wins every symbol it shares with a library that was ahead of it (libresolv and libc both
define ``inet_net_pton``; C++ libraries carry their own copies of templates), for the
references bound at start, for those bound lazily later, and for ``dlsym`` and modules
opened later (drivers, iconv modules), which search the same list. So:

- **No two libraries that define the same name change their order** (``earlier``, read from
  each library's table of exported symbols, ``exported``): a library is preloaded only
  with every library ahead of it that defines one of its names (which then stays ahead of
  it), and not at all when one of those cannot be preloaded. The order of the preloaded
  libraries among themselves is their order in the list.
- **The loader's own record agrees**: with ``LD_BIND_NOW`` (every reference bound at start,
  lazy ones included) the bindings it reports (``LD_DEBUG=bindings``) with the preload are
  those without it, reference by reference, or the plan is changed and checked again, and
  dropped when it does not settle.

The order of library constructors between libraries that do not depend on each other can
change (the loader sorts them by dependencies only); no library of ffmpeg's relies on
that.

A plan is made once per host and program, by a child process of the master before the first
worker (about two seconds: two runs of ``ffmpeg -version`` with the loader's debug output,
parsed away from the master's memory), and kept in ``plan_path()``. A stop asked for
meanwhile kills that child and the program it runs; a program that hangs under the
loader's debug output delays a start by MAKE_TIMEOUT at most. At each start the master
checks it against the files: the size and modification time (whole seconds, as image layers
keep them) of the program and of every library in its list, the list itself as the loader
resolves it now (``LD_TRACE_LOADED_OBJECTS``: a library found elsewhere through
``LD_LIBRARY_PATH``, a new ``/etc/ld.so.cache`` or another CPU level shows there), and the
environment variables that steer the loader; on any difference it is made again. Only
libraries owned by root in root's folders, which the daemon's user (and ffmpeg, which runs
as that user) cannot change, are ever preloaded, so a plan file written by someone with the
daemon's user id names nothing but the system's own libraries of that program. A program
that is a script is not planned (its loader would be its interpreter's).

Workers inherit the plans through fork and add ``LD_PRELOAD`` to the environment of the
program's runs (``env_for``); every ``RECHECK`` seconds a worker checks that the files are
unchanged (an upgrade under a running daemon) and starts the program as it is from then on
if not. A program without a plan, or any program when ``LD_PRELOAD`` is already set, starts
as it is. ``[job] fast_start = false`` turns it off.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable

from . import fsafe

log = logging.getLogger(__name__)

FORMAT = 2  # of the plan file
PLAN_FILE = "ffmpeg-start.json"
RUN_TIMEOUT = 30.0  # seconds for one run of ``<program> -version`` with the loader's output
MAKE_TIMEOUT = 60.0  # for the child process that makes a plan
MAKE_POLL = 0.1  # seconds between the master's checks, while it waits, that it may go on
TRACE_TIMEOUT = 10.0  # for the loader's list of a program's libraries
RECHECK = 10.0  # seconds between a worker's checks that the planned files are unchanged
MAX_ROUNDS = 6  # checks of the bindings before a plan that keeps changing them is dropped
MIN_GAIN = 0.001  # a library is preloaded only if it saves this share of the walks
# Names that older linkers put in every library's table (section ends, init and fini):
# each library's own, never looked up across libraries.
LINKER_NAMES = frozenset({b"_init", b"_fini", b"_edata", b"_end", b"__bss_start", b"_etext",
                          b"etext", b"edata", b"end", b"__end__"})

# "binding file /lib/x/libavdevice.so.59 [0] to /lib/x/libc.so.6 [0]: normal symbol `strlen'
# [GLIBC_2.2.5]" (glibc's rtld, LD_DEBUG=bindings)
_BINDING = re.compile(r"binding file (\S+) \[\d+\] to (\S+) \[\d+\]: (\w+) symbol `([^']*)'"
                      r"(?: \[([^\]]*)\])?")
_TRACED = re.compile(r"^\s*\S+ => (\S+) \(0x[0-9a-f]+\)$", re.M)

Binding = tuple[str, str, str, str, str]  # referrer, definer, kind, symbol, version
Identity = list[int]  # st_size, st_mtime in whole seconds (image layers drop the rest)

# program path -> the libraries to preload; and what to check them against (set in the
# master, inherited by the workers)
_plans: dict[str, tuple[str, ...]] = {}
_files: dict[str, dict[str, Identity]] = {}
_checked = {"at": 0.0}


# --- the loader's account, and the libraries' own tables ------------------------------------


def parse_scope(text: str) -> list[str]:
    """The main program's global search list from ``LD_DEBUG=scopes`` output ([] if none)."""
    for line in text.splitlines():
        _, sep, rest = line.partition("scope 0:")
        if sep:
            return rest.split()
    return []


def parse_bindings(text: str) -> set[Binding] | None:
    """The bindings the loader reported; None when a line of them does not parse (a path
    with a space in it): what is not read cannot be compared."""
    found = {(m[1], m[2], m[3], m[4], m[5] or "") for m in _BINDING.finditer(text)}
    lines = sum(1 for line in text.splitlines() if "binding file " in line)
    parsed = sum(1 for _ in _BINDING.finditer(text))
    return found if lines == parsed else None


def exported(path: str) -> frozenset[bytes] | None:
    """The names a shared library exports (defined, global, weak or unique, default or
    protected visibility; not absolute symbols such as version names, nor LINKER_NAMES),
    from its ELF dynamic symbol table; None when it cannot be read."""
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) as m:
            if m[:4] != b"\x7fELF" or m[5] not in (1, 2):
                return None
            e = "<" if m[5] == 1 else ">"
            if m[4] == 2:
                (shoff,) = struct.unpack_from(e + "Q", m, 0x28)
                shentsize, shnum = struct.unpack_from(e + "HH", m, 0x3A)
                section, symbol = e + "IIQQQQIIQQ", e + "IBBHQQ"
            elif m[4] == 1:
                (shoff,) = struct.unpack_from(e + "I", m, 0x20)
                shentsize, shnum = struct.unpack_from(e + "HH", m, 0x2E)
                section, symbol = e + "IIIIIIIIII", e + "IIIBBH"
            else:
                return None
            sections = [struct.unpack_from(section, m, shoff + i * shentsize)
                        for i in range(shnum)]
            dynsym = next((s for s in sections if s[1] == 11), None)  # SHT_DYNSYM
            if dynsym is None or dynsym[6] >= len(sections):
                return None
            strtab = sections[dynsym[6]]
            strings = m[strtab[4]:strtab[4] + strtab[5]]
            table = m[dynsym[4]:dynsym[4] + dynsym[5]]
    except (OSError, ValueError, struct.error):
        return None
    names: set[bytes] = set()
    wide = symbol.endswith("HQQ")
    for entry in struct.iter_unpack(symbol, table):
        if wide:
            name, info, other, shndx = entry[0], entry[1], entry[2], entry[3]
        else:
            name, info, other, shndx = entry[0], entry[3], entry[4], entry[5]
        if shndx in (0, 0xFFF1):  # undefined, absolute
            continue
        if info >> 4 not in (1, 2, 10) or other & 3 not in (0, 3) or info & 15 in (3, 4):
            continue
        end = strings.find(b"\0", name)
        text = strings[name:end if end >= 0 else len(strings)]
        if text not in LINKER_NAMES:
            names.add(text)
    return frozenset(names)


def earlier(scope: list[str], exports: dict[str, frozenset[bytes]]) -> dict[str, set[str]]:
    """For each library, the libraries ahead of it in ``scope`` (not the program) that define
    a name it defines too."""
    definers: dict[bytes, list[str]] = {}
    for path in scope[1:]:
        for name in exports.get(path, ()):
            definers.setdefault(name, []).append(path)
    ahead: dict[str, set[str]] = {path: set() for path in scope}
    for paths in definers.values():
        for i in range(1, len(paths)):
            ahead[paths[i]].update(paths[:i])
    return ahead


def _is_loader(path: str) -> bool:
    """The dynamic loader itself (in the search list, never in ldd's ``=>`` lines)."""
    return os.path.basename(path).startswith(("ld-linux", "ld64.so", "ld.so"))


def _candidate(path: str) -> bool:
    """A library that may be preloaded: a file by absolute path, not the loader itself, no
    separator of LD_PRELOAD in its name, and owned by root in root's folders."""
    if not os.path.isabs(path) or _is_loader(path) or \
            any(c in path for c in ": \t\n"):
        return False
    try:
        for where in (path, os.path.dirname(path)):
            st = os.stat(where)
            if st.st_uid != 0 or st.st_mode & 0o022:
                return False
    except OSError:
        return False
    return True


def _closure(lib: str, ahead: dict[str, set[str]]) -> set[str] | None:
    """``lib`` and every library that must be preloaded with it (see ``earlier``); None when
    one of them cannot be."""
    unit, todo = set(), [lib]
    while todo:
        path = todo.pop()
        if path in unit:
            continue
        if not _candidate(path):
            return None
        unit.add(path)
        todo.extend(ahead.get(path, ()))
    return unit


def choose(scope: list[str], bindings: Iterable[Binding],
           ahead: dict[str, set[str]] | None = None, exclude: frozenset[str] = frozenset(),
           include: frozenset[str] = frozenset(), min_gain: float = MIN_GAIN) -> list[str]:
    """The libraries to preload, in their order of ``scope``: greedily, the library (with
    those it needs ahead of it, ``ahead``) whose move to the front saves the most steps of
    the loader's walks, while one saves ``min_gain`` of them. A lookup that ends at
    position p of the list takes p + 1 steps."""
    ahead = ahead if ahead is not None else {}
    position = {path: i for i, path in enumerate(scope)}
    ends: Counter[str] = Counter()
    for _, definer, *_ in bindings:
        if definer in position:
            ends[definer] += 1

    def steps(chosen: set[str]) -> int:
        order = [p for p in scope[1:] if p in chosen] + [p for p in scope[1:]
                                                         if p not in chosen]
        return sum(ends[p] * (i + 2) for i, p in enumerate(order) if p in ends) + ends[scope[0]]

    chosen: set[str] = set()
    for path in include:
        unit = _closure(path, ahead) if path in position and position[path] > 0 else None
        if unit is not None:
            chosen |= unit
    now = steps(chosen)
    total = steps(set())
    units: dict[str, set[str] | None] = {}
    while True:
        best, best_steps = None, now - min_gain * total
        for lib in ends:
            if lib in chosen or lib in exclude or position[lib] == 0:
                continue
            if lib not in units:
                units[lib] = _closure(lib, ahead)
            unit = units[lib]
            if unit is None or unit & exclude:
                continue
            after = steps(chosen | unit)
            if after < best_steps:
                best, best_steps = unit, after
        if best is None:
            return [p for p in scope if p in chosen]
        chosen |= best
        now = best_steps


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
    return [st.st_size, int(st.st_mtime)]


def _loader_env() -> dict[str, str]:
    """Our environment without the loader's debug and preload variables."""
    return {k: v for k, v in os.environ.items()
            if k not in ("LD_DEBUG", "LD_DEBUG_OUTPUT", "LD_PRELOAD", "LD_TRACE_LOADED_OBJECTS")}


def _run(program: str, debug: str, preload: list[str] | None = None) -> tuple[str, str]:
    """``program -version`` with the loader's ``debug`` output, every reference bound at
    start: (stdout, the loader's lines of the program's own process)."""
    env = {**_loader_env(), "LD_DEBUG": debug, "LD_BIND_NOW": "1"}
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    from .media import die_with_parent  # (media imports this module)

    with subprocess.Popen([program, "-hide_banner", "-version"], env=env,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, preexec_fn=die_with_parent) as proc:
        try:
            out, err = proc.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, program)
    own = f"{proc.pid}:"  # each line starts with the pid: not a child's, if it has any
    text = "\n".join(line for line in err.decode("utf-8", "replace").splitlines()
                     if line.lstrip().startswith(own))
    return out.decode("utf-8", "replace"), text


def trace(program: str) -> list[str] | None:
    """The paths of ``program``'s libraries in the loader's order, as it resolves them now
    (``ldd``'s way: the loader lists them and stops before the program runs); None if it
    cannot tell."""
    try:
        done = subprocess.run([program], env={**_loader_env(), "LD_TRACE_LOADED_OBJECTS": "1"},
                              stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=TRACE_TIMEOUT)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return _TRACED.findall(done.stdout.decode("utf-8", "replace"))


def _is_elf(program: str) -> bool:
    try:
        with open(program, "rb") as fh:
            return fh.read(4) == b"\x7fELF"
    except OSError:
        return False


def make(program: str) -> dict | None:
    """A plan for ``program`` (an absolute path): {"preload": [...], "scope": [[path, size,
    mtime], ...]}, with an empty preload when nothing gains or nothing is sure; None when
    the loader gives no account of itself (a script, not glibc, a static program, a run
    that fails)."""
    if not _is_elf(program):
        return None
    try:
        out, text = _run(program, "scopes,bindings")
    except (OSError, subprocess.SubprocessError) as exc:
        log.info("ffmpeg start plan: cannot run %s -version (%s)", program, exc)
        return None
    scope = parse_scope(text)
    bindings = parse_bindings(text)
    if not scope or not bindings or text.count("Initial object scopes") != 1:
        return None  # (twice: an exec into another program)
    files = [[p, *i] for p in scope[1:] if os.path.isabs(p) and (i := _identity(p))]
    if len(files) != sum(1 for p in scope[1:] if os.path.isabs(p)):
        return None
    exports = {p: exported(p) for p, *_ in files}
    ahead = earlier(scope, {p: e for p, e in exports.items() if e is not None})
    for p, names in exports.items():
        if names is None:  # unreadable table: it may define anything, so it never moves,
            ahead[p].add(scope[0])  # (the program is never a candidate)
            for q in scope[scope.index(p) + 1:]:
                ahead[q].add(p)  # and nothing behind it moves ahead of it
    plan: dict = {"preload": [], "scope": files}
    excluded: frozenset[str] = frozenset()
    included: frozenset[str] = frozenset()
    for _ in range(MAX_ROUNDS):
        preload = choose(scope, bindings, ahead, excluded, included)
        if not preload:
            return plan
        try:
            out2, text2 = _run(program, "bindings", preload)
        except (OSError, subprocess.SubprocessError) as exc:
            log.info("ffmpeg start plan: %s does not run with its libraries preloaded (%s)",
                     program, exc)
            return plan
        new = parse_bindings(text2)
        if new is None:
            return plan
        if new == bindings and out2 == out:
            plan["preload"] = preload
            return plan
        # A library that took a binding from one ahead of it in the list: that one is
        # preloaded too (so it stays ahead), or, when it cannot be (the program), the thief
        # stays in its place. The choice is then made again.
        took, lost = _changes(bindings, new - bindings)
        if not took:
            return plan
        excluded |= {t for t, owner in zip(took, lost, strict=True)
                     if owner is None or not _candidate(owner)}
        included |= {o for o in lost if o is not None and _candidate(o)}
        included -= excluded
    return plan


# --- the host's plans ---------------------------------------------------------------------


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
    steer = sorted((k, v) for k, v in _loader_env().items()
                   if k.startswith("LD_") or k == "GLIBC_TUNABLES")
    return json.dumps([program, steer])


def _still_good(plan: dict, program: str) -> bool:
    """The plan was made for these files, as the loader finds them now."""
    try:
        if plan.get("program") != _identity(program):
            return False
        files = plan["scope"]
        paths = [path for path, *_ in files]
        preload = plan["preload"]
        if not all(isinstance(p, str) and p in paths and _candidate(p) for p in preload):
            return False
        if any(_identity(path) != identity for path, *identity in files):
            return False
        return trace(program) == [p for p in paths if not _is_loader(p)]
    except (KeyError, TypeError, ValueError, AttributeError):
        return False


def _read(path: str) -> dict:
    """The kept plans; {} when there are none, or the file is not a file of ours alone."""
    try:
        fd = fsafe.open_nofollow(path, os.O_RDONLY | os.O_NONBLOCK, what="ffmpeg start plan")
    except OSError:
        return {}
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022 or \
            st.st_size > 16 << 20:
        os.close(fd)
        log.warning("ffmpeg start plan %s is not a file of ours alone: not used", path)
        return {}
    with os.fdopen(fd, "rb") as fh:
        try:
            kept = json.loads(fh.read())
        except (ValueError, RecursionError):
            return {}
    if not isinstance(kept, dict) or kept.get("format") != FORMAT or \
            not isinstance(kept.get("plans"), dict):
        return {}
    return kept["plans"]


def _write(path: str, plans: dict) -> None:
    fd = fsafe.private_dir(os.path.dirname(path), "cache folder")
    tmp = f".tmp-{os.getpid()}-{PLAN_FILE}"
    try:
        out = fsafe.open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600,
                                  dir_fd=fd)
        with os.fdopen(out, "w") as fh:
            json.dump({"format": FORMAT, "plans": plans}, fh)
        os.rename(tmp, PLAN_FILE, src_dir_fd=fd, dst_dir_fd=fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=fd)
        raise
    finally:
        os.close(fd)


def _make_apart(program: str, stop: Callable[[], bool]) -> dict | None:
    """``make(program)`` in a child process: the loader's 8 MB of text are parsed away from
    the master's memory, which its workers would inherit. The child runs in a session of
    its own (a Ctrl-C meant for the master does not reach it, with a traceback) and is
    killed with the program it runs once ``stop()`` (the master was asked to stop) or
    MAKE_TIMEOUT passes: a program that hangs under the loader's debug output costs a start
    at most that long, and a stop nothing."""
    log.info("making the start plan of %s (once per host and version of it)", program)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "worker.preload", program,
                                 str(os.getpid())],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True,
                                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    except OSError as exc:
        log.warning("ffmpeg start plan for %s not made: %s", program, exc)
        return None
    deadline = time.monotonic() + MAKE_TIMEOUT
    with proc:
        while True:
            try:
                out, err = proc.communicate(timeout=MAKE_POLL)
                break
            except subprocess.TimeoutExpired:
                stopping = stop()
                if not stopping and time.monotonic() < deadline:
                    continue
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # and the program it runs
                proc.communicate()
                if stopping:
                    log.info("ffmpeg start plan for %s not made: stopping", program)
                else:
                    log.warning("ffmpeg start plan for %s not made in %.0f s", program,
                                MAKE_TIMEOUT)
                return None
    if proc.returncode != 0:
        log.warning("ffmpeg start plan for %s not made: %s", program,
                    err.decode("utf-8", "replace").strip()[-500:])
        return None
    try:
        plan = json.loads(out)
    except ValueError:
        log.warning("ffmpeg start plan for %s not made: the child's answer is not JSON", program)
        return None
    return plan if isinstance(plan, dict) else None


def prepare(programs: Iterable[str], path: str | None = None,
            stop: Callable[[], bool] = lambda: False) -> dict[str, tuple[str, ...]]:
    """Make (or read back) the plans of ``programs`` (names on PATH or paths) and use them
    in this process and the workers it forks. Never raises: a program without a plan starts
    as it is. Once ``stop()`` is true, no more plans are made."""
    use({})
    if "LD_PRELOAD" in os.environ:
        log.info("ffmpeg is started as it is: LD_PRELOAD is set (%s)", os.environ["LD_PRELOAD"])
        return {}
    try:
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
                if stop():
                    break
                identity = _identity(program)
                made = _make_apart(program, stop) if _is_elf(program) else None
                if made is None:
                    continue
                plan = {"program": identity, **made}
                kept[key] = plan
                changed = True
                log.info("ffmpeg start plan for %s: %d of its %d libraries preloaded",
                         program, len(plan["preload"]), len(plan["scope"]))
            if plan["preload"]:  # by the name the worker finds it by (shutil.which) too
                _plans[program] = _plans[found] = tuple(plan["preload"])
                _files[program] = _files[found] = {p: i for p, *i in plan["scope"]}
        if changed:
            try:
                _write(path, kept)
            except OSError as exc:  # UnsafePath included: made again at the next start
                log.warning("cannot keep the ffmpeg start plan in %s: %s", path, exc)
    except Exception:  # a plan is never worth a master that does not start
        log.exception("ffmpeg start plan: failed; ffmpeg is started as it is")
        use({})
    _checked["at"] = time.monotonic()
    return dict(_plans)


def _unchanged() -> bool:
    """Whether the planned files are still those the plans were made for (checked at most
    every RECHECK seconds); if not, the plans are dropped in this process."""
    now = time.monotonic()
    if now - _checked["at"] < RECHECK:
        return True
    _checked["at"] = now
    for program, files in list(_files.items()):
        if any(_identity(path) != identity for path, identity in files.items()):
            log.warning("%s or its libraries changed since its start plan was made: started "
                        "as it is until the next start or HUP", program)
            for name in [n for n, f in _files.items() if f is files]:
                _plans.pop(name, None)
                _files.pop(name, None)
    return True


def env_for(program: str, base: dict[str, str] | None) -> dict[str, str] | None:
    """The environment to start ``program`` (a resolved path) with: ``base`` (None: ours)
    with its plan's LD_PRELOAD; ``base`` itself when it has no plan."""
    if program not in _plans or not _unchanged() or program not in _plans:
        return base
    return {**(os.environ if base is None else base), "LD_PRELOAD": ":".join(_plans[program])}


def use(plans: dict[str, tuple[str, ...]]) -> None:
    """Use ``plans`` (as ``prepare`` returns them) in this process, unchecked: for tests."""
    _plans.clear()
    _files.clear()
    _plans.update(plans)


if __name__ == "__main__":  # the master's child: python -m worker.preload PROGRAM MASTER_PID
    from worker.media import die_with_parent

    die_with_parent()  # with the master, whatever kills it;
    if len(sys.argv) > 2 and os.getppid() != int(sys.argv[2]):
        sys.exit(1)  # and if that was before the line above: already gone
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    print(json.dumps(make(sys.argv[1])))

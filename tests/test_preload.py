"""The start plan of ffmpeg (worker/preload.py): its libraries preloaded so that the dynamic
loader searches less, with every symbol bound as before.

The guarantee is checked here with the loader's own record (``LD_DEBUG=bindings``), parsed
by the test itself, on the real ffmpeg and on a program built here whose libraries define
the same function twice; the gain is counted in the loader's steps on that program
(``LD_DEBUG=symbols`` prints one line a library looked in), which do not depend on the
machine's load. What it saves ffmpeg in CPU is measured by bench/ (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import textwrap
import time

import psutil
import pytest

from tests.conftest import child_named, gone, wait_for
from worker import media, preload

FFMPEG = shutil.which("ffmpeg")


def _loader(program: list[str], debug: str, preload_list: list[str] | tuple[str, ...] = (),
            env: dict[str, str] | None = None) -> tuple[str, list[str]]:
    """stdout, and the loader's lines without their pid; every reference bound at start
    (LD_BIND_NOW), the lazy ones included."""
    env = {**(env or os.environ), "LD_DEBUG": debug, "LD_BIND_NOW": "1"}
    env.pop("LD_PRELOAD", None)
    if preload_list:
        env["LD_PRELOAD"] = ":".join(preload_list)
    run = subprocess.run(program, env=env, capture_output=True, text=True, timeout=60,
                         check=True)
    return run.stdout, [line.split(":", 1)[1].strip() for line in run.stderr.splitlines()
                        if ":" in line]


def _bindings(lines: list[str]) -> set[str]:
    return {line for line in lines if line.startswith("binding file ")}


def _steps(lines: list[str]) -> int:
    return sum(1 for line in lines if "lookup in file=" in line)


def _definers_in_order(libraries: list[str]) -> dict[str, list[str]]:
    """Each name defined by two or more of ``libraries``: its definers in that order, read
    by binutils' nm (not by the module's own reader)."""
    found: dict[str, list[str]] = {}
    linker = {"_init", "_fini", "_edata", "_end", "__bss_start"}
    for path in libraries:
        out = subprocess.run(["nm", "-D", "--defined-only", path], capture_output=True,
                             text=True, check=True).stdout
        names = set()
        for line in out.splitlines():
            parts = line.split()
            # global (upper case) but absolute (version names), GNU indirect and unique
            if len(parts) == 3 and parts[1] in "TDBRVWGSCiu":
                names.add(parts[2].split("@")[0])
        for name in names - linker:
            found.setdefault(name, []).append(path)
    return {name: paths for name, paths in found.items() if len(paths) > 1}


# --- pure logic -------------------------------------------------------------------------------


def _b(referrer: str, definer: str, symbol: str) -> preload.Binding:
    return (referrer, definer, "normal", symbol, "")


def test_choose_moves_forward_the_libraries_where_many_lookups_end_deep(monkeypatch):
    monkeypatch.setattr(preload, "_candidate", lambda path: path.startswith("/lib/"))
    scope = ["prog"] + [f"/lib/l{i}.so" for i in range(1, 41)]
    # near the front already: what a move would gain is less than what it costs the others
    bindings = {_b("prog", "/lib/l1.so", f"a{i}") for i in range(50)}
    bindings |= {_b("/lib/l40.so", "/lib/l40.so", f"own{i}") for i in range(300)}  # deep
    bindings |= {_b("prog", "/lib/l30.so", f"c{i}") for i in range(200)}
    bindings |= {_b("prog", "/lib/l35.so", "once")}  # one lookup: not worth a step for all
    assert preload.choose(scope, bindings) == ["/lib/l30.so", "/lib/l40.so"]  # list order
    # excluded, it is not chosen; included, it is, in its place
    assert preload.choose(scope, bindings, exclude=frozenset({"/lib/l40.so"})) == \
        ["/lib/l30.so"]
    assert preload.choose(scope, bindings, include=frozenset({"/lib/l2.so"})) == \
        ["/lib/l2.so", "/lib/l30.so", "/lib/l40.so"]
    # a library that shares a name with one ahead of it takes that one along; with one
    # that cannot move (here, the program), it stays
    ahead = {"/lib/l40.so": {"/lib/l3.so"}, "/lib/l3.so": set(), "/lib/l30.so": {"prog"}}
    assert preload.choose(scope, bindings, ahead) == ["/lib/l3.so", "/lib/l40.so"]
    # never the program itself, nor a name without a path
    scope2 = ["prog", "linux-vdso.so.1"] + scope[1:]
    bindings2 = bindings | {_b("prog", "prog", f"e{i}") for i in range(900)}
    assert preload.choose(scope2, bindings2) == ["/lib/l30.so", "/lib/l40.so"]


def test_earlier_names_the_libraries_ahead_that_define_the_same_name():
    scope = ["prog", "/a.so", "/b.so", "/c.so"]
    exports = {"/a.so": frozenset({b"x", b"y"}), "/b.so": frozenset({b"z"}),
               "/c.so": frozenset({b"x", b"z", b"w"})}
    assert preload.earlier(scope, exports) == {"prog": set(), "/a.so": set(),
                                               "/b.so": set(), "/c.so": {"/a.so", "/b.so"}}


def test_parse_reads_glibc_loader_lines():
    text = textwrap.dedent("""\
         9542:\t
         9542:\tInitial object scopes
         9542:\tobject=ffmpeg [0]
         9542:\t scope 0: ffmpeg /lib/libavdevice.so.59 /lib/libc.so.6
         9542:\tobject=linux-vdso.so.1 [0]
         9542:\t scope 0: ffmpeg /lib/libavdevice.so.59 /lib/libc.so.6
         9542:\t scope 1: linux-vdso.so.1
         9542:\tbinding file /lib/libavdevice.so.59 [0] to /lib/libc.so.6 [0]: normal symbol `strlen' [GLIBC_2.2.5]
         9542:\tbinding file ffmpeg [0] to /lib/libavdevice.so.59 [0]: normal symbol `avdevice_register_all' [LIBAVDEVICE_59]
         9542:\tbinding file /lib/libc.so.6 [0] to /lib/libc.so.6 [0]: normal symbol `_dl_x'
    """)  # noqa: E501
    assert preload.parse_scope(text) == ["ffmpeg", "/lib/libavdevice.so.59", "/lib/libc.so.6"]
    assert preload.parse_bindings(text) == {
        ("/lib/libavdevice.so.59", "/lib/libc.so.6", "normal", "strlen", "GLIBC_2.2.5"),
        ("ffmpeg", "/lib/libavdevice.so.59", "normal", "avdevice_register_all",
         "LIBAVDEVICE_59"),
        ("/lib/libc.so.6", "/lib/libc.so.6", "normal", "_dl_x", ""),
    }
    assert preload.parse_scope("no loader here") == []
    # a line that does not parse (a path with a space) makes the whole record unreadable
    spaced = text + "9542:\tbinding file /lib/my lib.so [0] to /lib/libc.so.6 [0]: " \
        "normal symbol `f'\n"
    assert preload.parse_bindings(spaced) is None


def test_plan_path_follows_the_xdg_rule():
    assert preload.plan_path({"XDG_CACHE_HOME": "/x/c"}, 1000) == \
        "/x/c/clip-supervisor/ffmpeg-start.json"
    assert preload.plan_path({"XDG_CACHE_HOME": "rel", "HOME": "/home/u"}, 1000) == \
        "/home/u/.cache/clip-supervisor/ffmpeg-start.json"
    assert preload.plan_path({}, 0) == "/var/cache/clip-supervisor/ffmpeg-start.json"


# --- the real loader --------------------------------------------------------------------------


def test_ffmpegs_plan_keeps_every_lookup_as_before(tmp_path):
    plan = preload.make(FFMPEG)
    assert plan is not None and plan["preload"], "Debian's ffmpeg gains from a plan"
    scope = [path for path, *_ in plan["scope"]]
    assert set(plan["preload"]) <= set(scope)
    version = [FFMPEG, "-hide_banner", "-version"]
    # Every reference, the lazy ones too, binds as before
    out, plain = _loader(version, "bindings")
    out2, planned = _loader(version, "bindings", plan["preload"])
    assert out2 == out
    assert _bindings(planned) == _bindings(plain) and len(_bindings(plain)) > 1000
    # and no two libraries that define the same name swap places, so whatever looks a name
    # up later (dlsym, a module opened later) finds the same library
    new_order = plan["preload"] + [p for p in scope if p not in plan["preload"]]
    rank = {path: i for i, path in enumerate(new_order)}
    swapped = {name: paths for name, paths in _definers_in_order(scope).items()
               if sorted(paths, key=rank.__getitem__) != paths}
    assert not swapped, list(swapped.items())[:5]
    # and a copy clip made with it is the same, byte for byte
    source = str(tmp_path / "src.mp4")
    subprocess.run([FFMPEG, "-v", "error", "-f", "lavfi", "-i",
                    "testsrc2=size=320x240:rate=25:duration=6", "-c:v", "libx264", "-g", "25",
                    "-preset", "ultrafast", source], check=True, timeout=60)
    digests = []
    for extra in ({}, {"LD_PRELOAD": ":".join(plan["preload"])}):
        out_file = str(tmp_path / f"clip{len(digests)}.mp4")
        subprocess.run([FFMPEG, "-v", "error", "-ss", "2", "-i", source, "-t", "2", "-c", "copy",
                        out_file], check=True, timeout=60, env={**os.environ, **extra})
        with open(out_file, "rb") as fh:
            digests.append(hashlib.sha256(fh.read()).hexdigest())
    assert digests[0] == digests[1]


def _build(folder: str, pads: int = 20, deep_symbols: int = 2000) -> str:
    """A program linked with libfirst, ``pads`` small libraries, then libdeep; libfirst and
    libdeep both define ``which()``; the program calls libdeep's many functions, and looks
    which() up by dlsym only, and only when run without arguments: "which 1 7" (libfirst's).
    So nothing that ``make`` runs (``prog -hide_banner -version``) shows which one it is:
    only the rule on names defined twice keeps it."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")  # scripts/setup.sh installs gcc

    def lib(name: str, source: str) -> None:
        path = os.path.join(folder, f"{name}.c")
        with open(path, "w") as fh:
            fh.write(source)
        subprocess.run([cc, "-shared", "-fPIC", "-O0", "-o",
                        os.path.join(folder, f"lib{name}.so"), path], check=True, timeout=120)

    lib("first", "int which(void) { return 1; }\n")
    for i in range(pads):
        lib(f"pad{i}", f"int pad{i}(void) {{ return {i}; }}\n")
    deep = "int which(void) { return 2; }\n" + "".join(
        f"int f{i}(void) {{ return {i}; }}\n" for i in range(deep_symbols))
    lib("deep", deep)
    calls = "".join(f"int f{i}(void);\n" for i in range(deep_symbols))
    table = ", ".join(f"f{i}" for i in range(deep_symbols))
    main = os.path.join(folder, "prog.c")
    with open(main, "w") as fh:
        fh.write("#define _GNU_SOURCE\n#include <stdio.h>\n#include <dlfcn.h>\n" + calls
                 + f"int (*table[])(void) = {{{table}}};\n"
                 "int main(int argc, char **argv) { if (argc > 1) { puts(\"version\"); "
                 "return 0; } int (*w)(void) = (int (*)(void))dlsym(RTLD_DEFAULT, \"which\");"
                 " printf(\"which %d %d\\n\", w(), table[7]()); return 0; }\n")
    prog = os.path.join(folder, "prog")
    libs = ["-lfirst", *[f"-lpad{i}" for i in range(pads)], "-ldeep"]
    subprocess.run([cc, "-O0", "-Wl,--no-as-needed", "-o", prog, main, f"-L{folder}",
                    f"-Wl,-rpath,{folder}", *libs, "-ldl"], check=True, timeout=120)
    return prog


def test_a_library_sharing_a_name_with_one_ahead_keeps_that_one_ahead(tmp_path):
    folder = str(tmp_path)
    prog = _build(folder)
    assert subprocess.run([prog], capture_output=True, text=True).stdout == "which 1 7\n"
    deep, first = os.path.join(folder, "libdeep.so"), os.path.join(folder, "libfirst.so")
    # libdeep alone in front would make which() libdeep's: 2
    assert subprocess.run([prog], capture_output=True, text=True,
                          env={**os.environ, "LD_PRELOAD": deep}).stdout == "which 2 7\n"

    plan = preload.make(prog)

    # Then libfirst goes in front too, ahead of it: dlsym and every binding as before
    assert plan is not None and plan["preload"][:2] == [first, deep]
    assert not any("libpad" in p for p in plan["preload"])  # (libc may come after them)
    _, plain = _loader([prog], "bindings")
    out, planned = _loader([prog], "bindings", plan["preload"])
    assert out == "which 1 7\n" and _bindings(planned) == _bindings(plain)
    # with far fewer steps of the loader
    assert _steps(_loader([prog], "symbols", plan["preload"])[1]) < \
        0.5 * _steps(_loader([prog], "symbols")[1])

    # A library that the daemon's user could change (not root's) is never preloaded, and
    # neither is one that would have to pass it
    os.chown(first, 1, 1)
    plan = preload.make(prog)
    assert plan is not None and first not in plan["preload"] and deep not in plan["preload"]
    assert subprocess.run([prog], capture_output=True, text=True, env={
        **os.environ, "LD_PRELOAD": ":".join(plan["preload"])}).stdout == "which 1 7\n"


def _rewrite(path: str, change) -> None:
    with open(path) as fh:
        kept = json.load(fh)
    (plan,) = kept["plans"].values()
    change(plan)
    with open(path, "w") as fh:
        json.dump(kept, fh)


def test_plans_are_kept_read_back_and_made_again_when_a_file_changes(tmp_path, caplog,
                                                                     monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    cache.chmod(0o700)  # whatever the umask
    path = str(cache / "clip-supervisor" / preload.PLAN_FILE)
    real = os.path.realpath(FFMPEG)
    try:
        plans = preload.prepare(["ffmpeg"], path)
        assert plans[real] and plans[FFMPEG] == plans[real]
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        # A kept plan is read back, not made again: one library less in it shows
        _rewrite(path, lambda p: p.update(preload=p["preload"][:1]))
        assert preload.prepare(["ffmpeg"], path)[real] == plans[real][:1]
        # Made again when the program changed (an upgrade) ...
        _rewrite(path, lambda p: p["program"].__setitem__(1, p["program"][1] + 1))
        assert preload.prepare(["ffmpeg"], path)[real] == plans[real]
        # ... when one of its libraries did ...
        _rewrite(path, lambda p: p["scope"][-1].__setitem__(1, p["scope"][-1][1] + 1))
        assert preload.prepare(["ffmpeg"], path)[real] == plans[real]
        # ... and when the loader now finds its libraries elsewhere or others
        _rewrite(path, lambda p: p["scope"].pop(3))
        assert preload.prepare(["ffmpeg"], path)[real] == plans[real]
        # A plan that names a library the daemon's user could change is not used
        own = tmp_path / "libown.so"
        shutil.copyfile(plans[real][0], own)
        os.chown(own, 1, 1)
        _rewrite(path, lambda p: (p["scope"].append([str(own), *preload._identity(str(own))]),
                                  p.update(preload=[str(own)])))
        assert preload.prepare(["ffmpeg"], path)[real] == plans[real]
        # A file others may write is not trusted: made again, and written back as ours
        os.chmod(path, 0o666)
        caplog.clear()
        assert preload.prepare(["ffmpeg"], path)[real] == plans[real]
        assert "not a file of ours alone" in caplog.text
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        # Damage in its place never stops a start: nested too deep, a folder, a FIFO
        with open(path, "w") as fh:
            fh.write("[" * 100000)
        assert preload.prepare(["ffmpeg"], path)[real] == plans[real]
        os.unlink(path)
        os.mkdir(path)
        caplog.clear()
        assert preload.prepare(["ffmpeg"], path)[real] == plans[real]
        assert "cannot keep the ffmpeg start plan" in caplog.text
        os.rmdir(path)
        os.mkfifo(path)  # (opened without waiting for a writer; replaced by the plan)
        assert preload.prepare(["ffmpeg"], path)[real] == plans[real]
        assert stat.S_ISREG(os.stat(path).st_mode)
        # An environment that preloads already: nothing of ours is added
        monkeypatch.setenv("LD_PRELOAD", "/lib/none.so")
        assert preload.prepare(["ffmpeg"], path) == {}
        assert preload.env_for(FFMPEG, None) is None
        monkeypatch.delenv("LD_PRELOAD")
        # A script standing in for ffmpeg is not planned: the loader's account would be
        # its interpreter's
        script = tmp_path / "ffmpeg-wrapper"
        script.write_text(f"#!/bin/sh\nexec {FFMPEG} \"$@\"\n")
        script.chmod(0o755)
        assert preload.make(str(script)) is None
        assert preload.prepare([str(script)], path) == {}
        # A folder others may write: the plan is used, not kept
        other = tmp_path / "open"
        other.mkdir()
        other.chmod(0o777)
        caplog.clear()
        assert preload.prepare(["ffmpeg"], str(other / "c" / preload.PLAN_FILE))[real]
        assert "cannot keep the ffmpeg start plan" in caplog.text
        assert not os.path.exists(other / "c" / preload.PLAN_FILE)
    finally:
        preload.prepare(["ffmpeg", "ffprobe"])  # the host's plans, as the other tests use


def test_the_environment_a_program_starts_with(caplog):
    real = os.path.realpath(FFMPEG)
    try:
        preload.use({real: ("/lib/a.so", "/lib/b.so")})
        argv, _ = media._launcher([real, "-version"])
        env = media._environment(argv, None)
        if argv[0] == media._SETPRIV:
            assert env is None  # through setpriv (a dynamic program): as it is
        else:
            assert env is not None and env["LD_PRELOAD"] == "/lib/a.so:/lib/b.so"
            assert env["PATH"] == os.environ["PATH"]
            relay = media._environment(argv, {"http_proxy": "http://relay"})
            assert relay == {"http_proxy": "http://relay", "LD_PRELOAD": "/lib/a.so:/lib/b.so"}
        assert media._environment(["/usr/bin/setpriv", "--pdeathsig", "KILL", "--", real],
                                  None) is None or media._SETPRIV != "/usr/bin/setpriv"
        # a program without a plan: as it is
        assert media._environment(["/bin/true"], {"A": "1"}) == {"A": "1"}
        # A worker finds its planned files changed (an upgrade under a running daemon):
        # from then on the program starts as it is, and the log says so once
        preload._files[real] = {FFMPEG: [1, 2]}
        preload._checked["at"] = 0.0
        caplog.clear()
        assert preload.env_for(real, {"A": "1"}) == {"A": "1"}
        assert preload.env_for(real, None) is None
        assert caplog.text.count("changed since its start plan was made") == 1
    finally:
        preload.prepare(["ffmpeg", "ffprobe"])


# --- the daemon -------------------------------------------------------------------------------


def _running_ffmpeg(env, proc, name: str) -> psutil.Process:
    (pid,) = env.wait_workers(proc, 1)
    env.push({"id": name, "url": env.url("twenty.mp4", slow=3), "start": 1, "duration": 2})
    return wait_for(lambda: child_named(pid, "ffmpeg"), 30, what="the worker's ffmpeg")


@pytest.mark.settings({"supervisor": {"workers": 1}})
def test_the_workers_ffmpeg_starts_with_the_hosts_plan(env):
    plans = preload.prepare(["ffmpeg", "ffprobe"])
    if not plans:
        pytest.skip("this ffmpeg gains nothing from a plan")
    if media._death_prefix()[:1] == [media._SETPRIV]:
        pytest.skip("die-with-parent is not built: ffmpeg starts through setpriv, unplanned")
    proc = env.start()
    child = _running_ffmpeg(env, proc, "planned")
    assert child.environ().get("LD_PRELOAD") == ":".join(plans[FFMPEG])
    assert "http_proxy" in child.environ()  # the relay's environment, with the plan
    wait_for(lambda: env.done_events(), 60, what="the clip")
    assert env.done_events()[0]["id"] == "planned"
    assert abs(float(subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0",
         os.path.join(env.out, "planned.mp4")], capture_output=True, text=True,
        check=True).stdout) - 2) < 0.2
    assert env.stop(proc) == 0


@pytest.mark.settings({"supervisor": {"workers": 1}, "job": {"fast_start": "false"}})
def test_fast_start_false_starts_ffmpeg_as_it_is(env):
    proc = env.start()
    child = _running_ffmpeg(env, proc, "plain")
    assert "LD_PRELOAD" not in child.environ()
    wait_for(lambda: env.done_events(), 60, what="the clip")
    assert env.stop(proc) == 0


def _hanging_ffmpeg(folder: str) -> str:
    """An ELF program that is ffmpeg (it execs it), except under the loader's debug output,
    where it never ends: the making of its start plan hangs, as on a program wedged at start."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")  # scripts/setup.sh installs gcc
    source = os.path.join(folder, "hang.c")
    with open(source, "w") as fh:
        fh.write(textwrap.dedent(f"""\
            #include <stdlib.h>
            #include <unistd.h>
            int main(int argc, char **argv) {{
                (void)argc;
                if (getenv("LD_DEBUG")) for (;;) pause();
                execv("{FFMPEG}", argv);
                return 127;
            }}
            """))
    program = os.path.join(folder, "ffmpeg-hangs-under-ld-debug")
    subprocess.run([cc, "-O0", "-o", program, source], check=True, timeout=120)
    return program


def _making_a_plan(env) -> tuple[subprocess.Popen, str, psutil.Process]:
    """A master making the start plan of an ffmpeg that hangs while it is planned: (the
    master, that program, its hanging run)."""
    program = _hanging_ffmpeg(env.tmp)
    env.settings["job"]["ffmpeg"] = program
    env.settings["supervisor"]["workers"] = 1
    proc = env.start()

    def hung() -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter(["cmdline"]):
            if (p.info["cmdline"] or [""])[0] == program and "-version" in p.info["cmdline"]:
                found.append(p)
        return found

    (stuck,) = wait_for(hung, 30, what="the planned program, hanging")
    assert f"making the start plan of {program}" in env.log_text()
    assert not env.r.hlen(env.keys.workers), "no worker before the plans"
    return proc, program, stuck


# TERM as a service manager sends it; INT to the whole process group, as a Ctrl-C at the
# terminal does (the child making the plan is in a session of its own: no traceback of its)
@pytest.mark.parametrize("ask", ["term", "ctrl-c"])
def test_a_stop_while_the_start_plan_is_made_ends_it_at_once(env, ask):
    # Given a master making the start plan of an ffmpeg that hangs while it is planned
    proc, program, stuck = _making_a_plan(env)

    # When the operator stops it
    began = time.monotonic()
    if ask == "term":
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGINT)

    # Then it stops at once (not after the plan's 30 s run timeout), cleanly, and the
    # program being planned dies with the making
    assert proc.wait(15) == 0
    took = time.monotonic() - began
    assert took < preload.RUN_TIMEOUT / 2, f"stopped after {took:.1f} s"
    wait_for(lambda: gone(stuck.pid), 5, what="the planned program to die")
    log = env.log_text()
    assert f"ffmpeg start plan for {program} not made: stopping" in log
    assert "master stopped" in log and "Traceback" not in log
    assert "Traceback" not in proc.stderr.read().decode()


def test_the_making_of_a_plan_dies_with_a_killed_master(env):
    # Given a master making the start plan of an ffmpeg that hangs while it is planned
    proc, _, stuck = _making_a_plan(env)
    (child,) = psutil.Process(proc.pid).children()  # python -m worker.preload

    # When the master is killed outright (its signal handlers never run)
    proc.kill()
    proc.wait(10)

    # Then the child making the plan and the program it runs die with it (their own
    # session: a kill of the master's group would not reach them), not 30 s later
    wait_for(lambda: gone(child.pid) and gone(stuck.pid), 10, what="the plan's processes to die")

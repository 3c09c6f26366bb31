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
import stat
import subprocess
import textwrap

import psutil
import pytest

from tests.conftest import child_named, wait_for
from worker import media, preload

FFMPEG = shutil.which("ffmpeg")


def _loader(program: list[str], debug: str, preload_list: list[str] | tuple[str, ...] = (),
            env: dict[str, str] | None = None) -> tuple[str, list[str]]:
    """stdout, and the loader's lines without their pid."""
    env = {**(env or os.environ), "LD_DEBUG": debug}
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


# --- pure logic -------------------------------------------------------------------------------


def _b(referrer: str, definer: str, symbol: str) -> preload.Binding:
    return (referrer, definer, "normal", symbol, "")


def test_choose_moves_forward_the_libraries_where_many_lookups_end_deep():
    scope = ["prog"] + [f"/lib/l{i}.so" for i in range(1, 41)]
    # near the front already: what a move would gain is less than what it costs the others
    bindings = {_b("prog", "/lib/l1.so", f"a{i}") for i in range(50)}
    bindings |= {_b("/lib/l40.so", "/lib/l40.so", f"own{i}") for i in range(300)}  # deep
    bindings |= {_b("prog", "/lib/l30.so", f"c{i}") for i in range(200)}
    bindings |= {_b("prog", "/lib/l35.so", "once")}  # one lookup: not worth a step for all
    chosen = preload.choose(scope, bindings)
    assert chosen == ["/lib/l30.so", "/lib/l40.so"]  # in their order of the list
    # excluded, it is not chosen; included, it is, in its place
    assert preload.choose(scope, bindings, exclude=frozenset({"/lib/l40.so"})) == \
        ["/lib/l30.so"]
    assert preload.choose(scope, bindings, include=frozenset({"/lib/l2.so"})) == \
        ["/lib/l2.so", "/lib/l30.so", "/lib/l40.so"]
    # never the program itself, nor the loader, nor a name without a path
    scope2 = ["prog", "/lib/ld-linux-x86-64.so.2", "linux-vdso.so.1"] + scope[1:]
    bindings2 = bindings | {_b("prog", "/lib/ld-linux-x86-64.so.2", f"d{i}") for i in range(900)}
    bindings2 |= {_b("prog", "prog", f"e{i}") for i in range(900)}
    assert preload.choose(scope2, bindings2) == ["/lib/l30.so", "/lib/l40.so"]


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


def test_plan_path_follows_the_xdg_rule():
    assert preload.plan_path({"XDG_CACHE_HOME": "/x/c"}, 1000) == \
        "/x/c/clip-supervisor/ffmpeg-start.json"
    assert preload.plan_path({"XDG_CACHE_HOME": "rel", "HOME": "/home/u"}, 1000) == \
        "/home/u/.cache/clip-supervisor/ffmpeg-start.json"
    assert preload.plan_path({}, 0) == "/var/cache/clip-supervisor/ffmpeg-start.json"


# --- the real loader --------------------------------------------------------------------------


def test_ffmpegs_plan_binds_every_symbol_as_before_and_searches_far_less(tmp_path):
    plan = preload.make(FFMPEG)
    assert plan is not None and plan["preload"], "Debian's ffmpeg gains from a plan"
    assert set(plan["preload"]) <= set(plan["scope"])
    version = [FFMPEG, "-hide_banner", "-version"]
    out, plain = _loader(version, "bindings")
    out2, planned = _loader(version, "bindings", plan["preload"])
    assert out2 == out
    assert _bindings(planned) == _bindings(plain) and len(_bindings(plain)) > 1000
    # (the gain, ~a quarter of its steps left, is counted on the small program below: the
    # loader prints one line a step, 4 million for ffmpeg)
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
    """A program linked (BIND_NOW) with libfirst, ``pads`` small libraries, then libdeep;
    libfirst and libdeep both define ``which()``; the program calls libdeep's many
    functions. ``prog -hide_banner -version`` prints which() (1: libfirst's)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")  # scripts/setup.sh installs gcc

    def lib(name: str, source: str, *extra: str) -> None:
        path = os.path.join(folder, f"{name}.c")
        with open(path, "w") as fh:
            fh.write(source)
        subprocess.run([cc, "-shared", "-fPIC", "-O0", "-Wl,-z,now", "-o",
                        os.path.join(folder, f"lib{name}.so"), path, *extra],
                       check=True, timeout=120)

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
        fh.write(calls + "int which(void);\n#include <stdio.h>\n"
                 f"int (*table[])(void) = {{{table}}};\n"
                 "int main(void) { printf(\"which %d %d\\n\", which(), table[7]()); "
                 "return 0; }\n")
    prog = os.path.join(folder, "prog")
    libs = ["-lfirst", *[f"-lpad{i}" for i in range(pads)], "-ldeep"]
    subprocess.run([cc, "-O0", "-Wl,-z,now", "-Wl,--no-as-needed", "-o", prog, main,
                    f"-L{folder}", f"-Wl,-rpath,{folder}", *libs], check=True, timeout=120)
    return prog


def test_a_library_that_would_take_a_binding_keeps_the_one_ahead_of_it_ahead(tmp_path):
    folder = str(tmp_path)
    prog = _build(folder)
    assert subprocess.run([prog], capture_output=True, text=True).stdout == "which 1 7\n"
    deep, first = os.path.join(folder, "libdeep.so"), os.path.join(folder, "libfirst.so")
    # libdeep alone in front would bind which() to its own: 2
    _, plain = _loader([prog], "bindings")
    _, alone = _loader([prog], "bindings", [deep])
    assert _bindings(alone) != _bindings(plain)
    assert subprocess.run([prog], capture_output=True, text=True,
                          env={**os.environ, "LD_PRELOAD": deep}).stdout == "which 2 7\n"

    plan = preload.make(prog)

    # Then libfirst goes in front too, ahead of it, and every binding is as before
    assert plan is not None and plan["preload"][:2] == [first, deep]
    assert not any("libpad" in p for p in plan["preload"])  # (libc may come after them)
    out, planned = _loader([prog], "bindings", plan["preload"])
    assert out == "which 1 7\n" and _bindings(planned) == _bindings(plain)
    assert _steps(_loader([prog], "symbols", plan["preload"])[1]) < \
        0.5 * _steps(_loader([prog], "symbols")[1])


def test_plans_are_kept_read_back_and_made_again_when_a_file_changes(tmp_path, caplog):
    path = str(tmp_path / "cache" / "clip-supervisor" / preload.PLAN_FILE)
    real = os.path.realpath(FFMPEG)
    try:
        plans = preload.prepare(["ffmpeg"], path)
        assert plans[real] and plans[FFMPEG] == plans[real]
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        with open(path) as fh:
            kept = json.load(fh)
        (key,) = kept["plans"]
        # A kept plan is read back, not made again: one library less in it shows
        kept["plans"][key]["preload"] = kept["plans"][key]["preload"][:1]
        with open(path, "w") as fh:
            json.dump(kept, fh)
        assert preload.prepare(["ffmpeg"], path)[real] == plans[real][:1]
        # The program's identity changes (an upgrade): made again
        kept["plans"][key]["program"][1] += 1
        with open(path, "w") as fh:
            json.dump(kept, fh)
        assert preload.prepare(["ffmpeg"], path)[real] == plans[real]
        # A file others may write is not trusted: made again, and written back as ours
        os.chmod(path, 0o666)
        caplog.clear()
        assert preload.prepare(["ffmpeg"], path)[real] == plans[real]
        assert "not ours alone" in caplog.text
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        # An environment that preloads already: nothing of ours is added
        os.environ["LD_PRELOAD"] = "/lib/none.so"
        try:
            assert preload.prepare(["ffmpeg"], path) == {}
            assert preload.env_for(FFMPEG, None) is None
        finally:
            del os.environ["LD_PRELOAD"]
        # A script standing in for ffmpeg is not planned: the loader's account would be
        # its interpreter's
        script = tmp_path / "ffmpeg-wrapper"
        script.write_text(f"#!/bin/sh\nexec {FFMPEG} \"$@\"\n")
        script.chmod(0o755)
        assert preload.make(str(script)) is None
        assert preload.prepare([str(script)], path) == {}
        # A folder others may write: the plan is used, not kept
        preload.use({})
        other = tmp_path / "open"
        other.mkdir(mode=0o777)
        os.chmod(other, 0o777)
        caplog.clear()
        assert preload.prepare(["ffmpeg"], str(other / "c" / preload.PLAN_FILE))[real]
        assert "cannot keep the ffmpeg start plan" in caplog.text
        assert not os.path.exists(other / "c" / preload.PLAN_FILE)
    finally:
        preload.prepare(["ffmpeg", "ffprobe"])  # the host's plans, as the other tests use


def test_the_environment_a_program_starts_with():
    real = os.path.realpath(FFMPEG)
    try:
        preload.use({real: ("/lib/a.so", "/lib/b.so")})
        argv, _ = media._launcher([real, "-version"])
        env = media._environment(argv, None)
        assert env is not None and env["LD_PRELOAD"] == "/lib/a.so:/lib/b.so"
        assert env["PATH"] == os.environ["PATH"]
        relay = media._environment(argv, {"http_proxy": "http://relay"})
        assert relay == {"http_proxy": "http://relay", "LD_PRELOAD": "/lib/a.so:/lib/b.so"}
        # through setpriv (a dynamic program): as it is
        assert media._environment([media._SETPRIV or "setpriv", "--pdeathsig", "KILL", "--",
                                   real], None) is None
        # a program without a plan: as it is
        assert media._environment(["/bin/true"], {"A": "1"}) == {"A": "1"}
    finally:
        preload.prepare(["ffmpeg", "ffprobe"])


# --- the daemon -------------------------------------------------------------------------------


def _running_ffmpeg(env, proc, name: str) -> psutil.Process:
    (pid,) = env.wait_workers(proc, 1)
    env.push({"id": name, "url": env.url("twenty.mp4", slow=3), "start": 1, "duration": 2})
    return wait_for(lambda: child_named(pid, "ffmpeg"), 30, what="the worker's ffmpeg")


@pytest.mark.settings({"supervisor": {"workers": 1}})
def test_the_workers_ffmpeg_starts_with_the_hosts_plan(env):
    plans = preload.prepare(["ffmpeg"])
    if not plans:
        pytest.skip("this ffmpeg gains nothing from a plan")
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

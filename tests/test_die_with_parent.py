"""die-with-parent, the program every ffmpeg is started through (worker/die_with_parent.c):
built here by the install for this machine, and for AArch64 with a cross compiler, run
under qemu-user. Both builds use setup.py's own flags. That it makes a program die with
its parent, and the fallbacks when it is missing, are in test_reliability.py.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from worker import media

# What the program runs in these tests: Python, printing its parent-death signal, its
# arguments and an environment variable (so an exec that lost any of them shows).
PRINT = ("import ctypes, os, sys\n"
         "got = ctypes.c_int(-1)\n"
         "ctypes.CDLL(None).prctl(2, ctypes.byref(got))  # PR_GET_PDEATHSIG\n"
         "print(got.value, sys.argv[1:], os.environ.get('MARK'))\n")


def _setup_py():
    spec = importlib.util.spec_from_file_location("clip_supervisor_setup",
                                                  os.path.join(ROOT, "setup.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check(prefix: list[str], program: str) -> None:
    env = {**os.environ, "MARK": "kept"}
    run = subprocess.run([*prefix, program, sys.executable, "-c", PRINT, "a b", ""],
                         capture_output=True, text=True, timeout=60, env=env)
    assert (run.returncode, run.stdout) == (0, "9 ['a b', ''] kept\n"), run.stderr
    missing = subprocess.run([*prefix, program, "/nonexistent/ffmpeg"], capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 127
    assert missing.stderr == "die-with-parent: failed to execute /nonexistent/ffmpeg\n"
    usage = subprocess.run([*prefix, program], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 126 and usage.stderr.startswith("usage: die-with-parent")


def test_the_installed_program_sets_the_signal_and_execs_with_arguments_and_environment():
    assert os.access(media._HELPER, os.X_OK), "the install did not build die-with-parent"
    _check([], media._HELPER)


def test_it_builds_and_runs_on_aarch64(tmp_path):
    # Given the cross compiler and qemu-user (scripts/test.sh installs both)
    cc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
    if cc is None or qemu is None:
        pytest.skip("needs gcc-aarch64-linux-gnu and qemu-user")
    setup = _setup_py()
    # When die-with-parent is built for AArch64 as setup.py builds it
    program = str(tmp_path / "die-with-parent")
    built = subprocess.run([cc, *setup.FLAGS, "-o", program,
                            os.path.join(ROOT, setup.SOURCE)], capture_output=True, text=True,
                           timeout=120)
    assert built.returncode == 0, built.stderr
    with open(program, "rb") as fh:
        header = fh.read(20)
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64
    # Then under qemu-user it sets the signal and execs (this machine's Python: qemu-user
    # hands the exec to the kernel) with the arguments and the environment intact
    _check([qemu], program)

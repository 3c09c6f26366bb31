"""What pip installs: the wheel and the sdist, built from this tree with ``python -m build``.

The wheel must live beside supervisord, whose package is also called ``supervisor``: both
are installed into one fresh virtual environment, both run, and removing either leaves the
other whole. The sdist must hold a test suite that runs from the unpacked tree. These tests
build for real (the build backend and supervisord come from PyPI, the only network they use).
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import tarfile
import venv
import zipfile
from collections.abc import Iterator

import pytest

from tests.conftest import ROOT, Env

SUPERVISORD = "supervisor==4.3.0"
SAMPLE = os.path.join(ROOT, "etc", "clip-supervisor.conf")


def _version() -> str:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(os.path.join(ROOT, "setup.cfg"), encoding="utf-8")
    return parser.get("metadata", "version")


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything that points Python at this checkout."""
    environ = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
               and not k.startswith("CLIP_SUPERVISOR_")}
    return {**environ, **extra}


def _run(cmd: list[str], timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    if done.returncode != 0:
        raise AssertionError(f"{cmd} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


# --- from the checkout: fast ------------------------------------------------------------------


def test_version_is_the_one_in_setup_cfg():
    # Given the version written once, in setup.cfg
    expected = f"clip-supervisor {_version()}\n"

    # Then the command says it, run as a module from the checkout or through the shim
    for module in ("supervisor", "clip_supervisor"):
        done = _run([sys.executable, "-m", module, "--version"], cwd=ROOT)
        assert done.stdout == expected
    import supervisor
    import worker

    assert supervisor.__version__ == worker.__version__ == _version()


def test_sample_config_prints_the_documented_file_whatever_the_configuration():
    # Given an environment whose configuration would not load (a misspelled variable)
    bad = _clean_env(CLIP_SUPERVISOR_REDIS_URI="redis://db:6379/0")

    # When the sample is asked for
    done = _run([sys.executable, "-m", "supervisor", "sample-config"], cwd=ROOT, env=bad)

    # Then it is the documented file, byte for byte, and it loads
    with open(SAMPLE, encoding="utf-8") as fh:
        assert done.stdout == fh.read()


def test_license_is_mit_and_named_in_the_metadata():
    with open(os.path.join(ROOT, "LICENSE"), encoding="utf-8") as fh:
        text = fh.read()
    assert text.startswith("MIT License\n") and "Copyright (c) the clip-supervisor authors" in text
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(os.path.join(ROOT, "setup.cfg"), encoding="utf-8")
    assert parser.get("metadata", "license") == "MIT"
    assert parser.get("metadata", "license_files").split() == ["LICENSE"]


# --- built: slow --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Iterator[dict[str, str]]:
    """sdist and wheel, built by ``python -m build`` (the wheel from the sdist) from a copy of
    this tree: the build writes egg-info and build/ into its source folder, and the checkout
    is shared."""
    folder = tmp_path_factory.mktemp("build")
    src = folder / "src"
    ignore = shutil.ignore_patterns(".git", ".venv", "dist", "build", "*.egg-info",
                                    "__pycache__", ".pytest_cache", ".ruff_cache", "bench")
    shutil.copytree(ROOT, src, ignore=ignore, symlinks=True)
    out = folder / "dist"
    _run([sys.executable, "-m", "build", "--outdir", str(out), str(src)], timeout=600,
         env=_clean_env())
    names = os.listdir(out)
    sdist = [n for n in names if n.endswith(".tar.gz")]
    wheel = [n for n in names if n.endswith(".whl")]
    assert len(sdist) == 1 and len(wheel) == 1, names
    yield {"sdist": str(out / sdist[0]), "wheel": str(out / wheel[0]), "tmp": str(folder)}


def _record(wheel: str) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


@pytest.mark.slow
@pytest.mark.timeout(900)  # builds, and pip installs from PyPI on a cold cache
def test_the_wheel_installs_nothing_at_the_top_but_its_own_package(built):
    names = _record(built["wheel"])
    tops = {name.split("/", 1)[0] for name in names}
    assert tops == {"clip_supervisor", f"clip_supervisor-{_version()}.dist-info"}, tops
    # And it carries every module of the tree, the dashboard's files and the sample
    for package in ("supervisor", "worker"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith((".py", ".html", ".js", ".css")):
                    rel = os.path.relpath(os.path.join(dirpath, name), ROOT)
                    assert f"clip_supervisor/root/{rel}" in names, rel
    assert "clip_supervisor/root/etc/clip-supervisor.conf" in names
    # and die-with-parent (setup.py builds it; every ffmpeg starts through it), runnable
    helper = "clip_supervisor/root/worker/die-with-parent"
    with zipfile.ZipFile(built["wheel"]) as zf:
        assert (zf.getinfo(helper).external_attr >> 16) & 0o111 == 0o111
    assert "linux" in os.path.basename(built["wheel"])  # a binary: the wheel says for where
    assert f"clip_supervisor-{_version()}.dist-info/licenses/LICENSE" in names
    with zipfile.ZipFile(built["wheel"]) as zf:
        meta = zf.read(f"clip_supervisor-{_version()}.dist-info/METADATA").decode()
        entry = zf.read(f"clip_supervisor-{_version()}.dist-info/entry_points.txt").decode()
    assert "License: MIT" in meta or "License-Expression: MIT" in meta
    assert "Classifier: Operating System :: POSIX :: Linux" in meta
    assert "clip-supervisor = clip_supervisor:main" in entry


class Venv:
    """A fresh virtual environment of its own (no system site-packages)."""

    def __init__(self, path: str) -> None:
        self.path = path
        venv.EnvBuilder(with_pip=True, clear=True).create(path)
        self.bin = os.path.join(path, "bin")
        self.site_packages = self.run("python", "-c", "import sysconfig; "
                                      "print(sysconfig.get_path('purelib'))").stdout.strip()

    def run(self, *cmd: str, check: bool = True, cwd: str | None = None,
            timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
        exe = cmd[0] if os.path.isabs(cmd[0]) else os.path.join(self.bin, cmd[0])
        # Run from an empty folder: nothing of this checkout may be found through cwd.
        done = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, timeout=timeout,
                              cwd=cwd or self.path, env=_clean_env(**env))
        if check and done.returncode != 0:
            raise AssertionError(f"{cmd} exited {done.returncode}:\n{done.stdout}\n"
                                 f"{done.stderr}")
        return done

    def pip(self, *args: str) -> subprocess.CompletedProcess:
        return self.run("python", "-m", "pip", "--disable-pip-version-check", *args,
                        timeout=600)

    def files_of(self, distribution: str) -> set[str]:
        code = ("import importlib.metadata as m, json, sys; "
                "print(json.dumps([str(f) for f in m.distribution(sys.argv[1]).files]))")
        return set(json.loads(self.run("python", "-c", code, distribution).stdout))


def _conf(env: Env) -> str:
    """A configuration for the installed daemon: Redis, folders, fast jobs that clip nothing
    (the noop pipeline: this is about imports and processes, not ffmpeg)."""
    env.settings["supervisor"]["workers"] = 1
    env.settings["job"]["pipeline"] = "noop"
    return env.conf


def _clip_supervisor_works(v: Venv, env: Env, conf: str, job_id: str) -> None:
    assert v.run("clip-supervisor", "--version").stdout == f"clip-supervisor {_version()}\n"
    with open(SAMPLE, encoding="utf-8") as fh:
        assert v.run("clip-supervisor", "sample-config").stdout == fh.read()
    check = v.run("clip-supervisor", "run", "--check-config", "--config", conf)
    assert check.stdout == f"configuration ok ({conf})\n"
    # And the daemon runs for real: the master forks a worker that takes and finishes a job
    proc = subprocess.Popen([os.path.join(v.bin, "clip-supervisor"), "run", "--config", conf],
                            cwd=v.path, env=_clean_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    env.procs.append(proc)
    try:
        enq = v.run("clip-supervisor", "enqueue", env.url("ten.mp4"), "--id", job_id, "--wait",
                    "--timeout", "60", "--config", conf, timeout=90)
        assert enq.returncode == 0 and job_id in enq.stdout
    finally:
        proc.terminate()
        assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else ""
    assert job_id in {e["id"] for e in env.done_events()}


def _supervisord_works(v: Venv) -> None:
    assert v.run("supervisord", "--version").stdout.strip() == "4.3.0"
    assert "[supervisord]" in v.run("echo_supervisord_conf").stdout
    where = v.run("python", "-c", "import supervisor; print(supervisor.__file__)").stdout
    assert where.strip() == os.path.join(v.site_packages, "supervisor", "__init__.py")


@pytest.mark.slow
@pytest.mark.timeout(900)  # builds, and pip installs from PyPI on a cold cache
def test_supervisord_and_clip_supervisor_share_one_environment(built, env, tmp_path):
    # Given a fresh environment with supervisord from PyPI, then our wheel
    v = Venv(str(tmp_path / "venv"))
    v.pip("install", "--quiet", SUPERVISORD)
    v.pip("install", "--quiet", built["wheel"])
    conf = _conf(env)

    # Then no file belongs to both distributions, and both run
    ours, theirs = v.files_of("clip-supervisor"), v.files_of("supervisor")
    assert not ours & theirs, sorted(ours & theirs)[:5]
    assert not [f for f in ours if f.startswith(("supervisor/", "worker/"))]
    _supervisord_works(v)
    _clip_supervisor_works(v, env, conf, "beside-supervisord")
    # And our processes import our packages; the Python processes we start do too
    code = ("import clip_supervisor, subprocess, sys; clip_supervisor.activate(); "
            "import supervisor.cli; print(supervisor.cli.__file__); sys.stdout.flush(); "
            "subprocess.run([sys.executable, '-c', "
            "'import supervisor.cli, worker; print(supervisor.cli.__file__)'], check=True)")
    files = v.run("python", "-c", code).stdout.split()
    assert files == [os.path.join(v.site_packages, "clip_supervisor", "root", "supervisor",
                                  "cli.py")] * 2
    # And once supervisord is imported, a process cannot also take ours: it says so
    both = v.run("python", "-c", "import supervisor, clip_supervisor; clip_supervisor.activate()",
                 check=False)
    assert both.returncode == 1 and "another 'supervisor' package" in both.stderr

    # When supervisord is uninstalled, ours is whole
    v.pip("uninstall", "--yes", "--quiet", "supervisor")
    assert not os.path.exists(os.path.join(v.bin, "supervisord"))
    _clip_supervisor_works(v, env, conf, "after-supervisord")

    # And the other way round: supervisord installed again, ours removed, supervisord whole
    v.pip("install", "--quiet", SUPERVISORD)
    v.pip("uninstall", "--yes", "--quiet", "clip-supervisor")
    _supervisord_works(v)
    assert not os.path.exists(os.path.join(v.site_packages, "clip_supervisor"))


@pytest.mark.slow
@pytest.mark.timeout(900)  # builds, and pip installs from PyPI on a cold cache
def test_the_sdist_holds_a_test_suite_that_runs(built, tmp_path):
    # Given the sdist, unpacked
    with tarfile.open(built["sdist"]) as tf:
        tf.extractall(tmp_path, filter="tar")
        members = {m.name.split("/", 1)[1]: m for m in tf.getmembers() if "/" in m.name}
    tree = str(tmp_path / f"clip_supervisor-{_version()}")
    for name in ("LICENSE", "README.md", "setup.cfg", "pyproject.toml", "MANIFEST.in",
                 "tests/conftest.py", "tests/httpd.py", "tests/__init__.py",
                 "tests/test_job.py", "etc/clip-supervisor.conf",
                 "etc/systemd/clip-supervisor.service", "scripts/test.sh", "scripts/setup.sh",
                 "clip_supervisor/__init__.py", "supervisor/cli.py", "worker/runner.py",
                 "setup.py", "worker/die_with_parent.c"):
        assert name in members, f"{name} is not in the sdist"
    assert "worker/die-with-parent" not in members  # built from source where it installs
    # (scripts keep their x bit: scripts/test.sh is the README's test command)
    for name in ("scripts/test.sh", "scripts/setup.sh", "etc/init.d/clip-supervisor"):
        assert members[name].mode & 0o111, name
    assert not [n for n in members if "__pycache__" in n or n.startswith(("bench/", ".git/"))]

    # When a part of its suite runs from the unpacked tree (with this environment's tools)
    where = _run([sys.executable, "-c", "import worker; print(worker.__file__)"], cwd=tree,
                 env=_clean_env())
    assert where.stdout.strip() == os.path.join(tree, "worker", "__init__.py")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_job.py", "tests/test_packaging.py", "-m", "not slow"],
                          cwd=tree, env=_clean_env(), capture_output=True, text=True,
                          timeout=600)

    # Then it passes
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and " failed" not in done.stdout

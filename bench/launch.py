"""What it costs to start ffmpeg so that it dies with its worker, per way of doing it.

A worker starts one ffmpeg per clip, and a copy clip costs ffmpeg only ~80 ms of CPU, so a
millisecond per start shows. Each candidate starts a trivial program (``/bin/true``, so
that ffmpeg's own start-up does not drown the difference) N times from a process the size
of a worker (~30 MB of Python heap), in paired rounds (the candidates take turns, in an
order that changes each round), and reports the CPU (this process and its children) and
wall time per start, median over rounds, and the extra over a bare start:

- ``bare``: ``subprocess.Popen`` in a session of its own, as the worker starts ffmpeg, with
  nothing that makes the child die with us: the floor. (A master that is a child subreaper
  and kills its dead workers' orphans costs this per start: nothing is done per child.)
- ``die-with-parent``: ``die-with-parent program``, the static program without a C library
  that setup.py builds from worker/die_with_parent.c: what worker.media does.
- ``setpriv``: ``setpriv --pdeathsig KILL -- program`` (util-linux): worker.media's first
  fallback, when die-with-parent was not built.
- ``preexec``: ``prctl(PR_SET_PDEATHSIG)`` in a ``preexec_fn`` (worker.media's last resort):
  Python must fork the whole worker (no vfork) and run Python in the child.
- ``launcher``: a long-lived launcher process per worker (forked once, small): the worker
  hands it the child's pipes over a Unix socket (SCM_RIGHTS); it forks, sets the
  parent-death signal in the child, execs, and reports the pid and the exit status.
- ``glibc-helper``: the same 10 lines as die-with-parent with the C library, statically
  linked (built here with ``cc`` when there is one): what glibc's start-up costs.

With ``--ffmpeg``, each start is a real copy clip instead (10 s of the 720p source of
bench.clips, the floor's command, one at a time, 40 starts a round by default): what each
way adds next to ffmpeg's own ~80 ms, whose spread is then the noise; and ``startup-only``,
a bare start of ``ffmpeg -hide_banner -version``: ffmpeg starting (loading its shared
libraries) and exiting without a clip, the part of a clip no daemon can make cheaper.

Usage: python -m bench.launch [--starts 300] [--rounds 6] [--ffmpeg]
"""

from __future__ import annotations

import argparse
import array
import contextlib
import ctypes
import os
import resource
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable

from bench import harness as h
from bench.clips import CLIP_SECONDS, floor_command

PROGRAM = shutil.which("true") or "/bin/true"
PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)

HELPER_C = r"""
#include <signal.h>
#include <sys/prctl.h>
#include <unistd.h>
int main(int argc, char **argv) {
    pid_t parent = getppid();
    if (argc < 2 || prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != parent) return 126;
    execv(argv[1], argv + 1);
    return 127;
}
"""


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _die_with_parent() -> None:
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _popen(argv: list[str], preexec: Callable[[], None] | None = None) -> None:
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=preexec)
    proc.communicate()


class Launcher:
    """The long-lived launcher: forked once; per start, one message each way and back."""

    def __init__(self) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.pid = os.fork()
        if self.pid == 0:  # the launcher: small, it forks cheaply
            self.sock.close()
            code = 0
            try:
                self._serve(theirs)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        theirs.close()
        self.devnull = os.open(os.devnull, os.O_RDONLY)
        self.started = _cpu_of(self.pid)

    @staticmethod
    def _serve(sock: socket.socket) -> None:
        _die_with_parent()
        while True:
            msg, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(3 * 4))
            if not msg:
                return
            fds = array.array("i")
            fds.frombytes(ancillary[0][2])
            pid = os.fork()
            if pid == 0:
                try:
                    _die_with_parent()
                    os.setsid()
                    for target, fd in enumerate(fds):
                        os.dup2(fd, target)
                    argv = msg.decode().split("\0")
                    os.execv(argv[0], argv)
                finally:
                    os._exit(127)
            for fd in fds:
                os.close(fd)
            sock.send(str(pid).encode())
            _, status = os.waitpid(pid, 0)
            sock.send(str(status).encode())

    def start(self, argv: list[str]) -> None:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        fds = array.array("i", [self.devnull, out_w, err_w])
        self.sock.sendmsg(["\0".join(argv).encode()],
                          [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        os.close(out_w)
        os.close(err_w)
        int(self.sock.recv(64))  # the pid: a worker would watch and kill by it
        for fd in (out_r, err_r):
            while os.read(fd, 65536):
                pass
            os.close(fd)
        int(self.sock.recv(64))  # the exit status

    def cpu(self) -> float:
        return _cpu_of(self.pid) - self.started

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


def _cpu_of(pid: int) -> float:
    """CPU seconds of process ``pid`` and of the children it has reaped (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def build_helper() -> str | None:
    """The static C helper, built once into bench/.cache; None without a C compiler."""
    cc = shutil.which("cc")
    if cc is None:
        return None
    os.makedirs(h.CACHE, exist_ok=True)
    path = os.path.join(h.CACHE, "pdeathsig-exec")
    if not os.path.exists(path):
        source = path + ".c"
        with open(source, "w") as fh:
            fh.write(HELPER_C)
        built = subprocess.run([cc, "-O2", "-static", "-o", path, source],
                               capture_output=True, check=False)
        if built.returncode != 0:
            h.note(f"cannot build the C helper: {built.stderr.decode()[-300:]}")
            return None
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--starts", type=int, default=0,
                        help="starts per candidate and round (300; 40 with --ffmpeg)")
    parser.add_argument("--ffmpeg", action="store_true",
                        help="start a real copy clip instead of /bin/true")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    args.starts = args.starts or (40 if args.ffmpeg else 300)

    launcher = Launcher()  # forked while this process is small, as a worker would at its start
    ballast = [bytearray(1 << 20) for _ in range(30)]  # a worker's size: fork copies its tables
    setpriv = shutil.which("setpriv")
    helper = build_helper()
    ours = subprocess.run([h.clip_python(), "-c", "from worker import media; print(media._HELPER)"],
                          capture_output=True, text=True, check=True).stdout.strip()
    target = [PROGRAM]
    if args.ffmpeg:
        name, seconds, size, bitrate = h.SOURCE_720P
        out = os.path.join(h.tmpdir("launch"), "clip.mp4")
        target = floor_command(h.media(name, seconds, size, bitrate), out,
                               (seconds - CLIP_SECONDS) / 2, "copy")
        target[0] = shutil.which(target[0]) or target[0]
    candidates: dict[str, Callable[[], None]] = {"bare": lambda: _popen(target)}
    if os.access(ours, os.X_OK):
        candidates["die-with-parent"] = lambda: _popen([ours, *target])
    else:
        h.note(f"{ours} was not built (no C compiler at install?): not measured")
    if setpriv:
        candidates["setpriv"] = lambda: _popen([setpriv, "--pdeathsig", "KILL", "--", *target])
    candidates["preexec"] = lambda: _popen(target, _die_with_parent)
    candidates["launcher"] = lambda: launcher.start(target)
    if helper:
        candidates["glibc-helper"] = lambda: _popen([helper, *target])
    if args.ffmpeg:  # ffmpeg starting and exiting, no clip: what of a clip is its start-up
        candidates["startup-only"] = lambda: _popen([target[0], "-hide_banner", "-version"])

    cpu: dict[str, list[float]] = {name: [] for name in candidates}
    wall: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order if r % 2 == 0 else order[::-1]:
            start = candidates[name]
            spent = launcher.cpu() if name == "launcher" else 0.0
            c0, t0 = _cpu(), time.perf_counter()
            for _ in range(args.starts):
                start()
            took = time.perf_counter() - t0
            spent = _cpu() - c0 + (launcher.cpu() - spent if name == "launcher" else 0.0)
            cpu[name].append(spent / args.starts * 1e3)
            wall[name].append(took / args.starts * 1e3)
        h.note(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n} {cpu[n][-1]:.2f} ms CPU" for n in names))
    launcher.close()
    del ballast

    median = {name: h.median(values) for name, values in cpu.items()}
    bare = median["bare"]
    extra = {name: median[name] - bare for name in names}
    parts = [f"{name} {median[name]:.2f} ms CPU ({extra[name]:+.2f}; wall "
             f"{h.median(wall[name]):.2f} ms; range {min(cpu[name]):.2f}-{max(cpu[name]):.2f})"
             for name in names]
    what = "a 10 s copy clip with ffmpeg" if args.ffmpeg else PROGRAM
    line = (f"launch: CPU per start of {what}, median of {args.rounds} paired rounds of "
            f"{args.starts}: " + "; ".join(parts))
    h.emit("launch-ffmpeg" if args.ffmpeg else "launch", line,
           {"program": target, "starts": args.starts, "rounds": args.rounds, "cpu_ms": cpu,
            "wall_ms": wall, "median_cpu_ms": median, "extra_cpu_ms": extra})


if __name__ == "__main__":
    main()

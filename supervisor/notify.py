"""Readiness for systemd's Type=notify, spoken on a plain socket (sd_notify(3)).

systemd names a unix datagram socket in $NOTIFY_SOCKET (a leading "@" means Linux's
abstract namespace); one datagram of newline-separated VAR=VALUE lines tells it the
service's state. No library is needed, and without the variable (another init, a
terminal) every call does nothing. The master calls ``ready()`` once it serves: from then
on "systemctl start" has its answer.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping

SOCKET_VARIABLE = "NOTIFY_SOCKET"


def notify(state: str, environ: MutableMapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. "READY=1") to systemd; True when it was sent. A failure to send
    is not raised: a service manager that cannot be told is no reason to stop serving (it
    will time the start out and say so itself)."""
    environ = os.environ if environ is None else environ
    address = environ.get(SOCKET_VARIABLE, "")
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        return False  # unset, or a form we do not speak (vsock:...)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True


def ready(environ: MutableMapping[str, str] | None = None) -> bool:
    """Tell systemd the master is up and serving, then forget the socket, so that workers
    forked from now on (and their ffmpeg) never see it: only the main process speaks for
    the service (the unit says NotifyAccess=main)."""
    environ = os.environ if environ is None else environ
    sent = notify("READY=1\nSTATUS=serving", environ)
    environ.pop(SOCKET_VARIABLE, None)
    return sent

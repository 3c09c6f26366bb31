"""A TCP proxy on 127.0.0.1 that a test controls, to put a network fault between one client
and its server (e.g. one supervisor and Redis):

    forward     bytes flow both ways (the start state)
    blackhole   nothing flows either way, yet every socket stays open: clients hang until
                their own timeouts, as behind a partition that drops packets. Bytes sent
                meanwhile wait in the kernel's buffers and are delivered on ``resume``, as
                TCP delivers retransmitted segments once a partition heals.
    cut         every open connection is closed (a reset, a restarted middlebox)
    resume      back to forward

New connections are accepted in every state; behind a black hole they reach nothing.
"""

from __future__ import annotations

import contextlib
import socket
import threading


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = False
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self.accepted = 0
        threading.Thread(target=self._accept, name="tcpproxy-accept", daemon=True).start()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    # --- what a test calls -------------------------------------------------------------------

    def blackhole(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def cut(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, set()
        for sock in conns:
            _close(sock)

    def close(self) -> None:
        self._closed = True
        _close(self._listener)
        self.cut()
        self._flowing.set()  # frees the pumps, which then find their sockets closed

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- inside ------------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._conns |= {client, upstream}
                self.accepted += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), name="tcpproxy-pump",
                                 daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                self._flowing.wait()
                data = src.recv(65536)
                if not data:
                    break
                # Read while flowing, blocked before sending: hold it until the hole closes.
                self._flowing.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns -= {src, dst}
            _close(src)
            _close(dst)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()

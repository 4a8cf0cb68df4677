"""A TCP proxy on 127.0.0.1 that can stall: it forwards to a real server until told to stall,
then accepts connections and never answers (a hung load balancer or proxy in front of a store).

Everything stays on 127.0.0.1; each connection's threads end when either side closes or
when the proxy is stopped.
"""

from __future__ import annotations

import contextlib
import socket
import threading


class StallingProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.stalled = threading.Event()
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> StallingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._listener.close()
        for s in self._held:
            with contextlib.suppress(OSError):
                s.close()

    def stall(self) -> None:
        """From now on: new connections are accepted and never answered; open ones go silent."""
        self.stalled.set()

    def resume(self) -> None:
        self.stalled.clear()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._held.append(client)
            if self.stalled.is_set():
                continue  # accepted, read never, answered never
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            self._held.append(upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        src.settimeout(0.2)
        while not self._stop.is_set():
            if self.stalled.is_set():
                self._stop.wait(0.2)  # hold the connection open, forward nothing
                continue
            try:
                data = src.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            try:
                dst.sendall(data)
            except OSError:
                break
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

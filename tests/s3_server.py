"""A real S3-compatible server on 127.0.0.1 for the object-storage tests (moto's server mode, in a subprocess),
a TCP proxy in front of it that can go down or cut responses short, the way a network fails, and a static
HTTP file server that honours byte ranges (a corpus published on a web server).

Nothing here patches a client: carat talks HTTP to these sockets through s3fs/botocore exactly as it would to
AWS, MinIO or Ceph (``AWS_ENDPOINT_URL``).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import os
import re
import socket
import subprocess
import sys
import threading
from typing import Iterator

from tests.ports import free_port, wait_for_port


@contextlib.contextmanager
def moto_server(**env: str) -> Iterator[str]:
    """``python -m moto.server`` on a free port of 127.0.0.1; yields its endpoint URL. ``env``: moto settings
    (``INITIAL_NO_AUTH_ACTION_COUNT=0`` makes it check credentials like AWS does)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **env})
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class FaultyProxy:
    """Forwards 127.0.0.1:<port> to an upstream server. ``mode``: "pass"; "cut" (each connection's first
    response with a body is cut off halfway through its body, then the connection closes: a body cut short).
    :meth:`down` stops listening (connection refused), :meth:`up` listens again on the same port."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.port = free_port()
        self._mode = "pass"
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.cuts = 0
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self.up()

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        """Switch, closing the connections of the old mode (clients keep connections alive between requests)."""
        self._mode = mode
        self._drop_connections()

    def _drop_connections(self) -> None:
        with self._lock:
            sockets, self._open = list(self._open), set()
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        self._drop_connections()  # an outage also breaks the connections a client keeps alive

    def close(self) -> None:
        self.down()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            if self._listener is not listener:
                client.close()
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        except OSError:
            client.close()
            return
        with self._lock:
            self._open.update((client, upstream))
        threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
        if self._mode == "cut":
            self._pump_cut(upstream, client)
        else:
            self._pump(upstream, client)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close_both(src, dst)

    def _pump_cut(self, src: socket.socket, dst: socket.socket) -> None:
        """Forward the response head and half of its body, then close both sides."""
        buffered = b""
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    return
                buffered += data
                head_end = buffered.find(b"\r\n\r\n")
                if head_end < 0:
                    continue
                head = buffered[:head_end].decode("latin-1").lower()
                length = next((int(line.split(":", 1)[1]) for line in head.split("\r\n")
                               if line.startswith("content-length:")), 0)
                if length < 2:  # no body to cut (HEAD, errors): pass it on and keep going
                    dst.sendall(buffered)
                    buffered = b""
                    continue
                while len(buffered) < head_end + 4 + length // 2:
                    more = src.recv(65536)
                    if not more:
                        break
                    buffered += more
                dst.sendall(buffered[: head_end + 4 + length // 2])
                self.cuts += 1
                return
        except OSError:
            pass
        finally:
            _close_both(src, dst)


def _close_both(*sockets: socket.socket) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


class _RangeFileHandler(http.server.SimpleHTTPRequestHandler):
    """A static file server that answers ``Range: bytes=a-b`` with 206 (the standard library's answers 200 with
    the whole file), as nginx, S3 website endpoints and CDNs do."""

    def log_message(self, *args) -> None:
        pass

    def send_head(self):
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        path = self.translate_path(self.path)
        if wanted is None or not os.path.isfile(path):
            return super().send_head()
        size = os.path.getsize(path)
        start, end = int(wanted.group(1)), min(int(wanted.group(2) or size - 1), size - 1)
        with open(path, "rb") as handle:
            handle.seek(start)
            body = handle.read(end - start + 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        return io.BytesIO(body)


@contextlib.contextmanager
def http_file_server(directory: str) -> Iterator[str]:
    """``directory`` served read-only over HTTP on a free port of 127.0.0.1 (directory pages list its files);
    yields the base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_RangeFileHandler,
                                                                                 directory=directory))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()

"""Free TCP ports on 127.0.0.1 for servers the tests start (never a fixed number: another test, a leftover
process or a second checkout on the machine may hold it)."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

"""Free and busy TCP ports: where the servers we start may listen."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (for tests, ``--port 0``, temporary servers)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    """Whether ``host:port`` cannot be bound (something listens there, or is about to)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        # Same option uvicorn uses: a port in TIME_WAIT after a clean stop counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET

"""Ports on this machine, for the launcher, the embedded Valkey and tests."""

from __future__ import annotations

import socket

HOST = "127.0.0.1"


def find_free_port(host: str = HOST) -> int:
    """A TCP port nothing listens on right now (the OS picks it; another process may take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])

"""Ports on this machine, for the launcher, the embedded Valkey and tests: the one port check."""

from __future__ import annotations

import socket

HOST = "127.0.0.1"


def find_free_port(host: str = HOST) -> int:
    """A TCP port nothing listens on right now (the OS picks it; another process may take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    """Whether a listening socket could bind host:port now (TIME_WAIT leftovers do not count, as servers
    bind with SO_REUSEADDR)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True

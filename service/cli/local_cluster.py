"""`personalize up --workers N` (N > 1): a cluster on one machine. `up` keeps the embedded Valkey, the
supervised trainer and the router in its own process, and runs N `personalize serve --role worker`
children (node ids worker-0 .. worker-N-1, each on a free loopback port `up` picks, the same Valkey and
store, each its own DATA_DIR/workers/<node id> for its disk cache and its log).

A worker that dies is restarted, like a Kubernetes pod: same node id, data dir and advertised address,
after a backoff of 1 s doubling to 30 s (reset once it has served a minute), at most `--worker-restarts`
times (0 = never: the router routes its users to the others). While it is down the router does that
too. Their pids and ports are in DATA_DIR/workers.json, `{node_id: {"pid": P, "port": N}}`, rewritten
on every restart. `--worker-advertise` gives each worker the address it announces (a proxy or sidecar in
front of its port); by default it announces 127.0.0.1:port.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personalize.errors import Unavailable
from personalize.routing.membership import SERVING, Membership, MembershipConfig, NodeInfo, membership_client
from personalize_service.cli import settings
from personalize_service.net import find_free_port

log = logging.getLogger(__name__)

WORKER_KEYS = (
    "model.",
    "lora.",
    "load_timeout_s",
    "degrade_to_base",
    "engine.",
    "limits.",
    "feedback.",
    "service.grace_s",
    "service.threads",
)
"""Settings `up` passes on to its worker processes (API keys go by environment, never on a command line)."""
JOIN_TIMEOUT_S = 300.0
"""How long `up` waits for its workers to load the model and join the ring."""
STOP_TIMEOUT_S = 30.0
"""Beyond the workers' grace period, how long `up` waits for them to exit before killing them."""
RESTART_BACKOFF_S = (1.0, 30.0)
"""A dead worker is restarted after 1 s, doubling per quick death up to 30 s."""
HEALTHY_RUN_S = 60.0
"""A worker that ran this long before dying is restarted after the shortest backoff again."""
_PR_SET_PDEATHSIG = 1
_prctl: Any = None
with contextlib.suppress(Exception):  # resolved here: the child between fork and exec only makes the call
    _prctl = ctypes.CDLL(None, use_errno=True).prctl


@dataclass
class WorkerProcess:
    """One worker child of `up`."""

    node_id: str
    process: subprocess.Popen[bytes]
    data_dir: Path
    """Its own data dir: disk cache and worker.log."""
    port: int
    """The port it listens on (up picks it)."""
    advertise: str
    """The address it announces (empty = 127.0.0.1:port)."""
    started_at: float = 0.0
    restarts: int = 0
    terminated: bool = False
    """SIGTERM sent (a second one would interrupt its graceful stop)."""

    @property
    def log_path(self) -> Path:
        return self.data_dir / "worker.log"

    def log_tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""


def worker_command(
    values: Mapping[str, Any], node_id: str, data_dir: Path, port: int, advertise: str = ""
) -> list[str]:
    """The `personalize serve --role worker` command line of one of up's workers (the store and registry URLs,
    which may hold credentials, go by environment: see worker_environment)."""
    args = [
        sys.executable,
        "-m",
        "personalize_service.cli",
        "serve",
        "--role",
        "worker",
        "--node-id",
        node_id,
        "--data-dir",
        str(data_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    if advertise:
        args += ["--advertise-address", advertise]
    for setting in settings.SETTINGS:
        if setting.key.startswith(WORKER_KEYS) and settings.SERVE in setting.commands:
            args += [setting.flag, setting.show(values[setting.key])]
    return args


def worker_environment(values: Mapping[str, Any], store_url: str, registry_url: str = "") -> dict[str, str]:
    """This process's environment without PERSONALIZE_* (flags carry the resolved settings), plus what must
    not show on a command line: the store URL (it may carry S3 credentials) and the API keys, so every
    worker authenticates the tenants the router does."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONALIZE_")}
    env[settings.BY_KEY["store_url"].env] = store_url
    if registry_url:
        env[settings.BY_KEY["registry.url"].env] = registry_url  # it carries the registry's password
    if values["service.api_keys_file"]:
        env[settings.BY_KEY["service.api_keys_file"].env] = str(values["service.api_keys_file"])
    if values["service.api_keys"]:
        env[settings.BY_KEY["service.api_keys"].env] = str(values["service.api_keys"])
    if values["service.operator_keys"]:
        env[settings.BY_KEY["service.operator_keys"].env] = str(values["service.operator_keys"])
    return env


def advertise_list(text: str, count: int) -> list[str]:
    """`--worker-advertise` as one address per worker ("" each when empty); ValueError when it does not
    name exactly `count` host:port addresses."""
    if not text.strip():
        return [""] * count
    addresses = [a.strip() for a in text.split(",")]
    if len(addresses) != count or not all(a.rpartition(":")[0] and a.rpartition(":")[2].isdigit() for a in addresses):
        raise ValueError(
            f"--worker-advertise {text!r}: give {count} comma-separated host:port addresses, one per worker"
        )
    return addresses


def die_with_parent() -> None:
    """In the child before exec: SIGTERM it when `up` dies, even by SIGKILL (Linux; elsewhere a no-op)."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


class WorkerProcesses:
    """up's worker children: started together, waited for until they are on the ring, restarted when one
    dies, stopped together.

    Each runs in its own session, so a Ctrl-C reaches only `up`, which then stops them in order (the
    router first); if `up` itself is killed, the kernel sends them SIGTERM.
    """

    def __init__(
        self, values: Mapping[str, Any], count: int, registry_url: str, store_url: str, data_dir: Path
    ) -> None:
        self.values = values
        self.count = count
        self.registry_url = registry_url
        self.store_url = store_url
        self.data_dir = data_dir
        self.max_restarts = int(values.get("worker_restarts", 0))
        self.advertise = advertise_list(str(values.get("worker_advertise", "")), count)
        self.workers: dict[str, WorkerProcess] = {}
        self._env = worker_environment(values, store_url, registry_url)
        self._lock = threading.Lock()  # guards spawning and workers.json against stop()
        self._stop = threading.Event()
        self._monitor = threading.Thread(target=self._watch_exits, name="worker-monitor", daemon=True)

    @property
    def pids_file(self) -> Path:
        return self.data_dir / "workers.json"

    def start(self) -> WorkerProcesses:
        for index in range(self.count):
            node_id = f"worker-{index}"
            own = self.data_dir / "workers" / node_id
            own.mkdir(parents=True, exist_ok=True)
            self.workers[node_id] = self._spawn(node_id, own, self.advertise[index])
        return self

    def _spawn(self, node_id: str, own: Path, advertise: str) -> WorkerProcess:
        port = find_free_port()
        command = worker_command(self.values, node_id, own, port, advertise)
        with open(own / "worker.log", "ab") as out:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self._env,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        return WorkerProcess(node_id, process, own, port, advertise, started_at=time.monotonic())

    def wait_joined(
        self, membership: MembershipConfig, stop: threading.Event, timeout_s: float = JOIN_TIMEOUT_S
    ) -> dict[str, NodeInfo]:
        """Block until every worker serves on the ring; returns their membership records. RuntimeError
        (with the log tail) if one exits first or they take longer than `timeout_s`; {} if `stop` is set."""
        reader = Membership(membership_client(self.registry_url), membership)
        deadline = time.monotonic() + timeout_s
        while not stop.wait(0.2):
            self._check_alive()
            with contextlib.suppress(Unavailable):
                nodes = {n: info for n, info in reader.nodes().items() if n in self.workers and info.state == SERVING}
                if len(nodes) == len(self.workers):
                    self._record()
                    self._monitor.start()
                    return nodes
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"workers did not join within {timeout_s:.0f}s; see their logs under {self.data_dir / 'workers'}"
                )
        return {}

    def terminate(self) -> None:
        """SIGTERM every live worker, once (each drains, then leaves membership); returns at once. No
        worker is restarted from now on."""
        with self._lock:
            self._stop.set()
            for worker in self.workers.values():
                if worker.process.poll() is None and not worker.terminated:
                    worker.terminated = True
                    with contextlib.suppress(ProcessLookupError):
                        worker.process.terminate()

    def stop(self, grace_s: float) -> None:
        """terminate(), then wait for the workers to exit, killing those still running after grace_s plus
        STOP_TIMEOUT_S."""
        self.terminate()
        deadline = time.monotonic() + grace_s + STOP_TIMEOUT_S
        for worker in self.workers.values():
            try:
                worker.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in time; killing it", worker.node_id)
                worker.process.kill()
                worker.process.wait()
        if self._monitor.is_alive():
            self._monitor.join(5.0)
        self.pids_file.unlink(missing_ok=True)

    def _check_alive(self) -> None:
        for worker in self.workers.values():
            code = worker.process.poll()
            if code is not None:
                raise RuntimeError(
                    f"{worker.node_id} exited with status {code} while starting; the end of "
                    f"{worker.log_path}:\n{worker.log_tail()}"
                )

    def _record(self) -> None:
        """Write workers.json (atomically: tests and the chaos runner read it while up runs)."""
        record = {w.node_id: {"pid": w.process.pid, "port": w.port} for w in self.workers.values()}
        tmp = self.pids_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(self.pids_file)

    def _watch_exits(self) -> None:
        """Restart each worker that exits while up runs (with backoff, up to max_restarts times)."""
        due: dict[str, float] = {}  # node id -> when to restart it
        backoff: dict[str, float] = {}
        given_up: set[str] = set()
        while not self._stop.wait(0.25):
            now = time.monotonic()
            for node_id, worker in list(self.workers.items()):
                code = worker.process.poll()
                if code is None or node_id in given_up or (node_id in due and now < due[node_id]):
                    continue
                if node_id not in due:
                    if worker.restarts >= self.max_restarts:
                        given_up.add(node_id)
                        log.warning(
                            "%s (pid %d) exited with status %s and is not restarted (%d restarts "
                            "allowed): the router sends its users to the other workers (log: %s)",
                            node_id,
                            worker.process.pid,
                            code,
                            self.max_restarts,
                            worker.log_path,
                        )
                        continue
                    quick = now - worker.started_at < HEALTHY_RUN_S
                    wait = (
                        min(RESTART_BACKOFF_S[1], 2 * backoff.get(node_id, RESTART_BACKOFF_S[0] / 2))
                        if quick
                        else RESTART_BACKOFF_S[0]
                    )
                    backoff[node_id] = wait
                    due[node_id] = now + wait
                    log.warning(
                        "%s (pid %d) exited with status %s; restarting it in %.0f s (log: %s)",
                        node_id,
                        worker.process.pid,
                        code,
                        wait,
                        worker.log_path,
                    )
                    continue
                del due[node_id]
                with self._lock:
                    if self._stop.is_set():
                        return
                    index = int(node_id.rsplit("-", 1)[1])
                    fresh = self._spawn(node_id, worker.data_dir, self.advertise[index])
                    fresh.restarts = worker.restarts + 1
                    self.workers[node_id] = fresh
                    self._record()
                log.info("%s restarted as pid %d on port %d", node_id, fresh.process.pid, fresh.port)

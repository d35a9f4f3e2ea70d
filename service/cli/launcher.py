"""Running the server commands: `personalize up` (everything on one machine) and `personalize serve`.

Both check what they can before loading the model (the port is free, the settings parse), wire the parts
with `personalize.worker.bootstrap`, and serve until SIGTERM/SIGINT (service/worker_server.serve; the
router role: service/router_server.serve_router). `up` adds an embedded Valkey (its data under
DATA_DIR/valkey, restarted on its AOF if it dies, stopped last so its AOF is complete) and a
`file://DATA_DIR/store` store (or `--store-url`), and with `--workers N` runs N worker processes behind
the router (service/cli/local_cluster.py).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from tqdm import tqdm

from personalize_service.cli import settings
from personalize_service.net import port_is_free

if TYPE_CHECKING:
    from personalize.config import Config
    from personalize_service.server.base import ServiceConfig

log = logging.getLogger(__name__)

ROLES = ("worker", "router", "trainer", "gateway")
"""Roles of `personalize serve`."""
UP_HOST = "127.0.0.1"
"""`personalize up` listens on loopback only: it has no TLS and, by default, no API keys."""
DEFAULT_PORT = 50051


class LaunchError(Exception):
    """A server command cannot start; the message says what to do."""


def check_ports(host: str, values: Mapping[str, Any]) -> None:
    """LaunchError naming the flag if the gRPC or metrics port (when not 0) is taken."""
    for key, flag in (
        ("service.port", "--port"),
        ("service.metrics_port", "--metrics-port"),
        ("http_port", "--http-port"),
    ):
        port = values.get(key)
        if port and not port_is_free(host, port):
            raise LaunchError(
                f"port {port} on {host} is already in use (another `personalize up`?): stop "
                f"what holds it, or choose another with {flag} N (0 picks a free one)"
            )


@contextmanager
def _stages(names: tuple[str, ...]) -> Iterator[Any]:
    """A progress bar over start-up stages on stderr (shown on a terminal only); yields `next(stage)`."""
    bar = tqdm(total=len(names), file=sys.stderr, disable=None, leave=False, bar_format="{desc} {bar} {n}/{total}")
    done = [0]

    def step() -> None:
        if done[0]:
            bar.update(1)
        if done[0] < len(names):
            bar.set_description_str(names[done[0]])
        done[0] += 1

    try:
        step()
        yield step
    finally:
        bar.close()


def run_up(values: Mapping[str, Any]) -> int:
    """`personalize up` with resolved setting values; blocks until SIGTERM/SIGINT. Returns 0 after a clean
    shutdown; raises LaunchError (or a domain error) when it cannot start.

    `--workers 1`: one worker in this process, no router. `--workers N`: N worker processes behind the
    router, which serves in this process (service/cli/local_cluster.py).
    """
    workers = values["workers"]
    if workers < 1:
        raise LaunchError(f"--workers {workers}: up needs at least 1 worker")
    check_ports(UP_HOST, values)
    values = share_cores(values, workers + 1 if workers > 1 else 2)  # the workers (or up's own) + the trainer
    data_dir = Path(values["data_dir"]).expanduser().resolve()
    resolved = settings.build({**values, "data_dir": str(data_dir)})
    # Imported here: torch and transformers take seconds, which client commands never pay.
    from personalize_service.cli.embedded import EmbeddedValkey, EmbeddedValkeyConfig
    from personalize_service.server.base import stop_on_signals

    up = _Up(values, resolved, data_dir, values["store_url"] or (data_dir / "store").as_uri(), threading.Event())
    stages = (
        ("starting valkey", "loading model", "starting server")
        if workers == 1
        else ("starting valkey", f"starting {workers} workers", "starting router")
    )
    with stop_on_signals(up.stop), _stages(stages) as step:
        valkey = EmbeddedValkey(EmbeddedValkeyConfig(data_dir=data_dir / "valkey")).start()
        keeper = threading.Thread(target=_keep_alive, args=(valkey, up.stop), name="valkey-keeper", daemon=True)
        try:
            step()
            up.registry_url = valkey.url
            _forget_stale_nodes(valkey.url)
            keeper.start()
            if workers == 1:
                _up_one_worker(up, step)
            else:
                _up_cluster(up, workers, step)
        finally:
            up.stop.set()
            if keeper.is_alive():
                keeper.join()
            valkey.stop()
    print("personalize up: stopped", flush=True)
    return 0


def share_cores(values: Mapping[str, Any], processes: int) -> dict[str, Any]:
    """`values` with torch threads per process set to this machine's cores split over `processes` (at
    least 1), unless --torch-threads names a number. torch's default, one thread per core in every
    process, oversubscribes the cores: under generate load the trainer then applies events several times
    slower, at no gain in generate throughput."""
    out = dict(values)
    if not out.get("model.threads"):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        out["model.threads"] = max(1, cores // max(1, processes))
    return out


def _keep_alive(valkey: Any, stop: threading.Event, poll_s: float = 0.5) -> None:
    """Until `stop`: restart the embedded Valkey on its port and AOF whenever it dies (a crash, kill -9).
    Clients reconnect on their next command; nothing acknowledged is lost (appendfsync always)."""
    from personalize_service.cli.embedded import EmbeddedValkeyError

    while not stop.wait(poll_s):
        try:
            if valkey.revive():
                log.warning("embedded valkey died; restarted it on %s from its AOF", valkey.safe_url)
        except EmbeddedValkeyError as exc:
            log.error("embedded valkey died and could not be restarted (retrying): %s", exc)


def redact_registry_url(url: str) -> str:
    """A redis:// URL with its password masked (for logs and banners)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")).geturl()


def _forget_stale_nodes(registry_url: str) -> None:
    """Membership records in up's own (just started) Valkey are a previous run's: drop them."""
    from personalize.routing.membership import Membership, MembershipConfig, membership_client

    client = membership_client(registry_url)
    try:
        Membership(client, MembershipConfig()).forget_all()
    finally:
        client.close()


@dataclass
class _Up:
    """What the parts of `personalize up` share."""

    values: Mapping[str, Any]
    resolved: settings.Resolved
    data_dir: Path
    store_url: str
    stop: threading.Event
    registry_url: str = ""

    def config(self) -> Config:
        """The root config with up's own registry (the embedded Valkey) and store."""
        base = self.resolved.config
        return replace(base, registry=replace(base.registry, url=self.registry_url), store_url=self.store_url)

    def service(self) -> ServiceConfig:
        """up's service config for a server in this process: on loopback, its shared limits (when on)
        through the embedded Valkey, whose URL the settings could not know."""
        base = self.resolved.service
        shared = base.shared_limits and replace(base.shared_limits, url=self.registry_url)
        return replace(base, host=UP_HOST, shared_limits=shared)

    def banner(
        self,
        port: int,
        metrics_port: int,
        node_id: str,
        model: str,
        fingerprint: str,
        workers: Mapping[str, str] | None = None,
        http_port: int = 0,
        slots: str = "",
    ) -> str:
        keys = self.resolved.service.api_keys
        from personalize.adapters.store.s3 import redact_url

        return up_banner(
            port,
            metrics_port,
            node_id,
            model,
            fingerprint,
            redact_registry_url(self.registry_url),
            self.data_dir,
            redact_url(self.store_url),
            keys.tenants if keys.enabled else (),
            workers=workers,
            http_port=http_port,
            slots=slots,
            operator_keys=bool(keys.operators),
        )

    def start_http(self, grpc_port: int, model: str, fingerprint: str) -> Any:
        """The OpenAI-compatible edge on 127.0.0.1:--http-port, routing on the ring of up's workers (None if 0)."""
        if not self.values.get("http_port"):
            return None
        from personalize_service.http import GatewayConfig, serve_http

        gateway = GatewayConfig(
            registry_url=self.registry_url,
            api_keys=self.resolved.service.api_keys,
            namespace=self.resolved.config.registry.namespace,
            completion_ttl_s=self.values["completion_ttl_s"],
            upstream=self.resolved.router,
        )
        return serve_http(gateway, UP_HOST, self.values["http_port"], model, fingerprint)


def _up_one_worker(up: _Up, step: Callable[[], None]) -> None:
    """One worker serving in this process (it still heartbeats, so a router could be pointed at it)."""
    from personalize import bootstrap
    from personalize.routing.announce import AnnounceConfig
    from personalize_service.server.worker import serve

    config = up.config()
    worker = bootstrap.worker(config)
    step()
    if up.stop.is_set():  # interrupted while loading
        worker.stop()
        return
    assert worker.stream is not None
    worker.stream.ensure_group()
    trainer = TrainerSupervisor(up.values, up.registry_url, up.store_url, up.data_dir).start()

    http: list[Any] = []

    def ready(port: int, metrics_port: int) -> None:
        step()
        http.append(up.start_http(port, worker.base.name, worker.base.fingerprint))
        print(
            up.banner(
                port,
                metrics_port,
                worker.node_id,
                f"{worker.base.name} on {config.model.device}",
                worker.base.fingerprint,
                http_port=http[0].port if http[0] else 0,
                slots=worker.slots_summary(),
            ),
            flush=True,
        )

    try:  # no router watches this worker: it need not wait for one to see it draining
        serve(
            up.service(),
            worker,
            up.stop,
            on_ready=ready,
            announce=AnnounceConfig(up.registry_url, drain_notice_s=0.0),
        )
    finally:
        for server in http:
            if server is not None:
                server.stop()
        trainer.stop()


def _up_cluster(up: _Up, count: int, step: Callable[[], None]) -> None:
    """`count` worker processes and the trainer, then the router in this process until `up.stop`."""
    from personalize import bootstrap
    from personalize.routing.membership import MembershipConfig
    from personalize_service.cli.local_cluster import WorkerProcesses
    from personalize_service.client.cluster import Cluster
    from personalize_service.server.router import serve_router, worker_channel_opener

    service, membership = up.service(), MembershipConfig()
    workers = WorkerProcesses(up.values, count, up.registry_url, up.store_url, up.data_dir).start()
    trainer = TrainerSupervisor(up.values, up.registry_url, up.store_url, up.data_dir).start()
    try:
        nodes = workers.wait_joined(membership, up.stop)
        step()
        if up.stop.is_set():
            return
        model = f"{up.values['model.path'] or 'built-in tiny model'} on {up.values['model.device']}"
        cluster = Cluster(
            bootstrap.membership(up.config(), membership), worker_channel_opener(up.resolved.router, service.limits)
        )

        http: list[Any] = []

        def ready(port: int, metrics_port: int) -> None:
            step()
            http.append(up.start_http(port, up.values["model.path"] or "tiny", ""))
            print(
                up.banner(
                    port,
                    metrics_port,
                    "router",
                    model,
                    "",
                    workers={node_id: node.address for node_id, node in nodes.items()},
                    http_port=http[0].port if http[0] else 0,
                ),
                flush=True,
            )

        try:
            serve_router(service, cluster, up.stop, on_ready=ready)
        finally:
            for server in http:
                if server is not None:
                    server.stop()
    finally:
        workers.terminate()  # they drain while the trainer stops
        trainer.stop()
        workers.stop(service.grace_s)


def run_serve(role: str, values: Mapping[str, Any]) -> int:
    """`personalize serve --role ROLE` with resolved setting values, against external Valkey/Redis and an
    object store; blocks until SIGTERM/SIGINT."""
    if role not in ROLES:
        raise LaunchError(f"role {role!r} is not available; choose one of {', '.join(ROLES)}")
    needed = {"router": ("registry.url",), "gateway": ()}.get(role, ("registry.url", "store_url"))
    missing = [f"{settings.BY_KEY[k].flag} / {settings.BY_KEY[k].env}" for k in needed if not values[k]]
    if missing:
        raise LaunchError(
            f"serve needs {' and '.join(missing)}; to run everything on one machine without setup, use `personalize up`"
        )
    if role == "trainer":
        return run_trainer(values)
    if role == "router":
        return run_router(values)
    if role == "gateway":
        return run_gateway(values)
    check_ports(values["service.host"], values)
    resolved = settings.build({**values, "data_dir": str(Path(values["data_dir"]).expanduser().resolve())})
    from personalize import bootstrap
    from personalize.routing.announce import AnnounceConfig
    from personalize_service.server.base import stop_on_signals
    from personalize_service.server.worker import serve

    stop = threading.Event()
    with stop_on_signals(stop), _stages(("loading model", "starting server")) as step:
        worker = bootstrap.worker(resolved.config)
        step()
        if stop.is_set():
            worker.stop()
            return 0

        def ready(port: int, metrics_port: int) -> None:
            step()
            metrics = f", metrics on :{metrics_port}" if metrics_port else ""
            print(
                f"personalize serve: worker {worker.node_id} serving on {resolved.service.host}:{port}"
                f"{metrics} ({worker.base.name} on {resolved.config.model.device}; {worker.slots_summary()})",
                flush=True,
            )

        serve(resolved.service, worker, stop, on_ready=ready, announce=AnnounceConfig(resolved.config.registry.url))
    return 0


def run_router(values: Mapping[str, Any]) -> int:
    """`personalize serve --role router`: forward every call to the worker owning its user, over the
    workers that heartbeat into the registry's Valkey; blocks until SIGTERM/SIGINT."""
    check_ports(values["service.host"], values)
    resolved = settings.build({**values, "data_dir": str(Path(values["data_dir"]).expanduser().resolve())})
    from personalize import bootstrap
    from personalize_service.client.cluster import Cluster
    from personalize_service.server.base import stop_on_signals
    from personalize_service.server.router import serve_router, worker_channel_opener

    service = resolved.service
    cluster = Cluster(bootstrap.membership(resolved.config), worker_channel_opener(resolved.router, service.limits))
    stop = threading.Event()
    with stop_on_signals(stop):

        def ready(port: int, metrics_port: int) -> None:
            metrics = f", metrics on :{metrics_port}" if metrics_port else ""
            print(
                f"personalize serve: router serving on {service.host}:{port}{metrics} over "
                f"{len(cluster.ring())} workers",
                flush=True,
            )

        serve_router(service, cluster, stop, on_ready=ready)
    print("personalize serve: router stopped", flush=True)
    return 0


def run_gateway(values: Mapping[str, Any]) -> int:
    """`personalize serve --role gateway`: the OpenAI-compatible HTTP edge (service/http) on
    --host:--http-port, routing each call to its user's worker on the ring of --registry-url (or, without
    one, calling the router at --gateway-target over gRPC); blocks until SIGTERM/SIGINT."""
    port = values["http_port"]
    if not port:
        raise LaunchError("serve --role gateway needs --http-port N (not 0)")
    from personalize.adapters.store.s3 import redact_url
    from personalize_service.http import GatewayConfig, serve_http
    from personalize_service.server.auth import ApiKeys, load_api_keys
    from personalize_service.server.base import stop_on_signals
    from personalize_service.server.router import RouterConfig

    keys_file, registry_url = values["service.api_keys_file"], values["registry.url"]
    gateway = GatewayConfig(
        registry_url=registry_url,
        target="" if registry_url else values["gateway_target"],
        api_keys=load_api_keys(keys_file) if keys_file else ApiKeys.parse(values["service.api_keys"]),
        namespace=values["registry.namespace"],
        completion_ttl_s=values["completion_ttl_s"],
        upstream=RouterConfig(
            upstream_ca=values["router.upstream_ca"],
            upstream_cert=values["router.upstream_cert"],
            upstream_key=values["router.upstream_key"],
        ),
    )
    stop = threading.Event()
    with stop_on_signals(stop):
        model = values["model.path"] or "tiny"
        server = serve_http(gateway, values["service.host"], port, model)
        over = "the ring of " + redact_url(registry_url) if registry_url else values["gateway_target"]
        print(f"personalize serve: gateway serving on {values['service.host']}:{server.port} over {over}", flush=True)
        try:
            stop.wait()
        finally:
            server.stop()
    print("personalize serve: gateway stopped", flush=True)
    return 0


def run_trainer(values: Mapping[str, Any]) -> int:
    """`personalize serve --role trainer`: consume feedback, train, publish; blocks until SIGTERM/SIGINT.

    The node id names its consumer in the stream's group: keep it stable across restarts (the pod name),
    so a restarted trainer resumes its own pending events first.
    """
    resolved = settings.build({**values, "data_dir": str(Path(values["data_dir"]).expanduser().resolve())})
    from personalize import bootstrap
    from personalize.feedback.notify import redis_client
    from personalize.feedback.stream import FeedbackStream
    from personalize_service.server.base import stop_on_signals
    from personalize_service.server.metrics import TrainerMetrics, start_metrics_server
    from personalize_service.server.observe import TrainerObserver, setup_tracing

    stop = threading.Event()
    with stop_on_signals(stop):
        config = resolved.config
        setup_tracing(resolved.service.otlp_endpoint, "personalize-trainer")
        metrics = TrainerMetrics()
        lag = FeedbackStream(redis_client(config.registry.url), config.feedback).lag_by_partition
        trainer = bootstrap.trainer(config, on_round=TrainerObserver(metrics, lag))
        port = resolved.service.metrics_port
        http = start_metrics_server(metrics.registry, port, resolved.service.host) if port else None
        print(
            f"personalize serve: trainer {config.node_id} consuming {config.feedback.partitions} feedback partition(s)"
            + (f", metrics on :{http.port}" if http else ""),
            flush=True,
        )
        try:
            trainer.run_forever(stop)
        finally:
            if http is not None:
                http.stop()
    print("personalize serve: trainer stopped", flush=True)
    return 0


TRAINER_KEYS = (
    "model.",
    "lora.r_max",
    "lora.keep_versions",
    "feedback.",
    "trainer.",
    "allow_unsynced_registry",
    "service.otlp_endpoint",  # so the trainer's round and publish spans reach the same collector
)
"""Settings `up` passes on to the trainer process it supervises."""


class TrainerSupervisor:
    """`up`'s trainer: a child process (so a crash or SIGKILL never takes the worker down), restarted
    whenever it exits while `up` runs, and sent SIGTERM if `up` dies. Its pid is kept in
    DATA_DIR/trainer.pid."""

    def __init__(self, values: Mapping[str, Any], registry_url: str, store_url: str, data_dir: Path) -> None:
        self.args = [
            sys.executable,
            "-m",
            "personalize_service.cli",
            "serve",
            "--role",
            "trainer",
            "--data-dir",
            str(data_dir),
            "--node-id",
            "trainer-0",
        ]
        self.env = {  # credentials (the store's keys, the registry's password) stay off argv
            **os.environ,
            settings.BY_KEY["store_url"].env: store_url,
            settings.BY_KEY["registry.url"].env: registry_url,
        }
        for setting in settings.SETTINGS:
            if setting.key.startswith(TRAINER_KEYS):
                self.args += [setting.flag, setting.show(values[setting.key])]
        self.pid_file = data_dir / "trainer.pid"
        self._stop = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread = threading.Thread(target=self._run, name="trainer-supervisor", daemon=True)
        self.restarts = 0

    def start(self) -> TrainerSupervisor:
        self._thread.start()
        return self

    def _run(self) -> None:
        from personalize_service.cli.local_cluster import die_with_parent

        while not self._stop.is_set():  # own session: a Ctrl-C reaches `up` only, which stops it last
            self._proc = subprocess.Popen(
                self.args, stdin=subprocess.DEVNULL, start_new_session=True, env=self.env, preexec_fn=die_with_parent
            )
            self.pid_file.write_text(str(self._proc.pid))
            code = self._proc.wait()
            if self._stop.is_set():
                break
            self.restarts += 1
            log.warning("trainer exited with %s; restarting it", code)
            self._stop.wait(0.5)

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._thread.join(timeout)
        self.pid_file.unlink(missing_ok=True)


def _admin_lines(tenant_keys: bool, operator_keys: bool) -> list[str]:
    if operator_keys:
        return ["  admin     Stats/ListNodes need an operator key (--operator-keys / PERSONALIZE_OPERATOR_KEYS)"]
    if tenant_keys:
        return ["  admin     Stats/ListNodes refused: no operator key configured (--operator-keys)"]
    return []


def up_banner(
    port: int,
    metrics_port: int,
    node_id: str,
    model: str,
    fingerprint: str,
    valkey_url: str,
    data_dir: Path,
    store_url: str,
    tenants: tuple[str, ...],
    *,
    workers: Mapping[str, str] | None = None,
    http_port: int = 0,
    slots: str = "",
    operator_keys: bool = False,
) -> str:
    """What `personalize up` prints once it serves: what runs where, and commands to try.

    `tenants` empty = no API keys configured; `operator_keys` = operator keys guard the Admin API;
    `fingerprint` empty = not shown. `workers` (node id ->
    address) = a cluster behind the router, shown instead of `node_id`. The first line, `serving on
    HOST:PORT`, is stable: scripts (and the e2e tests) read the port from it.
    """
    target = f"{UP_HOST}:{port}"
    target_flag = "" if port == DEFAULT_PORT else f" --target {target}"
    if tenants:
        auth = f"API keys for {len(tenants)} tenant(s) ({', '.join(tenants)}); calls send 'authorization: Bearer <key>'"
        key_flag, key_arg, key_note = " --api-key $KEY", ", api_key=KEY", " (KEY: one of your API keys)"
    else:
        auth = "no API keys configured: accepting tenant 'default' without a key"
        key_flag = key_arg = key_note = ""
    metrics = (
        f"http://{UP_HOST}:{metrics_port}/metrics"
        if metrics_port
        else "off (--metrics-port N serves Prometheus metrics)"
    )
    return "\n".join(
        [
            f"personalize up: serving on {target}",
            *_nodes_lines(node_id, workers, data_dir),
            f"  model     {model}" + (f" ({fingerprint[:19]}…)" if fingerprint else ""),
            *([f"  slots     {slots}"] if slots else []),
            f"  registry  embedded Valkey {valkey_url} (AOF in {data_dir / 'valkey'})",
            f"  store     {store_url}",
            f"  metrics   {metrics}",
            *(
                [f"  openai    http://{UP_HOST}:{http_port}/v1 (OpenAI-compatible HTTP; `user` = user id)"]
                if http_port
                else []
            ),
            f"  auth      {auth}",
            *_admin_lines(bool(tenants), operator_keys),
            "",
            f"Try it from another terminal{key_note}:",
            f'  personalize generate{target_flag}{key_flag} alice "Tell me about LoRA"',
            f"  python -c 'from personalize_service.client import PersonalizeClient as C; "
            f'print(C("{target}"{key_arg}).generate("alice", "Tell me about LoRA").text)\'',
            f"  grpcurl -plaintext {target} list",
            *_http_lines(http_port, "$KEY" if tenants else ""),
            "",
            f"Stop with Ctrl-C or SIGTERM; adapters and the registry stay in {data_dir}.",
        ]
    )


def _http_lines(http_port: int, key: str) -> list[str]:
    """The OpenAI-compatible edge's lines of the banner (none when it is off)."""
    if not http_port:
        return []
    base = f"http://{UP_HOST}:{http_port}/v1"
    auth = f" -H 'Authorization: Bearer {key}'" if key else ""
    return [
        f"  curl {base}/completions -H 'Content-Type: application/json'{auth} "
        '-d \'{"prompt": "Tell me about LoRA", "user": "alice", "max_tokens": 32}\'',
        f'  python -c \'from openai import OpenAI; print(OpenAI(base_url="{base}", '
        f'api_key="{key or "none"}").completions.create(model="tiny", prompt="Hi", '
        'user="alice").choices[0].text)\'',
    ]


def _nodes_lines(node_id: str, workers: Mapping[str, str] | None, data_dir: Path) -> list[str]:
    if workers is None:
        return [f"  node      {node_id}"]
    listed = ", ".join(f"{node} {address}" for node, address in sorted(workers.items()))
    return [
        f"  router    consistent hashing on (tenant, user) over {len(workers)} workers",
        f"  workers   {listed}",
        f"  logs      {data_dir / 'workers'}/<node>/worker.log (pids and ports in {data_dir / 'workers.json'})",
    ]


def configure_logging(level: str) -> None:
    """Log lines on stderr: `time level logger: message`."""
    logging.basicConfig(
        level=level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

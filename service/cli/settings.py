"""Server settings: one table, resolved from flags, environment variables, a config file and defaults.

Every knob of `personalize up` and `personalize serve` is one row of `SETTINGS`: its config key (also
its key in a `--config` file), command-line flag, environment variable, default and help. The CLI builds
its flags from the table, the README's configuration table is `markdown_table()` (a test keeps them
equal), and Kubernetes manifests set the environment variables it names.

Precedence, highest first: flag, environment variable, config file (`--config FILE` or env
PERSONALIZE_CONFIG; JSON, or TOML by its `.toml` suffix, keys nested by their dots), default.

This module imports no torch: `resolve` gives plain values (fast, for checks that must come before the
model loads); `build` turns them into the library's `Config` and the server's `ServiceConfig`.

    python -m personalize_service.cli.settings    # print the table as Markdown
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from personalize.config import Config
    from personalize_service.server.base import ServiceConfig
    from personalize_service.server.router import RouterConfig

CONFIG_ENV = "PERSONALIZE_CONFIG"
"""Environment variable naming a config file (the `--config` flag wins over it)."""
UP, SERVE = "up", "serve"
BOTH = (UP, SERVE)


class SettingsError(ValueError):
    """A setting has a malformed value or the config file cannot be used; the message names the source."""


# ---- value parsers (str -> value; ValueError with a short reason) -------------------------------------

_SIZE_RE = re.compile(r"\s*(\d+)\s*(KiB|MiB|GiB|TiB|B)?\s*")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def parse_size(text: str) -> int:
    """Bytes from `1234`, `64KiB`, `512MiB`, `8GiB` or `1TiB`."""
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        raise ValueError("not a size: use bytes or a number with KiB, MiB, GiB or TiB (e.g. 512MiB)")
    return int(match[1]) * _SIZE_UNITS[match[2]]


def format_size(size: int) -> str:
    """The shortest exact form `parse_size` reads back (`512MiB`, `1000`)."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        if size and size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return str(size)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("not an integer") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError("not a number") from None


def _str(text: str) -> str:
    return text


def _modules(text: str) -> tuple[str, ...]:
    modules = tuple(m.strip() for m in text.split(",") if m.strip())
    if not modules:
        raise ValueError("not a comma-separated list of module names (e.g. q_proj,v_proj)")
    return modules


_BOOLS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def _bool(text: str) -> bool:
    try:
        return _BOOLS[text.strip().lower()]
    except KeyError:
        raise ValueError("not a boolean: use true or false") from None


@dataclass(frozen=True)
class Setting:
    """One configurable value."""

    key: str
    """Config key: the field path in Config (`model.path`), ServiceConfig (`service.port`) or Limits
    (`limits.burst`); also its (dotted or nested) key in a config file."""
    flag: str
    """Command-line flag."""
    env: str
    """Environment variable."""
    default: Any
    """Value when nothing sets it (a test holds these equal to the dataclass defaults)."""
    parse: Callable[[str], Any]
    """Text (flag, environment) -> value; ValueError says why not."""
    help: str
    commands: tuple[str, ...] = BOTH
    """Commands it applies to."""
    metavar: str = ""

    def show(self, value: Any) -> str:
        """A value as it would be typed (sizes with their unit, booleans as true/false)."""
        if self.parse is parse_size:
            return format_size(value)
        if self.parse is _bool:
            return "true" if value else "false"
        if self.parse is _modules:
            return ",".join(value)
        return str(value)


def _s(
    key: str,
    flag: str,
    env: str,
    default: Any,
    parse: Callable[[str], Any],
    help: str,
    commands: tuple[str, ...] = BOTH,
    metavar: str = "",
) -> Setting:
    return Setting(key, flag, env, default, parse, help, commands, metavar)


SETTINGS: tuple[Setting, ...] = (
    # -- where state lives
    _s(
        "data_dir",
        "--data-dir",
        "PERSONALIZE_DATA_DIR",
        "./data",
        _str,
        "local state: embedded Valkey AOF (up), file store (up), disk cache",
        metavar="DIR",
    ),
    _s(
        "registry.url",
        "--registry-url",
        "PERSONALIZE_REGISTRY_URL",
        "",
        _str,
        "redis:// URL of the registry (Valkey/Redis); required",
        (SERVE,),
        "URL",
    ),
    _s(
        "registry.namespace",
        "--namespace",
        "PERSONALIZE_NAMESPACE",
        "pz",
        _str,
        "prefix of every registry and feedback key, so deployments can share one server",
        metavar="NAME",
    ),
    _s(
        "registry.bucket_bits",
        "--bucket-bits",
        "PERSONALIZE_BUCKET_BITS",
        16,
        _int,
        "users are spread over 2**N registry hashes; fixed for the life of a namespace",
        (SERVE,),
        "N",
    ),
    _s(
        "registry.cluster",
        "--registry-cluster",
        "PERSONALIZE_REGISTRY_CLUSTER",
        False,
        _bool,
        "the registry is a Redis/Valkey Cluster (speak its protocol; a redis+cluster:// URL implies it)",
        (SERVE,),
        "BOOL",
    ),
    _s(
        "allow_unsynced_registry",
        "--allow-unsynced-registry",
        "PERSONALIZE_ALLOW_UNSYNCED_REGISTRY",
        False,
        _bool,
        "start even when the registry server acknowledges writes before they are on disk (appendonly off or "
        "appendfsync other than always; a power cut then loses acknowledged feedback)",
        metavar="BOOL",
    ),
    _s(
        "store_url",
        "--store-url",
        "PERSONALIZE_STORE_URL",
        "",
        _str,
        "adapter store: file:///abs/path or s3://bucket/prefix?endpoint=host:port; required by serve, "
        "up defaults to file://DATA_DIR/store",
        metavar="URL",
    ),
    _s(
        "node_id",
        "--node-id",
        "PERSONALIZE_NODE_ID",
        "worker-0",
        _str,
        "stable node name (the StatefulSet pod name in Kubernetes)",
        metavar="NAME",
    ),
    # -- the gRPC server
    _s(
        "service.host",
        "--host",
        "PERSONALIZE_HOST",
        "127.0.0.1",
        _str,
        "address to listen on (0.0.0.0 in a container); up always uses 127.0.0.1",
        (SERVE,),
        "ADDR",
    ),
    _s("service.port", "--port", "PERSONALIZE_PORT", 50051, _int, "gRPC port (0 = pick a free one)", metavar="N"),
    _s(
        "service.advertise",
        "--advertise-address",
        "PERSONALIZE_ADVERTISE_ADDRESS",
        "",
        _str,
        "host:port routers dial to reach this worker (the pod's DNS name); empty = host:port (hostname for 0.0.0.0)",
        (SERVE,),
        "HOST:PORT",
    ),
    _s(
        "service.metrics_port",
        "--metrics-port",
        "PERSONALIZE_METRICS_PORT",
        0,
        _int,
        "Prometheus /metrics port (0 = off); serve --role trainer serves the trainer's metrics on it",
        metavar="N",
    ),
    _s(
        "service.grace_s",
        "--grace-s",
        "PERSONALIZE_GRACE_S",
        10.0,
        _float,
        "on SIGTERM, seconds in-flight calls get to finish",
        metavar="S",
    ),
    _s(
        "service.threads",
        "--threads",
        "PERSONALIZE_THREADS",
        1024,
        _int,
        "gRPC handler threads (concurrent calls being served)",
        metavar="N",
    ),
    _s(
        "service.api_keys_file",
        "--api-keys-file",
        "PERSONALIZE_API_KEYS_FILE",
        "",
        _str,
        "file of tenant:key lines; none = tenant 'default' without a key",
        metavar="FILE",
    ),
    _s(
        "service.tls_cert",
        "--tls-cert",
        "PERSONALIZE_TLS_CERT",
        "",
        _str,
        "PEM certificate chain: serve TLS (with --tls-key)",
        metavar="FILE",
    ),
    _s(
        "service.tls_key", "--tls-key", "PERSONALIZE_TLS_KEY", "", _str, "PEM private key of --tls-cert", metavar="FILE"
    ),
    _s(
        "service.tls_client_ca",
        "--tls-client-ca",
        "PERSONALIZE_TLS_CLIENT_CA",
        "",
        _str,
        "PEM CA: require client certificates it signed (mutual TLS)",
        metavar="FILE",
    ),
    _s(
        "router.upstream_ca",
        "--upstream-ca",
        "PERSONALIZE_UPSTREAM_CA",
        "",
        _str,
        "PEM CA that signed the workers' certificates: the router and gateway dial workers over TLS",
        metavar="FILE",
    ),
    _s(
        "router.upstream_cert",
        "--upstream-cert",
        "PERSONALIZE_UPSTREAM_CERT",
        "",
        _str,
        "PEM client certificate the router and gateway present to workers that require mutual TLS",
        metavar="FILE",
    ),
    _s(
        "router.upstream_key",
        "--upstream-key",
        "PERSONALIZE_UPSTREAM_KEY",
        "",
        _str,
        "PEM private key of --upstream-cert",
        metavar="FILE",
    ),
    _s(
        "service.api_keys",
        "--api-keys",
        "PERSONALIZE_API_KEYS",
        "",
        _str,
        "tenant:key entries, comma-separated (prefer the env var: flags show in ps)",
        metavar="KEYS",
    ),
    _s(
        "service.operator_keys",
        "--operator-keys",
        "PERSONALIZE_OPERATOR_KEYS",
        "",
        _str,
        "keys of the Admin API (Stats, ListNodes), comma-separated; with tenant keys and none of these, "
        "Admin is refused to all (prefer the env var)",
        metavar="KEYS",
    ),
    # -- the base model
    _s(
        "model.path",
        "--model",
        "PERSONALIZE_MODEL_PATH",
        "",
        _str,
        "Hugging Face checkpoint: local directory or cached repo id (docs/models.md); empty = built-in tiny model",
        metavar="PATH",
    ),
    _s("model.device", "--device", "PERSONALIZE_DEVICE", "cpu", _str, "torch device: cpu, cuda, cuda:1", metavar="DEV"),
    _s(
        "model.dtype",
        "--dtype",
        "PERSONALIZE_DTYPE",
        "float32",
        _str,
        "weight dtype: float32, bfloat16, float16",
        metavar="DTYPE",
    ),
    _s(
        "model.threads",
        "--torch-threads",
        "PERSONALIZE_TORCH_THREADS",
        0,
        _int,
        "torch threads per process (0 = one per core; up with several processes splits the cores)",
        metavar="N",
    ),
    # -- adapters and the cache
    _s("lora.r_max", "--max-rank", "PERSONALIZE_MAX_RANK", 16, _int, "largest adapter rank accepted", metavar="R"),
    _s(
        "lora.target_modules",
        "--target-modules",
        "PERSONALIZE_TARGET_MODULES",
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        _modules,
        "projections a device slot holds LoRA for (with r_max, its size); adapters on others are refused",
        metavar="LIST",
    ),
    _s(
        "lora.device_bytes",
        "--device-cache",
        "PERSONALIZE_DEVICE_CACHE",
        512 * 2**20,
        parse_size,
        "device slot budget (adapters resident on the GPU/CPU)",
        metavar="SIZE",
    ),
    _s(
        "lora.host_bytes",
        "--host-cache",
        "PERSONALIZE_HOST_CACHE",
        2**30,
        parse_size,
        "host RAM budget of parsed adapters",
        metavar="SIZE",
    ),
    _s(
        "lora.disk_bytes",
        "--disk-cache",
        "PERSONALIZE_DISK_CACHE",
        8 * 2**30,
        parse_size,
        "local disk budget of adapter files (under DATA_DIR/cache; 0 = off)",
        metavar="SIZE",
    ),
    _s(
        "lora.tenant_slot_share",
        "--tenant-slot-share",
        "PERSONALIZE_TENANT_SLOT_SHARE",
        0.5,
        _float,
        "largest share of the device slots one tenant may hold pinned or loading at once (1 = no cap)",
        metavar="F",
    ),
    _s(
        "lora.keep_versions",
        "--keep-versions",
        "PERSONALIZE_KEEP_VERSIONS",
        4,
        _int,
        "stored adapter versions kept per user (older ones are deleted as new ones are published; 0 = keep all)",
        metavar="N",
    ),
    _s(
        "load_timeout_s",
        "--load-timeout-s",
        "PERSONALIZE_LOAD_TIMEOUT_S",
        30.0,
        _float,
        "how long a request waits for its adapter to load",
        metavar="S",
    ),
    _s(
        "degrade_to_base",
        "--degrade-to-base",
        "PERSONALIZE_DEGRADE_TO_BASE",
        False,
        _bool,
        "when a user's adapter cannot be loaded (store down, corrupt object), serve the base model and flag "
        "the response degraded instead of failing UNAVAILABLE / DATA_LOSS",
        metavar="BOOL",
    ),
    # -- the engine
    _s(
        "engine.max_batch",
        "--max-batch",
        "PERSONALIZE_MAX_BATCH",
        32,
        _int,
        "requests decoded together in one step",
        metavar="N",
    ),
    _s(
        "engine.max_len",
        "--max-len",
        "PERSONALIZE_MAX_LEN",
        1024,
        _int,
        "tokens per request, prompt plus completion",
        metavar="N",
    ),
    _s(
        "engine.max_waiting",
        "--max-waiting",
        "PERSONALIZE_MAX_WAITING",
        1024,
        _int,
        "requests queued before RESOURCE_EXHAUSTED",
        metavar="N",
    ),
    _s(
        "engine.stream_interval",
        "--stream-interval",
        "PERSONALIZE_STREAM_INTERVAL",
        4,
        _int,
        "tokens each streamed chunk gathers after the first (which goes at once); 1 = a chunk per token",
        metavar="N",
    ),
    # -- request limits
    _s(
        "limits.max_prompt_bytes",
        "--max-prompt-bytes",
        "PERSONALIZE_MAX_PROMPT_BYTES",
        16 * 2**10,
        parse_size,
        "prompt size limit",
        metavar="SIZE",
    ),
    _s(
        "limits.max_chat_messages",
        "--max-messages",
        "PERSONALIZE_MAX_MESSAGES",
        1024,
        _int,
        "messages one chat may hold (a generation's or a feedback event's)",
        metavar="N",
    ),
    _s(
        "limits.max_new_tokens",
        "--max-new-tokens-limit",
        "PERSONALIZE_MAX_NEW_TOKENS",
        512,
        _int,
        "largest max_new_tokens a request may ask for",
        metavar="N",
    ),
    _s(
        "limits.default_new_tokens",
        "--default-new-tokens",
        "PERSONALIZE_DEFAULT_NEW_TOKENS",
        64,
        _int,
        "max_new_tokens of a request that leaves it 0",
        metavar="N",
    ),
    _s(
        "limits.max_import_file_bytes",
        "--max-import-bytes",
        "PERSONALIZE_MAX_IMPORT_BYTES",
        64 * 2**20,
        parse_size,
        "size limit of each imported adapter file",
        metavar="SIZE",
    ),
    _s(
        "limits.max_message_bytes",
        "--max-message-bytes",
        "PERSONALIZE_MAX_MESSAGE_BYTES",
        4 * 2**20,
        parse_size,
        "grpc receive limit of every method (larger adapters import streamed)",
        metavar="SIZE",
    ),
    _s(
        "limits.requests_per_second",
        "--rate",
        "PERSONALIZE_RATE",
        1000.0,
        _float,
        "sustained requests/s per tenant",
        metavar="R",
    ),
    _s(
        "limits.burst",
        "--burst",
        "PERSONALIZE_BURST",
        2000,
        _int,
        "requests a tenant may make at once above the rate",
        metavar="N",
    ),
    _s(
        "limits.max_concurrent_generations",
        "--max-concurrent",
        "PERSONALIZE_MAX_CONCURRENT",
        256,
        _int,
        "generations one tenant may have running or queued (keep well below --threads)",
        metavar="N",
    ),
    _s(
        "limits.feedback_per_second",
        "--feedback-rate",
        "PERSONALIZE_FEEDBACK_RATE",
        200.0,
        _float,
        "feedback quota: sustained events/s per tenant (per server)",
        metavar="R",
    ),
    _s(
        "limits.feedback_burst",
        "--feedback-burst",
        "PERSONALIZE_FEEDBACK_BURST",
        2000,
        _int,
        "feedback events a tenant may send at once above its quota's rate",
        metavar="N",
    ),
    _s(
        "limits.shared",
        "--shared-limits",
        "PERSONALIZE_SHARED_LIMITS",
        False,
        _bool,
        "keep each tenant's rate and feedback-quota buckets and concurrency leases in the registry's Valkey: all "
        "three hold across every process",
        metavar="BOOL",
    ),
    _s(
        "limits.shared_timeout_s",
        "--shared-limits-timeout",
        "PERSONALIZE_SHARED_LIMITS_TIMEOUT",
        1.0,
        _float,
        "with --shared-limits: seconds a limit check waits on Valkey before this process decides alone (fail open)",
        metavar="S",
    ),
    # -- feedback and training
    _s(
        "feedback.partitions",
        "--feedback-partitions",
        "PERSONALIZE_FEEDBACK_PARTITIONS",
        4,
        _int,
        "feedback streams; fixed for the life of a deployment",
        metavar="P",
    ),
    _s(
        "feedback.wait_replicas",
        "--feedback-wait-replicas",
        "PERSONALIZE_FEEDBACK_WAIT_REPLICAS",
        0,
        _int,
        "acknowledge feedback only once N replicas of its shard hold it (WAIT): survives a failover",
        metavar="N",
    ),
    _s(
        "feedback.wait_timeout_ms",
        "--feedback-wait-timeout-ms",
        "PERSONALIZE_FEEDBACK_WAIT_TIMEOUT_MS",
        2000,
        _int,
        "how long an append waits for those replicas before it fails UNAVAILABLE (retry with the event_key)",
        metavar="MS",
    ),
    _s(
        "feedback.wait_aof",
        "--feedback-wait-aof",
        "PERSONALIZE_FEEDBACK_WAIT_AOF",
        False,
        _bool,
        "wait for the replicas to fsync the event to their AOF (WAITAOF), not only to receive it",
        metavar="BOOL",
    ),
    _s(
        "trainer.steps",
        "--train-steps",
        "PERSONALIZE_TRAIN_STEPS",
        4,
        _int,
        "optimizer steps a user gets per new feedback event",
        metavar="N",
    ),
    _s(
        "trainer.min_steps",
        "--train-min-steps",
        "PERSONALIZE_TRAIN_MIN_STEPS",
        1,
        _int,
        "fewest optimizer steps of a user in a round",
        metavar="N",
    ),
    _s(
        "trainer.max_steps",
        "--train-max-steps",
        "PERSONALIZE_TRAIN_MAX_STEPS",
        48,
        _int,
        "most optimizer steps of a user in a round",
        metavar="N",
    ),
    _s("trainer.lr", "--train-lr", "PERSONALIZE_TRAIN_LR", 2e-3, _float, "trainer learning rate", metavar="LR"),
    _s("trainer.rank", "--train-rank", "PERSONALIZE_TRAIN_RANK", 8, _int, "rank of a new user's adapter", metavar="R"),
    _s(
        "trainer.max_events",
        "--train-max-events",
        "PERSONALIZE_TRAIN_MAX_EVENTS",
        256,
        _int,
        "most events in one training round",
        metavar="N",
    ),
    _s(
        "trainer.loss_chunk_tokens",
        "--train-loss-chunk-tokens",
        "PERSONALIZE_TRAIN_LOSS_CHUNK_TOKENS",
        1024,
        _int,
        "answer tokens whose full-vocabulary logits the loss computes at once (bounds trainer memory)",
        metavar="N",
    ),
    _s(
        "trainer.fit_loss",
        "--train-fit-loss",
        "PERSONALIZE_TRAIN_FIT_LOSS",
        0.1,
        _float,
        "a user whose wanted answers have a mean token NLL above this trains past its step budget; below, it stops",
        metavar="NLL",
    ),
    _s(
        "trainer.fit_steps",
        "--train-fit-steps",
        "PERSONALIZE_TRAIN_FIT_STEPS",
        16,
        _int,
        "most steps per new event of a user whose wanted answers are not learned yet",
        metavar="N",
    ),
    _s(
        "trainer.warmup",
        "--train-warmup",
        "PERSONALIZE_TRAIN_WARMUP",
        4,
        _int,
        "steps over which a user's learning rate ramps up to --train-lr in every round (0 = none)",
        metavar="N",
    ),
    _s(
        "trainer.reject_weight",
        "--train-reject-weight",
        "PERSONALIZE_TRAIN_REJECT_WEIGHT",
        0.5,
        _float,
        "weight of a reject event's unlikelihood loss",
        metavar="W",
    ),
    _s(
        "trainer.prefer_nll",
        "--train-prefer-nll",
        "PERSONALIZE_TRAIN_PREFER_NLL",
        1.0,
        _float,
        "weight of the chosen answer's NLL added to a prefer event's DPO loss",
        metavar="W",
    ),
    _s(
        "trainer.claim_idle_ms",
        "--claim-idle-ms",
        "PERSONALIZE_CLAIM_IDLE_MS",
        30_000,
        _int,
        "a dead trainer's events are claimed after this idle time",
        metavar="MS",
    ),
    # -- traces and access logs
    _s(
        "service.otlp_endpoint",
        "--otlp-endpoint",
        "PERSONALIZE_OTLP_ENDPOINT",
        "",
        _str,
        "OTLP/HTTP collector (http://host:4318) to export traces to; empty = OTEL_EXPORTER_OTLP_ENDPOINT, else off",
        metavar="URL",
    ),
    _s(
        "service.access_log",
        "--access-log",
        "PERSONALIZE_ACCESS_LOG",
        "",
        _str,
        "file of JSON access-log lines, one per call ('-' = stderr); empty = off",
        metavar="FILE",
    ),
    _s(
        "service.access_log_key",
        "--access-log-key",
        "PERSONALIZE_ACCESS_LOG_KEY",
        "",
        _str,
        "secret key of the access log's user-id hash (set it for hashes that join across nodes)",
        metavar="KEY",
    ),
    # -- the OpenAI-compatible HTTP edge (service/http)
    _s(
        "http_port",
        "--http-port",
        "PERSONALIZE_HTTP_PORT",
        8000,
        _int,
        "OpenAI-compatible HTTP port (up: on 127.0.0.1; serve --role gateway: on --host); 0 = off",
        metavar="N",
    ),
    _s(
        "gateway_target",
        "--gateway-target",
        "PERSONALIZE_GATEWAY_TARGET",
        "127.0.0.1:50051",
        _str,
        "host:port the gateway role calls without --registry-url (with one it routes itself on the ring)",
        (SERVE,),
        "HOST:PORT",
    ),
    _s(
        "completion_ttl_s",
        "--completion-ttl",
        "PERSONALIZE_COMPLETION_TTL",
        86400,
        _int,
        "seconds the HTTP edge remembers a completion, so feedback can name it by completion_id",
        metavar="S",
    ),
    # -- up only
    _s(
        "workers",
        "--workers",
        "PERSONALIZE_WORKERS",
        1,
        _int,
        "worker processes behind a consistent-hash router; 1 = one worker in the up process, no router",
        (UP,),
        "N",
    ),
    _s(
        "worker_restarts",
        "--worker-restarts",
        "PERSONALIZE_WORKER_RESTARTS",
        10,
        _int,
        "times up restarts a worker process that dies (backoff 1 s doubling to 30 s); 0 = never",
        (UP,),
        "N",
    ),
    _s(
        "worker_advertise",
        "--worker-advertise",
        "PERSONALIZE_WORKER_ADVERTISE",
        "",
        _str,
        "comma-separated host:port per worker, the address each announces and the router dials (a proxy "
        "or sidecar in front of it); empty = its own port",
        (UP,),
        "ADDRS",
    ),
)
"""Every server setting, grouped by component (the README and manifests list them in this order)."""

BY_KEY: dict[str, Setting] = {s.key: s for s in SETTINGS}


def settings_for(command: str) -> tuple[Setting, ...]:
    return tuple(s for s in SETTINGS if command in s.commands)


def dest(setting: Setting) -> str:
    """The argparse destination of a setting's flag."""
    return setting.flag.lstrip("-").replace("-", "_")


# ---- resolution -------------------------------------------------------------------------------------


def resolve(
    command: str, flags: Mapping[str, Any], environ: Mapping[str, str], config_file: str | None = None
) -> dict[str, Any]:
    """Values of `command`'s settings by key: flag (a `dest(setting)` entry that is not None), else
    environment, else `config_file` (or the file env PERSONALIZE_CONFIG names), else default.

    Raises SettingsError naming the flag, variable or file entry with a malformed value, and for a
    config file that is unreadable or holds unknown keys.
    """
    path = config_file or environ.get(CONFIG_ENV) or None
    from_file = load_config_file(path, command) if path else {}
    values: dict[str, Any] = {}
    for setting in settings_for(command):
        given = flags.get(dest(setting))
        if given is not None:
            values[setting.key] = _parsed(setting, given, setting.flag)
        elif environ.get(setting.env, "") != "":
            values[setting.key] = _parsed(setting, environ[setting.env], f"{setting.env} (environment)")
        elif setting.key in from_file:
            values[setting.key] = _parsed(setting, from_file[setting.key], f"{setting.key} in {path}")
        else:
            values[setting.key] = setting.default
    return values


def _parsed(setting: Setting, raw: Any, source: str) -> Any:
    if isinstance(raw, bool) and setting.parse is _bool:  # `true` in a TOML/JSON config file
        return raw
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise SettingsError(f"{source}: expected a string or a number, got {raw!r:.60}")
    try:
        return setting.parse(str(raw))
    except ValueError as exc:
        raise SettingsError(f"{source}: {str(raw)!r:.80} is {exc}") from None


def load_config_file(path: str | os.PathLike[str], command: str = SERVE) -> dict[str, Any]:
    """A JSON or TOML (by suffix) config file flattened to {dotted key: value}; SettingsError if it
    cannot be read or parsed, or names a key that is no setting of `command`."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
        data = tomllib.loads(text) if file.suffix.lower() == ".toml" else json.loads(text)
    except OSError as exc:
        raise SettingsError(f"config file {file}: cannot read it ({exc.strerror})") from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        kind = "TOML" if file.suffix.lower() == ".toml" else "JSON"
        raise SettingsError(f"config file {file}: not valid {kind} ({exc})") from None
    if not isinstance(data, dict):
        raise SettingsError(f"config file {file}: the top level must be an object/table of settings")
    flat = _flatten(data)
    known = {s.key for s in settings_for(command)}
    unknown = sorted(set(flat) - known)
    if unknown:
        raise SettingsError(
            f"config file {file}: unknown settings {unknown} for `personalize {command}`; known: {sorted(known)}"
        )
    return flat


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, key + "."))
        else:
            flat[key] = value
    return flat


# ---- building the config objects ---------------------------------------------------------------------


@dataclass(frozen=True)
class Resolved:
    """What a server command runs with."""

    config: Config
    service: ServiceConfig
    router: RouterConfig
    workers: int


def _section(values: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {key.removeprefix(prefix): value for key, value in values.items() if key.startswith(prefix)}


def build(values: Mapping[str, Any]) -> Resolved:
    """The config objects for resolved `values`; the library's own checks raise InvalidArgument."""
    # Imported here: they pull in torch, which client commands and --help never need.
    from personalize.adapters.registry import RegistryConfig
    from personalize.config import Config, LoraConfig
    from personalize.engine.engine import EngineConfig
    from personalize.feedback.stream import StreamConfig
    from personalize.feedback.trainer import TrainerConfig
    from personalize.model import ModelConfig
    from personalize_service.server.auth import ApiKeys, load_api_keys
    from personalize_service.server.base import ServiceConfig
    from personalize_service.server.limits import Limits
    from personalize_service.server.router import RouterConfig

    registry = RegistryConfig(**_section(values, "registry."))
    config = Config(
        node_id=values["node_id"],
        data_dir=values["data_dir"],
        registry=registry,
        store_url=values.get("store_url", ""),
        model=ModelConfig(**_section(values, "model.")),
        lora=LoraConfig(**_section(values, "lora.")),
        engine=EngineConfig(**_section(values, "engine.")),
        load_timeout_s=values["load_timeout_s"],
        degrade_to_base=values["degrade_to_base"],
        allow_unsynced_registry=values["allow_unsynced_registry"],
        feedback=StreamConfig(**_section(values, "feedback."), namespace=registry.namespace),
        trainer=TrainerConfig(**_section(values, "trainer.")),
    )
    service_values = _section(values, "service.")
    keys_file, keys_text = service_values.pop("api_keys_file"), service_values.pop("api_keys")
    operator_keys = service_values.pop("operator_keys")
    if keys_file and keys_text:
        raise SettingsError(
            "API keys are given both as a file (--api-keys-file / PERSONALIZE_API_KEYS_FILE) "
            "and inline (--api-keys / PERSONALIZE_API_KEYS); use one"
        )
    api_keys = (load_api_keys(keys_file) if keys_file else ApiKeys.parse(keys_text)).with_operator_keys(operator_keys)
    limit_values = _section(values, "limits.")
    shared_limits = registry if limit_values.pop("shared") else None
    service = ServiceConfig(
        **service_values, limits=Limits(**limit_values), api_keys=api_keys, shared_limits=shared_limits
    )
    router = RouterConfig(**_section(values, "router."))
    return Resolved(config=config, service=service, router=router, workers=values.get("workers", 1))


# ---- documentation -----------------------------------------------------------------------------------


def markdown_table() -> str:
    """The settings as the README's Markdown table."""
    lines = ["| config key | flag | environment variable | default | meaning |", "|---|---|---|---|---|"]
    for s in SETTINGS:
        default = f"`{s.show(s.default)}`" if s.default != "" else "(empty)"
        only = "" if s.commands == BOTH else f" *({' and '.join(s.commands)} only)*"
        lines.append(f"| `{s.key}` | `{s.flag}` | `{s.env}` | {default} | {s.help}{only} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())

"""The `personalize` command: run the service, and talk to it over gRPC.

Server commands (`up`, `serve`) take their settings from service/cli/settings.py; client commands use the
SDK (service/client/sdk.py). Exit status: 0 success, 1 failure (a call's status code and message are
printed), 2 bad usage or settings, 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from tqdm import tqdm

import personalize
from personalize.errors import PersonalizeError
from personalize_service.cli import launcher, settings
from personalize_service.client import PersonalizeClient, PersonalizeClientError

PROG = "personalize"
DEFAULT_TARGET = "127.0.0.1:50051"

DESCRIPTION = """\
personalize: every user of your app gets a personal LoRA adapter on one shared base LLM.

Start everything on this machine with `personalize up`, then call it from another terminal
with the client commands (or the Python SDK, or any gRPC client)."""

EPILOG = """\
examples:
  personalize up                                  # serve on 127.0.0.1:50051, state in ./data
  personalize generate alice "Write a haiku about autumn"
  personalize generate alice "Write a haiku" --stream --max-new-tokens 32
  personalize adapter import alice ./alice-peft-adapter   # a PEFT LoRA directory
  personalize adapter show alice
  personalize adapter export alice ./alice-export
  personalize adapter delete alice
  personalize stats

  personalize serve --role worker --registry-url redis://valkey:6379/0 \\
      --store-url 's3://adapters/prod?endpoint=minio:9000' --host 0.0.0.0

`personalize COMMAND --help` shows each command's options."""

UP_EPILOG = """\
examples:
  personalize up                          # 127.0.0.1:50051, state in ./data
  personalize up --data-dir /tmp/pz --port 50052
  personalize up --model ./my-llama --device cuda
  personalize up --workers 3              # 3 worker processes behind a consistent-hash router
  PERSONALIZE_API_KEYS="acme:s3cret,globex:t0ken" personalize up

Every option can also come from its environment variable or a --config file (JSON or TOML);
flags win over the environment, which wins over the file."""

SERVE_EPILOG = """\
example (the settings usually come from environment variables in a container):
  PERSONALIZE_REGISTRY_URL=redis://valkey:6379/0 \\
  PERSONALIZE_STORE_URL='s3://adapters/prod?endpoint=minio:9000' \\
  PERSONALIZE_NODE_ID=worker-0 PERSONALIZE_HOST=0.0.0.0 PERSONALIZE_DEVICE=cuda \\
  personalize serve --role worker

and the router in front of the workers (it finds them through the same registry):
  PERSONALIZE_REGISTRY_URL=redis://valkey:6379/0 PERSONALIZE_HOST=0.0.0.0 personalize serve --role router

Flags win over environment variables, which win over the --config file (JSON or TOML)."""

_GROUPS = {
    "data_dir": "state",
    "registry": "state",
    "store_url": "state",
    "node_id": "state",
    "allow_unsynced_registry": "state",
    "service": "server",
    "router": "server",
    "model": "model",
    "lora": "adapters",
    "load_timeout_s": "adapters",
    "degrade_to_base": "adapters",
    "engine": "engine",
    "limits": "request limits",
    "workers": "server",
    "worker_restarts": "server",
    "worker_advertise": "server",
    "http_port": "server",
    "gateway_target": "server",
    "completion_ttl_s": "server",
    "feedback": "feedback and training",
    "trainer": "feedback and training",
}


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)


# ---- the parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {personalize.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_server_command(
        commands,
        settings.UP,
        "run everything on this machine: embedded Valkey, file store, "
        "one worker (or --workers N behind a router), on 127.0.0.1",
        UP_EPILOG,
    )
    serve = _add_server_command(
        commands, settings.SERVE, "run one server role against external Valkey/Redis and S3 (production)", SERVE_EPILOG
    )
    serve.add_argument(
        "--role",
        choices=list(launcher.ROLES),
        default="worker",
        help="worker: serves generations; router: forwards each call to the worker owning its "
        "user; trainer: consumes feedback and publishes new versions",
    )
    client = _client_options()
    _add_generate(commands, client)
    _add_feedback(commands, client)
    _add_adapter(commands, client)
    stats = commands.add_parser(
        "stats", parents=[client], formatter_class=_Formatter, help="per-node cache, batch and queue figures"
    )
    stats.set_defaults(run=_stats)
    nodes = commands.add_parser(
        "nodes", parents=[client], formatter_class=_Formatter, help="list the serving nodes with their state and load"
    )
    nodes.set_defaults(run=_nodes)
    return parser


def _add_server_command(commands: Any, name: str, help: str, epilog: str) -> argparse.ArgumentParser:
    """A server subcommand whose options are the settings table's rows for it."""
    parser = commands.add_parser(name, help=help, description=help, epilog=epilog, formatter_class=_Formatter)
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f"JSON or TOML file of settings, keys as in the README [env {settings.CONFIG_ENV}]",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log verbosity on stderr (default info)",
    )
    groups: dict[str, Any] = {}
    for setting in settings.settings_for(name):
        title = _GROUPS[setting.key.split(".")[0]]
        group = groups.get(title) or groups.setdefault(title, parser.add_argument_group(title))
        shown = setting.show(setting.default) if setting.default != "" else "none"
        group.add_argument(
            setting.flag,
            dest=settings.dest(setting),
            default=None,
            metavar=setting.metavar or None,
            help=f"{setting.help} [env {setting.env}; default {shown}]",
        )
    parser.set_defaults(server=name)
    return parser


def _client_options() -> argparse.ArgumentParser:
    """Connection options every client command takes."""
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("connection")
    group.add_argument(
        "--target",
        default=os.environ.get("PERSONALIZE_TARGET", DEFAULT_TARGET),
        metavar="HOST:PORT",
        help=f"server address [env PERSONALIZE_TARGET; default {DEFAULT_TARGET}]",
    )
    group.add_argument(
        "--api-key",
        default=os.environ.get("PERSONALIZE_API_KEY"),
        metavar="KEY",
        help="API key, sent as 'authorization: Bearer KEY' [env PERSONALIZE_API_KEY]",
    )
    group.add_argument("--timeout", type=float, default=60.0, metavar="S", help="seconds per call (default 60)")
    group.add_argument("--json", action="store_true", help="print the response as JSON")
    return options


def _add_generate(commands: Any, client: argparse.ArgumentParser) -> None:
    p = commands.add_parser(
        "generate",
        parents=[client],
        formatter_class=_Formatter,
        help="a completion with the user's adapter (the base model if they have none)",
        epilog='example:\n  personalize generate alice "Say hello" --max-new-tokens 16 --stream',
    )
    p.add_argument("user", help="user id (1-256 bytes of UTF-8)")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="most tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed: the same seed gives the same text")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop before this text (repeatable)")
    p.add_argument("--stream", action="store_true", help="print pieces as they are generated")
    p.add_argument("--base", action="store_true", help="skip the user's adapter: serve the base model")
    p.set_defaults(run=_generate)


def _add_feedback(commands: Any, client: argparse.ArgumentParser) -> None:
    p = commands.add_parser(
        "feedback",
        parents=[client],
        formatter_class=_Formatter,
        help="record a user's reaction to an answer (durable once acknowledged)",
        epilog='example:\n  personalize feedback alice --prompt "Say hi" --completion "Hello!" --kind accept',
    )
    p.add_argument("user", help="user id")
    p.add_argument("--prompt", required=True, help="the prompt the user saw answered")
    p.add_argument("--completion", required=True, help="the answer (the chosen one for --kind prefer)")
    p.add_argument(
        "--kind",
        choices=["accept", "reject", "correct", "prefer"],
        default="accept",
        help="accept (good), reject (bad), correct (needs --correction), prefer (needs --rejected)",
    )
    p.add_argument("--correction", default="", help="the answer the user wanted (--kind correct)")
    p.add_argument("--rejected", default="", help="the answer the user did not prefer (--kind prefer)")
    p.add_argument("--event-key", default="", help="idempotency key: a repeated key is stored once")
    p.set_defaults(run=_feedback)


def _add_adapter(commands: Any, client: argparse.ArgumentParser) -> None:
    adapter = commands.add_parser(
        "adapter", help="show, export, import or delete a user's adapter", formatter_class=_Formatter
    )
    actions = adapter.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = actions.add_parser("show", parents=[client], help="what the server knows of a user's adapter")
    show.add_argument("user")
    show.set_defaults(run=_adapter_show)
    export = actions.add_parser("export", parents=[client], help="write a user's adapter as PEFT files into DIR")
    export.add_argument("user")
    export.add_argument("dir", help="directory to write adapter_config.json and adapter_model.safetensors into")
    export.add_argument("--version", type=int, default=0, help="version to export (default 0 = current)")
    export.set_defaults(run=_adapter_export)
    imp = actions.add_parser(
        "import",
        parents=[client],
        formatter_class=_Formatter,
        help="install PEFT LoRA adapters for users",
        epilog="examples:\n  personalize adapter import alice ./alice-adapter\n"
        "  personalize adapter import alice=./a bob=./b carol=./c   # several, with a progress bar",
    )
    imp.add_argument(
        "items",
        nargs="+",
        metavar="USER DIR | USER=DIR",
        help="a user and a PEFT adapter directory, or several USER=DIR pairs",
    )
    imp.set_defaults(run=_adapter_import)
    delete = actions.add_parser("delete", parents=[client], help="forget a user: adapter versions and records")
    delete.add_argument("user")
    delete.set_defaults(run=_adapter_delete)


# ---- client commands ---------------------------------------------------------------------------------


def _print_message(message: Message) -> None:
    print(
        json_format.MessageToJson(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    )


def _generate(client: PersonalizeClient, args: argparse.Namespace) -> int:
    options = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
        use_base_model=args.base,
    )
    if args.stream:
        with client.generate_stream(args.user, args.prompt, **options) as stream:
            for piece in stream:
                if not args.json:
                    print(piece, end="", flush=True)
            response = stream.response
        assert response is not None  # the stream ended with its final chunk
    else:
        response = client.generate(args.user, args.prompt, **options)
    if args.json:
        _print_message(response)
        return 0
    if not args.stream:
        print(response.text, end="")
    print()
    print(
        f"[adapter v{response.adapter_version}, cache {response.cache_tier}, node {response.node_id}, "
        f"{response.prompt_tokens} prompt + {response.completion_tokens} completion tokens, "
        f"finish {response.finish_reason}]",
        file=sys.stderr,
    )
    if response.degraded:
        print(
            f"[degraded: the base model served because the user's adapter could not be loaded: "
            f"{response.degraded_reason}]",
            file=sys.stderr,
        )
    return 0


def _feedback(client: PersonalizeClient, args: argparse.Namespace) -> int:
    ack = client.feedback(
        args.user,
        args.prompt,
        args.completion,
        args.kind,
        correction=args.correction,
        rejected=args.rejected,
        event_key=args.event_key,
    )
    if args.json:
        _print_message(ack)
    else:
        print(f"recorded event {ack.event_id} (partition {ack.partition})")
    return 0


def _adapter_show(client: PersonalizeClient, args: argparse.Namespace) -> int:
    info = client.get_adapter(args.user)
    if args.json:
        _print_message(info)
        return 0
    for name in (
        "user_id",
        "version",
        "rank",
        "examples_seen",
        "base_fingerprint",
        "updated_at_unix_ms",
        "pending_events",
        "owner_node",
    ):
        print(f"{name:<20}{getattr(info, name)}")
    return 0


def _adapter_export(client: PersonalizeClient, args: argparse.Namespace) -> int:
    exported = client.export_adapter(args.user, args.version)
    path = exported.save(args.dir)
    if args.json:
        _print_message(exported.info)
    else:
        print(
            f"wrote {', '.join(sorted(exported.files))} of {args.user!r} version "
            f"{args.version or exported.info.version} to {path}"
        )
    return 0


def parse_import_items(items: Sequence[str]) -> list[tuple[str, Path]]:
    """`USER DIR` or `USER=DIR ...` -> (user, dir) pairs (split at the first `=`). ValueError if mixed."""
    if len(items) == 2 and "=" not in items[0]:
        return [(items[0], Path(items[1]))]
    pairs: list[tuple[str, Path]] = []
    for item in items:
        user, sep, directory = item.partition("=")
        if not sep or not user or not directory:
            raise ValueError(f"{item!r} is not USER=DIR; give either `USER DIR` or one or more USER=DIR pairs")
        pairs.append((user, Path(directory)))
    return pairs


def _adapter_import(client: PersonalizeClient, args: argparse.Namespace) -> int:
    try:
        pairs = parse_import_items(args.items)
    except ValueError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    failed = 0
    for user, directory in tqdm(
        pairs, desc="importing", unit="adapter", file=sys.stderr, disable=len(pairs) == 1 or None
    ):
        try:
            info = client.import_adapter(user, directory)
        except (PersonalizeClientError, OSError) as exc:
            failed += 1
            tqdm.write(f"{user}: {_describe(exc)}", file=sys.stderr)
            continue
        if args.json:
            _print_message(info)
        elif len(pairs) == 1:
            print(f"imported {directory} as {user!r} version {info.version} (rank {info.rank})")
    if len(pairs) > 1 and not args.json:
        print(f"imported {len(pairs) - failed} of {len(pairs)} adapters")
    return 1 if failed else 0


def _adapter_delete(client: PersonalizeClient, args: argparse.Namespace) -> int:
    response = client.delete_user(args.user)
    if args.json:
        _print_message(response)
    else:
        print(
            f"deleted {args.user!r}: {response.versions_deleted} adapter versions, "
            f"{response.events_deleted} feedback events"
        )
    return 0


def _tiers(counts: Any, unit: Callable[[int], str] = str) -> str:
    return "  ".join(f"{tier} {unit(counts[tier])}" for tier in sorted(counts)) or "-"


def _bytes(size: int) -> str:
    """A byte count for people: 598020 -> 584.0KiB."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}TiB"


def _stats(client: PersonalizeClient, args: argparse.Namespace) -> int:
    response = client.stats()
    if args.json:
        _print_message(response)
        return 0
    for node in response.nodes:
        print(f"node {node.node_id}")
        for name in ("resident", "bytes", "hits", "misses"):
            print(f"  {name:<12}{_tiers(getattr(node, name), _bytes if name == 'bytes' else str)}")
        print(f"  {'batch':<12}mean {node.batch_occupancy:.2f}, max {node.max_batch_occupancy}")
        print(f"  {'queue':<12}{node.queue_depth}")
        print(f"  {'stream lag':<12}{node.stream_lag}")
    if response.degraded:
        print("(some nodes did not answer)")
    return 0


def _nodes(client: PersonalizeClient, args: argparse.Namespace) -> int:
    response = client.list_nodes()
    if args.json:
        _print_message(response)
        return 0
    for node in response.nodes:
        print(f"{node.node_id}  {node.address}  {node.state}  load {node.load}/{node.capacity}")
    return 0


def _describe(exc: BaseException) -> str:
    """One line for a failed call: its status code and message, with a hint when the server is down."""
    if isinstance(exc, PersonalizeClientError):
        text = f"{exc.code().name}: {exc.details()}"
        if exc.code().name == "UNAVAILABLE" and "connect" in exc.details().lower():
            text += " (is the server running? start one with `personalize up`)"
        return text
    return str(exc)


def _run_client(args: argparse.Namespace) -> int:
    run: Callable[[PersonalizeClient, argparse.Namespace], int] = args.run
    try:
        with PersonalizeClient(args.target, api_key=args.api_key, timeout=args.timeout) as client:
            return run(client, args)
    except (PersonalizeClientError, OSError) as exc:
        print(f"{PROG}: error: {_describe(exc)}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2


# ---- server commands ---------------------------------------------------------------------------------


def _run_server(args: argparse.Namespace) -> int:
    launcher.configure_logging(args.log_level)
    try:
        values = settings.resolve(args.server, vars(args), os.environ, args.config)
        if args.server == settings.UP:
            return launcher.run_up(values)
        return launcher.run_serve(args.role, values)
    except (settings.SettingsError, launcher.LaunchError) as exc:
        print(f"{PROG} {args.server}: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, settings.SettingsError) else 1
    except PersonalizeError as exc:  # a setting the library refuses (bad dtype, rank, ...)
        print(f"{PROG} {args.server}: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as exc:  # a port lost to a race, Valkey failing to start, ...
        print(f"{PROG} {args.server}: error: {exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run_server(args) if getattr(args, "server", None) else _run_client(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

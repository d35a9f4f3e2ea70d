"""Running `personalize up` as a user would (a subprocess on a temp data dir), and references to compare
its answers with: the base model's and PEFT's own greedy generations, computed in this process."""

from __future__ import annotations

import contextlib
import copy
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from peft import LoraConfig, PeftModel, get_peft_model

from personalize_service.gen.personalize.v1 import personalize_pb2_grpc as pb_grpc

START_TIMEOUT_S = 180.0
"""Import, model load and Valkey start on a busy 2-core machine."""
STOP_TIMEOUT_S = 60.0
SERVING_RE = re.compile(rb"serving on 127\.0\.0\.1:(\d+)")
TEST_FLAGS = ("--device-cache", "64MiB", "--host-cache", "64MiB", "--disk-cache", "64MiB", "--http-port", "0")
"""Smaller cache budgets than the defaults: several servers share the test machine; no HTTP edge (its
default port 8000 would be shared; tests/e2e/test_http.py gives it a free port)."""


@dataclass
class UpServer:
    """A running `personalize up` process."""

    process: subprocess.Popen[bytes]
    data_dir: Path
    log_path: Path
    """Its stdout and stderr."""
    port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def channel(self) -> grpc.Channel:
        options = [("grpc.max_receive_message_length", 256 * 2**20), ("grpc.max_send_message_length", 256 * 2**20)]
        return grpc.insecure_channel(self.target, options=options)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int:
        """Send `sig`, wait for the exit, return its status (kill and the Valkey child too if it hangs)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        _kill_orphaned_valkey(self.data_dir)
        return self.process.returncode


def up_command(data_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "personalize_service.cli", "up", "--data-dir", str(data_dir), *args]


def start_up(data_dir: Path, log_path: Path, *args: str, env: dict[str, str] | None = None, port: int = 0) -> UpServer:
    """Start `personalize up` on `data_dir` and return once its health service answers SERVING.

    Fails (with the log tail) if it exits or does not serve within START_TIMEOUT_S.
    """
    return start_server(up_command(data_dir, "--port", str(port), *TEST_FLAGS, *args), data_dir, log_path, env)


def start_server(command: list[str], data_dir: Path, log_path: Path, env: dict[str, str] | None = None) -> UpServer:
    """Run a server command (PERSONALIZE_* variables of this process left out, `env` added) until it prints
    `serving on 127.0.0.1:PORT` and its health service answers SERVING."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PERSONALIZE_")}
    environ.update(env or {})
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=environ)
    deadline = time.monotonic() + START_TIMEOUT_S
    found = None
    while found is None:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(
                f"{' '.join(command[2:5])} did not start (exit {process.poll()}):\n"
                f"{log_path.read_text(errors='replace')[-4000:]}"
            )
        found = SERVING_RE.search(log_path.read_bytes())
        time.sleep(0.1)
    server = UpServer(process, data_dir, log_path, int(found[1]))
    wait_serving(server, deadline)
    return server


def wait_serving(server: UpServer, deadline: float) -> None:
    with server.channel() as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"never SERVING:\n{server.log()[-4000:]}")
            time.sleep(0.1)


def valkey_pids(data_dir: Path) -> list[int]:
    """Ids of valkey-server processes running in `data_dir`/valkey (the embedded Valkey of an `up` there)."""
    folder = str((data_dir / "valkey").resolve())
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if os.readlink(proc / "cwd") == folder and b"valkey-server" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
    return pids


def _kill_orphaned_valkey(data_dir: Path) -> None:
    """If `up` died without stopping its Valkey (only when killed), stop that child."""
    for pid in valkey_pids(data_dir):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)


@dataclass
class Stubs:
    """The service's stubs on one channel."""

    api: pb_grpc.PersonalizeStub
    admin: pb_grpc.AdminStub

    @classmethod
    def on(cls, channel: grpc.Channel) -> Stubs:
        return cls(pb_grpc.PersonalizeStub(channel), pb_grpc.AdminStub(channel))


# ---- references ----------------------------------------------------------------------------------------


def greedy_reference(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int) -> tuple[str, str]:
    """(text, finish_reason) of transformers' own greedy generation, cut the way the engine cuts: at the
    end-of-sequence token ('eos') or after max_new_tokens ('length')."""
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    new = out[0, len(ids) :].tolist()
    if tokenizer.eos_token_id in new:
        return tokenizer.decode(new[: new.index(tokenizer.eos_token_id)], skip_special_tokens=True), "eos"
    return tokenizer.decode(new, skip_special_tokens=True), "length"


def make_peft_adapter(
    base_model: Any,
    seed: int,
    directory: Path,
    rank: int = 4,
    targets: tuple[str, ...] = ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"),
) -> PeftModel:
    """A PEFT LoRA adapter made by PEFT itself on a copy of `base_model`, lora_B perturbed so it changes the
    output, saved with `save_pretrained` into `directory`; returns the PeftModel (eval mode)."""
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=list(targets), lora_dropout=0.0, init_lora_weights=False
    )
    model = get_peft_model(copy.deepcopy(base_model), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    model.save_pretrained(str(directory))
    return model.eval()


def adapter_files(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}


KEY_A = (("authorization", "Bearer keyA"),)
"""Call metadata of tenant A of `two_tenants`."""
KEY_B = (("authorization", "Bearer keyB"),)
OPERATOR_KEY = (("authorization", "Bearer opKey"),)
"""Call metadata of the operator (the Admin API) of `two_tenants`."""


@contextlib.contextmanager
def two_tenants(root: Path, *args: str) -> Iterator[tuple[UpServer, Stubs]]:
    """`personalize up ARGS` under `root` with two tenants (KEY_A, KEY_B), an operator key (OPERATOR_KEY) and
    stubs on one channel; stopped cleanly."""
    env = {"PERSONALIZE_API_KEYS": "tenantA:keyA,tenantB:keyB", "PERSONALIZE_OPERATOR_KEYS": "opKey"}
    server = start_up(root / "data", root / "up.log", *args, env=env)
    try:
        with server.channel() as channel:
            yield server, Stubs.on(channel)
    finally:
        assert server.stop() == 0, server.log()[-4000:]

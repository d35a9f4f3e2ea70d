"""Starting and stopping `personalize up`: refusals before the model loads, graceful SIGTERM under load,
and state that survives a restart on the same data dir."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import grpc

from personalize.model import BaseModel
from personalize_service.gen.personalize.v1 import personalize_pb2 as pb
from personalize_service.gen.personalize.v1 import personalize_pb2_grpc as pb_grpc
from tests.e2e.upserver import Stubs, UpServer, adapter_files, make_peft_adapter, start_up, up_command, valkey_pids


def _run_up(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(up_command(data_dir, *args), capture_output=True, text=True, timeout=120)


def test_taken_port_is_refused_before_anything_starts(up_server: UpServer, tmp_path: Path) -> None:
    done = _run_up(tmp_path / "data", "--port", str(up_server.port))
    assert done.returncode != 0
    assert f"port {up_server.port} on 127.0.0.1 is already in use" in done.stderr
    assert not (tmp_path / "data").exists()  # no Valkey, no model: the check came first


def test_zero_workers_is_refused(tmp_path: Path) -> None:
    done = _run_up(tmp_path / "data", "--workers", "0")
    assert done.returncode != 0 and "--workers 0: up needs at least 1 worker" in done.stderr
    assert not (tmp_path / "data").exists()


def test_bad_setting_is_a_usage_error(tmp_path: Path) -> None:
    done = _run_up(tmp_path / "data", "--port", "not-a-port")
    assert done.returncode == 2 and "--port: 'not-a-port' is not an integer" in done.stderr


def test_sigterm_finishes_in_flight_calls_and_refuses_new_ones(tmp_path: Path) -> None:
    server = start_up(tmp_path / "data", tmp_path / "up.log", "--grace-s", "60")
    with server.channel() as channel:
        stubs = Stubs.on(channel)
        requests = [pb.GenerateRequest(user_id=f"u{i}", prompt="Hello, world", max_new_tokens=400) for i in range(8)]
        in_flight = [stubs.api.Generate.future(r, timeout=120) for r in requests]
        deadline = time.monotonic() + 60
        while stubs.admin.ListNodes(pb.ListNodesRequest(), timeout=10).nodes[0].load < len(requests):
            assert time.monotonic() < deadline, "the calls never all got in flight"
            time.sleep(0.02)

        server.process.send_signal(signal.SIGTERM)
        refused = _first_refusal(server)
        assert refused == grpc.StatusCode.UNAVAILABLE  # the 8 calls were in flight at SIGTERM (load above) ...

        for future in in_flight:  # ... and every one ran to its end
            response = future.result()
            assert response.finish_reason == "length" and response.completion_tokens == 400
    assert server.process.wait(60) == 0
    assert "received SIGTERM" in server.log() and "stopped" in server.log()
    server.stop()


def _first_refusal(server: UpServer, within_s: float = 60.0) -> grpc.StatusCode:
    """The status of the first new call (on a new connection) that the draining server refuses."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        with server.channel() as channel:
            try:
                Stubs.on(channel).api.Generate(
                    pb.GenerateRequest(user_id="late", prompt="hi", max_new_tokens=1), timeout=5
                )
            except grpc.RpcError as exc:
                return exc.code()
        time.sleep(0.05)
    raise AssertionError("new calls were still accepted after SIGTERM")


def test_restart_keeps_every_adapter_and_generation(base: BaseModel, tmp_path: Path) -> None:
    adapters = []
    for n in range(2):
        make_peft_adapter(base.model, seed=20 + n, directory=tmp_path / f"adapter-{n}")
        adapters.append(tmp_path / f"adapter-{n}")
    users = {"alice": [adapters[0]], "bob": [adapters[1]], "carol": [adapters[0], adapters[1]]}
    data_dir = tmp_path / "data"

    first = start_up(data_dir, tmp_path / "up1.log")
    with first.channel() as channel:
        api = Stubs.on(channel).api
        for user, dirs in users.items():
            for directory in dirs:
                api.ImportAdapter(pb.ImportAdapterRequest(user_id=user, files=adapter_files(directory)), timeout=60)
        before = _snapshot(api, [*users, "nobody"])
    assert first.stop(signal.SIGINT) == 0  # Ctrl-C: the same graceful stop as SIGTERM
    assert valkey_pids(data_dir) == [], "the embedded Valkey outlived `personalize up`"

    second = start_up(data_dir, tmp_path / "up2.log")
    with second.channel() as channel:
        after = _snapshot(Stubs.on(channel).api, [*users, "nobody"])
    assert second.stop() == 0
    assert after == before
    assert [before[u][0].version for u in users] == [1, 1, 2]  # type: ignore[union-attr]


def _snapshot(api: pb_grpc.PersonalizeStub, users: list[str]) -> dict[str, tuple[pb.AdapterInfo | None, str, bytes]]:
    """Per user: AdapterInfo (None without one), a greedy generation, the exported weights."""
    snapshot: dict[str, tuple[pb.AdapterInfo | None, str, bytes]] = {}
    for user in users:
        info: pb.AdapterInfo | None = None
        weights = b""
        try:
            info = api.GetAdapter(pb.GetAdapterRequest(user_id=user), timeout=10)
            weights = api.ExportAdapter(pb.ExportAdapterRequest(user_id=user), timeout=30).files[
                "adapter_model.safetensors"
            ]
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
        request = pb.GenerateRequest(user_id=user, prompt="Hello, world", max_new_tokens=16)
        snapshot[user] = (info, api.Generate(request, timeout=60).text, weights)
    return snapshot

"""Hostile tenants against `personalize up`: what one tenant sends never fails another tenant's stream."""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from personalize.adapters.store.keys import adapter_version, user_prefix
from personalize.lora.slots import slot_nbytes
from personalize.model import BaseModel, default_llama_config
from personalize_service.gen.personalize.v1 import personalize_pb2 as pb
from personalize_service.server.limits import MIB, Limits
from tests.e2e.upserver import (
    KEY_A,
    KEY_B,
    OPERATOR_KEY,
    Stubs,
    UpServer,
    adapter_files,
    make_peft_adapter,
    two_tenants,
)


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[UpServer, Stubs]]:
    with two_tenants(tmp_path_factory.mktemp("up-hostile")) as running:
        yield running


@pytest.fixture(scope="module")
def huge_adapter(base: BaseModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A PEFT adapter whose weights are finite but ~1e30: its deltas overflow to inf."""
    directory = tmp_path_factory.mktemp("huge-adapter")
    make_peft_adapter(base.model, seed=9, directory=directory)
    path = directory / "adapter_model.safetensors"
    save_file({k: v * 1e30 for k, v in load_file(str(path)).items()}, str(path))
    return adapter_files(directory)


class _Stream(threading.Thread):
    """Tenant B's stream, read to its end on its own thread."""

    def __init__(self, api: object) -> None:
        super().__init__(daemon=True)
        self.api = api
        self.chunks: list[pb.GenerateChunk] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        request = pb.GenerateRequest(user_id="bob", prompt="A long and quiet story about", max_new_tokens=48)
        try:
            self.chunks = list(self.api.GenerateStream(request, timeout=120, metadata=KEY_B))  # type: ignore[attr-defined]
        except grpc.RpcError as exc:
            self.error = exc


def test_tiny_temperature_and_huge_adapter_fail_only_their_own_request(
    up: tuple[UpServer, Stubs], huge_adapter: dict[str, bytes]
) -> None:
    api = up[1].api
    other = _Stream(api)
    other.start()
    tiny = api.Generate(
        pb.GenerateRequest(user_id="mallory", prompt="hi", max_new_tokens=8, temperature=1e-40),
        timeout=60,
        metadata=KEY_A,
    )
    assert tiny.finish_reason in ("length", "eos")  # decoded greedily, not a NaN draw
    try:
        api.ImportAdapter(pb.ImportAdapterRequest(user_id="mallory", files=huge_adapter), timeout=60, metadata=KEY_A)
    except grpc.RpcError as exc:  # refused at import (magnitude bounds): as good as failing alone
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.details()
    else:
        for temperature in (0.0, 0.7):
            with pytest.raises(grpc.RpcError) as raised:
                api.Generate(
                    pb.GenerateRequest(user_id="mallory", prompt="hi", max_new_tokens=8, temperature=temperature),
                    timeout=60,
                    metadata=KEY_A,
                )
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "user 'mallory'" in raised.value.details()
    other.join(120)
    assert other.error is None, other.error
    assert other.chunks and other.chunks[-1].done
    assert other.chunks[-1].final.finish_reason in ("length", "eos")
    after = api.Generate(
        pb.GenerateRequest(user_id="bob", prompt="still", max_new_tokens=4), timeout=60, metadata=KEY_B
    )
    assert after.completion_tokens >= 1


def _raw_error(server: UpServer, method: str, body: bytes, metadata: object = None) -> grpc.RpcError:
    """The error a call of `method` with `body` as its raw (unparsed) message gets."""
    with server.channel() as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as raised:
            call(body, timeout=120, metadata=metadata)
    return raised.value


def test_huge_unauthenticated_calls_oversize_requests_and_admin_calls_are_refused(
    up: tuple[UpServer, Stubs],
) -> None:
    """While B streams: junk without a key is UNAUTHENTICATED (never parsed: parsing it would be INTERNAL),
    100 MiB in one message RESOURCE_EXHAUSTED at the receive limit, a keyless 120 MiB ImportAdapterStream
    UNAUTHENTICATED before most of it is sent, a Generate over max_request_bytes INVALID_ARGUMENT, A's key
    on the Admin API PERMISSION_DENIED."""
    server, stubs = up
    other = _Stream(stubs.api)
    other.start()
    junk = b"\xff" * (100 * MIB)
    error = _raw_error(server, "/personalize.v1.Personalize/ImportAdapter", junk[: 3 * MIB])
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error.details()
    error = _raw_error(server, "/personalize.v1.Personalize/ImportAdapter", junk)  # over the receive limit
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    taken: list[int] = []

    def keyless_120_mib() -> Iterator[pb.ImportAdapterChunk]:
        for index in range(120):
            taken.append(index)
            yield pb.ImportAdapterChunk(user_id="mallory", file_name="adapter_model.safetensors", data=junk[:MIB])

    with pytest.raises(grpc.RpcError) as raised:
        stubs.api.ImportAdapterStream(keyless_120_mib(), timeout=120)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert len(taken) < 60  # refused on its headers: most of it never left the attacker
    limit = Limits().max_request_bytes
    error = _raw_error(server, "/personalize.v1.Personalize/Generate", junk[: limit + 1], KEY_A)
    assert (
        error.code() == grpc.StatusCode.INVALID_ARGUMENT and f"limit is {limit} (max_request_bytes" in error.details()
    )
    for call in (stubs.admin.Stats, stubs.admin.ListNodes):
        request = pb.StatsRequest() if call is stubs.admin.Stats else pb.ListNodesRequest()
        with pytest.raises(grpc.RpcError) as raised:
            call(request, timeout=30, metadata=KEY_A)
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert call(request, timeout=30, metadata=OPERATOR_KEY).nodes
    other.join(120)
    assert other.error is None, other.error
    assert other.chunks and other.chunks[-1].done
    ack = stubs.api.SubmitFeedback(
        pb.FeedbackRequest(user_id="bob", prompt="p", completion="c", kind=pb.FeedbackRequest.ACCEPT),
        timeout=30,
        metadata=KEY_B,
    )
    assert ack.event_id


EXAMPLES = int(os.environ.get("PERSONALIZE_HOSTILE_EXAMPLES", "30"))
NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=40,
)
metadata_values = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["abc", "1e3", "-1", str(1 << 60), "7"]),
    json_values.map(json.dumps),
    st.just("x" * 300_000),
)
metadata = st.dictionaries(
    st.sampled_from(["examples_seen", "replay", "version", "base_fingerprint", "junk"]) | st.text(max_size=10),
    metadata_values,
    max_size=4,
)
numbers = st.one_of(
    st.integers(-3, 16),
    st.just(10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e30, 1e6, 4000.0, 0.0]),
)
factors = st.sampled_from([1.0, 0.0, -1.0, 60.0, 1e4, 1e30, 3e38])
dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32])


def _hostile_files(
    files: dict[str, bytes], rank: object, alpha: object, factor: float, dtype: torch.dtype, meta: dict[str, str]
) -> dict[str, bytes]:
    config = json.loads(files["adapter_config.json"])
    config["r"], config["lora_alpha"] = rank, alpha
    with tempfile.TemporaryDirectory() as tmp:  # safetensors writes metadata only through a file
        path = Path(tmp) / "w.safetensors"
        path.write_bytes(files["adapter_model.safetensors"])
        tensors = {k: (v.double() * factor).to(dtype) for k, v in load_file(str(path)).items()}
        save_file(tensors, str(path), metadata=meta)
        weights = path.read_bytes()
    return {"adapter_config.json": json.dumps(config).encode(), "adapter_model.safetensors": weights}


@pytest.fixture(scope="module")
def plain_adapter(base: BaseModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    directory = tmp_path_factory.mktemp("plain-adapter")
    make_peft_adapter(base.model, seed=11, directory=directory)
    return adapter_files(directory)


def test_random_hostile_imports_never_hurt_another_tenant(
    up: tuple[UpServer, Stubs], plain_adapter: dict[str, bytes]
) -> None:
    server, stubs = up
    api = stubs.api
    trainer_pid = (server.data_dir / "trainer.pid").read_text()
    other = _Stream(api)
    other.start()
    counter = iter(range(10**6))

    @settings(
        max_examples=EXAMPLES, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    @given(
        rank=st.just(4) | numbers,
        alpha=st.just(8) | numbers,
        factor=st.just(1.0) | factors,
        dtype=st.just(torch.float32) | dtypes,
        meta=metadata,
    )
    @example(rank=4, alpha=8, factor=1.0, dtype=torch.float32, meta={"examples_seen": "abc"})
    @example(rank=4, alpha=8, factor=1.0, dtype=torch.float32, meta={"examples_seen": "1e3"})
    @example(rank=4, alpha=8, factor=1.0, dtype=torch.float32, meta={"examples_seen": str(1 << 60)})
    @example(
        rank=4,
        alpha=8,
        factor=1.0,
        dtype=torch.float32,
        meta={"replay": json.dumps([{"prompt": [1, {"x": None}], "kind": 3}])},
    )
    @example(rank=4, alpha=8, factor=1e30, dtype=torch.float32, meta={})
    @example(rank=4, alpha=1e30, factor=1.0, dtype=torch.float32, meta={})
    def attack(rank: object, alpha: object, factor: float, dtype: torch.dtype, meta: dict[str, str]) -> None:
        user = f"eve-{next(counter)}"
        files = _hostile_files(plain_adapter, rank, alpha, factor, dtype, meta)
        try:
            api.ImportAdapter(pb.ImportAdapterRequest(user_id=user, files=files), timeout=60, metadata=KEY_A)
        except grpc.RpcError as exc:
            assert exc.code() not in NEVER, exc.details()
            return
        api.SubmitFeedback(
            pb.FeedbackRequest(user_id=user, prompt="p", completion="c", kind=pb.FeedbackRequest.ACCEPT),
            timeout=30,
            metadata=KEY_A,
        )
        try:
            api.Generate(
                pb.GenerateRequest(user_id=user, prompt="hi", max_new_tokens=4, temperature=0.5),
                timeout=60,
                metadata=KEY_A,
            )
        except grpc.RpcError as exc:
            assert exc.code() not in NEVER, exc.details()

    attack()
    other.join(120)
    assert other.error is None, other.error
    assert other.chunks and other.chunks[-1].done
    time.sleep(2)  # let the trainer take the hostile users' feedback events before reading its pid again
    assert (server.data_dir / "trainer.pid").read_text() == trainer_pid


@pytest.fixture(scope="module")
def narrow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[UpServer, Stubs]]:
    """A server decoding at most 2 rows at a time, so a flood of one tenant queues; a feedback quota of 3
    events per tenant (refilled at 1 per 1000 s)."""
    flags = ("--max-batch", "2", "--feedback-burst", "3", "--feedback-rate", "0.001")
    with two_tenants(tmp_path_factory.mktemp("up-narrow"), *flags) as running:
        yield running


def test_one_tenants_flood_does_not_queue_another_tenant_behind_it(narrow: tuple[UpServer, Stubs]) -> None:
    """A queues 20 calls of 96 tokens on 2 rows; B's call, sent once A's flood waits in the engine's queue,
    finishes while only a few of A's calls finish (first-come-first-served would finish it behind all of
    A's). The wait is on the engine's own queue depth (Stats), not on heartbeat-reported load, which a fast
    machine can finish the flood within."""
    api = narrow[1].api
    flood = 20
    request = pb.GenerateRequest(user_id="flooder", prompt="flood", max_new_tokens=96, temperature=0.5)
    calls = [api.Generate.future(request, timeout=300, metadata=KEY_A) for _ in range(flood)]
    admin = narrow[1].admin
    deadline = time.monotonic() + 120
    while admin.Stats(pb.StatsRequest(), timeout=30, metadata=OPERATOR_KEY).nodes[0].queue_depth < flood - 4:
        assert time.monotonic() < deadline and not all(c.done() for c in calls), "A's flood never queued"
        time.sleep(0.01)
    done_before = sum(c.done() for c in calls)  # counted from here: how long B took to get here is not B's wait
    reply = api.Generate(
        pb.GenerateRequest(user_id="bob", prompt="mine", max_new_tokens=4), timeout=300, metadata=KEY_B
    )
    finished_meanwhile = sum(c.done() for c in calls) - done_before
    assert reply.completion_tokens >= 1
    # round robin admits B at the next free row: the 2 running A calls (and a next one that ends early) may
    # finish meanwhile; first-come-first-served would finish the >= 16 queued ones first
    assert finished_meanwhile <= flood // 2 - 2, f"{finished_meanwhile} of A's {flood} calls finished before B's"
    for c in calls:
        c.result()


def test_one_tenants_feedback_flood_is_refused_at_its_quota_and_not_anothers(narrow: tuple[UpServer, Stubs]) -> None:
    api = narrow[1].api

    def feedback(user: str, metadata: object) -> pb.FeedbackAck:
        request = pb.FeedbackRequest(user_id=user, prompt="p", completion="c", kind=pb.FeedbackRequest.ACCEPT)
        return api.SubmitFeedback(request, timeout=30, metadata=metadata)  # type: ignore[no-any-return]

    for _ in range(3):
        assert feedback("flooder", KEY_A).event_id
    with pytest.raises(grpc.RpcError) as raised:
        feedback("flooder", KEY_A)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "feedback quota" in raised.value.details() and "feedback_burst" in raised.value.details()
    assert feedback("bob", KEY_B).event_id  # B's quota is its own


SLOTS = 4


@pytest.fixture(scope="module")
def slotted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[UpServer, Stubs]]:
    """A server of 4 device slots (half of them per tenant, the default share), decoding one row at a time,
    so a tenant's queued calls hold their users' slots pinned until admitted. The load timeout (also the
    wait for a slot) is shorter than the 512-token decodes of A's first users (~2 s here at one row) and
    long enough for a real load on a busy CI machine (at 0.3 s one timed out: DEADLINE_EXCEEDED)."""
    slot = slot_nbytes(default_llama_config(), 16)  # the default --max-rank and target modules, float32
    flags = ("--max-batch", "1", "--device-cache", str(SLOTS * slot), "--load-timeout-s", "1.5")
    with two_tenants(tmp_path_factory.mktemp("up-slotted"), *flags) as running:
        yield running


def test_one_tenants_many_users_never_take_another_tenants_device_slots(
    slotted: tuple[UpServer, Stubs], base: BaseModel, tmp_path: Path
) -> None:
    """A imports adapters for 6 users and calls all of them at once while 1 row decodes: at most half the
    slots may be held by A's queued calls, so some of A's calls are refused naming max_tenant_slots, while
    B's stream with B's own adapter, started alongside, finishes and B's adapter still gets a slot."""
    stubs = slotted[1]
    api = stubs.api
    stats = stubs.admin.Stats(pb.StatsRequest(), timeout=30, metadata=OPERATOR_KEY).nodes[0]
    assert stats.device_slots == SLOTS, stats
    for i, (user, key) in enumerate([*((f"a{i}", KEY_A) for i in range(6)), ("bob", KEY_B)]):
        directory = tmp_path / user
        make_peft_adapter(base.model, seed=20 + i, directory=directory)
        api.ImportAdapter(
            pb.ImportAdapterRequest(user_id=user, files=adapter_files(directory)), timeout=60, metadata=key
        )
    other = _Stream(api)
    other.start()
    calls = [
        api.Generate.future(
            pb.GenerateRequest(user_id=f"a{i}", prompt="flood", max_new_tokens=512),
            timeout=300,
            metadata=KEY_A,
        )
        for i in range(6)
    ]
    refused = []
    for call in calls:
        try:
            assert call.result().completion_tokens >= 1
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
            refused.append(exc.details())
    assert refused, "A's six queued users all got a device slot: the per-tenant cap did not hold"
    assert all("tenant 'tenantA'" in d and "max_tenant_slots" in d for d in refused), refused
    other.join(120)
    assert other.error is None, other.error
    assert other.chunks and other.chunks[-1].done
    mine = api.Generate(pb.GenerateRequest(user_id="bob", prompt="mine", max_new_tokens=4), timeout=60, metadata=KEY_B)
    assert mine.completion_tokens >= 1 and mine.adapter_version >= 1, mine


def test_exporting_an_older_corrupted_version_is_refused_and_hurts_no_one(
    up: tuple[UpServer, Stubs], base: BaseModel, tmp_path: Path
) -> None:
    """An older version is found by listing the store, not through the record's checksum: with one bit of
    its object flipped on disk, exporting it is DATA_LOSS naming the version (never the altered bytes),
    the current version still exports, and B's concurrent stream finishes."""
    server, stubs = up
    api = stubs.api
    for seed in (31, 32):
        make_peft_adapter(base.model, seed=seed, directory=tmp_path / str(seed))
        api.ImportAdapter(
            pb.ImportAdapterRequest(user_id="eve", files=adapter_files(tmp_path / str(seed))),
            timeout=60,
            metadata=KEY_A,
        )
    prefix = user_prefix("tenantA", "eve")
    found = [p for p in server.data_dir.rglob("*") if p.is_file() and prefix in p.as_posix()]
    [old] = [p for p in found if adapter_version(p.as_posix()[p.as_posix().index(prefix) :]) == 1]
    flipped = bytearray(old.read_bytes())
    flipped[-100] ^= 0x01
    old.write_bytes(bytes(flipped))
    other = _Stream(api)
    other.start()
    with pytest.raises(grpc.RpcError) as raised:
        api.ExportAdapter(pb.ExportAdapterRequest(user_id="eve", version=1), timeout=60, metadata=KEY_A)
    assert raised.value.code() == grpc.StatusCode.DATA_LOSS, raised.value.details()
    assert "v1" in raised.value.details()
    current = api.ExportAdapter(pb.ExportAdapterRequest(user_id="eve"), timeout=60, metadata=KEY_A)
    assert current.info.version == 2 and current.files
    other.join(120)
    assert other.error is None, other.error
    assert other.chunks and other.chunks[-1].done

"""degrade_to_base over a real worker: real Valkey, a real file:// or SeaweedFS S3 store, the real cache
tiers and engine on the tiny default model. When a user's current adapter cannot be loaded (corrupt object,
store down) the worker serves the base model flagged degraded, or fails as before when degrading is off;
and the adapter cache never serves a deleted user's old object for the new one with the same version."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import redis
import torch
from s3server import S3Server, start_weed_mini

from personalize import bootstrap
from personalize.adapters.registry import RegistryConfig
from personalize.adapters.repository import AdapterRepository
from personalize.adapters.store import FileStore, S3Store
from personalize.adapters.store.keys import adapter_key
from personalize.adapters.store.s3 import CHECKSUM_HEADER
from personalize.config import Config, LoraConfig
from personalize.engine.types import SamplingParams
from personalize.errors import CorruptObject, IncompatibleAdapter, Unavailable
from personalize.lora.adapter import Adapter
from personalize.lora.format import random_adapter, write_peft
from personalize.lora.slots import slot_nbytes
from personalize.model import default_llama_config
from personalize.worker import Worker
from personalize_service.cli import commands as cli
from personalize_service.client import DataLossError, PersonalizeClient
from personalize_service.server.base import ServiceConfig
from personalize_service.server.worker import create_server

T = "default"  # the tenant of a server without API keys, so the gRPC checks reach the same users
R_MAX = 8
SLOT = slot_nbytes(default_llama_config(), R_MAX)
PROMPT = "Tell me about LoRA"
GREEDY = SamplingParams(max_new_tokens=16, ignore_eos=True)


@contextmanager
def running_worker(
    data_dir: Path,
    registry_url: str,
    store_url: str,
    *,
    degrade: bool,
    node_id: str = "worker-0",
    slots: int = 4,
    host_bytes: int = 1 << 24,
    disk_bytes: int = 1 << 24,
) -> Iterator[Worker]:
    """A started worker wired by `bootstrap` exactly as `personalize serve` wires it (disk tier under data_dir)."""
    config = Config(
        node_id=node_id,
        data_dir=str(data_dir),
        load_timeout_s=10.0,
        degrade_to_base=degrade,
        lora=LoraConfig(r_max=R_MAX, device_bytes=slots * SLOT, host_bytes=host_bytes, disk_bytes=disk_bytes),
    )
    worker = bootstrap.worker(replace(config, registry=RegistryConfig(url=registry_url), store_url=store_url))
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()


def distinct_adapter(worker: Worker, seed: int) -> Adapter:
    """A random adapter big enough to change greedy outputs of the tiny model."""
    return random_adapter(worker.spec, rank=4, alpha=8.0, generator=torch.Generator().manual_seed(seed), std=0.2)


def give_adapter(worker: Worker, user_id: str, seed: int) -> int:
    """Import an adapter for the user (ImportAdapter's path: object, then registry); returns its version."""
    return worker.import_adapter(T, user_id, write_peft(distinct_adapter(worker, seed), worker.spec)).version


def text_of(worker: Worker, user_id: str, use_base_model: bool = False) -> str:
    return worker.generate(T, user_id, PROMPT, GREEDY, use_base_model).result(30).text


def corrupt_current_object(worker: Worker, user_id: str, s3: S3Server | None) -> None:
    """Flip one bit of the user's current object without going through the store (a silent bit flip): the
    bytes still parse, only the checksum can tell."""
    record = worker.registry.get(T, user_id)
    assert record is not None
    key = adapter_key(T, user_id, record.version, record.checksum)
    flipped = bytearray(worker.store.get(key))
    flipped[-100] ^= 0x01
    if isinstance(worker.store, FileStore):
        (worker.store.root / key).write_bytes(bytes(flipped))
    else:
        assert isinstance(worker.store, S3Store) and s3 is not None
        name = worker.store.config.prefix + key
        raw = s3.client()
        stale = raw.stat_object(worker.store.config.bucket, name).metadata[CHECKSUM_HEADER]
        raw.put_object(
            worker.store.config.bucket,
            name,
            io.BytesIO(bytes(flipped)),
            len(flipped),
            metadata={CHECKSUM_HEADER: stale},
        )


def nothing_cached(worker: Worker) -> bool:
    return worker.cache.stats()["resident"] == {"device": 0, "host": 0, "disk": 0}


@pytest.fixture(params=["file", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        return (tmp_path / "objects").as_uri()
    server: S3Server = request.getfixturevalue("s3_server")
    return server.s3_url("pz-tests", f"degrade/{tmp_path.name}")


@pytest.fixture
def registry_url(valkey_url: str, redis_client: redis.Redis) -> str:
    """The session's Valkey, flushed for this test."""
    return valkey_url


# ---- a corrupt object ------------------------------------------------------------------------------------


@pytest.mark.parametrize("degrade", [True, False], ids=["degrade", "strict"])
def test_a_corrupt_current_object(
    tmp_path: Path, registry_url: str, store_url: str, degrade: bool, request: pytest.FixtureRequest
) -> None:
    s3 = request.getfixturevalue("s3_server") if store_url.startswith("s3://") else None
    with running_worker(tmp_path / "w", registry_url, store_url, degrade=degrade) as worker:
        assert give_adapter(worker, "broken", seed=1) == 1
        give_adapter(worker, "fine", seed=2)
        corrupt_current_object(worker, "broken", s3)
        assert nothing_cached(worker)  # imports publish only: no tier holds a good copy to fall back on
        base_text = text_of(worker, "broken", use_base_model=True)

        for _ in range(2):  # the failed load is not cached: each request tries the store again
            if degrade:
                generation = worker.generate(T, "broken", PROMPT, GREEDY)
                assert generation.result(30).text == base_text
                info = generation.info
                assert info.degraded and (info.adapter_version, info.cache_tier) == (0, "none")
                assert info.degraded_reason == (
                    "adapter v1 of user 'broken' is corrupt: the stored object failed its checksum"
                )
            else:
                with pytest.raises(CorruptObject, match="corrupt"):
                    worker.generate(T, "broken", PROMPT, GREEDY)
        assert nothing_cached(worker)  # the refused object went into no tier

        fine = worker.generate(T, "fine", PROMPT, GREEDY)  # everyone else is served as usual
        assert fine.result(30).text != base_text
        assert (fine.info.adapter_version, fine.info.degraded, fine.info.degraded_reason) == (1, False, "")
        nobody = worker.generate(T, "nobody", PROMPT, GREEDY)  # no adapter yet: base, not degraded
        assert nobody.result(30).text == base_text
        assert (nobody.info.adapter_version, nobody.info.cache_tier, nobody.info.degraded) == (0, "none", False)

        give_adapter(worker, "broken", seed=3)  # a good v2 heals the user
        healed = worker.generate(T, "broken", PROMPT, GREEDY)
        healed.result(30)
        assert (healed.info.adapter_version, healed.info.degraded) == (2, False)


def test_an_adapter_of_another_base_model_still_fails_when_degrading(tmp_path: Path, registry_url: str) -> None:
    """Only load failures degrade: an incompatible adapter is the caller's to fix, and says so."""
    with running_worker(tmp_path / "w", registry_url, (tmp_path / "objects").as_uri(), degrade=True) as worker:
        other_base = dataclasses.replace(worker.spec, base_fingerprint="sha256:" + "0f" * 32)
        foreign = AdapterRepository(worker.registry, worker.store, other_base)
        foreign.publish(T, "mallory", distinct_adapter(worker, seed=4), None, examples_seen=0)
        with pytest.raises(IncompatibleAdapter, match="trained on base"):
            worker.generate(T, "mallory", PROMPT, GREEDY)


# ---- the store down -----------------------------------------------------------------------------------------


def test_a_stopped_store(tmp_path: Path, registry_url: str) -> None:
    """SeaweedFS stops after the users got their adapters: degrading workers serve the base model flagged,
    strict ones fail UNAVAILABLE; users without an adapter are served normally by both."""
    s3 = start_weed_mini(tmp_path / "s3")
    try:
        url = s3.s3_url("down", "pz")
        with (
            running_worker(tmp_path / "on", registry_url, url, degrade=True, node_id="worker-0") as lenient,
            running_worker(tmp_path / "off", registry_url, url, degrade=False, node_id="worker-1") as strict,
        ):
            give_adapter(lenient, "alice", seed=5)
            base_text = text_of(lenient, "alice", use_base_model=True)
            s3.stop(timeout_s=10)

            generation = lenient.generate(T, "alice", PROMPT, GREEDY)
            assert generation.result(30).text == base_text
            info = generation.info
            assert info.degraded and (info.adapter_version, info.cache_tier) == (0, "none")
            assert info.degraded_reason == (
                "adapter v1 of user 'alice' unavailable: the adapter store or registry is unreachable"
            )  # no endpoint, bucket, key or secret
            assert nothing_cached(lenient)

            with pytest.raises(Unavailable, match="unreachable"):
                strict.generate(T, "alice", PROMPT, GREEDY)
            for worker in (lenient, strict):
                nobody = worker.generate(T, "nobody", PROMPT, GREEDY)
                assert nobody.result(30).text == base_text and not nobody.info.degraded
    finally:
        s3.stop(timeout_s=5)


def test_cached_users_are_served_throughout_a_store_outage(tmp_path: Path, registry_url: str) -> None:
    """Users whose adapters are in the device or disk tier keep their own adapter, undegraded, on a strict
    worker while SeaweedFS is down; a user cached nowhere fails, which shows the store really is down."""
    s3 = start_weed_mini(tmp_path / "s3")
    try:
        with running_worker(
            tmp_path / "w", registry_url, s3.s3_url("outage", "pz"), degrade=False, slots=2, host_bytes=0
        ) as worker:
            users = ["alice", "bob", "carol"]
            for seed, user_id in enumerate([*users, "dave"], start=20):
                give_adapter(worker, user_id, seed)
            before = {u: text_of(worker, u) for u in users}  # device: bob, carol; disk: all three
            assert len(set(before.values()) | {text_of(worker, "dave", use_base_model=True)}) == len(users) + 1
            assert worker.cache.stats()["resident"] == {"device": 2, "host": 0, "disk": 3}
            s3.stop(timeout_s=10)

            with pytest.raises(Unavailable, match="unreachable"):  # dave was never loaded: the store is gone
                text_of(worker, "dave")
            tiers = []
            for _ in range(3):
                for user_id in ["carol", "alice", "bob"]:
                    generation = worker.generate(T, user_id, PROMPT, GREEDY)
                    assert generation.result(30).text == before[user_id]
                    info = generation.info
                    assert (info.adapter_version, info.degraded) == (1, False)
                    tiers.append(info.cache_tier)
            assert {"device", "disk"} <= set(tiers)  # both tiers served during the outage
    finally:
        s3.stop(timeout_s=5)


# ---- through the gRPC server, the SDK and the CLI ------------------------------------------------------------


@contextmanager
def serving(worker: Worker) -> Iterator[str]:
    server, port = create_server(ServiceConfig(port=0), worker)
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def test_the_flag_reaches_the_sdk_and_the_cli(
    tmp_path: Path, registry_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    store_url = (tmp_path / "objects").as_uri()
    with (
        running_worker(tmp_path / "on", registry_url, store_url, degrade=True) as lenient,
        running_worker(tmp_path / "off", registry_url, store_url, degrade=False, node_id="worker-1") as strict,
    ):
        give_adapter(lenient, "broken", seed=6)
        give_adapter(lenient, "fine", seed=7)
        corrupt_current_object(lenient, "broken", None)
        with serving(lenient) as target, PersonalizeClient(target, retries=0) as client:
            response = client.generate("broken", PROMPT, max_new_tokens=8)
            assert response.degraded and response.adapter_version == 0 and response.cache_tier == "none"
            assert response.degraded_reason.startswith("adapter v1 of user 'broken' is corrupt")

            with client.generate_stream("broken", PROMPT, max_new_tokens=8) as stream:
                pieces = "".join(stream)
            assert stream.response is not None and stream.response.degraded
            assert stream.response.degraded_reason == response.degraded_reason
            assert stream.response.text == pieces == response.text

            normal = client.generate("fine", PROMPT, max_new_tokens=8)
            assert not normal.degraded and normal.degraded_reason == "" and normal.adapter_version == 1

            assert cli.main(["generate", "broken", PROMPT, "--max-new-tokens", "4", "--target", target]) == 0
            assert "[degraded: " in capsys.readouterr().err
            assert cli.main(["generate", "fine", PROMPT, "--max-new-tokens", "4", "--target", target]) == 0
            assert "degraded" not in capsys.readouterr().err

        with serving(strict) as target, PersonalizeClient(target, retries=0) as client:
            with pytest.raises(DataLossError) as raised:
                client.generate("broken", PROMPT, max_new_tokens=8)
            assert raised.value.code() == grpc.StatusCode.DATA_LOSS


# ---- a deleted user's old object is never served for the new one -------------------------------------------


@pytest.mark.parametrize("tier", ["device", "host", "disk"])
def test_a_node_that_missed_a_delete_serves_the_new_object(
    tmp_path: Path, registry_url: str, store_url: str, tier: str
) -> None:
    """`stale` cached the user's v1 (in `tier` only), then another node deleted the user and imported a
    different adapter, again v1. `stale` must serve the new object, never the cached old one."""
    only: dict[str, int] = {"device": {}, "host": {"slots": 1, "disk_bytes": 0}, "disk": {"slots": 1, "host_bytes": 0}}[
        tier
    ]
    with (
        running_worker(tmp_path / "a", registry_url, store_url, degrade=False) as other,
        running_worker(tmp_path / "b", registry_url, store_url, degrade=False, node_id="worker-1", **only) as stale,
    ):
        assert give_adapter(other, "u", seed=8) == 1
        old = stale.generate(T, "u", PROMPT, GREEDY)
        old_text = old.result(30).text
        assert (old.info.adapter_version, old.info.cache_tier) == (1, "store")
        if tier != "device":  # push it out of the single device slot: it stays in the host or disk tier
            give_adapter(other, "pusher", seed=9)
            text_of(stale, "pusher")
            again = stale.generate(T, "u", PROMPT, GREEDY)
            assert again.result(30).text == old_text and again.info.cache_tier == tier
            text_of(stale, "pusher")

        assert other.delete_user(T, "u")[0] == 1  # `stale` is not told
        assert give_adapter(other, "u", seed=10) == 1  # a different object, the same version number
        new_text = text_of(other, "u")
        assert new_text != old_text

        new = stale.generate(T, "u", PROMPT, GREEDY)
        assert new.result(30).text == new_text
        assert (new.info.adapter_version, new.info.cache_tier) == (1, "store")
        assert text_of(stale, "u") == new_text  # and from now on its cached copy is the new one


def test_exporting_an_older_corrupt_version_is_data_loss(tmp_path: Path, registry_url: str) -> None:
    """An older version is found by listing, not by the record's checksum: its key's checksum is verified."""
    with running_worker(tmp_path / "w", registry_url, (tmp_path / "objects").as_uri(), degrade=False) as worker:
        give_adapter(worker, "old", seed=1)
        give_adapter(worker, "old", seed=2)
        assert isinstance(worker.store, FileStore)
        [(_, key)] = [(v, k) for v, k in worker.repo.stored(T, "old") if v == 1]
        flipped = bytearray((worker.store.root / key).read_bytes())
        flipped[-100] ^= 0x01
        (worker.store.root / key).write_bytes(bytes(flipped))
        with pytest.raises(CorruptObject, match="v1"):
            worker.export_adapter(T, "old", version=1)
        assert worker.export_adapter(T, "old", version=2)[1].version == 2

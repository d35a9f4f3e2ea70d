"""Many users at once: 200 concurrent Generate calls from 50 users (half with adapters) all succeed, batch
together, and each answer is the one that user gets alone."""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from personalize.model import BaseModel
from personalize_service.gen.personalize.v1 import personalize_pb2 as pb
from tests.e2e.upserver import Stubs, UpServer, adapter_files, make_peft_adapter

USERS = [f"load-user-{i}" for i in range(50)]
WITH_ADAPTER = USERS[::2]
PROMPTS = ["Hello, world", "The quick brown fox", "Tell me about LoRA", "x"]
CALLS = 200
MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def adapter_dirs(base: BaseModel, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    dirs = [tmp_path_factory.mktemp(f"load-adapter-{seed}") for seed in range(3)]
    for seed, directory in enumerate(dirs):
        make_peft_adapter(base.model, seed=100 + seed, directory=directory)
    return dirs


def _request(call: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        user_id=USERS[call % len(USERS)], prompt=PROMPTS[call % len(PROMPTS)], max_new_tokens=MAX_NEW_TOKENS
    )


def test_200_concurrent_generations_succeed_and_batch(stubs: Stubs, adapter_dirs: list[Path]) -> None:
    for n, user in enumerate(WITH_ADAPTER):
        files = adapter_files(adapter_dirs[n % len(adapter_dirs)])
        stubs.api.ImportAdapter(pb.ImportAdapterRequest(user_id=user, files=files), timeout=60)
    distinct = {(r.user_id, r.prompt): r for r in map(_request, range(CALLS))}
    alone = {key: stubs.api.Generate(request, timeout=60).text for key, request in distinct.items()}

    futures = [stubs.api.Generate.future(_request(call), timeout=300) for call in range(CALLS)]
    busiest = 0
    while not all(f.done() for f in futures):
        busiest = max(busiest, stubs.admin.Stats(pb.StatsRequest(), timeout=30).nodes[0].max_batch_occupancy)
        time.sleep(0.05)
    failures = [(call, f.exception()) for call, f in enumerate(futures) if f.exception() is not None]
    assert not failures, failures[:3]

    for call, future in enumerate(futures):
        request, response = _request(call), future.result()
        assert response.adapter_version == (1 if request.user_id in WITH_ADAPTER else 0)
        assert response.text == alone[(request.user_id, request.prompt)], (request.user_id, request.prompt)
    assert busiest > 1
    stats = stubs.admin.Stats(pb.StatsRequest(), timeout=30).nodes[0]
    assert stats.max_batch_occupancy > 1 and stats.hits["device"] > 0


def test_streams_and_unary_calls_mix(stubs: Stubs) -> None:
    streams = [stubs.api.GenerateStream(_request(call), timeout=300) for call in range(20)]
    unary = [stubs.api.Generate.future(_request(call), timeout=300) for call in range(20)]
    for stream, future in zip(streams, unary, strict=True):
        chunks = list(stream)
        assert chunks[-1].done and chunks[-1].final.text == future.result().text


def test_cancelled_stream_leaves_the_batch(stubs: Stubs) -> None:
    stream = stubs.api.GenerateStream(
        pb.GenerateRequest(user_id="canceller", prompt="Hello, world", max_new_tokens=512), timeout=300
    )
    next(stream)
    stream.cancel()
    with pytest.raises(grpc.RpcError) as raised:
        list(stream)
    assert raised.value.code() == grpc.StatusCode.CANCELLED
    deadline = time.monotonic() + 30
    while stubs.admin.ListNodes(pb.ListNodesRequest(), timeout=10).nodes[0].load:
        assert time.monotonic() < deadline, "the cancelled stream kept generating"
        time.sleep(0.05)


def _metric_samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        families = text_string_to_metric_families(reply.read().decode())
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def test_metrics_follow_the_load(up_server: UpServer, stubs: Stubs, adapter_dirs: list[Path]) -> None:
    """Its own load, counted as deltas: passes alone or after any other test of the module."""
    url = re.search(r"metrics +(http://\S+/metrics)", up_server.log())
    assert url is not None, up_server.log()
    ok = ("personalize_requests_total", (("code", "OK"), ("rpc", "personalize.v1.Personalize/Generate")))
    tokens, steps = ("personalize_tokens_generated_total", ()), ("personalize_batch_occupancy_count", ())
    before = _metric_samples(url[1])
    user = "metrics-user"  # a fresh user: its adapter is loaded from the store on the first call
    stubs.api.ImportAdapter(pb.ImportAdapterRequest(user_id=user, files=adapter_files(adapter_dirs[0])), timeout=60)
    calls = 24
    requests = [
        pb.GenerateRequest(
            user_id=[user, "metrics-base"][n % 2], prompt=PROMPTS[n % len(PROMPTS)], max_new_tokens=MAX_NEW_TOKENS
        )
        for n in range(calls)
    ]
    replies = [f.result() for f in [stubs.api.Generate.future(r, timeout=300) for r in requests]]
    generated = sum(r.completion_tokens for r in replies)
    # Its slot load is counted under the tier it came from: one CI run saw the store count unchanged, so
    # whichever tier served it (store, disk, host RAM), some tier's count must grow.
    load_keys = {
        tier: ("personalize_adapter_load_seconds_count", (("tier", tier),)) for tier in ("store", "disk", "host")
    }
    deadline = time.monotonic() + 30
    while True:  # the server copies engine and cache counters into the metrics every second, each in turn
        samples = _metric_samples(url[1])
        grew = {key: samples.get(key, 0) - before.get(key, 0) for key in (ok, tokens, steps)}
        loads = {tier: samples.get(key, 0) - before.get(key, 0) for tier, key in load_keys.items()}
        if grew[ok] >= calls and grew[tokens] >= generated and sum(loads.values()) > 0:
            break
        assert time.monotonic() < deadline, (grew, generated, loads)
        time.sleep(0.2)
    assert generated > 0 and grew[steps] > 0
    assert samples[("personalize_batch_occupancy_sum", ())] > samples[steps]  # some step ran more than one row
    assert {r.adapter_version for r, q in zip(replies, requests, strict=True) if q.user_id == user} == {1}

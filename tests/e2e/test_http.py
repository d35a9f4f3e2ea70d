"""The OpenAI-compatible HTTP edge of `personalize up`, driven by the official `openai` package: text and
chat completions, streaming, `user` selecting the personal adapter, feedback, and OpenAI's error shape."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from personalize.model import BaseModel
from personalize.routing.ring import route_key
from personalize_service.cli.embedded import running_url
from personalize_service.client import PersonalizeClient
from personalize_service.client.routing import RoutingClient
from personalize_service.net import find_free_port
from personalize_service.server.auth import DEFAULT_TENANT
from tests.e2e.upserver import UpServer, adapter_files, greedy_reference, make_peft_adapter, start_up

KEY = "sk-test-alpha"
KEY_BETA = "sk-test-beta"
"""Another tenant: tenant isolation."""
KEY_LOAD = "sk-test-gamma"
"""A third tenant for the 200 concurrent requests, so they drain only its own rate-limit bucket."""
KEY_TRAIN = "sk-test-delta"
"""A fourth tenant whose adapter trains (its polling drains no other tenant's bucket)."""
KEY_OPERATOR = "sk-test-operator"
"""An operator key: the only kind GET /v1/stats answers (a tenant's key is 403)."""
BURST, RATE = 100, 2.0
"""Every tenant may send BURST requests at once, then RATE per second (--burst, --rate)."""
HTTP_RE = re.compile(r"openai\s+http://127\.0\.0\.1:(\d+)/v1")
PROMPT = "The quick brown fox"
METRICS_PORT = find_free_port()


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[UpServer, str]]:
    """(`personalize up` with one tenant key and the HTTP edge on a free port, its /v1 base URL)."""
    root = tmp_path_factory.mktemp("http-up")
    server = start_up(
        root / "data",
        root / "up.log",
        "--api-keys",
        f"alpha:{KEY},beta:{KEY_BETA},gamma:{KEY_LOAD},delta:{KEY_TRAIN}",
        "--operator-keys",
        KEY_OPERATOR,
        "--burst",
        str(BURST),
        "--rate",
        str(RATE),
        "--http-port",
        str(find_free_port()),
        "--metrics-port",
        str(METRICS_PORT),
    )
    try:
        deadline = time.monotonic() + 60
        while (found := HTTP_RE.search(server.log())) is None and time.monotonic() < deadline:
            time.sleep(0.1)  # the banner follows the gRPC server's own `serving on` log line
        assert found, server.log()[-2000:]
        yield server, f"http://127.0.0.1:{found[1]}/v1"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(up: tuple[UpServer, str]) -> openai.OpenAI:
    return openai.OpenAI(base_url=up[1], api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def sdk(up: tuple[UpServer, str]) -> Iterator[PersonalizeClient]:
    with PersonalizeClient(up[0].target, api_key=KEY, timeout=120) as grpc_client:
        yield grpc_client


def test_text_completion_is_the_grpc_generation(client: openai.OpenAI, sdk: PersonalizeClient, base: BaseModel) -> None:
    raw = client.completions.with_raw_response.create(
        model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, user="http-alice"
    )
    done = raw.parse()
    assert raw.headers["x-personalize-adapter-version"] == "0"
    assert done.object == "text_completion" and done.id.startswith("cmpl-") and done.created > 0
    assert done.choices[0].finish_reason in ("stop", "length") and done.usage is not None
    assert done.usage.completion_tokens > 0
    direct = sdk.generate("http-alice", PROMPT, max_new_tokens=24)
    assert done.choices[0].text == direct.text
    assert direct.text == greedy_reference(base.model, base.tokenizer, PROMPT, 24)[0]


def test_streamed_pieces_join_to_the_whole_text(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, stream=True))
    # a text chunk and the finishing one at least: a reader behind the engine gets the queued pieces joined
    assert len(chunks) >= 2 and "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_chat_completion_renders_the_template(client: openai.OpenAI, sdk: PersonalizeClient) -> None:
    messages: list[Any] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    done = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=16, temperature=0, user="http-bob"
    )
    assert done.object == "chat.completion" and done.choices[0].message.role == "assistant"
    direct = sdk.generate("http-bob", "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n", max_new_tokens=16)
    assert done.choices[0].message.content == direct.text
    as_messages = sdk.generate("http-bob", [("system", "Be brief."), ("user", "Hi")], max_new_tokens=16)
    assert (as_messages.text, as_messages.prompt_tokens) == (direct.text, direct.prompt_tokens)
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=16,
        temperature=0,
        user="http-bob",
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == direct.text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == direct.completion_tokens


def test_text_content_parts_and_vllms_sampling_extras_reach_the_worker(
    client: openai.OpenAI, sdk: PersonalizeClient
) -> None:
    as_string = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi\nthere"}], max_tokens=12, temperature=0
    )
    as_parts = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}],
        max_tokens=12,
        temperature=0,
    )
    assert as_parts.choices[0].message.content == as_string.choices[0].message.content
    assert as_parts.usage is not None and as_string.usage is not None
    assert as_parts.usage.prompt_tokens == as_string.usage.prompt_tokens
    greedy = sdk.generate("http-frank", PROMPT, max_new_tokens=24).text
    top1 = client.completions.create(  # sampling at temperature 1 from one candidate is the greedy text
        model="tiny", prompt=PROMPT, max_tokens=24, temperature=1.0, seed=3, user="http-frank", extra_body={"top_k": 1}
    )
    assert top1.choices[0].text == greedy
    penalized = sdk.generate("http-frank", PROMPT, max_new_tokens=24, repetition_penalty=3.0).text
    assert penalized != greedy  # so the equality below shows the option arrived
    over_http = client.completions.create(
        model="tiny",
        prompt=PROMPT,
        max_tokens=24,
        temperature=0,
        user="http-frank",
        extra_body={"repetition_penalty": 3.0},
    )
    assert over_http.choices[0].text == penalized


def test_user_selects_the_imported_adapter(
    client: openai.OpenAI, sdk: PersonalizeClient, base: BaseModel, tmp_path: Path
) -> None:
    model = make_peft_adapter(base.model, seed=5, directory=tmp_path)
    sdk.import_adapter("http-carol", adapter_files(tmp_path))
    raw = client.completions.with_raw_response.create(
        model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, user="http-carol"
    )
    assert raw.headers["x-personalize-adapter-version"] == "1"
    text = raw.parse().choices[0].text
    assert text == greedy_reference(model, base.tokenizer, PROMPT, 24)[0]
    other = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, user="http-dave")
    assert other.choices[0].text != text
    anonymous = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0)
    assert anonymous.choices[0].text == other.choices[0].text


def test_models_and_feedback(client: openai.OpenAI, up: tuple[UpServer, str]) -> None:
    assert [m.id for m in client.models.list().data] != []
    reply = httpx.post(
        f"{up[1]}/feedback",
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
        json={"user": "http-erin", "prompt": "Say hi", "completion": "Hello!", "kind": "accept"},
    )
    assert reply.status_code == 200 and reply.json()["event_id"]
    bad = httpx.post(
        f"{up[1]}/feedback",
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
        json={"user": "http-erin", "prompt": "Say hi", "completion": "Hello!", "kind": "correct"},
    )
    assert bad.status_code == 400 and set(bad.json()["error"]) == {"message", "type", "param", "code"}


def test_errors_have_openais_shape(client: openai.OpenAI, up: tuple[UpServer, str]) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="tiny", prompt=PROMPT, n=2)
    assert bad.value.status_code == 400 and bad.value.param == "n"
    assert isinstance(bad.value.body, dict) and bad.value.body["type"] == "invalid_request_error"
    wrong = openai.OpenAI(base_url=up[1], api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as denied:
        wrong.completions.create(model="tiny", prompt=PROMPT, max_tokens=4)
    assert denied.value.status_code == 401 and isinstance(denied.value.body, dict)
    assert set(denied.value.body) == {"message", "type", "param", "code"}
    assert "Traceback" not in denied.value.message
    assert httpx.get(up[1].removesuffix("/v1") + "/healthz").status_code == 200
    assert httpx.get(up[1].removesuffix("/v1") + "/readyz").status_code == 200


def _cancelled_streams() -> float:
    """GenerateStream calls the worker counted as CANCELLED."""
    text = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("personalize_requests_total{") and "GenerateStream" in line and 'code="CANCELLED"' in line
    )


def test_a_client_that_disconnects_cancels_its_generation(up: tuple[UpServer, str]) -> None:
    before = _cancelled_streams()
    body = {
        "model": "tiny",
        "prompt": PROMPT,
        "max_tokens": 512,
        "temperature": 1.0,
        "seed": 3,
        "stream": True,
        "user": "http-frank",
    }
    with httpx.stream(
        "POST", f"{up[1]}/completions", json=body, timeout=60, headers={"Authorization": f"Bearer {KEY}"}
    ) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    deadline = time.monotonic() + 60
    while _cancelled_streams() == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _cancelled_streams() == before + 1


def _gateway(log_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    """`personalize serve --role gateway ARGS` on a free port, once it serves; (process, /v1 base URL)."""
    port = find_free_port()
    command = [sys.executable, "-m", "personalize_service.cli", "serve", "--role", "gateway", "--http-port", str(port)]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PERSONALIZE_")}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [*command, "--data-dir", str(log_path.parent), *args], stdout=log, stderr=subprocess.STDOUT, env=environ
        )
    deadline = time.monotonic() + 60
    while b"gateway serving on" not in log_path.read_bytes():
        assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.1)
    return process, f"http://127.0.0.1:{port}/v1"


def _stopped(process: subprocess.Popen[bytes], log_path: Path) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(30)
    assert process.returncode == 0 and b"gateway stopped" in log_path.read_bytes()


def test_serve_role_gateway_routes_on_the_registry_ring(up: tuple[UpServer, str], tmp_path: Path) -> None:
    """`personalize serve --role gateway --registry-url` alone: the same answers, straight from the worker
    that owns the user on the ring (its node id in the header); an empty ring is OpenAI's 503."""
    registry = running_url(up[0].data_dir / "valkey")  # the banner masks the password
    keys = ("--api-keys", f"alpha:{KEY}")
    process, url = _gateway(tmp_path / "gateway.log", "--registry-url", registry, *keys)
    try:
        client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=120)
        raw = client.completions.with_raw_response.create(
            model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, user="http-gw"
        )
        direct = openai.OpenAI(base_url=up[1], api_key=KEY, max_retries=0).completions.with_raw_response.create(
            model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, user="http-gw"
        )
        assert raw.parse().choices[0].text == direct.parse().choices[0].text
        assert raw.headers["x-personalize-node"] == direct.headers["x-personalize-node"] != ""
        assert httpx.get(url.removesuffix("/v1") + "/readyz").status_code == 200
    finally:
        _stopped(process, tmp_path / "gateway.log")
    empty = ("--registry-url", registry, "--namespace", "nobody", *keys)
    process, url = _gateway(tmp_path / "empty.log", *empty)
    try:
        reply = httpx.post(
            f"{url}/completions", json={"prompt": "Hi", "user": "u"}, headers={"Authorization": f"Bearer {KEY}"}
        )
        assert reply.status_code == 503 and reply.headers["retry-after"]
        assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
        assert httpx.get(url.removesuffix("/v1") + "/readyz").status_code == 503
    finally:
        _stopped(process, tmp_path / "empty.log")


def test_serve_role_gateway_fronts_a_running_server(up: tuple[UpServer, str], tmp_path: Path) -> None:
    """`personalize serve --role gateway --gateway-target`: the same edge over one server's gRPC port."""
    process, url = _gateway(tmp_path / "gateway.log", "--gateway-target", up[0].target)
    try:
        client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=120)
        done = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, user="http-gw")
        assert (
            done.choices[0].text
            == openai.OpenAI(base_url=up[1], api_key=KEY, max_retries=0)
            .completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, user="http-gw")
            .choices[0]
            .text
        )
    finally:
        _stopped(process, tmp_path / "gateway.log")


def _http(up: tuple[UpServer, str], key: str) -> httpx.Client:
    return httpx.Client(base_url=up[1], headers={"Authorization": f"Bearer {key}"}, timeout=120)


def test_feedback_by_completion_id_trains_the_users_next_version(up: tuple[UpServer, str]) -> None:
    client = openai.OpenAI(base_url=up[1], api_key=KEY_TRAIN, max_retries=0, timeout=120)
    done = client.completions.create(model="tiny", prompt="Q: Say hi?\nA: ", max_tokens=8, user="http-gina")
    with _http(up, KEY_TRAIN) as http:
        reply = http.post("/feedback", json={"completion_id": done.id, "kind": "correct", "correction": " Hi!"})
        assert reply.status_code == 200 and reply.json()["event_id"], reply.text
        deadline = time.monotonic() + 240
        while (info := http.get("/users/http-gina/adapter")).status_code != 200 or info.json()["version"] < 1:
            assert time.monotonic() < deadline, info.text
            time.sleep(1.0)  # within the tenant's --rate
        assert info.json()["examples_seen"] >= 1
    raw = client.completions.with_raw_response.create(model="tiny", prompt=PROMPT, max_tokens=4, user="http-gina")
    assert int(raw.headers["x-personalize-adapter-version"]) >= 1


def test_adapters_over_http_and_tenant_isolation(up: tuple[UpServer, str], base: BaseModel, tmp_path: Path) -> None:
    make_peft_adapter(base.model, seed=7, directory=tmp_path)
    files = [("files", (name, data, "application/octet-stream")) for name, data in adapter_files(tmp_path).items()]
    with _http(up, KEY) as alpha, _http(up, KEY_BETA) as beta:
        imported = alpha.post("/users/http-hank/adapter/import", files=files)
        assert imported.status_code == 200 and imported.json()["version"] == 1, imported.text
        exported = alpha.get("/users/http-hank/adapter/export")
        assert exported.status_code == 200 and exported.headers["content-type"] == "application/zip"
        done = alpha.post("/completions", json={"prompt": PROMPT, "max_tokens": 4, "user": "http-hank"}).json()
        for reply in (  # tenant beta sees none of alpha's user: not its adapter, not its completions
            beta.get("/users/http-hank/adapter"),
            beta.get("/users/http-hank/adapter/export"),
            beta.post("/feedback", json={"completion_id": done["id"], "kind": "accept"}),
        ):
            assert reply.status_code == 404 and reply.json()["error"]["type"] == "not_found_error"
        assert beta.delete("/users/http-hank/adapter").json()["versions_deleted"] == 0
        assert alpha.get("/users/http-hank/adapter").json()["version"] == 1
        deleted = alpha.delete("/users/http-hank/adapter")
        assert deleted.status_code == 200 and deleted.json()["versions_deleted"] == 1
        assert alpha.get("/users/http-hank/adapter").status_code == 404
        forgotten = alpha.post("/feedback", json={"completion_id": done["id"], "kind": "accept"})
        assert forgotten.status_code == 404  # DeleteUser dropped the remembered completion


def test_error_statuses_have_openais_shape(up: tuple[UpServer, str]) -> None:
    with _http(up, KEY) as alpha:
        replies = {
            401: httpx.post(f"{up[1]}/completions", json={"prompt": "Hi"}, headers={"Authorization": "Bearer x"}),
            404: alpha.get("/users/http-nobody/adapter"),
            413: alpha.post("/completions", content=b" " * (1 << 21), headers={"content-type": "application/json"}),
            400: alpha.post("/chat/completions", json={"messages": [{"role": "user"}]}),
            403: alpha.get("/stats"),  # a tenant's key on the operator-only route
        }
    for status, reply in replies.items():
        assert reply.status_code == status and set(reply.json()["error"]) == {"message", "type", "param", "code"}
        assert "Traceback" not in reply.text
    assert replies[400].json()["error"]["param"] == "messages.0.content"
    with _http(up, KEY) as alpha:
        many = alpha.post("/chat/completions", json={"messages": [{"role": "user", "content": "x"}] * 1025})
    assert many.status_code == 400 and "max_chat_messages" in many.json()["error"]["message"]
    assert replies[403].json()["error"]["type"] == "permission_error"
    assert "operator key" in replies[403].json()["error"]["message"]
    with _http(up, KEY_OPERATOR) as operator:
        stats = operator.get("/stats")
    assert stats.status_code == 200, stats.text
    assert stats.json()["object"] == "stats" and len(stats.json()["nodes"]) == 1


async def _many(url: str, count: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300) as http:
        body = {"prompt": "Hi", "max_tokens": 1, "temperature": 0}
        calls = [
            http.post(
                "/completions", json={**body, "user": f"many-{i % 20}"}, headers={"Authorization": f"Bearer {KEY_LOAD}"}
            )
            for i in range(count)
        ]
        return list(await asyncio.gather(*calls))


def test_200_concurrent_requests_succeed_or_are_rate_limited(up: tuple[UpServer, str]) -> None:
    """200 at once from one tenant: each is answered 200 or, past its --burst (100; --rate 2/s refills a
    few more meanwhile), 429 with Retry-After in OpenAI's error shape; nothing else."""
    replies = asyncio.run(_many(up[1], 200))
    statuses = [r.status_code for r in replies]
    assert set(statuses) == {200, 429}, sorted(set(statuses))
    assert statuses.count(200) >= BURST // 2  # the concurrent ones did not fail for any other reason
    for reply in replies:
        if reply.status_code == 429:
            assert reply.headers["retry-after"] and reply.json()["error"]["type"] == "rate_limit_error"
        else:
            assert reply.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_with_two_workers_each_user_lands_on_its_ring_owner_without_the_router(tmp_path: Path) -> None:
    """`personalize up --workers 2`: the edge routes itself (the SDK's routing client over the workers'
    heartbeats), so every call lands on the user's ring owner and the router forwards none of them."""
    metrics_port = find_free_port()
    server = start_up(
        tmp_path / "data",
        tmp_path / "up.log",
        "--workers",
        "2",
        "--http-port",
        str(find_free_port()),
        "--metrics-port",
        str(metrics_port),
    )
    try:
        deadline = time.monotonic() + 120
        while (found := HTTP_RE.search(server.log())) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert found, server.log()[-2000:]
        with RoutingClient(running_url(server.data_dir / "valkey"), timeout=30) as ring_view:
            ring = ring_view.cluster.ring()
            assert sorted(ring.nodes) == ["worker-0", "worker-1"]
            landed = {}
            for i in range(12):
                user = f"http-ring-{i}"
                raw = httpx.post(
                    f"http://127.0.0.1:{found[1]}/v1/completions",
                    json={"prompt": "Hi", "max_tokens": 1, "user": user},
                    timeout=120,
                )
                assert raw.status_code == 200, raw.text
                landed[user] = raw.headers["x-personalize-node"]
                assert landed[user] == ring.owner(route_key(DEFAULT_TENANT, user)), user
        assert set(landed.values()) == {"worker-0", "worker-1"}
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        forwarded = [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("personalize_router_forwarded_total{") and 'rpc="Generate"' in line
        ]
        assert sum(forwarded) == 0  # no call took the router hop
    finally:
        assert server.stop() == 0, server.log()[-4000:]

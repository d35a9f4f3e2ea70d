"""The OpenAI-compatible HTTP edge of `personalize up`, driven by the official `openai` package: text and
chat completions, streaming, `user` selecting the personal adapter, feedback, and OpenAI's error shape."""

from __future__ import annotations

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
from personalize_service.client import PersonalizeClient
from personalize_service.net import find_free_port
from tests.e2e.upserver import UpServer, adapter_files, greedy_reference, make_peft_adapter, start_up

KEY = "sk-test-alpha"
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
        f"alpha:{KEY}",
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
    assert len(chunks) > 2 and "".join(c.choices[0].text for c in chunks if c.choices) == whole
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


def test_serve_role_gateway_fronts_a_running_server(up: tuple[UpServer, str], tmp_path: Path) -> None:
    """`personalize serve --role gateway` alone: the same edge over another server's gRPC port."""
    port = find_free_port()
    log_path = tmp_path / "gateway.log"
    command = [
        sys.executable,
        "-m",
        "personalize_service.cli",
        "serve",
        "--role",
        "gateway",
        "--http-port",
        str(port),
        "--gateway-target",
        up[0].target,
        "--data-dir",
        str(tmp_path),
    ]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PERSONALIZE_")}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environ)
    try:
        deadline = time.monotonic() + 60
        while b"gateway serving on" not in log_path.read_bytes():
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=120)
        done = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, user="http-gw")
        assert (
            done.choices[0].text
            == openai.OpenAI(base_url=up[1], api_key=KEY, max_retries=0)
            .completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, user="http-gw")
            .choices[0]
            .text
        )
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    assert process.returncode == 0 and b"gateway stopped" in log_path.read_bytes()

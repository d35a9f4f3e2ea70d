"""`personalize up --model DIR` on a tiny random checkpoint of each family, with a trained BPE tokenizer:
gRPC generations equal transformers' greedy ones and the stream joins to the unary text."""

from __future__ import annotations

from pathlib import Path

import pytest

from personalize.model import ModelConfig, load_base_model
from personalize_service.gen.personalize.v1 import personalize_pb2 as pb
from tests.e2e.upserver import Stubs, greedy_reference, start_up
from tests.tiny_models import save_tiny

PROMPTS = ["Hello there", "héllo wörld ✓ ça va", "日本語のテキストと中文", "emoji 🙂🚀"]


@pytest.mark.parametrize("family", ["llama3-rope", "qwen2", "gemma3"])
def test_up_with_a_real_checkpoint_generates_as_transformers(family: str, tmp_path: Path) -> None:
    directory = save_tiny(family, tmp_path / "model")
    base = load_base_model(ModelConfig(path=str(directory)))
    server = start_up(tmp_path / "data", tmp_path / "up.log", "--model", str(directory))
    try:
        with server.channel() as channel:
            stubs = Stubs.on(channel)
            for prompt in PROMPTS:
                request = pb.GenerateRequest(user_id="u", prompt=prompt, max_new_tokens=16)
                unary = stubs.api.Generate(request, timeout=120)
                chunks = list(stubs.api.GenerateStream(request, timeout=120))
                assert "".join(c.text for c in chunks) == unary.text
                assert (unary.text, unary.finish_reason) == greedy_reference(base.model, base.tokenizer, prompt, 16)
    finally:
        assert server.stop() == 0, server.log()[-4000:]

"""`personalize up --model DIR` on a tiny random checkpoint of every supported family, with a trained BPE tokenizer:
gRPC generations equal transformers' greedy ones and the stream joins to the unary text."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from personalize.model import ModelConfig, load_base_model
from personalize_service.gen.personalize.v1 import personalize_pb2 as pb
from tests.e2e.upserver import Stubs, greedy_reference, start_up
from tests.tiny_models import CHATML_TEMPLATE, FAMILIES, save_tiny

PROMPTS = ["Hello there", "héllo wörld ✓ ça va", "日本語のテキストと中文", "emoji 🙂🚀"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
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


def test_up_renders_chat_messages_with_the_models_template(tmp_path: Path) -> None:
    directory = save_tiny("qwen2", tmp_path / "model", chat_template=CHATML_TEMPLATE)
    base = load_base_model(ModelConfig(path=str(directory)))
    chat = [pb.ChatMessage(role="system", content="Be brief."), pb.ChatMessage(role="user", content="héllo ✓")]
    turns = [{"role": m.role, "content": m.content} for m in chat]
    rendered = base.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    template_ids = base.tokenizer.apply_chat_template(turns, add_generation_prompt=True, return_dict=False)
    server = start_up(tmp_path / "data", tmp_path / "up.log", "--model", str(directory))
    try:
        with server.channel() as channel:
            api = Stubs.on(channel).api
            via_chat = api.Generate(pb.GenerateRequest(user_id="u", messages=chat, max_new_tokens=12), timeout=120)
            via_text = api.Generate(pb.GenerateRequest(user_id="u", prompt=rendered, max_new_tokens=12), timeout=120)
            assert via_chat.text == via_text.text == greedy_reference(base.model, base.tokenizer, rendered, 12)[0]
            assert via_chat.prompt_tokens == len(template_ids)
            feedback = pb.FeedbackRequest(user_id="u", messages=chat, completion="ok", kind=pb.FeedbackRequest.ACCEPT)
            assert api.SubmitFeedback(feedback, timeout=60).event_id
            both = pb.GenerateRequest(user_id="u", prompt="x", messages=chat)
            with pytest.raises(grpc.RpcError) as err:
                api.Generate(both, timeout=60)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "exactly one of prompt and messages" in (err.value.details() or "")
    finally:
        assert server.stop() == 0, server.log()[-4000:]

"""Chat: messages render exactly as the model's `apply_chat_template` (with the generation prompt), the same
in serving and in training, and a model without a chat template refuses them by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from personalize.engine.engine import Engine, EngineConfig
from personalize.engine.text import ChatMessage, encode_chat, encode_prompt
from personalize.engine.types import SamplingParams
from personalize.errors import InvalidArgument
from personalize.feedback.batch import build_batch
from personalize.feedback.events import FeedbackEvent
from personalize.feedback.examples import VersionExamples, decode, encode
from personalize.model import BaseModel, ModelConfig, load_base_model
from tests.helpers import hf_greedy
from tests.tiny_models import CHATML_TEMPLATE, save_tiny

CHATS = [
    (ChatMessage("user", "Hello there"),),
    (ChatMessage("system", "Be brief."), ChatMessage("user", "héllo wörld ✓ 日本語")),
    (ChatMessage("user", "Hi"), ChatMessage("assistant", "Hello!"), ChatMessage("user", "emoji 🙂")),
]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory: pytest.TempPathFactory) -> BaseModel:
    directory = save_tiny("qwen2", tmp_path_factory.mktemp("chat"), chat_template=CHATML_TEMPLATE)
    return load_base_model(ModelConfig(path=str(directory)))


def _template_ids(tokenizer: object, chat: tuple[ChatMessage, ...]) -> list[int]:
    turns = [{"role": m.role, "content": m.content} for m in chat]
    ids = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=False)  # type: ignore[attr-defined]
    return list(ids)


def _hf_greedy(base: BaseModel, ids: list[int]) -> str:
    out = hf_greedy(base.model, ids, NEW_TOKENS)
    return str(base.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True))


@pytest.mark.parametrize("chat", CHATS)
def test_messages_encode_exactly_as_apply_chat_template(chat_base: BaseModel, chat: tuple[ChatMessage, ...]) -> None:
    ids = encode_chat(chat_base.tokenizer, chat)
    assert ids == _template_ids(chat_base.tokenizer, chat)
    assert chat_base.tokenizer.decode(ids).endswith("<|im_start|>assistant\n")  # the generation prompt


def test_serving_messages_equals_the_rendered_prompt_and_transformers(chat_base: BaseModel) -> None:
    engine = Engine(chat_base, EngineConfig(max_batch=2 * len(CHATS), max_len=256))
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    rendered = [
        chat_base.tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in c], add_generation_prompt=True, tokenize=False
        )
        for c in CHATS
    ]
    via_chat = [engine.submit(c, params) for c in CHATS]
    via_text = [engine.submit(r, params) for r in rendered]
    engine.run_until_idle()
    for chat, text, prompt, a, b in zip(CHATS, rendered, rendered, via_chat, via_text, strict=True):
        assert encode_prompt(chat_base.tokenizer, prompt) == _template_ids(chat_base.tokenizer, chat)  # no BOS here
        assert a.result().text == b.result().text == _hf_greedy(chat_base, _template_ids(chat_base.tokenizer, chat))
        assert a.result().prompt_tokens == len(_template_ids(chat_base.tokenizer, chat)), text


@pytest.mark.parametrize("kind", ["accept", "correct", "prefer"])
def test_training_rows_are_the_chat_template_ids_then_the_answer(chat_base: BaseModel, kind: str) -> None:
    tok = chat_base.tokenizer
    chat = CHATS[1]
    event = FeedbackEvent("t", "u", kind, "", "A short answer", correction="Corrected", rejected="Other", messages=chat)
    batch = build_batch(tok, [[event]], max_tokens=256)
    prompt_ids = _template_ids(tok, chat)
    answers = {"accept": ["A short answer"], "correct": ["Corrected"], "prefer": ["A short answer", "Other"]}[kind]
    for row, answer in enumerate(answers):
        want = [*prompt_ids, *tok.encode(answer, add_special_tokens=False), tok.eos_token_id]
        got = batch.input_ids[row][batch.attention_mask[row].bool()].tolist()
        assert got == want
        labels = batch.labels[row][: len(want)].tolist()
        assert labels == [-100] * len(prompt_ids) + want[len(prompt_ids) :]


def test_a_model_without_a_chat_template_refuses_messages(tmp_path: Path) -> None:
    base = load_base_model(ModelConfig(path=str(save_tiny("llama", tmp_path / "m"))))
    engine = Engine(base, EngineConfig(max_batch=1, max_len=64))
    with pytest.raises(InvalidArgument, match="messages: this model has no chat template"):
        engine.submit(CHATS[0], SamplingParams())
    with pytest.raises(InvalidArgument, match="messages: a chat needs at least one message"):
        encode_chat(base.tokenizer, ())


def test_the_builtin_model_renders_chat_with_its_documented_template() -> None:
    tok = load_base_model(ModelConfig()).tokenizer
    chat = (ChatMessage("system", "Be brief."), ChatMessage("user", "Hi"))
    assert tok.decode(encode_chat(tok, chat)) == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"


def test_chat_events_keep_their_messages_on_the_stream_and_in_replay() -> None:
    event = FeedbackEvent("t", "u", "accept", "", "ok", messages=CHATS[2])
    assert FeedbackEvent.from_fields(event.to_fields()) == event
    plain = FeedbackEvent("t", "u", "accept", "a prompt", "ok")
    assert FeedbackEvent.from_fields(plain.to_fields()) == plain
    stored = decode(encode(VersionExamples(["1-0"], [event, plain])))
    assert [(e.prompt, e.messages) for e in stored.replay] == [("", CHATS[2]), ("a prompt", ())]
    with pytest.raises(InvalidArgument, match="exactly one of prompt and messages"):
        FeedbackEvent("t", "u", "accept", "a prompt", "ok", messages=CHATS[0])

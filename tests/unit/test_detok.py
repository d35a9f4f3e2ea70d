"""The incremental detokenizer: pieces never hold a broken character, always join to the full decode,
and each token decodes a window of bounded length (constant work per token)."""

from __future__ import annotations

import random
from typing import Any

import pytest
from transformers import ByT5Tokenizer

from personalize.engine.text import TextStream
from tests.tiny_models import CORPUS, train_tokenizer

TOKENIZERS = {
    "byte_level": lambda: train_tokenizer("byte_level"),
    "sentencepiece": lambda: train_tokenizer("sentencepiece"),
    "byt5": ByT5Tokenizer,
}
TEXT = " ".join(CORPUS) + " Ünïcödé 🙂 終わり"


class CountingTokenizer:
    """Wraps a tokenizer and records how many ids each decode call was given."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.lengths: list[int] = []

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        self.lengths.append(len(ids))
        return str(self.inner.decode(ids, **kwargs))


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def tokenizer(request: pytest.FixtureRequest) -> Any:
    return TOKENIZERS[request.param]()


def _stream(tokenizer: Any, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], TextStream]:
    stream = TextStream(tokenizer, stop)
    pieces = [stream.push(i) for i in ids]
    return [*pieces, stream.flush()], stream


@pytest.mark.parametrize("repeat", [1, 8])
def test_pieces_of_valid_text_are_whole_characters_and_join_to_the_decode(tokenizer: Any, repeat: int) -> None:
    ids = tokenizer.encode(TEXT * repeat, add_special_tokens=False)
    pieces, stream = _stream(tokenizer, ids)
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == stream.text == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("seed", range(4))
def test_random_ids_join_to_the_decode(tokenizer: Any, seed: int) -> None:
    rng = random.Random(seed)
    ids = [rng.randrange(3, min(len(tokenizer), 300)) for _ in range(200)]
    pieces, _ = _stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)


def test_stop_string_cuts_across_pieces(tokenizer: Any) -> None:
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    pieces, stream = _stream(tokenizer, ids, stop=("lazy dog",))
    full = tokenizer.decode(ids, skip_special_tokens=True)
    assert stream.stopped and "".join(pieces) == full[: full.index("lazy dog")]


def test_work_per_token_is_bounded_whatever_the_length(tokenizer: Any) -> None:
    counting = CountingTokenizer(tokenizer)
    ids = tokenizer.encode(TEXT * 20, add_special_tokens=False)
    _stream(counting, ids)
    assert len(ids) > 1000
    assert len(counting.lengths) <= 2 * len(ids) + 2
    assert max(counting.lengths) <= 16  # a window of a few tokens, never the sequence so far


def test_special_tokens_among_the_ids_are_left_out_as_a_full_decode_leaves_them(tokenizer: Any) -> None:
    text_ids = tokenizer.encode(TEXT, add_special_tokens=False)
    specials = sorted(tokenizer.all_special_ids)
    assert specials
    ids = [i for n, t in enumerate(text_ids) for i in ((t, specials[n % len(specials)]) if n % 7 == 0 else (t,))]
    pieces, _ = _stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)

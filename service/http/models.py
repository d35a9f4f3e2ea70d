"""The pydantic schema of the OpenAI-compatible requests this edge accepts (unknown fields are ignored,
as OpenAI's own server and vLLM's do for options they do not act on)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

_UINT32_MAX, _UINT64_MAX = 2**32 - 1, 2**64 - 1
"""The proto fields' ranges (max_new_tokens, seed): a value outside is the caller's 400, never a failed
conversion (500); the worker then holds max_new_tokens to its own limit."""


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = ""
    max_tokens: int | None = Field(default=None, ge=1, le=_UINT32_MAX)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=_UINT32_MAX)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=_UINT64_MAX)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: int = 1

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def new_tokens(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 16


class CompletionRequest(_Sampling):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str
    """Required (a message without it is a 400 naming `messages.N.content`, not an empty turn)."""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    completion_id: str = ""
    """The `id` of a completion this edge returned: its user, prompt and text are looked up (within the
    completion TTL), so none of them is sent again."""
    user: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    completion: str | None = None
    kind: Literal["accept", "reject", "correct", "prefer"]
    correction: str = ""
    rejected: str = ""
    event_key: str = ""

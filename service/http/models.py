"""The pydantic schema of the OpenAI-compatible requests this edge accepts. Unknown fields are ignored, as
OpenAI's own server and vLLM's do; an OpenAI option that would change the output and that this server does
not implement (`logprobs`, `frequency_penalty`, `response_format`, `tools`, ...) is a 400 naming it when set
to anything but its neutral value (`_Sampling.unsupported`), never silently dropped."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    field_validator,
    model_validator,
)

_UINT32_MAX, _UINT64_MAX = 2**32 - 1, 2**64 - 1
"""The proto fields' ranges (max_new_tokens, seed): a value outside is the caller's 400, never a failed
conversion (500); the worker then holds max_new_tokens to its own limit."""


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    _options: dict[str, Any] = PrivateAttr(default_factory=dict)
    """The UNSUPPORTED options the body set, picked out of it by name (the rest of its unknown fields are
    never copied: a body of many thousands of them costs its parse only)."""

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
    top_k: int = Field(default=0, ge=-1, le=_UINT32_MAX)
    """vLLM's extra sampling option: the k most likely tokens only; 0 or -1 = off."""
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    """vLLM's extra sampling option: > 1 discourages tokens already in the prompt or the completion."""

    @model_validator(mode="wrap")
    @classmethod
    def _pick_options(cls, data: Any, handler: ModelWrapValidatorHandler[_Sampling]) -> _Sampling:
        model = handler(data)
        if isinstance(data, dict):
            model._options = {name: data[name] for name in UNSUPPORTED if name in data}
        return model

    def unsupported(self) -> tuple[str, str] | None:
        """(the first OpenAI option set to a value this server does not implement, why), or None."""
        for name, (neutral, instead) in UNSUPPORTED.items():
            if not neutral(self._options.get(name)):
                return name, f"{name}: not supported by this server (leave it out{instead})"
        return None

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def new_tokens(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 16


def _off(value: Any) -> bool:
    return value is None or value is False


def _zero(value: Any) -> bool:
    return value is None or (not isinstance(value, bool) and value == 0)


UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "echo": (_off, ""),
    "logprobs": (_off, "; the gRPC API's GenerateRequest.logprobs returns the chosen tokens' logprobs"),
    "top_logprobs": (_zero, ""),
    "frequency_penalty": (_zero, " or send 0; repetition_penalty is supported"),
    "presence_penalty": (_zero, " or send 0; repetition_penalty is supported"),
    "logit_bias": (lambda v: not v, ""),
    "best_of": (lambda v: v is None or (not isinstance(v, bool) and v == 1), " or send 1"),
    "suffix": (lambda v: not v, ""),
    "response_format": (lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"), ' or send "text"'),
    "tools": (lambda v: not v, ""),
    "tool_choice": (lambda v: v in (None, "none", "auto"), ""),
    "functions": (lambda v: not v, ""),
    "function_call": (lambda v: v in (None, "none", "auto"), ""),
}
"""OpenAI options that change the output, with the values that leave it unchanged (what SDKs send by
default) and what to do instead: any other value is refused (400) rather than ignored."""


class CompletionRequest(_Sampling):
    prompt: str | list[str]

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and value and not all(isinstance(p, str) for p in value):
            raise ValueError("token-id prompts are not supported; send the prompt as text")
        return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    """OpenAI's roles without tool and function turns, which this server does not serve."""
    content: str
    """Required (a message without it is a 400 naming `messages.N.content`, not an empty turn). OpenAI's
    list of content parts is accepted when every part is text: the parts join with newlines, as vLLM joins
    them; an image or audio part is a 400 naming it."""

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        texts = []
        for n, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"part {n} is {kind or 'not a content part'!r}; only text parts are supported")
            texts.append(part["text"])
        return "\n".join(texts)


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

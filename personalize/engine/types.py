"""Request and result types of the generation engine."""

from __future__ import annotations

from dataclasses import dataclass, field

from personalize.errors import InvalidArgument


@dataclass(frozen=True)
class SamplingParams:
    """How to decode one request."""

    max_new_tokens: int = 64
    """Upper bound on generated tokens (>= 1)."""
    temperature: float = 0.0
    """0 = greedy; otherwise softmax temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]."""
    seed: int = 0
    """Per-request sampling seed: the same seed gives the same sampled text."""
    stop: tuple[str, ...] = ()
    """Generation ends before the first occurrence of any of these strings."""
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token (benchmarks)."""
    top_k: int = 0
    """Sample among the k most likely tokens only; 0 = no limit."""
    repetition_penalty: float = 1.0
    """CTRL penalty in (0, 100] on tokens of the prompt and completion so far; 1.0 = none, > 1 discourages."""
    logprobs: bool = False
    """Return each chosen token's log-probability (GenerationResult.logprobs)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InvalidArgument(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (self.temperature >= 0.0) or self.temperature > 100.0:
            raise InvalidArgument(f"temperature must be in [0, 100], got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0 (0 = no limit), got {self.top_k}")
        if not (0.0 < self.repetition_penalty <= 100.0):
            raise InvalidArgument(f"repetition_penalty must be in (0, 100] (1.0 = none), got {self.repetition_penalty}")
        if any(not s for s in self.stop):
            raise InvalidArgument("stop strings must be non-empty")


@dataclass(frozen=True)
class StreamPiece:
    """Newly final text of a streamed request with the logprobs of the tokens it completes."""

    text: str
    logprobs: tuple[float, ...] = ()
    """With SamplingParams.logprobs: log p of each token generated since the previous piece (a token whose
    text was held back, an unfinished character or a possible stop string, counts in the piece that
    releases it; an EOS or a stop string's tokens in the last piece). Joined over the pieces: the result's."""


@dataclass
class RequestTimings:
    """When one request passed each stage, in seconds since the epoch (0.0 = not reached), for metrics
    and traces: waiting = admitted - submitted, prefill = first_token - admitted (time to first token =
    first_token - submitted), decode = finished - first_token."""

    submitted: float = 0.0
    admitted: float = 0.0
    """Taken from the waiting queue into a prefill."""
    first_token: float = 0.0
    finished: float = 0.0
    token_gaps: list[float] = field(default_factory=list)
    """Seconds between consecutive tokens after the first (inter-token latency), one per later token."""


@dataclass(frozen=True)
class GenerationResult:
    """The outcome of one request."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    """'stop' (stop string), 'length' (max_new_tokens), 'eos' (end-of-sequence token) or 'cancelled'."""
    logprobs: tuple[float, ...] = ()
    """With SamplingParams.logprobs: log p of each generated token under the model's (unpenalized,
    untempered) distribution, natural log; one per completion token."""
    timings: RequestTimings | None = field(default=None, compare=False)
    """When it was queued, admitted, produced its first token and finished; None for a request that never ran."""

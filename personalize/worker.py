"""A worker node: the facade the gRPC service calls. Registry lookup -> cache -> engine batch.

`service/` translates requests into these calls and back; nothing here knows about gRPC.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from personalize.engine.types import GenerationResult


@dataclass(frozen=True)
class AdapterInfo:
    """What the system knows of one user's adapter (API.md `AdapterInfo`)."""

    user_id: str
    version: int
    rank: int
    examples_seen: int
    base_fingerprint: str
    updated_at_unix_ms: int
    pending_events: int = 0
    owner_node: str = ""


@dataclass(frozen=True)
class GenerationInfo:
    """Which adapter served a generation and where it was found."""

    adapter_version: int
    """0 = the base model served (no adapter, or use_base_model)."""
    cache_tier: str
    """device, host, disk, store or none."""
    node_id: str


@dataclass(frozen=True)
class NodeStats:
    """Per-node figures for `Admin.Stats`."""

    node_id: str
    resident: dict[str, int] = field(default_factory=dict)
    """tier -> adapters resident."""
    bytes: dict[str, int] = field(default_factory=dict)
    """tier -> bytes resident."""
    hits: dict[str, int] = field(default_factory=dict)
    misses: dict[str, int] = field(default_factory=dict)
    batch_occupancy: float = 0.0
    """Mean running requests per decode step over the node's life."""
    max_batch_occupancy: int = 0
    queue_depth: int = 0
    stream_lag: int = 0


class Generation(Protocol):
    """A running request: iterate for text pieces as they are produced, or wait for the result."""

    info: GenerationInfo

    def __iter__(self) -> Iterator[str]: ...

    def result(self, timeout: float | None = None) -> GenerationResult: ...

    def cancel(self) -> None: ...

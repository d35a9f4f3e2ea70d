"""The root configuration: one object crosses the entry point; `personalize.bootstrap` wires the parts."""

from __future__ import annotations

from dataclasses import dataclass, field

from personalize.adapters.registry import RegistryConfig
from personalize.engine.engine import EngineConfig
from personalize.errors import InvalidArgument
from personalize.feedback.stream import StreamConfig
from personalize.feedback.trainer import TrainerConfig
from personalize.lora.adapter import TARGET_MODULES
from personalize.model import ModelConfig


@dataclass(frozen=True)
class LoraConfig:
    """Adapters this node accepts and how many stay resident on the device."""

    r_max: int = 16
    """Largest rank accepted (smaller ranks are zero-padded in the slots)."""
    target_modules: tuple[str, ...] = TARGET_MODULES
    """Projections that may carry LoRA."""
    device_bytes: int = 512 * 2**20
    """Byte budget of the device slot tier; the slot count is this over the bytes of one slot."""
    host_bytes: int = 1 * 2**30
    """Byte budget of parsed adapters kept in host RAM."""
    disk_bytes: int = 8 * 2**30
    """Byte budget of the local-disk tier (under the data directory)."""
    keep_versions: int = 4
    """Stored versions kept per user: every keep_versions-th publish deletes the versions older than the
    newest keep_versions (the corrupt-object recovery rebuilds from them) and objects of lost races at the
    current version; 0 = keep every version."""
    tenant_slot_share: float = 0.5
    """Largest share of the device slots one tenant may hold pinned or loading at once (1.0 = no cap)."""

    def __post_init__(self) -> None:
        if not 0 < self.tenant_slot_share <= 1:
            raise InvalidArgument(f"lora tenant_slot_share must be in (0, 1], got {self.tenant_slot_share}")
        if not 1 <= self.r_max <= 256:
            raise InvalidArgument(f"lora r_max must be in [1, 256], got {self.r_max}")
        bad = set(self.target_modules) - set(TARGET_MODULES)
        if bad or not self.target_modules:
            raise InvalidArgument(f"lora target_modules must be a non-empty subset of {TARGET_MODULES}")
        if self.keep_versions < 0:
            raise InvalidArgument(f"lora keep_versions must be >= 0 (0 = keep all), got {self.keep_versions}")
        if min(self.device_bytes, self.host_bytes, self.disk_bytes) < 0:
            raise InvalidArgument("cache byte budgets must be >= 0")

    def max_tenant_slots(self, num_slots: int) -> int:
        """The cache's max_tenant_slots for a pool of `num_slots`: at least 1; 0 (no cap) at share 1.0."""
        return 0 if self.tenant_slot_share >= 1 else max(1, int(self.tenant_slot_share * num_slots))


@dataclass(frozen=True)
class Config:
    """Everything one node needs: model, adapters, engine, and where state lives."""

    node_id: str = "worker-0"
    """Stable node name (the StatefulSet pod name in Kubernetes): the ring hashes it."""
    data_dir: str = "./data"
    """Local state: embedded Valkey AOF, file:// store, disk cache."""
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    """The registry's Valkey/Redis: URL (empty = `up`'s embedded Valkey), key namespace (the feedback
    stream's too), bucket bits, cluster protocol."""
    store_url: str = ""
    """file:// or s3:// URL of the adapter store; empty = file:// under data_dir."""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    feedback: StreamConfig = field(default_factory=StreamConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    load_timeout_s: float = 30.0
    """How long a request waits for its adapter to load before failing."""
    degrade_to_base: bool = False
    """If a user's adapter cannot be loaded (store down), serve the base model (flagged) instead of failing."""
    allow_unsynced_registry: bool = False
    """Run against a registry server that acknowledges writes before they are on disk (appendfsync other
    than always); by default such a server is refused at startup."""

    def __post_init__(self) -> None:
        if self.feedback.namespace != self.registry.namespace:  # one deployment, one key prefix
            raise InvalidArgument(
                f"feedback.namespace {self.feedback.namespace!r} differs from registry.namespace "
                f"{self.registry.namespace!r}; they name the same deployment's keys"
            )

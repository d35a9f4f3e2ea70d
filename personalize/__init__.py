"""personalize: per-user LoRA adapters on one shared base model (library; no gRPC here)."""

__version__ = "0.1.0"

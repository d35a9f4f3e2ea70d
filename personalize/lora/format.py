"""PEFT's on-disk LoRA format: `adapter_config.json` + `adapter_model.safetensors`, strictly validated.

Files are untrusted input (users import adapters), so every read checks names, shapes, ranks, dtypes and
values against the base model and raises `AdapterError` (or `IncompatibleAdapter` for a fingerprint
mismatch) naming the file, the tensor and what was expected. Pickle (`adapter_model.bin`) is never read.

Decisions:
- rsLoRA (`use_rslora: true`, scaling alpha/sqrt(r)) is accepted and normalised to plain LoRA on read:
  the adapter's alpha becomes `lora_alpha * sqrt(r)`, so `Adapter.scaling` is exact. Files we write are
  always plain LoRA (`use_rslora: false`) with that effective alpha: PEFT computes the same delta.
- Files may hold float32, bfloat16 or float16; readers convert to the requested dtype (float32 default)
  and refuse values that are non-finite before or after that conversion. Writers keep the adapter's dtype.
- An imported adapter must also be sane in magnitude, not only finite (`check_served`):
  |w| <= MAX_WEIGHT, alpha / r <= MAX_SCALING and the delta's norm bound scaling * |B|_F * |A|_F <=
  max_delta_norm(dtype) of the served dtype, so no activation of norm up to 256 overflows fp16/bf16/fp32
  through the adapter (a poisoned adapter is refused at import, not served as inf logits).
- Our metadata (base_fingerprint, version, ...) lives in the safetensors header metadata, so it travels
  with the weights file; `adapter_config.json` holds only PEFT's own fields so every PEFT version reads it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import torch
from safetensors.torch import save as save_safetensors

from personalize.errors import AdapterError, IncompatibleAdapter, InvalidArgument
from personalize.lora.adapter import TARGET_MODULES, Adapter, module_key

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"
DEFAULT_MAX_BYTES = 512 * 1024 * 1024
"""Per-file size limit of a read, in bytes."""

MAX_WEIGHT = 1e3
"""Largest accepted |value| of a LoRA weight (trained adapters hold values well below 1)."""
MAX_SCALING = 1e3
"""Largest accepted alpha / r."""
MAX_DELTA_NORM = 1e4
"""Largest accepted bound scaling * |B|_F * |A|_F on a module's delta norm (in float32)."""
_MAX_RANK = 1 << 20  # before r_max is known: keeps sqrt(r) and alpha / r in float range
_ACTIVATION_HEADROOM = 256.0  # activation norm the delta bound must survive in the served dtype

_OBJECT = "adapter object"  # how the single-blob form is named in error messages
_FILE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_FORMAT_KEY = "format"  # transformers/PEFT write {"format": "pt"} and warn when it is absent
_RESERVED_METADATA = (_FORMAT_KEY, ADAPTER_CONFIG)
_LORA_TENSOR = re.compile(r"base_model\.model\.(?P<path>[\w.]+?)\.lora_(?P<rest>.+)")
_MODULE_PATH = re.compile(r"model\.layers\.(?P<layer>\d{1,6})\.(?:self_attn|mlp)\.(?P<module>\w+)")
# init_lora_weights values that leave the base weights alone; PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA rewrite
# them, so their unconverted adapters only work on a modified base.
_SAFE_INITS: tuple[object, ...] = (True, False, "gaussian", "eva", "orthogonal", "mica")
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (use_dora)",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "fan_in_fan_out": "transposed weights (fan_in_fan_out)",
    "lora_bias": "LoRA bias terms (lora_bias)",
    "layer_replication": "layer replication (layer_replication)",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "use_qalora": "QALoRA (use_qalora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
}


@dataclass(frozen=True)
class AdapterSpec:
    """What an adapter must match to run on one base model."""

    r_max: int
    """Largest accepted rank."""
    target_modules: tuple[str, ...]
    """Modules that may carry LoRA, a subset of TARGET_MODULES."""
    shapes: dict[str, tuple[int, int]]
    """module_key(layer, module) -> (d_out, d_in) of the base linear, for every layer and target module."""
    base_fingerprint: str = ""
    """Fingerprint of the base model; empty = do not check."""
    base_model_name: str = ""
    """Written as PEFT's base_model_name_or_path (null when empty)."""

    def __post_init__(self) -> None:
        if self.r_max < 1:
            raise InvalidArgument(f"r_max must be >= 1, got {self.r_max}")
        unknown = [m for m in self.target_modules if m not in TARGET_MODULES]
        if not self.target_modules or unknown:
            raise InvalidArgument(
                f"target_modules must be a non-empty subset of {TARGET_MODULES}, got {self.target_modules}"
            )
        for key, shape in self.shapes.items():
            match = _MODULE_PATH.fullmatch(key)
            if (
                match is None
                or match["module"] not in self.target_modules
                or module_key(int(match["layer"]), match["module"]) != key
            ):
                raise InvalidArgument(f"shapes key {key!r} is not the module_key of a target module")
            if len(shape) != 2 or min(shape) < 1:
                raise InvalidArgument(f"shape of {key} must be (d_out, d_in) > 0, got {shape}")

    @property
    def num_layers(self) -> int:
        return 1 + max((_layer_of(key) for key in self.shapes), default=-1)

    @classmethod
    def for_model(
        cls, model: Any, r_max: int, target_modules: tuple[str, ...] = TARGET_MODULES, base_fingerprint: str = ""
    ) -> AdapterSpec:
        """Spec of a Llama-family HF causal LM, or of a `personalize.model.BaseModel` (whose fingerprint
        is then the default), read from `model.model.layers[i].self_attn.q_proj` etc."""
        if isinstance(getattr(model, "fingerprint", None), str):  # a BaseModel, without importing it
            base_fingerprint = base_fingerprint or model.fingerprint
            model = model.model
        shapes: dict[str, tuple[int, int]] = {}
        for index, layer in enumerate(model.model.layers):
            for name in target_modules:
                key = module_key(index, name)
                weight = layer.get_submodule(key.split(".", 3)[3]).weight
                shapes[key] = (int(weight.shape[0]), int(weight.shape[1]))
        return cls(r_max=r_max, target_modules=tuple(target_modules), shapes=shapes, base_fingerprint=base_fingerprint)


def _layer_of(key: str) -> int:
    return int(key.split(".")[2])


def _canonical(keys: Collection[str]) -> list[str]:
    """Module keys ordered by layer, then by TARGET_MODULES order."""
    return sorted(keys, key=lambda k: (_layer_of(k), TARGET_MODULES.index(k.rsplit(".", 1)[1])))


def _tensor_name(key: str, half: str) -> str:
    """PEFT's saved name of lora_A / lora_B of a module: base_model.model.<key>.lora_A.weight."""
    return f"base_model.model.{key}.lora_{half}.weight"


# --- constructors ----------------------------------------------------------------------------------


def _stamped(spec: AdapterSpec, metadata: Mapping[str, str] | None) -> dict[str, str]:
    out = dict(metadata or {})
    if spec.base_fingerprint:
        out.setdefault("base_fingerprint", spec.base_fingerprint)
    return out


def _constructed(
    spec: AdapterSpec,
    rank: int,
    alpha: float,
    metadata: Mapping[str, str] | None,
    draw: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]],
) -> Adapter:
    """An adapter with draw(d_out, d_in) -> (lora_a, lora_b) on every module of `spec`, in canonical order."""
    if not 1 <= rank <= spec.r_max:
        raise AdapterError(f"rank must be in [1, r_max={spec.r_max}], got {rank}")
    weights = {key: draw(*spec.shapes[key]) for key in _canonical(spec.shapes)}
    return Adapter(rank=rank, alpha=float(alpha), weights=weights, metadata=_stamped(spec, metadata))


def zero_adapter(
    spec: AdapterSpec,
    rank: int,
    alpha: float,
    metadata: Mapping[str, str] | None = None,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> Adapter:
    """An adapter whose delta is exactly zero, on every layer and target module of `spec`.

    Without a generator both lora_a and lora_b are zero (no gradient flows: not trainable as is). With one,
    lora_a is drawn like PEFT's default init (kaiming-uniform, a=sqrt(5)) and lora_b is zero, so the
    delta is still zero but training can start from it. Metadata gets spec.base_fingerprint if unset.
    """

    def draw(d_out: int, d_in: int) -> tuple[torch.Tensor, torch.Tensor]:
        lora_a = torch.zeros(rank, d_in, dtype=dtype)
        if generator is not None:
            bound = 1.0 / math.sqrt(d_in)  # what kaiming_uniform_(a=sqrt(5)) gives on [rank, d_in]
            lora_a = (torch.rand(rank, d_in, generator=generator) * 2 - 1).mul_(bound).to(dtype)
        return lora_a, torch.zeros(d_out, rank, dtype=dtype)

    return _constructed(spec, rank, alpha, metadata, draw)


def random_adapter(
    spec: AdapterSpec,
    rank: int,
    alpha: float,
    generator: torch.Generator,
    std: float = 0.02,
    metadata: Mapping[str, str] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> Adapter:
    """An adapter with lora_a and lora_b ~ N(0, std^2) on every layer and target module of `spec`.

    lora_b is nonzero, so the adapter changes the model's outputs. Deterministic for a given generator
    state. Metadata gets spec.base_fingerprint if unset.
    """

    def draw(d_out: int, d_in: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            (torch.randn(rank, d_in, generator=generator) * std).to(dtype),
            (torch.randn(d_out, rank, generator=generator) * std).to(dtype),
        )

    return _constructed(spec, rank, alpha, metadata, draw)


# --- checks shared by readers and writers ----------------------------------------------------------


def _check_rank(rank: int, spec: AdapterSpec, source: str) -> None:
    if rank > spec.r_max:
        raise AdapterError(f"{source}: rank r={rank} exceeds this deployment's maximum r_max={spec.r_max}")


def _check_pair(
    key: str, lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int, spec: AdapterSpec, source: str
) -> None:
    """lora_a must be [rank, d_in] and lora_b [d_out, rank] for the base linear `key`."""
    d_out, d_in = spec.shapes[key]
    name_a, name_b = _tensor_name(key, "A"), _tensor_name(key, "B")
    if lora_a.ndim != 2 or lora_a.shape[1] != d_in:
        raise AdapterError(
            f"{source}: {name_a} has shape {list(lora_a.shape)}, expected [r, {d_in}] "
            f"(d_in of the base {key} is {d_in})"
        )
    if lora_b.ndim != 2 or lora_b.shape[0] != d_out:
        raise AdapterError(
            f"{source}: {name_b} has shape {list(lora_b.shape)}, expected [{d_out}, r] "
            f"(d_out of the base {key} is {d_out})"
        )
    if lora_a.shape[0] != lora_b.shape[1]:
        raise AdapterError(
            f"{source}: rank mismatch in {key}: lora_A has rank {lora_a.shape[0]}, lora_B has rank {lora_b.shape[1]}"
        )
    if lora_a.shape[0] != rank:
        raise AdapterError(f"{source}: {name_a} has rank {lora_a.shape[0]}, but the config says r={rank}")


def _check_dtype(name: str, tensor: torch.Tensor, source: str) -> None:
    if tensor.dtype not in _FILE_DTYPES.values():
        raise AdapterError(f"{source}: {name} has dtype {tensor.dtype}; accepted: float32, bfloat16, float16")


def _check_finite(name: str, tensor: torch.Tensor, source: str, after: str = "") -> None:
    """Refuse NaN/Inf values (`after` explains a conversion that made them)."""
    if not bool(torch.isfinite(tensor).all()):
        kind = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
        raise AdapterError(f"{source}: {name} contains {kind} values{after}")


def max_delta_norm(dtype: torch.dtype) -> float:
    """The delta-norm bound in `dtype`: MAX_DELTA_NORM, tighter where the dtype's range is small (fp16)."""
    return min(MAX_DELTA_NORM, float(torch.finfo(dtype).max) / _ACTIVATION_HEADROOM)


def _check_magnitude(key: str, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, source: str) -> None:
    """Refuse weights, or a module delta, too large to serve in lora_a's dtype (see the module docstring)."""
    for name, tensor in ((_tensor_name(key, "A"), lora_a), (_tensor_name(key, "B"), lora_b)):
        peak = float(tensor.abs().max()) if tensor.numel() else 0.0
        if peak > MAX_WEIGHT:
            raise AdapterError(f"{source}: {name} has a value of magnitude {peak:.3g}, over the limit {MAX_WEIGHT:g}")
    bound = scaling * float(torch.linalg.norm(lora_a.float())) * float(torch.linalg.norm(lora_b.float()))
    limit = max_delta_norm(lora_a.dtype)
    if not bound <= limit:
        raise AdapterError(
            f"{source}: the delta of {key} (scaling {scaling:.3g} x |lora_B| x |lora_A|) has "
            f"norm bound {bound:.3g}, over the limit {limit:.3g} for {lora_a.dtype}"
        )


def check_served(adapter: Adapter, dtype: torch.dtype, source: str = ADAPTER_WEIGHTS) -> None:
    """Refuse an adapter that would overflow when served in `dtype`: finite there, and in magnitude bounds."""
    _check_scaling(adapter.rank, adapter.alpha, source)
    for key, (lora_a, lora_b) in adapter.weights.items():
        pair = (
            _converted(_tensor_name(key, "A"), lora_a, dtype, source),
            _converted(_tensor_name(key, "B"), lora_b, dtype, source),
        )
        _check_magnitude(key, *pair, adapter.alpha / adapter.rank, source)


def _check_scaling(rank: int, alpha: float, source: str) -> None:
    if not abs(alpha) / rank <= MAX_SCALING:
        raise AdapterError(f"{source}: lora_alpha / r = {alpha / rank:.3g} is over the limit {MAX_SCALING:g}")


def _check_adapter(adapter: Adapter, spec: AdapterSpec) -> None:
    """What a writer refuses: anything a reader would refuse."""
    source = "adapter"
    if adapter.rank < 1 or not math.isfinite(adapter.alpha):
        raise AdapterError(f"{source}: rank must be >= 1 and alpha finite, got r={adapter.rank}, alpha={adapter.alpha}")
    _check_rank(adapter.rank, spec, source)
    if not adapter.weights:
        raise AdapterError(f"{source}: has no LoRA weights")
    for key, (lora_a, lora_b) in adapter.weights.items():
        if key not in spec.shapes:
            raise AdapterError(
                f"{source}: {key!r} is not a target module of this base model "
                f"(targets: {spec.target_modules}, {spec.num_layers} layers)"
            )
        _check_pair(key, lora_a, lora_b, adapter.rank, spec, source)
        for name, tensor in ((_tensor_name(key, "A"), lora_a), (_tensor_name(key, "B"), lora_b)):
            _check_dtype(name, tensor, source)
            _check_finite(name, tensor, source)
    for k, v in adapter.metadata.items():
        if not isinstance(k, str) or not isinstance(v, str) or k in _RESERVED_METADATA:
            raise AdapterError(
                f"{source}: metadata must map str to str and not use {_RESERVED_METADATA}, got {k!r}: {v!r}"
            )


# --- writing ----------------------------------------------------------------------------------------


def _json_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _config_json(adapter: Adapter, spec: AdapterSpec) -> str:
    """The adapter_config.json PEFT writes for a plain LoRA on a causal LM (PEFT fills unlisted fields)."""
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": adapter.rank,
        "lora_alpha": _json_number(adapter.alpha),
        "target_modules": sorted(adapter.target_modules),
        "bias": "none",
        "base_model_name_or_path": spec.base_model_name or None,
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        # True: modules this adapter leaves out get lora_B = 0 in PEFT, i.e. no change
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    return json.dumps(config, indent=2, sort_keys=True)


def _file_metadata(adapter: Adapter, spec: AdapterSpec) -> dict[str, str]:
    """Header metadata of a written file: the adapter's metadata, stamped with the base fingerprint."""
    _check_adapter(adapter, spec)
    found = adapter.metadata.get("base_fingerprint", "")
    if spec.base_fingerprint and found and found != spec.base_fingerprint:
        raise IncompatibleAdapter(f"adapter: trained on base model {found}, not {spec.base_fingerprint}")
    return {**_stamped(spec, adapter.metadata), _FORMAT_KEY: "pt"}


def _safetensors_bytes(adapter: Adapter, metadata: dict[str, str]) -> bytes:
    tensors: dict[str, torch.Tensor] = {}
    for key in _canonical(adapter.weights):
        for half, tensor in zip("AB", adapter.weights[key], strict=True):
            # a private contiguous CPU copy: safetensors refuses views sharing storage (e.g. slot rows)
            tensors[_tensor_name(key, half)] = tensor.detach().to("cpu", copy=True).contiguous()
    return save_safetensors(tensors, metadata=metadata)


def canonical_safetensors(data: bytes) -> bytes:
    """`data` with the `__metadata__` entries of its safetensors header in sorted key order.

    The safetensors writer emits metadata in hash-map order, which changes from call to call, so the same
    adapter would export to different bytes; tensor entries and data are already in a fixed order and are
    kept. Bytes that are not a safetensors file with metadata come back unchanged.
    """
    size = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if not 0 < size <= len(data) - 8:
        return data
    try:
        header = json.loads(data[8 : 8 + size])
    except ValueError:
        return data
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        return data
    ordered = {"__metadata__": dict(sorted(header.pop("__metadata__").items())), **header}
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes with spaces
    return len(text).to_bytes(8, "little") + text + data[8 + size :]


def write_peft(adapter: Adapter, spec: AdapterSpec) -> dict[str, bytes]:
    """The two files PEFT writes: {"adapter_config.json": ..., "adapter_model.safetensors": ...}.

    Raises AdapterError if the adapter does not fit `spec` (the same checks as a read), and
    IncompatibleAdapter if its metadata names another base fingerprint.
    """
    metadata = _file_metadata(adapter, spec)
    return {
        ADAPTER_CONFIG: _config_json(adapter, spec).encode(),
        ADAPTER_WEIGHTS: _safetensors_bytes(adapter, metadata),
    }


def save_peft(adapter: Adapter, spec: AdapterSpec, directory: str | os.PathLike[str]) -> Path:
    """Write the PEFT files into `directory` (created if needed); each file is replaced atomically."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    for name, data in write_peft(adapter, spec).items():
        tmp = root / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, root / name)
    return root


def adapter_to_bytes(adapter: Adapter, spec: AdapterSpec) -> bytes:
    """One safetensors blob holding the weights, our metadata and the PEFT config (key adapter_config.json).

    A version is then a single whole-object put; `adapter_from_bytes` reads it back.
    """
    metadata = _file_metadata(adapter, spec)
    metadata[ADAPTER_CONFIG] = _config_json(adapter, spec)
    return _safetensors_bytes(adapter, metadata)


# --- reading: containers ----------------------------------------------------------------------------


def _check_size(data: bytes, source: str, max_bytes: int) -> None:
    if len(data) > max_bytes:
        raise AdapterError(f"{source} is {len(data)} bytes, over the {max_bytes}-byte limit")


def _header_metadata(data: bytes, source: str) -> dict[str, str]:
    """The string->string metadata of a safetensors header (the safetensors API reads it only from files)."""
    if len(data) < 8:
        raise AdapterError(f"{source} is truncated: {len(data)} bytes, not even a safetensors header length")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise AdapterError(
            f"{source} is truncated or corrupt: its header claims {size} bytes, only {len(data) - 8} follow"
        )
    try:
        header = json.loads(data[8 : 8 + size])
    except (ValueError, RecursionError) as exc:
        raise AdapterError(f"{source} has a corrupt safetensors header: {exc}") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    metadata = {} if metadata is None else metadata
    if (
        not isinstance(header, dict)
        or not isinstance(metadata, dict)
        or not all(isinstance(v, str) for v in metadata.values())
    ):
        raise AdapterError(
            f"{source} has a corrupt safetensors header: not a JSON object of tensors with string->string __metadata__"
        )
    return metadata


def _tensors(data: bytes, source: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors blob as a CPU tensor of its file dtype (float32/bfloat16/float16)."""
    try:
        views = safetensors.deserialize(data)
    except Exception as exc:  # untrusted bytes through a native parser: any failure means corrupt
        raise AdapterError(f"{source} is not a valid safetensors file: {exc}") from None
    tensors: dict[str, torch.Tensor] = {}
    for name, view in views:
        dtype = _FILE_DTYPES.get(view["dtype"])
        if dtype is None:
            raise AdapterError(
                f"{source}: tensor {name} has dtype {view['dtype']}; "
                f"accepted: F32 (float32), BF16 (bfloat16), F16 (float16)"
            )
        raw = view["data"]
        flat = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        tensors[name] = flat.reshape(view["shape"])
    return tensors


def _required(present: Collection[str], where: str) -> None:
    """Both PEFT files must be there; a pickle weights file is named as the reason, never read."""
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if name in present:
            continue
        hint = ""
        if name == ADAPTER_WEIGHTS and PICKLE_WEIGHTS in present:
            hint = f" (found {PICKLE_WEIGHTS}: pickle is never loaded, convert it to safetensors)"
        raise AdapterError(f"{where}: missing {name}{hint}")


# --- reading: the PEFT config -----------------------------------------------------------------------


@dataclass(frozen=True)
class _LoraOptions:
    """What we keep of adapter_config.json."""

    rank: int
    alpha: float
    """Effective alpha: rsLoRA's lora_alpha * sqrt(r), so alpha / rank is the scaling."""
    targets: list[str] | None
    """target_modules when it is a list; None when a regex string or absent (the tensors then decide)."""


def _parse_config(raw: bytes | str, source: str) -> _LoraOptions:
    """Parse and check a PEFT LoRA config; raises AdapterError naming any unsupported option."""
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise AdapterError(f"{source} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{source} must be a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{source}: peft_type is {config.get('peft_type')!r}, only 'LORA' is supported")
    _check_options(config, source)
    rank, alpha = config.get("r", 8), config.get("lora_alpha", 8)  # PEFT's defaults
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= _MAX_RANK:
        raise AdapterError(f"{source}: r must be an integer in [1, {_MAX_RANK}], got {str(rank)[:40]}")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not _finite_number(alpha):
        raise AdapterError(f"{source}: lora_alpha must be a finite number, got {str(alpha)[:40]}")
    _check_patterns(config, rank, alpha, source)
    if config.get("use_rslora") is True:
        alpha = alpha * math.sqrt(rank)  # rsLoRA scales by alpha/sqrt(r); ours by alpha/r
    targets = _parse_targets(config.get("target_modules"), source)
    return _LoraOptions(rank=rank, alpha=float(alpha), targets=targets)


def _finite_number(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _check_options(config: dict[str, Any], source: str) -> None:
    for key, what in _UNSUPPORTED_OPTIONS.items():
        if config.get(key):
            raise AdapterError(f"{source}: {what} is not supported ({key}: {json.dumps(config[key])})")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{source}: bias={config['bias']!r} is not supported, only 'none'")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise AdapterError(f"{source}: task_type={config['task_type']!r} is not supported, only 'CAUSAL_LM'")
    if config.get("use_rslora", False) not in (True, False):
        raise AdapterError(f"{source}: use_rslora must be true or false, got {config['use_rslora']!r}")
    init = config.get("init_lora_weights", True)
    if not any(init is safe or (isinstance(init, str) and init == safe) for safe in _SAFE_INITS):
        raise AdapterError(
            f"{source}: init_lora_weights={init!r} is not supported: that initialisation "
            f"rewrites the base weights (convert the adapter to plain LoRA with PEFT first)"
        )


def _check_patterns(config: dict[str, Any], rank: int, alpha: float, source: str) -> None:
    """Per-module ranks/alphas are unsupported (one rank per adapter); entries equal to r/alpha are no-ops."""
    for key, default in (("rank_pattern", rank), ("alpha_pattern", alpha)):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise AdapterError(f"{source}: {key} must be an object, got {pattern!r}")
        differing = {k: v for k, v in pattern.items() if v != default}
        if differing:
            raise AdapterError(
                f"{source}: per-module {key} is not supported (one rank and alpha per "
                f"adapter), got {json.dumps(differing)}"
            )


def _parse_targets(targets: object, source: str) -> list[str] | None:
    if targets is None or isinstance(targets, str):
        return None  # a regex or "all-linear": never evaluated (untrusted regex); the tensors decide
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise AdapterError(f"{source}: target_modules must be a list of names or a regex, got {targets!r}")
    for target in targets:
        if target.rsplit(".", 1)[-1] not in TARGET_MODULES:
            raise AdapterError(
                f"{source}: target module {target!r} is not supported (supported: {', '.join(TARGET_MODULES)})"
            )
    return targets


# --- reading: tensors -------------------------------------------------------------------------------


def _parse_name(name: str, spec: AdapterSpec, targets: list[str] | None, source: str) -> tuple[str, str]:
    """(module_key, "A" or "B") of a PEFT tensor name, or AdapterError saying why it cannot be used."""
    match = _LORA_TENSOR.fullmatch(name)
    if match is None:
        raise AdapterError(
            f"{source}: unknown tensor name {name!r} (expected base_model.model."
            f"model.layers.N.<self_attn|mlp>.<module>.lora_A.weight / lora_B.weight)"
        )
    path = match["path"]
    module = path.rsplit(".", 1)[-1]
    if module not in TARGET_MODULES:
        raise AdapterError(
            f"{source}: tensor {name} adapts module {module!r}, which is not supported "
            f"(supported: {', '.join(TARGET_MODULES)})"
        )
    if match["rest"] not in ("A.weight", "B.weight"):
        raise AdapterError(
            f"{source}: unknown tensor name {name!r}: lora_{match['rest']} is not supported, "
            f"only lora_A.weight and lora_B.weight"
        )
    layer = _MODULE_PATH.fullmatch(path)
    if layer is None or module_key(int(layer["layer"]), module) != path:
        raise AdapterError(
            f"{source}: unknown tensor name {name!r} (expected module path "
            f"{module_key(0, module).replace('.0.', '.N.')})"
        )
    if module not in spec.target_modules:
        raise AdapterError(
            f"{source}: tensor {name} adapts {module}, which is not a target module here "
            f"(targets: {', '.join(spec.target_modules)})"
        )
    if path not in spec.shapes:
        raise AdapterError(
            f"{source}: tensor {name} is for layer {layer['layer']}, out of range: the base "
            f"model has {spec.num_layers} layers"
        )
    if targets is not None and not any(path == t or path.endswith("." + t) for t in targets):
        raise AdapterError(
            f"{source}: tensor {name} adapts {module}, which the config's target_modules {targets} does not list"
        )
    return path, match["rest"][0]


def _pairs(
    tensors: dict[str, torch.Tensor], spec: AdapterSpec, targets: list[str] | None, source: str
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Group tensors into (lora_a, lora_b) per module key; every lora_A needs its lora_B and vice versa."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        key, half = _parse_name(name, spec, targets, source)
        halves.setdefault(key, {})[half] = tensor
    if not halves:
        raise AdapterError(f"{source}: contains no LoRA tensors")
    for key, pair in halves.items():
        for half, other in (("A", "B"), ("B", "A")):
            if half not in pair:
                raise AdapterError(f"{source}: {_tensor_name(key, other)} has no matching {_tensor_name(key, half)}")
    return {key: (halves[key]["A"], halves[key]["B"]) for key in _canonical(halves)}


def _converted(name: str, tensor: torch.Tensor, dtype: torch.dtype, source: str) -> torch.Tensor:
    _check_finite(name, tensor, source)
    out = tensor.to(dtype)
    if out.dtype != tensor.dtype:
        _check_finite(name, out, source, after=f" after conversion to {dtype} (values overflow it)")
    return out


def _check_fingerprint(metadata: Mapping[str, str], spec: AdapterSpec, source: str) -> None:
    found = metadata.get("base_fingerprint", "")
    if spec.base_fingerprint and found and found != spec.base_fingerprint:
        raise IncompatibleAdapter(
            f"{source}: adapter was trained on base model {found}, this base model is {spec.base_fingerprint}"
        )


def _decode(
    blob: bytes,
    config: bytes | str,
    config_source: str,
    source: str,
    spec: AdapterSpec,
    dtype: torch.dtype,
    check_fingerprint: bool,
) -> Adapter:
    """Validate and build an Adapter from a safetensors blob and a PEFT config."""
    if not dtype.is_floating_point:
        raise InvalidArgument(f"adapter dtype must be a floating point dtype, got {dtype}")
    metadata = _header_metadata(blob, source)
    if check_fingerprint:  # first: a foreign base usually also has foreign shapes
        _check_fingerprint(metadata, spec, source)
    options = _parse_config(config, config_source)
    _check_rank(options.rank, spec, config_source)
    pairs = _pairs(_tensors(blob, source), spec, options.targets, source)
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, (lora_a, lora_b) in pairs.items():
        _check_pair(key, lora_a, lora_b, options.rank, spec, source)
        weights[key] = (
            _converted(_tensor_name(key, "A"), lora_a, dtype, source),
            _converted(_tensor_name(key, "B"), lora_b, dtype, source),
        )
    ours = {k: v for k, v in metadata.items() if k not in _RESERVED_METADATA}
    return Adapter(rank=options.rank, alpha=options.alpha, weights=weights, metadata=ours)


def read_peft(
    files: Mapping[str, bytes],
    spec: AdapterSpec,
    *,
    dtype: torch.dtype = torch.float32,
    check_fingerprint: bool = True,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Adapter:
    """Read PEFT's files (name -> content) into an Adapter of `dtype`, validated against `spec`.

    Raises AdapterError naming the file and tensor for anything malformed or not fitting the base, and
    IncompatibleAdapter when the file's base_fingerprint differs from spec.base_fingerprint (a file
    without a fingerprint, e.g. one PEFT wrote, passes). Metadata = the file's header metadata.
    """
    _required(files.keys(), "adapter files")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        _check_size(files[name], name, max_bytes)
    return _decode(
        files[ADAPTER_WEIGHTS], files[ADAPTER_CONFIG], ADAPTER_CONFIG, ADAPTER_WEIGHTS, spec, dtype, check_fingerprint
    )


def load_peft(
    directory: str | os.PathLike[str],
    spec: AdapterSpec,
    *,
    dtype: torch.dtype = torch.float32,
    check_fingerprint: bool = True,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Adapter:
    """`read_peft` on a directory; sizes are checked before anything is read into memory."""
    root = Path(directory)
    present = {name for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, PICKLE_WEIGHTS) if (root / name).is_file()}
    _required(present, str(root))
    files: dict[str, bytes] = {}
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        path = root / name
        if path.stat().st_size > max_bytes:
            raise AdapterError(f"{path} is {path.stat().st_size} bytes, over the {max_bytes}-byte limit")
        files[name] = path.read_bytes()
    return read_peft(files, spec, dtype=dtype, check_fingerprint=check_fingerprint, max_bytes=max_bytes)


def adapter_from_bytes(
    data: bytes,
    spec: AdapterSpec,
    *,
    dtype: torch.dtype = torch.float32,
    check_fingerprint: bool = True,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Adapter:
    """Read a blob written by `adapter_to_bytes`, with the same validation as `read_peft`."""
    _check_size(data, _OBJECT, max_bytes)
    config = _header_metadata(data, _OBJECT).get(ADAPTER_CONFIG)
    if config is None:
        raise AdapterError(f"{_OBJECT}: no {ADAPTER_CONFIG} in its safetensors metadata")
    return _decode(data, config, f"{_OBJECT} metadata {ADAPTER_CONFIG}", _OBJECT, spec, dtype, check_fingerprint)

"""A base-model checkpoint on disk: where it is, what it is, and its identity.

`resolve` finds a checkpoint from a local directory or a Hugging Face repo id already in the local HF
cache (never the network). `read_config` reads config.json alone, so an unsupported architecture is refused
before any weight is read. `checkpoint_fingerprint` hashes the config and every weight file once and caches
the result beside the checkpoint, keyed by each file's name, size, mtime and safetensors header: a restart
costs a few stat calls, and the identity is the stored weights' (any serving dtype gives the same one).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

from personalize.errors import InvalidArgument

FINGERPRINT_FILE = ".personalize-fingerprint.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
_IGNORED_CONFIG_KEYS = ("transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures", "use_cache")


def resolve(name: str) -> Path:
    """The checkpoint directory of `name`: a local directory, or a repo id (`org/model`) found in the
    local Hugging Face cache (offline). InvalidArgument names every place looked at when neither has it."""
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return path
    looked = [f"local directory {path.resolve()}"]
    if name.count("/") == 1 and not path.exists():
        from huggingface_hub import constants, snapshot_download

        cache_dir = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
        looked.append(f"Hugging Face cache {cache_dir} (repo {name}, offline)")
        try:
            snapshot = Path(snapshot_download(name, local_files_only=True, cache_dir=cache_dir))
        except Exception:
            snapshot = None
        if snapshot is not None and (snapshot / "config.json").is_file():
            return snapshot
    raise InvalidArgument(f"base model {name!r} not found (no config.json); looked in: {'; '.join(looked)}")


def read_config(path: Path) -> dict[str, Any]:
    """config.json of a checkpoint as a dict (nothing else is read)."""
    try:
        return dict(json.loads((path / "config.json").read_text()))
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"unreadable config.json in {path}: {exc}") from exc


def eos_ids(path: Path, config: dict[str, Any], tokenizer_eos: int | None) -> frozenset[int]:
    """Every id that ends generation: generation_config.json's eos_token_id (one id or a list, as in
    Llama 3), else config.json's, plus the tokenizer's."""
    found: set[int] = set()
    gen_path = path / "generation_config.json"
    sources = [config.get("eos_token_id")]
    if gen_path.is_file():
        sources.insert(0, json.loads(gen_path.read_text()).get("eos_token_id"))
    for value in sources:
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, list):
            found.update(int(v) for v in value)
    if tokenizer_eos is not None:
        found.add(int(tokenizer_eos))
    return frozenset(found)


def _weight_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))


def _safetensors_header(file: Path) -> bytes:
    with file.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return f.read(min(size, 100_000_000))


def _cache_key(path: Path, files: list[Path]) -> str:
    """What identifies the checkpoint's files without reading their data."""
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for f in files:
        st = f.stat()
        digest.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        if f.name.endswith(".safetensors"):
            digest.update(_safetensors_header(f))
    return digest.hexdigest()


def _compute(config: dict[str, Any], files: list[Path]) -> str:
    digest = hashlib.sha256()
    keep = {k: config[k] for k in sorted(config) if k not in _IGNORED_CONFIG_KEYS}
    digest.update(json.dumps(keep, sort_keys=True, default=str).encode())
    for f in files:
        digest.update(f"{f.name}:{f.stat().st_size}".encode())
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 24):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _cache_file(path: Path) -> Path:
    """Beside the checkpoint when it is writable, else under the user's cache (read-only HF snapshots)."""
    if os.access(path, os.W_OK):
        return path / FINGERPRINT_FILE
    home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "personalize" / "fingerprints"
    return home / (hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32] + ".json")


def checkpoint_fingerprint(path: Path, config: dict[str, Any]) -> str:
    """sha256 over the config's architecture fields and every weight file, cached (see module docstring)."""
    files = _weight_files(path)
    if not files:
        raise InvalidArgument(f"no weight files (*.safetensors, *.bin) in {path}")
    key = _cache_key(path, files)
    cache = _cache_file(path)
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return str(cached["fingerprint"])
    except (OSError, ValueError):
        pass
    value = _compute(config, files)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "fingerprint": value}))
        tmp.replace(cache)
    except OSError:
        pass  # an unwritable cache only costs the hash again at the next start
    return value

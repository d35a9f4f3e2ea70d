"""PEFT's on-disk LoRA format: round trips with PEFT itself, strict validation, the single-object form."""

from __future__ import annotations

import contextlib
import copy
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from personalize.errors import AdapterError, IncompatibleAdapter
from personalize.lora.adapter import Adapter, module_key
from personalize.lora.format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterSpec,
    adapter_from_bytes,
    adapter_to_bytes,
    load_peft,
    random_adapter,
    read_peft,
    save_peft,
    write_peft,
    zero_adapter,
)
from personalize.model import BaseModel, build_random_llama, default_llama_config

R_MAX = 8
FINGERPRINT = "sha256:test-base"
Q0 = module_key(0, "q_proj")
Q0_A = f"base_model.model.{Q0}.lora_A.weight"
Q0_B = f"base_model.model.{Q0}.lora_B.weight"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    return build_random_llama(default_llama_config(), seed=7)


@pytest.fixture(scope="module")
def spec(base: torch.nn.Module) -> AdapterSpec:
    return AdapterSpec.for_model(base, r_max=R_MAX, base_fingerprint=FINGERPRINT)


@pytest.fixture(scope="module")
def adapter(spec: AdapterSpec) -> Adapter:
    return random_adapter(spec, rank=4, alpha=8.0, generator=gen(0), metadata={"version": "3"})


@pytest.fixture(scope="module")
def files(adapter: Adapter, spec: AdapterSpec) -> dict[str, bytes]:
    return write_peft(adapter, spec)


def assert_same(got: Adapter, want: Adapter) -> None:
    assert (got.rank, got.alpha) == (want.rank, want.alpha)
    assert list(got.weights) == list(want.weights)
    for key, (lora_a, lora_b) in want.weights.items():
        assert torch.equal(got.weights[key][0], lora_a) and torch.equal(got.weights[key][1], lora_b), key


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        return model(input_ids=ids).logits


# --- round trips with PEFT ------------------------------------------------------------------------------


def test_adapter_saved_by_peft_loads_unchanged(base: torch.nn.Module, spec: AdapterSpec, tmp_path: Path) -> None:
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(copy.deepcopy(base), config).save_pretrained(tmp_path)
    saved = load_tensors((tmp_path / ADAPTER_WEIGHTS).read_bytes())

    loaded = load_peft(tmp_path, spec)

    assert (loaded.rank, loaded.alpha, loaded.metadata) == (4, 16.0, {})
    assert loaded.target_modules == ("q_proj", "v_proj", "down_proj")
    assert len(loaded.weights) * 2 == len(saved)
    for key, (lora_a, lora_b) in loaded.weights.items():
        assert torch.equal(lora_a, saved[f"base_model.model.{key}.lora_A.weight"])
        assert torch.equal(lora_b, saved[f"base_model.model.{key}.lora_B.weight"])


def test_our_adapter_loads_in_peft_with_the_same_math(base: torch.nn.Module, spec: AdapterSpec, tmp_path: Path) -> None:
    ours = random_adapter(spec, rank=4, alpha=6.0, generator=gen(1), std=0.05)
    save_peft(ours, spec, tmp_path)

    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)

    merged = copy.deepcopy(base)  # the definition: W + scaling * B @ A on every adapted linear
    for key, (lora_a, lora_b) in ours.weights.items():
        layer = peft_model.base_model.model.get_submodule(key)
        assert torch.equal(layer.lora_A["default"].weight, lora_a)
        assert torch.equal(layer.lora_B["default"].weight, lora_b)
        assert layer.scaling["default"] == ours.scaling
        merged.get_submodule(key).weight.data += ours.scaling * lora_b @ lora_a
    assert not torch.allclose(logits(merged), logits(base), atol=1e-3)
    torch.testing.assert_close(logits(peft_model), logits(merged), atol=1e-5, rtol=1e-5)


def test_rslora_is_read_as_plain_lora_with_the_same_scaling(
    base: torch.nn.Module, spec: AdapterSpec, tmp_path: Path
) -> None:
    config = LoraConfig(
        r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "o_proj"], init_lora_weights=False
    )
    original = get_peft_model(copy.deepcopy(base), config)
    original.save_pretrained(tmp_path / "peft")

    loaded = load_peft(tmp_path / "peft", spec)
    assert loaded.scaling == pytest.approx(4 / math.sqrt(8))

    save_peft(loaded, spec, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / ADAPTER_CONFIG).read_text())["use_rslora"] is False
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(logits(reloaded), logits(original), atol=1e-5, rtol=1e-5)


def test_regex_target_modules_are_accepted_from_the_tensors(
    base: torch.nn.Module, spec: AdapterSpec, tmp_path: Path
) -> None:
    config = LoraConfig(r=2, lora_alpha=4, target_modules=r".*\.(q_proj|up_proj)", init_lora_weights=False)
    get_peft_model(copy.deepcopy(base), config).save_pretrained(tmp_path)
    assert load_peft(tmp_path, spec).target_modules == ("q_proj", "up_proj")


def test_written_config_and_metadata_are_what_peft_writes(files: Files, spec: AdapterSpec, tmp_path: Path) -> None:
    config = json.loads(files[ADAPTER_CONFIG])
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    assert config["target_modules"] == sorted(spec.target_modules)
    (tmp_path / ADAPTER_WEIGHTS).write_bytes(files[ADAPTER_WEIGHTS])
    with safe_open(str(tmp_path / ADAPTER_WEIGHTS), "pt") as handle:
        assert handle.metadata() == {"format": "pt", "version": "3", "base_fingerprint": FINGERPRINT}
        assert Q0_A in set(handle.keys())


# --- our own round trips ----------------------------------------------------------------------------------


def test_files_round_trip(files: Files, adapter: Adapter, spec: AdapterSpec) -> None:
    loaded = read_peft(files, spec)
    assert_same(loaded, adapter)
    assert loaded.metadata == {"version": "3", "base_fingerprint": FINGERPRINT}


@pytest.mark.parametrize(("rank", "alpha"), [(1, 1.0), (3, 5.5), (R_MAX, 16.0)])
def test_bytes_round_trip_for_mixed_ranks(spec: AdapterSpec, rank: int, alpha: float) -> None:
    ours = random_adapter(spec, rank=rank, alpha=alpha, generator=gen(rank), metadata={"examples_seen": "12"})
    loaded = adapter_from_bytes(adapter_to_bytes(ours, spec), spec)
    assert_same(loaded, ours)
    assert loaded.metadata == ours.metadata


def test_bfloat16_file_is_converted_to_float32(spec: AdapterSpec) -> None:
    ours = random_adapter(spec, rank=2, alpha=2.0, generator=gen(2), dtype=torch.bfloat16)
    loaded = read_peft(write_peft(ours, spec), spec, dtype=torch.float32)
    for key, (lora_a, lora_b) in ours.weights.items():
        assert loaded.weights[key][0].dtype == torch.float32
        assert torch.equal(loaded.weights[key][0], lora_a.float())
        assert torch.equal(loaded.weights[key][1], lora_b.float())


def test_partial_adapter_round_trips(spec: AdapterSpec, adapter: Adapter) -> None:
    part = Adapter(4, 8.0, weights={k: v for k, v in adapter.weights.items() if k.endswith("v_proj")})
    loaded = read_peft(write_peft(part, spec), spec)
    assert loaded.target_modules == ("v_proj",) and len(loaded.weights) == spec.num_layers


def test_constructors(spec: AdapterSpec) -> None:
    zero = zero_adapter(spec, rank=4, alpha=8.0)
    trainable = zero_adapter(spec, rank=4, alpha=8.0, generator=gen(0))
    assert zero.metadata == {"base_fingerprint": FINGERPRINT} and len(zero.weights) == len(spec.shapes)
    for key in spec.shapes:
        assert not zero.weights[key][0].any() and not trainable.weights[key][1].any()
        assert trainable.weights[key][0].abs().sum() > 0
    one, same = (random_adapter(spec, rank=2, alpha=4.0, generator=gen(5)) for _ in range(2))
    assert_same(one, same)
    assert all(b.abs().sum() > 0 for _, b in one.weights.values())
    with pytest.raises(AdapterError, match="r_max"):
        random_adapter(spec, rank=R_MAX + 1, alpha=1.0, generator=gen(0))


def test_spec_for_base_model_uses_its_fingerprint(base: torch.nn.Module) -> None:
    wrapped = BaseModel(model=base, tokenizer=None, fingerprint="sha256:abc", name="tiny")
    spec = AdapterSpec.for_model(wrapped, r_max=4, target_modules=("q_proj", "down_proj"))
    assert spec.base_fingerprint == "sha256:abc" and spec.num_layers == 4
    assert spec.shapes[module_key(1, "down_proj")] == (128, 352)
    assert set(spec.shapes) == {module_key(i, m) for i in range(4) for m in ("q_proj", "down_proj")}


# --- malformed adapters -----------------------------------------------------------------------------------


Files = dict[str, bytes]
Tensors = dict[str, torch.Tensor]


def edit_config(files: Files, **changes: object) -> Files:
    config = json.loads(files[ADAPTER_CONFIG])
    config.update(changes)
    return {**files, ADAPTER_CONFIG: json.dumps(config).encode()}


def edit_tensors(files: Files, edit: Callable[[Tensors], object]) -> Files:
    raw = files[ADAPTER_WEIGHTS]
    tensors = {k: v.clone() for k, v in load_tensors(raw).items()}
    edit(tensors)
    header_size = int.from_bytes(raw[:8], "little")
    metadata = json.loads(raw[8 : 8 + header_size])["__metadata__"]
    return {**files, ADAPTER_WEIGHTS: save_tensors(tensors, metadata=metadata)}


def with_tensor(name: str, value: torch.Tensor) -> Callable[[Files, AdapterSpec], Files]:
    return lambda files, spec: edit_tensors(files, lambda t: t.__setitem__(name, value))


def poisoned(name: str, value: float) -> Callable[[Files, AdapterSpec], Files]:
    return lambda files, spec: edit_tensors(files, lambda t: t[name].view(-1).__setitem__(5, value))


def without(name: str) -> Callable[[Files, AdapterSpec], Files]:
    return lambda files, spec: edit_tensors(files, lambda t: t.pop(name))


def moved_to_layer_9(files: Files, spec: AdapterSpec) -> Files:
    def edit(tensors: Tensors) -> None:
        for name in (Q0_A, Q0_B):
            tensors[name.replace(Q0, module_key(9, "q_proj"))] = tensors.pop(name)

    return edit_tensors(files, edit)


def roomy(spec: AdapterSpec) -> AdapterSpec:
    """The same base without a fingerprint and with r_max 16: lets a test write what `spec` refuses."""
    return AdapterSpec(16, spec.target_modules, spec.shapes)


def rank_16(files: Files, spec: AdapterSpec) -> Files:
    return write_peft(random_adapter(roomy(spec), 16, 1.0, gen(0)), roomy(spec))


def foreign(files: Files, spec: AdapterSpec) -> Files:
    other = random_adapter(roomy(spec), 4, 8.0, gen(0), metadata={"base_fingerprint": "sha256:other"})
    return write_peft(other, roomy(spec))


def config(**changes: object) -> Callable[[Files, AdapterSpec], Files]:
    return lambda files, spec: edit_config(files, **changes)


def replaced(name: str, data: Callable[[bytes], bytes]) -> Callable[[Files, AdapterSpec], Files]:
    return lambda files, spec: {**files, name: data(files[name])}


def case(
    name: str, mutate: Callable[[Files, AdapterSpec], Files], *fragments: str, error: type[AdapterError] = AdapterError
) -> object:
    return pytest.param(mutate, error, fragments, id=name)


MALFORMED = [
    case("wrong d_in", with_tensor(Q0_A, torch.ones(4, 127)), Q0_A, "[4, 127]", "128"),
    case("wrong d_out", with_tensor(Q0_B, torch.ones(64, 4)), Q0_B, "[64, 4]", "128"),
    case("A/B rank mismatch", with_tensor(Q0_B, torch.ones(128, 3)), "rank mismatch", Q0),
    case("rank vs config r", config(r=5), "r=5", "rank 4"),
    case("rank over r_max", rank_16, "r=16", "r_max=8"),
    case("NaN", poisoned(Q0_B, math.nan), Q0_B, "NaN"),
    case("Inf", poisoned(Q0_A, math.inf), Q0_A, "Inf"),
    case("integer dtype", with_tensor(Q0_A, torch.ones(4, 128, dtype=torch.int64)), Q0_A, "I64"),
    case("lm_head", with_tensor("base_model.model.lm_head.lora_A.weight", torch.ones(4, 128)), "'lm_head'"),
    case(
        "embed_tokens",
        with_tensor("base_model.model.model.embed_tokens.lora_embedding_A", torch.ones(4, 384)),
        "'embed_tokens'",
    ),
    case("lm_head in config", config(target_modules=["q_proj", "lm_head"]), "'lm_head'", "target module"),
    case("unknown tensor", with_tensor("model.foo.weight", torch.ones(2)), "unknown tensor name", "model.foo.weight"),
    case(
        "DoRA magnitude",
        with_tensor(f"base_model.model.{Q0}.lora_magnitude_vector", torch.ones(128)),
        "lora_magnitude_vector",
    ),
    case("layer out of range", moved_to_layer_9, "layer 9", "4 layers"),
    case("missing lora_B", without(Q0_B), Q0_A, Q0_B),
    case("missing lora_A", without(Q0_A), Q0_A, Q0_B),
    case("no tensors", replaced(ADAPTER_WEIGHTS, lambda _: save_tensors({})), "no LoRA tensors"),
    case("truncated weights", replaced(ADAPTER_WEIGHTS, lambda data: data[:-100]), ADAPTER_WEIGHTS),
    case("truncated header", replaced(ADAPTER_WEIGHTS, lambda data: data[:200]), ADAPTER_WEIGHTS, "truncated"),
    case("bad JSON", replaced(ADAPTER_CONFIG, lambda _: b'{"peft_type": "LORA",'), ADAPTER_CONFIG, "not valid JSON"),
    case("not LoRA", config(peft_type="IA3"), "peft_type", "IA3"),
    case("DoRA", config(use_dora=True), "DoRA", "use_dora"),
    case("modules_to_save", config(modules_to_save=["lm_head"]), "modules_to_save"),
    case("rank_pattern", config(rank_pattern={"q_proj": 2}), "rank_pattern"),
    case("alpha_pattern", config(alpha_pattern={"v_proj": 1}), "alpha_pattern"),
    case("bias", config(bias="all"), "bias"),
    case("PiSSA", config(init_lora_weights="pissa"), "pissa"),
    case("config misses a module", config(target_modules=["q_proj"]), "does not list", "['q_proj']"),
    case("foreign fingerprint", foreign, "sha256:other", FINGERPRINT, error=IncompatibleAdapter),
    case(
        "pickle only",
        lambda f, s: {ADAPTER_CONFIG: f[ADAPTER_CONFIG], "adapter_model.bin": b"\x80\x04"},
        "adapter_model.bin",
        "pickle",
    ),
    case("no config", lambda f, s: {ADAPTER_WEIGHTS: f[ADAPTER_WEIGHTS]}, ADAPTER_CONFIG, "missing"),
]


@pytest.mark.parametrize(("mutate", "error", "fragments"), MALFORMED)
def test_malformed_adapter_is_rejected_with_a_clear_message(
    files: Files,
    spec: AdapterSpec,
    mutate: Callable[[Files, AdapterSpec], Files],
    error: type[AdapterError],
    fragments: tuple[str, ...],
) -> None:
    with pytest.raises(AdapterError) as caught:
        read_peft(mutate(files, spec), spec)
    assert type(caught.value) is error
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_module_outside_the_deployments_targets_is_rejected(files: Files, spec: AdapterSpec) -> None:
    narrow = AdapterSpec(
        R_MAX, ("q_proj", "v_proj"), {k: v for k, v in spec.shapes.items() if k.endswith(("q_proj", "v_proj"))}
    )
    with pytest.raises(AdapterError, match=r"(k|o|gate|up|down)_proj, which is not a target module here"):
        read_peft(files, narrow)


def test_foreign_fingerprint_passes_when_not_checked(spec: AdapterSpec, adapter: Adapter) -> None:
    other = AdapterSpec(spec.r_max, spec.target_modules, spec.shapes, base_fingerprint="sha256:other")
    assert (
        read_peft(write_peft(adapter, spec), other, check_fingerprint=False).metadata["base_fingerprint"] == FINGERPRINT
    )


def test_size_limit(files: Files, spec: AdapterSpec, tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="over the 1000-byte limit"):
        read_peft(files, spec, max_bytes=1000)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(AdapterError, match=f"{ADAPTER_WEIGHTS} is .* over the 1000-byte limit"):
        load_peft(tmp_path, spec, max_bytes=1000)


def test_directory_with_only_a_pickle_is_refused(files: Files, spec: AdapterSpec, tmp_path: Path) -> None:
    (tmp_path / ADAPTER_CONFIG).write_bytes(files[ADAPTER_CONFIG])
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04not-to-be-unpickled")
    with pytest.raises(AdapterError, match=r"missing adapter_model\.safetensors .*pickle is never loaded"):
        load_peft(tmp_path, spec)


def test_overflow_on_conversion_is_rejected(files: Files, spec: AdapterSpec) -> None:
    big = poisoned(Q0_A, 1e6)(files, spec)
    assert read_peft(big, spec).weights[Q0][0].view(-1)[5] == 1e6
    with pytest.raises(AdapterError, match=f"{Q0_A}.*Inf.*float16"):
        read_peft(big, spec, dtype=torch.float16)


def test_object_form_validates_like_files(adapter: Adapter, spec: AdapterSpec) -> None:
    blob = adapter_to_bytes(adapter, spec)
    with pytest.raises(AdapterError, match=r"no adapter_config\.json"):
        adapter_from_bytes(write_peft(adapter, spec)[ADAPTER_WEIGHTS], spec)
    with pytest.raises(AdapterError, match="truncated"):
        adapter_from_bytes(blob[:50], spec)
    narrow = AdapterSpec(2, spec.target_modules, spec.shapes, base_fingerprint=FINGERPRINT)
    with pytest.raises(AdapterError, match="r_max=2"):
        adapter_from_bytes(blob, narrow)
    other = AdapterSpec(R_MAX, spec.target_modules, spec.shapes, base_fingerprint="sha256:other")
    with pytest.raises(IncompatibleAdapter):
        adapter_from_bytes(blob, other)


def test_writer_refuses_what_a_reader_would(adapter: Adapter, spec: AdapterSpec) -> None:
    weights = dict(adapter.weights)
    weights[Q0] = (weights[Q0][0], torch.full_like(weights[Q0][1], math.nan))
    with pytest.raises(AdapterError, match="NaN"):
        write_peft(Adapter(rank=4, alpha=8.0, weights=weights), spec)
    with pytest.raises(IncompatibleAdapter):
        adapter_to_bytes(Adapter(4, 8.0, adapter.weights, {"base_fingerprint": "sha256:other"}), spec)
    with pytest.raises(AdapterError, match=r"not use \('format'"):
        write_peft(Adapter(4, 8.0, adapter.weights, {"format": "np"}), spec)


# --- fuzzing: garbage never escapes as anything but AdapterError --------------------------------------------


@pytest.fixture(scope="module")
def small_blob(spec: AdapterSpec) -> bytes:
    return adapter_to_bytes(random_adapter(spec, rank=1, alpha=1.0, generator=gen(9)), spec)


def corruptions(blob: bytes) -> st.SearchStrategy[bytes]:
    truncated = st.integers(0, len(blob)).map(lambda n: blob[:n])
    flips = st.lists(st.tuples(st.integers(0, len(blob) - 1), st.integers(0, 255)), min_size=1, max_size=4)
    flipped = flips.map(lambda changes: bytes(_flip(bytearray(blob), changes)))
    return st.one_of(st.binary(max_size=512), truncated, flipped)


def _flip(data: bytearray, flips: list[tuple[int, int]]) -> bytearray:
    for index, value in flips:
        data[index] = value
    return data


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_corrupt_bytes_raise_only_adapter_error(
    small_blob: bytes, files: Files, spec: AdapterSpec, data: st.DataObject
) -> None:
    garbage = data.draw(corruptions(small_blob))
    config = data.draw(st.one_of(st.just(files[ADAPTER_CONFIG]), corruptions(files[ADAPTER_CONFIG])))
    for read in (
        lambda: adapter_from_bytes(garbage, spec),
        lambda: read_peft({ADAPTER_CONFIG: config, ADAPTER_WEIGHTS: garbage}, spec),
    ):
        with contextlib.suppress(AdapterError):  # anything else fails the test
            assert isinstance(read(), Adapter)

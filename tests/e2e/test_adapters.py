"""Adapters over gRPC: a PEFT-made adapter generates exactly as PEFT does; export/import round trips are
bit-identical; DeleteUser forgets the user."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from safetensors.torch import load as load_safetensors

from personalize.model import BaseModel
from personalize_service.gen.personalize.v1 import personalize_pb2 as pb
from tests.e2e.upserver import Stubs, adapter_files, greedy_reference, make_peft_adapter

PROMPTS = [("Hello, world", 24), ("What is 2+2?", 40), ("The quick brown fox", 24)]


@pytest.fixture(scope="module")
def peft_adapter(base: BaseModel, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """(PeftModel, its save_pretrained directory)."""
    directory = tmp_path_factory.mktemp("peft-adapter")
    return make_peft_adapter(base.model, seed=11, directory=directory), directory


def _import(stubs: Stubs, user_id: str, files: dict[str, bytes]) -> pb.AdapterInfo:
    return stubs.api.ImportAdapter(pb.ImportAdapterRequest(user_id=user_id, files=files), timeout=60)


def _generate(stubs: Stubs, user_id: str, prompt: str, max_new_tokens: int, **extra: Any) -> pb.GenerateResponse:
    request = pb.GenerateRequest(user_id=user_id, prompt=prompt, max_new_tokens=max_new_tokens, **extra)
    return stubs.api.Generate(request, timeout=120)


def test_imported_peft_adapter_generates_like_peft(
    stubs: Stubs, base: BaseModel, peft_adapter: tuple[Any, Path]
) -> None:
    model, directory = peft_adapter
    info = _import(stubs, "peft-user", adapter_files(directory))
    assert (info.user_id, info.version, info.rank, info.base_fingerprint) == ("peft-user", 1, 4, base.fingerprint)

    for prompt, max_new_tokens in PROMPTS:
        response = _generate(stubs, "peft-user", prompt, max_new_tokens)
        expected = greedy_reference(model, base.tokenizer, prompt, max_new_tokens)
        assert (response.text, response.finish_reason) == expected, prompt
        assert response.adapter_version == 1
        base_text = greedy_reference(base.model, base.tokenizer, prompt, max_new_tokens)[0]
        assert response.text != base_text, "the adapter should change the output"

    again = _generate(stubs, "peft-user", *PROMPTS[0])
    assert (again.adapter_version, again.cache_tier) == (1, "device")
    streamed = list(
        stubs.api.GenerateStream(
            pb.GenerateRequest(user_id="peft-user", prompt=PROMPTS[0][0], max_new_tokens=PROMPTS[0][1]), timeout=120
        )
    )
    assert "".join(c.text for c in streamed) == again.text and streamed[-1].final.adapter_version == 1
    plain = _generate(stubs, "peft-user", *PROMPTS[0], use_base_model=True)
    assert (plain.adapter_version, plain.cache_tier) == (0, "none")
    assert plain.text == greedy_reference(base.model, base.tokenizer, *PROMPTS[0])[0]


def test_get_adapter_reports_the_import(stubs: Stubs, peft_adapter: tuple[Any, Path]) -> None:
    _import(stubs, "info-user", adapter_files(peft_adapter[1]))
    second = _import(stubs, "info-user", adapter_files(peft_adapter[1]))
    info = stubs.api.GetAdapter(pb.GetAdapterRequest(user_id="info-user"), timeout=10)
    assert (info.version, info.rank, info.owner_node) == (2, 4, "worker-0") and info == second
    assert info.updated_at_unix_ms > 0


def test_export_import_round_trip_is_bit_identical(stubs: Stubs, peft_adapter: tuple[Any, Path]) -> None:
    _import(stubs, "export-a", adapter_files(peft_adapter[1]))
    first = stubs.api.ExportAdapter(pb.ExportAdapterRequest(user_id="export-a"), timeout=60)
    assert set(first.files) == {"adapter_config.json", "adapter_model.safetensors"}
    _import(stubs, "export-b", dict(first.files))
    second = stubs.api.ExportAdapter(pb.ExportAdapterRequest(user_id="export-b"), timeout=60)
    assert dict(second.files) == dict(first.files)

    ours = load_safetensors(first.files["adapter_model.safetensors"])
    peft = load_safetensors((peft_adapter[1] / "adapter_model.safetensors").read_bytes())
    assert set(ours) == set(peft)
    for name, tensor in peft.items():
        assert torch.equal(ours[name], tensor), name
    by_version = stubs.api.ExportAdapter(pb.ExportAdapterRequest(user_id="export-a", version=1), timeout=60)
    assert dict(by_version.files) == dict(first.files)


def test_export_of_a_missing_version_is_not_found(stubs: Stubs, peft_adapter: tuple[Any, Path]) -> None:
    _import(stubs, "one-version", adapter_files(peft_adapter[1]))
    for user_id, version in (("one-version", 2), ("never-imported", 0)):
        with pytest.raises(grpc.RpcError) as raised:
            stubs.api.ExportAdapter(pb.ExportAdapterRequest(user_id=user_id, version=version), timeout=10)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_delete_user_forgets_the_adapter(stubs: Stubs, base: BaseModel, peft_adapter: tuple[Any, Path]) -> None:
    _import(stubs, "doomed", adapter_files(peft_adapter[1]))
    assert _generate(stubs, "doomed", *PROMPTS[0]).adapter_version == 1

    deleted = stubs.api.DeleteUser(pb.DeleteUserRequest(user_id="doomed"), timeout=30)
    assert deleted.versions_deleted == 1
    with pytest.raises(grpc.RpcError) as raised:
        stubs.api.GetAdapter(pb.GetAdapterRequest(user_id="doomed"), timeout=10)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    after = _generate(stubs, "doomed", *PROMPTS[0])
    assert (after.adapter_version, after.cache_tier) == (0, "none")
    assert after.text == greedy_reference(base.model, base.tokenizer, *PROMPTS[0])[0]


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"adapter_config.json": b"{}"}, "missing ['adapter_model.safetensors']"),
        ({"adapter_config.json": b"{}", "adapter_model.safetensors": b"x", "adapter_model.bin": b"x"}, "not accepted"),
        ({"adapter_config.json": b"not json", "adapter_model.safetensors": b"\x00" * 16}, "adapter"),
    ],
)
def test_bad_import_is_invalid_argument(stubs: Stubs, files: dict[str, bytes], message: str) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        _import(stubs, "bad-import", files)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in raised.value.details()

"""The committed stubs in service/gen are exactly what `make proto` generates from proto/."""

from __future__ import annotations

import importlib
from pathlib import Path

from personalize_service import protogen


def test_generated_stubs_are_up_to_date() -> None:
    stale = protogen.stale_files(protogen.generate())
    assert not stale, f"stale generated code {stale}: run `make proto` and commit service/gen"


def test_stale_files_detects_a_difference(tmp_path: Path) -> None:
    generated = protogen.generate()
    protogen.write(generated, tmp_path)
    assert protogen.stale_files(generated, tmp_path) == []
    first = next(iter(generated))
    (tmp_path / first).write_bytes(generated[first] + b"# edited by hand\n")
    assert protogen.stale_files(generated, tmp_path) == [first]


def test_generated_imports_do_not_collide_with_the_library() -> None:
    grpc_module = protogen.generate()["personalize/v1/personalize_pb2_grpc.py"].decode()
    assert "from personalize.v1 import" not in grpc_module
    assert "from personalize_service.gen.personalize.v1 import personalize_pb2" in grpc_module
    module = importlib.import_module("personalize_service.gen.personalize.v1.personalize_pb2_grpc")
    assert hasattr(module, "PersonalizeServicer") and hasattr(module, "AdminServicer")


def test_check_mode_passes_on_committed_stubs() -> None:
    assert protogen.main(["--check"]) == 0

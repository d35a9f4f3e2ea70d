"""Generate the Python gRPC stubs from `proto/` (the only source of the API).

    python -m personalize_service.protogen          # (re)write service/gen/personalize/v1/*
    python -m personalize_service.protogen --check  # exit 1 if the committed stubs are stale

protoc writes `from personalize.v1 import personalize_pb2`, which would resolve to our library package
(also named `personalize`), so the import is rewritten to the installed name of the generated package.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO_ROOT / "proto"
PROTO_FILES = ("personalize/v1/personalize.proto",)
GEN_ROOT = REPO_ROOT / "service" / "gen"
GEN_PACKAGE = "personalize_service.gen"
OUTPUT_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(proto_root: Path = PROTO_ROOT) -> dict[str, bytes]:
    """Run protoc on PROTO_FILES; return {path relative to GEN_ROOT: file bytes}, imports rewritten.

    Raises RuntimeError with protoc's exit status if compilation fails (protoc prints why on stderr).
    """
    include = str(resources.files("grpc_tools") / "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *PROTO_FILES,
        ]
        status = protoc.main(args)
        if status != 0:
            raise RuntimeError(f"protoc failed with exit status {status} on {', '.join(PROTO_FILES)}")
        return {rel: _rewrite_imports(Path(tmp, rel).read_bytes()) for rel in _output_paths()}


def _output_paths() -> list[str]:
    """The generated files' paths relative to the output root, in a stable order."""
    return [proto.removesuffix(".proto") + suffix for proto in PROTO_FILES for suffix in OUTPUT_SUFFIXES]


def _rewrite_imports(source: bytes) -> bytes:
    """`from personalize.v1 import x` -> `from personalize_service.gen.personalize.v1 import x`."""
    text = source.decode("utf-8")
    for proto in PROTO_FILES:
        package = proto.rsplit("/", 1)[0].replace("/", ".")
        text = text.replace(f"from {package} import ", f"from {GEN_PACKAGE}.{package} import ")
    return text.encode("utf-8")


def stale_files(generated: dict[str, bytes], gen_root: Path = GEN_ROOT) -> list[str]:
    """The generated paths whose committed copy under gen_root is missing or differs byte for byte."""
    return [
        rel
        for rel, data in generated.items()
        if not (gen_root / rel).is_file() or (gen_root / rel).read_bytes() != data
    ]


def write(generated: dict[str, bytes], gen_root: Path = GEN_ROOT) -> None:
    """Write the generated files under gen_root (the package `__init__.py` files are committed)."""
    for rel, data in generated.items():
        path = gen_root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m personalize_service.protogen",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="do not write; exit 1 if the committed stubs differ from freshly generated ones",
    )
    args = parser.parse_args(argv)
    generated = generate()
    if args.check:
        stale = stale_files(generated)
        for rel in stale:
            print(f"stale: service/gen/{rel} (run `make proto`)", file=sys.stderr)
        return 1 if stale else 0
    write(generated)
    for rel in generated:
        print(f"wrote service/gen/{rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

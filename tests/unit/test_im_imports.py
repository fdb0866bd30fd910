"""The instance manager's settings import no implementation: no fetcher, no store (issue 8, item 1)."""

from __future__ import annotations

import json
import subprocess
import sys

FETCH_MODULES = (
    "diffmesh_instance_manager.fetchers",
    "diffmesh_instance_manager.fetch_common",
    "diffmesh_instance_manager.file_fetch",
    "diffmesh_instance_manager.ranged_fetch",
    "diffmesh_instance_manager.http_fetch",
    "diffmesh_instance_manager.s3_fetch",
    "diffmesh_instance_manager.remote_access",
    "diffmesh_instance_manager.store",
)


def _modules_after_import(module: str) -> set[str]:
    """``sys.modules`` of a fresh interpreter after importing ``module``."""
    code = f"import json, sys; import {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(json.loads(out))


def test_settings_import_no_fetcher() -> None:
    loaded = _modules_after_import("diffmesh_instance_manager.settings")
    assert "diffmesh_instance_manager.settings" in loaded
    assert not loaded & set(FETCH_MODULES)
    assert not {"fsspec", "s3fs", "botocore", "aiohttp"} & loaded


def test_scheme_fetchers_do_not_import_the_registry() -> None:
    for module in ("diffmesh_instance_manager.http_fetch", "diffmesh_instance_manager.s3_fetch"):
        loaded = _modules_after_import(module)
        assert "diffmesh_instance_manager.fetchers" not in loaded, module

"""The shared library imports without torch (the router and coordinator images have none)."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
sys.modules['torch'] = None  # any `import torch` now raises ImportError
import diffmesh, diffmesh.cli, diffmesh.server, diffmesh.channels, diffmesh.errors, diffmesh.telemetry
import diffmesh.artifacts, diffmesh.pipeline_key, diffmesh.healthcheck, diffmesh.redis_server
import diffmesh.ports, diffmesh.config_doc, diffmesh.config_cli
from diffmesh.v1 import router_pb2_grpc, coordinator_pb2_grpc, worker_pb2_grpc, instance_manager_pb2_grpc
print('ok')
"""


def test_shared_library_imports_without_torch() -> None:
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_cli_help_without_torch() -> None:
    code = "import sys; sys.modules['torch'] = None; from diffmesh.cli import main; raise SystemExit(main(['--help']))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "demo-models" in out.stdout and "sim" in out.stdout

"""Instance-manager contract tests: the topology (:class:`ImMesh`, :class:`Im`), test artifacts,
and the calls and checks the ``tests/contract/test_instance_manager*.py`` modules share."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import pytest
from diffmesh.artifacts import artifact_bytes, artifact_sha256
from diffmesh.server import ServerThread
from diffmesh.v1 import (
    common_pb2,
    coordinator_pb2,
    coordinator_pb2_grpc,
    instance_manager_pb2,
    instance_manager_pb2_grpc,
    plan_pb2,
)
from safetensors.numpy import load_file, save_file

if TYPE_CHECKING:
    from diffmesh_instance_manager.app import InstanceManagerApp

DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}
# Component kinds, as registered with the coordinator.
BASE = common_pb2.COMPONENT_KIND_BASE
LORA = common_pb2.COMPONENT_KIND_LORA
CONTROLNET = common_pb2.COMPONENT_KIND_CONTROLNET


@dataclass
class ImMesh:
    """A coordinator and the artifacts registered with it (``paths``: component id → local file)."""

    coordinator: ServerThread
    stub: coordinator_pb2_grpc.CacheCoordinatorServiceStub
    root: Path
    outside: Path
    paths: dict[str, Path]


@dataclass
class Im:
    """A running instance manager and a client stub."""

    thread: ServerThread
    app: InstanceManagerApp
    stub: instance_manager_pb2_grpc.InstanceManagerServiceStub
    node_id: str


def write_lora(path: Path, seed: int, rows: int = 8) -> Path:
    """A small random LoRA safetensors file (with ``__metadata__``) at ``path``."""
    rng = np.random.default_rng(seed)
    save_file(
        {
            "unet.down.lora_A.weight": rng.standard_normal((4, rows), dtype=np.float32),
            "unet.down.lora_B.weight": rng.standard_normal((rows, 4), dtype=np.float32),
            "unet.scale": rng.standard_normal(3).astype(np.float16),
        },
        str(path),
        metadata={"format": "pt", "lora_alpha": "4"},
    )
    return path


def write_base(folder: Path, seed: int) -> Path:
    """A diffusers-shaped base folder: configs, one safetensors file and a README that is not loaded."""
    rng = np.random.default_rng(seed)
    (folder / "unet").mkdir(parents=True)
    (folder / "tokenizer").mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (folder / "unet" / "config.json").write_text(json.dumps({"sample_size": 8}))
    (folder / "tokenizer" / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    (folder / "README.md").write_text("not a config, not loaded")
    save_file(
        {"conv_in.weight": rng.standard_normal((8, 4, 3, 3), dtype=np.float32), "steps": np.arange(6, dtype=np.int64)},
        str(folder / "unet" / "diffusion_pytorch_model.safetensors"),
    )
    return folder


def register_component(
    stub: coordinator_pb2_grpc.CacheCoordinatorServiceStub,
    cid: str,
    kind: int,
    uri: str,
    path: Path,
    sha: str = "",
    family: str = "sd15",
) -> None:
    """Registers ``cid`` at ``uri`` with the size and, unless ``sha`` is given, the digest of ``path``."""
    component = common_pb2.Component(
        id=cid,
        kind=kind,  # type: ignore[arg-type]
        family=family,
        uri=uri,
        bytes=artifact_bytes(path),
        sha256=sha or artifact_sha256(path),
    )
    stub.RegisterComponent(coordinator_pb2.RegisterComponentRequest(component=component))


def start_im(mesh: ImMesh | None, ssd_dir: Path, node_id: str | None = None, **overrides: Any) -> tuple[Im, grpc.Channel]:
    """Starts an instance manager on ``mesh``'s coordinator (none: without one); the caller closes both."""
    # Imported here so that the contract conftest, which imports this module, loads without the service.
    from diffmesh_instance_manager.app import InstanceManagerApp
    from diffmesh_instance_manager.settings import InstanceManagerSettings

    node_id = node_id or f"imt-{uuid.uuid4().hex[:8]}"
    overrides.setdefault("allowed_roots", [str(mesh.root)] if mesh else [])
    settings = InstanceManagerSettings(
        node_id=node_id,
        coordinator=mesh.coordinator.address if mesh else "",
        ssd_dir=str(ssd_dir),
        **overrides,
    )
    app = InstanceManagerApp(settings)
    thread = ServerThread(app)
    channel = grpc.insecure_channel(thread.address)
    return Im(thread, app, instance_manager_pb2_grpc.InstanceManagerServiceStub(channel), node_id), channel


def acquire(im: Im, *ids: str, holder: str = "worker-0") -> instance_manager_pb2.AcquireResponse:
    return im.stub.Acquire(instance_manager_pb2.AcquireRequest(component_ids=list(ids), holder=holder), timeout=60)


def release(im: Im, lease_id: str) -> int:
    """Releases a lease; returns how many components it freed."""
    return im.stub.Release(instance_manager_pb2.ReleaseRequest(lease_id=lease_id)).released


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    """The ``grpc.RpcError`` that ``call`` raises (the test fails if it raises none)."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def im_stats(im: Im) -> instance_manager_pb2.StatsResponse:
    return im.stub.Stats(instance_manager_pb2.StatsRequest())


def tier_stats(stats: instance_manager_pb2.StatsResponse, tier: int) -> instance_manager_pb2.TierStats:
    return next(t for t in stats.tiers if t.tier == tier)


def component_state(stats: instance_manager_pb2.StatsResponse, cid: str) -> instance_manager_pb2.ComponentState | None:
    return next((c for c in stats.components if c.component_id == cid), None)


def segment_bytes(segment: str) -> bytes:
    return Path("/dev/shm", segment).read_bytes()


def assert_tensors_match(shm_file: instance_manager_pb2.ShmFile, source: Path) -> None:
    """The shared-memory file holds ``source``'s bytes, and its tensor index points at its tensors."""
    blob = segment_bytes(shm_file.segment)
    region = blob[shm_file.offset : shm_file.offset + shm_file.length]
    assert region == source.read_bytes()
    expected = load_file(str(source))
    assert {t.name for t in shm_file.tensors} == set(expected)
    for t in shm_file.tensors:
        arr = np.frombuffer(blob[t.offset : t.offset + t.length], dtype=DTYPES[t.dtype]).reshape(tuple(t.shape))
        np.testing.assert_array_equal(arr, expected[t.name])


def assert_nothing_published(im: Im, cid: str) -> None:
    """No SSD object, no temporary file and no tier state of ``cid`` is left behind."""
    ssd = im.app.settings.ssd_path()
    assert not any(p.name.endswith(f"_{cid}") for p in (ssd / "objects").iterdir())
    assert list((ssd / "tmp").iterdir()) == []
    assert component_state(im_stats(im), cid) is None


def assert_refused_publishing_nothing(im: Im, cid: str, code: grpc.StatusCode, needle: str) -> None:
    """Acquire of ``cid`` fails with ``code`` and a message containing ``needle``, leaving nothing behind."""
    err = rpc_error(lambda: acquire(im, cid))
    assert err.code() == code, err.details()
    assert needle in (err.details() or "")
    assert_nothing_published(im, cid)


def apply_plan(im: Im, plan: plan_pb2.Plan) -> bool:
    """Hands ``plan`` to the instance manager's plan executor (on its event loop, as its PlanFollower does);
    returns whether it was applied."""
    return bool(im.thread.call(im.app.executor.apply(plan)))


def host_resident(im: Im, cid: str) -> bool:
    """Whether ``cid`` is in ``im``'s HOST tier (per ``Stats``)."""
    state = component_state(im_stats(im), cid)
    return state is not None and state.tier == common_pb2.TIER_HOST

"""Topologies shared by contract test modules. Module-scoped: each module that asks gets its own."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from diffmesh.server import ServerThread
from diffmesh.v1 import coordinator_pb2_grpc, worker_pb2_grpc
from diffmesh_coordinator.app import CoordinatorApp
from diffmesh_coordinator.settings import CoordinatorSettings

from tests.support.im import BASE, CONTROLNET, LORA, ImMesh, register_component, write_base, write_lora
from tests.support.worker import CONTROLNET as DEMO_CONTROLNET
from tests.support.worker import LORA as DEMO_LORA
from tests.support.worker import NODE_ID, WORKER_ID, WorkerMesh


@pytest.fixture(scope="module")
def im_mesh(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImMesh]:
    """A coordinator with test artifacts registered: good ones, bad ones (each checked by the
    instance manager in its own way) and two ~1 MiB LoRAs for capacity tests. Its plans admit every
    copy into HOST (``cold_min_uses=0``): these tests are about loading and eviction; COLD admission
    has its own (test_instance_manager_plan.py)."""
    root = tmp_path_factory.mktemp("im-artifacts")
    outside = tmp_path_factory.mktemp("im-outside")
    namespace = f"imt{uuid.uuid4().hex[:8]}:"
    coordinator = ServerThread(CoordinatorApp(CoordinatorSettings(redis_url=redis_url, namespace=namespace, cold_min_uses=0)))
    channel = grpc.insecure_channel(coordinator.address)
    stub = coordinator_pb2_grpc.CacheCoordinatorServiceStub(channel)
    paths: dict[str, Path] = {}

    def add(cid: str, kind: int, path: Path, uri: str | None = None, sha: str = "") -> None:
        paths[cid] = path
        register_component(stub, cid, kind, uri or path.as_uri(), path, sha)

    add("base-a", BASE, write_base(root / "base-a", 1))
    add("lora-a", LORA, write_lora(root / "lora-a.safetensors", 2))
    add("lora-b", LORA, write_lora(root / "lora-b.safetensors", 3))
    add("lora-c", LORA, write_lora(root / "lora-c.safetensors", 4))
    add("lora-d", LORA, write_lora(root / "lora-d.safetensors", 5))
    add("lora-restart", LORA, write_lora(root / "lora-restart.safetensors", 6))
    # Bad artifacts, each registered with the digest of its actual bytes unless noted.
    add("lora-badsha", LORA, write_lora(root / "lora-badsha.safetensors", 7), sha="0" * 64)
    truncated = write_lora(root / "lora-truncated.safetensors", 8)
    truncated.write_bytes(truncated.read_bytes()[:-10])
    add("lora-truncated", LORA, truncated)
    malformed = root / "lora-malformed.safetensors"
    raw = b'{"x": {"dtype": "F32", '
    malformed.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 16)
    add("lora-malformed", LORA, malformed)
    pickled = write_base(root / "cn-pickle", 9)
    (pickled / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    add("cn-pickle", CONTROLNET, pickled)
    add("lora-outside", LORA, write_lora(outside / "lora-outside.safetensors", 10))
    (root / "sub").mkdir()
    add("lora-dotdot", LORA, root / "lora-a.safetensors", uri=f"file://{root}/sub/../lora-a.safetensors")
    os.symlink(outside / "lora-outside.safetensors", root / "lora-link.safetensors")
    add("lora-symlink", LORA, root / "lora-link.safetensors")
    # Two ~1 MiB LoRAs for the capacity test.
    add("big-1", LORA, write_lora(root / "big-1.safetensors", 11, rows=32768))
    add("big-2", LORA, write_lora(root / "big-2.safetensors", 12, rows=32768))
    yield ImMesh(coordinator, stub, root, outside, paths)
    channel.close()
    coordinator.stop()


@pytest.fixture(scope="module")
def worker_mesh(redis_url: str, demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerMesh]:
    """Coordinator (demo catalog), instance manager and one CPU worker (``max_queue=1``) on node
    ``NODE_ID``; ``xl-lora`` and ``xl-controlnet`` are demo copies registered as family sdxl."""
    # Service imports stay in the fixture: every contract module loads this file, and the worker
    # imports torch and diffusers.
    from diffmesh_instance_manager.app import InstanceManagerApp
    from diffmesh_instance_manager.settings import InstanceManagerSettings
    from diffmesh_worker.app import WorkerApp
    from diffmesh_worker.settings import WorkerSettings

    namespace = f"wkt{uuid.uuid4().hex[:8]}:"
    coordinator = ServerThread(
        CoordinatorApp(
            CoordinatorSettings(
                redis_url=redis_url, namespace=namespace, catalog=str(demo_models / "catalog.json"), lease_seconds=6
            )
        )
    )
    channel = grpc.insecure_channel(coordinator.address)
    coord = coordinator_pb2_grpc.CacheCoordinatorServiceStub(channel)
    # Components of another family, for the family checks: copies of demo artifacts.
    other = tmp_path_factory.mktemp("other-family")
    lora_src = next((demo_models / "lora").glob(f"{DEMO_LORA}.safetensors"))
    shutil.copy(lora_src, other / "xl-lora.safetensors")
    xl_lora = other / "xl-lora.safetensors"
    register_component(coord, "xl-lora", LORA, xl_lora.as_uri(), xl_lora, family="sdxl")
    shutil.copytree(demo_models / "controlnet" / DEMO_CONTROLNET, other / "xl-controlnet")
    xl_controlnet = other / "xl-controlnet"
    register_component(coord, "xl-controlnet", CONTROLNET, xl_controlnet.as_uri(), xl_controlnet, family="sdxl")

    im = ServerThread(
        InstanceManagerApp(
            InstanceManagerSettings(
                node_id=NODE_ID,
                coordinator=coordinator.address,
                ssd_dir=str(tmp_path_factory.mktemp("ssd")),
                allowed_roots=[str(demo_models), str(other)],
            )
        )
    )
    app = WorkerApp(
        WorkerSettings(
            worker_id=WORKER_ID,
            node_id=NODE_ID,
            coordinator=coordinator.address,
            instance_manager=im.address,
            device="cpu",
            max_queue=1,
            torch_threads=1,
        )
    )
    worker = ServerThread(app)
    worker_channel = grpc.insecure_channel(worker.address)
    yield WorkerMesh(coordinator, im, worker, app, worker_pb2_grpc.WorkerServiceStub(worker_channel), coord)
    worker_channel.close()
    worker.stop()
    im.stop()
    channel.close()
    coordinator.stop()

"""Worker contract tests: the topology (:class:`WorkerMesh`), the demo-model ids they use, and
building, running and decoding ``Run`` requests (``tests/contract/test_worker*.py``)."""

from __future__ import annotations

import io
import os
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from diffmesh.server import ServerThread
from diffmesh.v1 import common_pb2, coordinator_pb2_grpc, worker_pb2, worker_pb2_grpc
from PIL import Image

if TYPE_CHECKING:  # the worker imports torch and diffusers: only the tests that start one pay for it
    from diffmesh_worker.app import WorkerApp

# Demo-model component ids (diffmesh.demo.models).
BASE = "sd15-tiny-a"
BASE_B = "sd15-tiny-b"
LORA = "lora-neon"
LORA_2 = "lora-sketch"
CONTROLNET = "controlnet-edges"
WORKER_ID = "wk-contract"
NODE_ID = f"node-contract-{os.getpid()}"


@dataclass
class WorkerMesh:
    """Coordinator, instance manager and worker servers, with client stubs."""

    coordinator: ServerThread
    im: ServerThread
    worker: ServerThread
    app: WorkerApp
    stub: worker_pb2_grpc.WorkerServiceStub
    coord: coordinator_pb2_grpc.CacheCoordinatorServiceStub


def make_request(
    seed: int = 7,
    loras: tuple[tuple[str, float], ...] = (),
    controlnets: tuple[tuple[str, bytes], ...] = (),
    base: str = BASE,
    **params: object,
) -> worker_pb2.RunRequest:
    """A small ``RunRequest`` (2 steps, 64x64, one image) with ``params`` overriding the generation parameters."""
    gen = dict(prompt="a red fox in the snow", steps=2, width=64, height=64, seed=seed, num_images=1)
    gen.update(params)
    return worker_pb2.RunRequest(
        request_id=f"req-{uuid.uuid4().hex[:8]}",
        pipeline=common_pb2.PipelineSpec(
            base_id=base,
            loras=[common_pb2.LoraRef(id=lid, scale=scale) for lid, scale in loras],
            controlnets=[common_pb2.ControlNetRef(id=cid, image=img) for cid, img in controlnets],
        ),
        params=common_pb2.GenerationParams(**gen),  # type: ignore[arg-type]
        tenant="t1",
    )


def run(mesh: WorkerMesh, request: worker_pb2.RunRequest) -> tuple[list[worker_pb2.RunResponse], common_pb2.GenerationResult]:
    """Runs ``request`` to its end; returns every event and the result (the last event)."""
    events = list(mesh.stub.Run(request, timeout=120))
    assert events[-1].WhichOneof("event") == "result"
    return events, events[-1].result


def pixels(result: common_pb2.GenerationResult) -> list[np.ndarray]:
    """The result's images, decoded to int16 RGB arrays (differences do not wrap)."""
    return [np.asarray(Image.open(io.BytesIO(img.png)).convert("RGB"), dtype=np.int16) for img in result.images]

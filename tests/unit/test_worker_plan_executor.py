"""Applying the coordinator's plan on a worker: which HOT replicas are this worker's, their pins,
stale versions, dropped replicas, and the pre-build target (overlay or base + LoRAs).
Pre-building itself runs against real services in tests/contract/test_worker_policy.py."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from diffmesh.policy.eviction import LRUEviction
from diffmesh.v1 import common_pb2, plan_pb2
from diffmesh_worker.device_cache import CacheEntry, DeviceCache, LoraWeights
from diffmesh_worker.loader import PipelineParts
from diffmesh_worker.plan_executor import PlanExecutor, Replica
from diffmesh_worker.runner import DeviceSlot

NODE, WORKER = "node-a", "wk-1"


def _hot(
    key: str, base: str, loras: tuple[str, ...], replicas: list[tuple[str, str]], fused: str = ""
) -> plan_pb2.HotPipelinePlan:
    return plan_pb2.HotPipelinePlan(
        pipeline_key=key,
        pipeline=common_pb2.PipelineSpec(base_id=base, loras=[common_pb2.LoraRef(id=i, scale=1.0) for i in loras]),
        replicas=[plan_pb2.WorkerRef(node_id=n, worker_id=w) for n, w in replicas],
        fused_id=fused,
    )


def _executor(cache: DeviceCache) -> PlanExecutor:
    # apply() only pins and wakes the loop; the loader and the coordinator are not called here.
    return PlanExecutor(NODE, WORKER, cache, DeviceSlot(4), cast(Any, None), cast(Any, None), retry_s=5.0, timeout_s=1.0)


def test_apply_pins_this_workers_replicas_ignores_stale_versions_and_unpins_dropped_ones() -> None:
    cache = DeviceCache(0, 16, LRUEviction())
    cache.add(CacheEntry("base-a", common_pb2.COMPONENT_KIND_BASE, "sd15", 10, LoraWeights({}, None), None))
    executor = _executor(cache)
    plan = plan_pb2.Plan(
        version=3,
        hot=[
            _hot("a+x", "base-a", ("lora-x",), [(NODE, WORKER), ("node-b", WORKER)], fused="fused-ax"),
            _hot("b", "base-b", (), [(NODE, "wk-2"), ("node-b", WORKER)]),  # not this worker
        ],
    )
    asyncio.run(executor.apply(plan))
    assert executor.version == 3 and list(executor.replicas) == ["a+x"]
    assert cache.pins == {"base-a", "lora-x", "fused-ax"}

    stale = plan_pb2.Plan(version=2, hot=[_hot("c", "base-c", (), [(NODE, WORKER)])])
    asyncio.run(executor.apply(stale))
    assert executor.version == 3 and cache.pins == {"base-a", "lora-x", "fused-ax"}

    asyncio.run(executor.apply(plan_pb2.Plan(version=4, hot=[_hot("b", "base-b", (), [(NODE, WORKER)])])))
    assert list(executor.replicas) == ["b"] and cache.pins == {"base-b"}
    assert "base-a" in cache  # unpinned, not removed


def test_target_is_the_overlay_once_it_exists() -> None:
    replica = Replica("a+x", PipelineParts("base-a", ("lora-x",), ("cn",)), fused_id="fused-ax")
    assert replica.target() == PipelineParts("base-a", ("lora-x",), ("cn",))
    replica.fused_exists = True
    assert replica.target() == PipelineParts("fused-ax", (), ("cn",))
    assert replica.pins() == ["base-a", "lora-x", "cn", "fused-ax"]

"""The instance manager executes the coordinator's plan (pins, prefetches, the COLD admission
rule; stale, LRU and partly unknown plans) and evicts LRU under ``DIFFMESH_POLICY=lru`` — real
instance managers on the real coordinator and Redis, real files and shared memory.

The coordinator's own plan loop drives the first tests: recorded requests make a pipeline HOT,
its plan reaches the instance manager through the PlanFollower, and the node pins and fuses
it. The rest hand crafted plans to the instance manager's executor the way its PlanFollower
does, with versions far above the coordinator's own so that its plan loop does not interfere
(that coordinator, ``im_mesh``'s, admits every copy: ``cold_min_uses=0``)."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from diffmesh.pipeline_key import canonical_key, fused_id
from diffmesh.server import ServerThread
from diffmesh.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, plan_pb2
from diffmesh_coordinator.app import CoordinatorApp
from diffmesh_coordinator.settings import CoordinatorSettings

from tests.support.im import (
    Im,
    ImMesh,
    acquire,
    apply_plan,
    component_state,
    host_resident,
    im_stats,
    release,
    start_im,
    tier_stats,
)
from tests.support.waiting import wait_for

MIB = 1024 * 1024
HOST = common_pb2.TIER_HOST
SSD = common_pb2.TIER_SSD
_versions = itertools.count(1 << 40)


def _plan(im: Im, version: int | None = None, **directive: list[str]) -> plan_pb2.Plan:
    """A plan whose directive for ``im``'s node holds ``directive`` (pinned_ids, prefetch_ids, ...)."""
    return plan_pb2.Plan(
        version=next(_versions) if version is None else version,
        mode=plan_pb2.POLICY_MODE_DIFFMESH,
        nodes=[
            plan_pb2.NodeDirective(node_id="some-other-node", pinned_ids=["lora-d"]),
            plan_pb2.NodeDirective(node_id=im.node_id, **directive),
        ],
    )


def _with_admission(plan: plan_pb2.Plan, admitted: list[str], cold_min_uses: int) -> plan_pb2.Plan:
    plan.admission.CopyFrom(plan_pb2.AdmissionRule(admitted_ids=admitted, cold_min_uses=cold_min_uses))
    return plan


@pytest.fixture()
def im(im_mesh: ImMesh, tmp_path: Path) -> Iterator[Im]:
    running, channel = start_im(im_mesh, tmp_path / "ssd")
    yield running
    channel.close()
    running.thread.stop()


@pytest.fixture()
def pool_im(im_mesh: ImMesh, tmp_path: Path) -> Iterator[Im]:
    """HOST is a 5 MiB pool: two 2 MiB blocks (every artifact here rounds to one block)."""
    running, channel = start_im(im_mesh, tmp_path / "ssd", host_capacity_bytes=5 * MIB)
    yield running
    channel.close()
    running.thread.stop()


def _use(im: Im, *ids: str) -> None:
    release(im, acquire(im, *ids).lease_id)


@pytest.fixture()
def planning(redis_url: str, demo_models: Path, tmp_path: Path) -> Iterator[tuple[ImMesh, Im]]:
    """A coordinator that plans every 0.2 s with its default policy settings (demo catalog), and an instance manager."""
    settings = CoordinatorSettings(
        redis_url=redis_url,
        namespace=f"imp{uuid.uuid4().hex[:8]}:",
        catalog=str(demo_models / "catalog.json"),
        plan_seconds=0.2,
        lease_seconds=60,
    )
    coordinator = ServerThread(CoordinatorApp(settings))
    channel = grpc.insecure_channel(coordinator.address)
    mesh = ImMesh(coordinator, coordinator_pb2_grpc.CacheCoordinatorServiceStub(channel), demo_models, demo_models, {})
    im, im_channel = start_im(mesh, tmp_path / "ssd", host_capacity_bytes=64 * MIB)
    yield mesh, im
    im_channel.close()
    im.thread.stop()
    channel.close()
    coordinator.stop()


def test_the_coordinators_plan_pins_and_fuses_a_hot_pipeline_on_its_replica_node(planning: tuple[ImMesh, Im]) -> None:
    mesh, im = planning
    wait_for(lambda: any(n.node_id == im.node_id for n in mesh.stub.ListNodes(coordinator_pb2.ListNodesRequest()).nodes), "node")
    worker = coordinator_pb2.WorkerInfo(
        worker_id="w-plan", node_id=im.node_id, address="127.0.0.1:1", device="cpu", device_memory_bytes=8 << 30
    )
    mesh.stub.RegisterWorker(coordinator_pb2.RegisterWorkerRequest(worker=worker))
    base, loras = "sd15-tiny-b", [("lora-pixel", 0.5)]
    key = canonical_key(base, loras)
    now = time.time()
    records = [
        coordinator_pb2.RequestRecord(
            request_id=f"r{i}", pipeline_key=key, component_ids=[base, "lora-pixel"], arrival_unix=now, num_images=1
        )
        for i in range(20)
    ]
    mesh.stub.RecordRequests(coordinator_pb2.RecordRequestsRequest(records=records))
    fid = fused_id(base, loras)
    # The plan makes the pipeline HOT with a replica on this node's worker: its overlay is fused here and pinned.
    wait_for(lambda: host_resident(im, fid), "the HOT pipeline's overlay fused on its replica's node", timeout=120)
    wait_for(lambda: {base, "lora-pixel", fid} <= im.app.store.pinned, "the HOT pipeline's components pinned")
    stats = im_stats(im)
    assert stats.plan_version >= 1 and stats.fusions_done == 1 and stats.pinned_components >= 3
    rec = mesh.stub.GetComponent(coordinator_pb2.GetComponentRequest(id=fid)).component
    assert rec.kind == common_pb2.COMPONENT_KIND_FUSED and rec.base_id == base


def test_the_coordinators_plan_fuses_a_warm_pipeline_with_loras_on_the_node_holding_its_base(
    planning: tuple[ImMesh, Im],
) -> None:
    mesh, im = planning
    wait_for(lambda: any(n.node_id == im.node_id for n in mesh.stub.ListNodes(coordinator_pb2.ListNodesRequest()).nodes), "node")
    worker = coordinator_pb2.WorkerInfo(
        worker_id="w-plan", node_id=im.node_id, address="127.0.0.1:1", device="cpu", device_memory_bytes=8 << 30
    )
    mesh.stub.RegisterWorker(coordinator_pb2.RegisterWorkerRequest(worker=worker))
    base, loras = "sd15-tiny-b", [("lora-neon", 0.8)]
    _use(im, base)  # the node's SSD now holds the base

    def holds_base() -> bool:
        resp = mesh.stub.Locate(coordinator_pb2.LocateRequest(component_ids=[base]))
        return any(r.node_id == im.node_id for loc in resp.locations for r in loc.residencies)

    wait_for(holds_base, "the node's copy of the base reported")
    warm_key = canonical_key(base, loras)
    now = time.time()
    mix = [
        (canonical_key("sd15-tiny-a"), ["sd15-tiny-a"], 20),  # HOT, no LoRAs: nothing to fuse
        (warm_key, [base, "lora-neon"], 8),  # WARM with LoRAs: a fusion target
        (canonical_key("sd15-tiny-c"), ["sd15-tiny-c"], 1),
        (canonical_key(base), [base], 1),
    ]
    records = [
        coordinator_pb2.RequestRecord(request_id=f"{key}-{i}", pipeline_key=key, component_ids=ids, arrival_unix=now)
        for key, ids, n in mix
        for i in range(n)
    ]
    mesh.stub.RecordRequests(coordinator_pb2.RecordRequestsRequest(records=records))
    fid = fused_id(base, loras)
    wait_for(lambda: host_resident(im, fid), "the WARM pipeline's overlay fused on the node holding its base", timeout=120)
    plan = mesh.stub.GetPlan(coordinator_pb2.GetPlanRequest()).plan
    assert {p.pipeline_key: p.band for p in plan.pipelines}[warm_key] == plan_pb2.BAND_WARM
    assert [(f.pipeline_key, f.fused_id, list(f.node_ids)) for f in plan.fusions] == [(warm_key, fid, [im.node_id])]
    assert all(not h.fused_id for h in plan.hot)
    assert fid not in im.app.store.pinned  # only HOT replicas pin
    assert im_stats(im).fusions_done == 1
    rec = mesh.stub.GetComponent(coordinator_pb2.GetComponentRequest(id=fid)).component
    assert rec.kind == common_pb2.COMPONENT_KIND_FUSED and rec.base_id == base


def test_under_the_coordinators_default_rule_a_cold_component_used_once_is_not_kept(planning: tuple[ImMesh, Im]) -> None:
    _, im = planning
    wait_for(lambda: im_stats(im).plan_version >= 1, "the coordinator's first plan applied")
    assert im.app.store.admission.rule is not None and im.app.store.admission.rule.cold_min_uses == 2
    _use(im, "lora-neon")
    assert not host_resident(im, "lora-neon")
    _use(im, "lora-neon")
    assert host_resident(im, "lora-neon")
    assert im_stats(im).admissions_refused == 1


def test_plan_pins_survive_eviction_pressure_until_a_plan_drops_them(pool_im: Im) -> None:
    assert apply_plan(pool_im, _plan(pool_im, pinned_ids=["lora-a"]))
    _use(pool_im, "lora-a")
    for cid in ("lora-b", "lora-c", "lora-d", "lora-b"):
        _use(pool_im, cid)  # one block left: each evicts the one before, never the pinned copy
    stats = im_stats(pool_im)
    assert stats.pinned_components == 1  # lora-d is pinned on the other node only
    assert component_state(stats, "lora-a").tier == HOST  # type: ignore[union-attr]
    assert tier_stats(stats, HOST).evicted_bytes > 0
    # A newer plan replaces the pinned set: two copies leased at once now take both blocks.
    assert apply_plan(pool_im, _plan(pool_im))
    resp = acquire(pool_im, "lora-c", "lora-d")
    assert not host_resident(pool_im, "lora-a")
    assert im_stats(pool_im).pinned_components == 0
    release(pool_im, resp.lease_id)


def test_plan_prefetch_makes_a_copy_host_resident_and_an_acquire_counts_a_hit(im: Im) -> None:
    assert apply_plan(im, _plan(im, prefetch_ids=["lora-b"]))
    wait_for(lambda: host_resident(im, "lora-b"), "the prefetched copy in HOST")
    stats = im_stats(im)
    assert stats.prefetches_started == 1 and stats.prefetch_hits == 0
    assert tier_stats(stats, HOST).misses == 0  # no Acquire asked for it
    resp = acquire(im, "lora-b")
    assert resp.handles[0].source_tier == HOST
    release(im, resp.lease_id)
    _use(im, "lora-b")
    # The same prefetch in a newer plan: already resident, nothing started; one hit per prefetch.
    assert apply_plan(im, _plan(im, prefetch_ids=["lora-b"]))
    stats = im_stats(im)
    assert stats.prefetches_started == 1 and stats.prefetch_hits == 1


def test_a_stale_plan_is_ignored(im: Im) -> None:
    version = next(_versions) + 10
    assert apply_plan(im, _plan(im, version, pinned_ids=["lora-a"]))
    assert not apply_plan(im, _plan(im, version - 5, pinned_ids=["lora-c"], prefetch_ids=["lora-c"]))
    assert not apply_plan(im, _plan(im, version, pinned_ids=["lora-c"]))  # the same version again
    stats = im_stats(im)
    assert stats.plan_version == version and stats.pinned_components == 1 and stats.prefetches_started == 0
    assert im.app.store.pinned == {"lora-a"}


def test_an_lru_plan_is_ignored(im: Im) -> None:
    plan = _plan(im, pinned_ids=["lora-a"])
    plan.mode = plan_pb2.POLICY_MODE_LRU
    assert not apply_plan(im, plan)
    assert im_stats(im).plan_version < plan.version and "lora-a" not in im.app.store.pinned


def test_a_plan_naming_unknown_components_applies_the_rest(im: Im) -> None:
    plan = _plan(
        im,
        pinned_ids=["lora-a", "no-such-pin"],
        prefetch_ids=["no-such-component", "lora-c"],
        fuse_pipeline_keys=["not-a-hot-key", "no-such-base|lora-a@1.00|"],
    )
    plan.hot.add(
        pipeline_key="no-such-base|lora-a@1.00|",
        pipeline=common_pb2.PipelineSpec(base_id="no-such-base", loras=[common_pb2.LoraRef(id="lora-a", scale=1.0)]),
    )
    assert apply_plan(im, plan)
    wait_for(lambda: host_resident(im, "lora-c"), "the known component prefetched")
    stats = im_stats(im)
    assert stats.plan_version == plan.version and stats.prefetches_started == 1 and stats.fusions_done == 0
    assert im.app.store.pinned == {"lora-a", "no-such-pin"}  # a pin is only an id: nothing to look up
    _use(im, "lora-a")  # the service is unharmed


def test_a_cold_component_used_once_is_not_kept_in_host(im: Im) -> None:
    assert apply_plan(im, _with_admission(_plan(im), admitted=["lora-a"], cold_min_uses=2))
    resp = acquire(im, "lora-b")
    segment = resp.handles[0].files[0].segment
    assert host_resident(im, "lora-b") and Path("/dev/shm", segment).exists()  # the worker maps it meanwhile
    release(im, resp.lease_id)
    stats = im_stats(im)
    assert component_state(stats, "lora-b").tier == SSD  # type: ignore[union-attr]
    assert stats.admissions_refused == 1
    assert tier_stats(stats, HOST).evicted_bytes == 0  # freed, not evicted
    wait_for(lambda: not Path("/dev/shm", segment).exists(), "the transient segment unlinked")
    # The second request on this node reaches cold_min_uses: the copy stays.
    resp = acquire(im, "lora-b")
    assert resp.handles[0].source_tier == SSD
    release(im, resp.lease_id)
    assert host_resident(im, "lora-b")
    # An admitted component (HOT or WARM) is kept at its first use.
    _use(im, "lora-a")
    assert host_resident(im, "lora-a")
    assert im_stats(im).admissions_refused == 1


def test_a_transient_copy_lives_until_its_last_lease_ends(im: Im) -> None:
    assert apply_plan(im, _with_admission(_plan(im), admitted=[], cold_min_uses=3))
    first = acquire(im, "lora-c", holder="w1")
    second = acquire(im, "lora-c", holder="w2")  # a hit on the transient copy: a second use, still under 3
    release(im, first.lease_id)
    assert host_resident(im, "lora-c")
    release(im, second.lease_id)
    assert not host_resident(im, "lora-c")
    assert im_stats(im).admissions_refused == 1


def test_in_a_full_pool_a_cold_copy_is_kept_only_when_busier_than_what_it_displaces(pool_im: Im) -> None:
    assert apply_plan(pool_im, _with_admission(_plan(pool_im), admitted=[], cold_min_uses=2))
    for cid in ("lora-a", "lora-a", "lora-a", "lora-b", "lora-b", "lora-b"):
        _use(pool_im, cid)  # each: transient at its first use, cached at its second
    assert im_stats(pool_im).admissions_refused == 2
    _use(pool_im, "lora-c")  # transient: it takes a block while leased (evicting one), then frees it
    _use(pool_im, "lora-a")
    _use(pool_im, "lora-b")  # both blocks hold the busy pair again
    assert host_resident(pool_im, "lora-a") and host_resident(pool_im, "lora-b")
    # lora-c has enough uses now, but the pool is full of copies asked for twice as often: refused again.
    _use(pool_im, "lora-c")
    assert not host_resident(pool_im, "lora-c")
    assert im_stats(pool_im).admissions_refused == 4


def test_a_rule_with_cold_min_uses_zero_keeps_every_copy(im: Im) -> None:
    assert apply_plan(im, _with_admission(_plan(im), admitted=[], cold_min_uses=0))
    _use(im, "lora-d")
    assert host_resident(im, "lora-d") and im_stats(im).admissions_refused == 0


def test_lru_mode_evicts_the_least_recently_used_copy(im_mesh: ImMesh, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFMESH_POLICY", "lru")
    lru, channel = start_im(im_mesh, tmp_path / "ssd", host_capacity_bytes=5 * MIB)
    try:
        # lora-a is asked for three times, lora-b once and later: utility eviction would keep lora-a, LRU does not.
        for _ in range(3):
            _use(lru, "lora-a")
        _use(lru, "lora-b")
        _use(lru, "lora-c")
        stats = im_stats(lru)
        assert component_state(stats, "lora-a").tier == SSD  # type: ignore[union-attr]
        assert component_state(stats, "lora-b").tier == HOST  # type: ignore[union-attr]
        assert not apply_plan(lru, _plan(lru, pinned_ids=["lora-a"]))  # plans are ignored (and none is followed)
        assert lru.app.follower is None and lru.app.store.peers is None and lru.app.store.pinned == set()
    finally:
        channel.close()
        lru.thread.stop()

"""The ``Fuse`` RPC's work: a base with LoRAs merged in, as a FUSED overlay component in the SSD and HOST tiers.

:meth:`OverlayFuser.fuse` validates the request, takes the LoRA set in canonical
pipeline-key form, derives the overlay once per overlay id (concurrent calls share the
work), registers it with the coordinator and makes it HOST-resident through the store.
Deriving makes the base and the LoRAs HOST-resident under an internal lease, writes the
overlay from their HOST copies (:mod:`.overlay_writer`, torch imported on first use)
to the SSD tier's ``tmp/``, hashes it and publishes it in the SSD tier, bounded like
every SSD copy. An overlay whose SSD copy is gone (evicted, or fused on another node) is
derived again on demand (:meth:`OverlayFuser.rederive`, the store's
:class:`~diffmesh_instance_manager.store.OverlayDeriver`) and checked against its
catalog digest.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from diffmesh.artifacts import artifact_bytes, artifact_sha256
from diffmesh.catalog import check_id
from diffmesh.errors import DataLoss, FailedPrecondition, InvalidArgument
from diffmesh.pipeline_key import SCALE_DECIMALS
from diffmesh.pipeline_key import fused_id as default_fused_id
from diffmesh.request_validation import LORA_SCALE_LIMIT
from diffmesh.v1 import common_pb2, instance_manager_pb2

from diffmesh_instance_manager.catalog_records import Record
from diffmesh_instance_manager.host import HostEntry, to_handle
from diffmesh_instance_manager.ssd import SsdEntry
from diffmesh_instance_manager.store import ComponentStore

log = logging.getLogger(__name__)

MAX_FUSE_LORAS = 8
#: The lease holder of the base and LoRAs while an overlay is derived (and of a Fuse without a holder).
FUSE_HOLDER = "im:fuse"
#: Label of a FUSED record: its LoRA set, ``[{"id", "scale"}…]`` as canonical JSON.
LORAS_LABEL = "diffmesh.loras"

RecordRegister = Callable[[Record], Awaitable[Record]]


class OverlayFuser:
    """Fuses LoRAs into bases as FUSED overlays of ``store``; ``register`` adds a record to the catalog (None: no coordinator)."""

    def __init__(self, store: ComponentStore, register: RecordRegister | None) -> None:
        self.store = store
        self.register = register
        self._fusing: dict[str, asyncio.Task[tuple[Record, bool]]] = {}

    async def close(self, wait_s: float = 30.0) -> None:
        """Lets fusions in progress finish (at most ``wait_s``), then cancels the rest."""
        pending = [t for t in self._fusing.values() if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=wait_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def fuse(
        self, base_id: str, loras: list[tuple[str, float]], fused_id: str, holder: str
    ) -> tuple[Record, instance_manager_pb2.HostHandle, str, bool]:
        """Merges ``loras`` into ``base_id`` as a FUSED overlay in the SSD and HOST tiers.

        The LoRA set is taken in canonical pipeline-key form (sorted by id, scales rounded
        to two decimals), so one pipeline key maps to one overlay.

        Returns the registered record, its HOST handle, a lease id (when ``holder`` is
        given) and whether this call computed it. Concurrent calls for one overlay compute
        it once.
        """
        if not base_id:
            raise InvalidArgument("base_id", "required")
        if not 1 <= len(loras) <= MAX_FUSE_LORAS:
            raise InvalidArgument("loras", f"1-{MAX_FUSE_LORAS} LoRAs are required, got {len(loras)}")
        seen: set[str] = set()
        for i, (lid, scale) in enumerate(loras):
            if not lid:
                raise InvalidArgument(f"loras[{i}].id", "empty id")
            if lid in seen:
                raise InvalidArgument(f"loras[{i}].id", f"{lid!r} is listed twice")
            seen.add(lid)
            if not math.isfinite(scale) or abs(scale) > LORA_SCALE_LIMIT:
                bound = LORA_SCALE_LIMIT
                raise InvalidArgument(f"loras[{i}].scale", f"must be finite within [-{bound}, {bound}], got {scale}")
        # The canonical pipeline key's form: sorted by id, scales to two decimals (one overlay per pipeline key).
        loras = sorted((lid, round(scale, SCALE_DECIMALS)) for lid, scale in loras)
        if not fused_id:
            fused_id = default_fused_id(base_id, loras)
        check_id("fused_id", fused_id)
        if self.register is None:
            raise FailedPrecondition("Fuse registers the overlay with the coordinator, and none is configured")
        task = self._fusing.get(fused_id)
        created = task is None
        if task is None:
            task = asyncio.create_task(self._fuse_once(base_id, loras, fused_id))
            self._fusing[fused_id] = task
            task.add_done_callback(functools.partial(self._fuse_done, fused_id))
        rec, created_now = await asyncio.shield(task)
        store = self.store
        lease = store.leases.open(holder or FUSE_HOLDER, time.time())
        try:
            store.popularity.record(rec.id, time.time())
            t0 = time.perf_counter()
            source = await store.host_leased(rec, lease)
            handle = to_handle(store.host.entries[rec.id], source, time.perf_counter() - t0)
        except BaseException:
            store.release(lease.lease_id)
            raise
        if not holder:
            store.release(lease.lease_id)
        return rec, handle, lease.lease_id if holder else "", created and created_now

    def _fuse_done(self, fused_id: str, task: asyncio.Task[tuple[Record, bool]]) -> None:
        self._fusing.pop(fused_id, None)
        if not task.cancelled():
            task.exception()  # retrieved here too: every waiter may have gone away

    async def _fuse_once(self, base_id: str, loras: list[tuple[str, float]], fused_id: str) -> tuple[Record, bool]:
        assert self.register is not None
        catalog = self.store.catalog
        lora_label = json.dumps([{"id": lid, "scale": s} for lid, s in loras], sort_keys=True)
        existing = await catalog.find(fused_id)
        if existing is not None:
            same = (
                existing.kind == common_pb2.COMPONENT_KIND_FUSED
                and existing.base_id == base_id
                and existing.labels.get(LORAS_LABEL) == lora_label
            )
            if not same:
                raise InvalidArgument("fused_id", f"{fused_id!r} already names another catalog component")
            return existing, False
        recs = await catalog.get_many([base_id, *(lid for lid, _ in loras)])
        base, lora_recs = recs[0], recs[1:]
        if base.kind != common_pb2.COMPONENT_KIND_BASE:
            raise InvalidArgument("base_id", f"{base_id!r} is not a BASE component")
        for i, rec in enumerate(lora_recs):
            if rec.kind != common_pb2.COMPONENT_KIND_LORA:
                raise InvalidArgument(f"loras[{i}].id", f"{rec.id!r} is not a LORA component")
            if rec.family != base.family:
                raise InvalidArgument(f"loras[{i}].id", f"{rec.id!r} is family {rec.family!r}, the base is {base.family!r}")
        entry = await self._derive(fused_id, base, lora_recs, [s for _, s in loras], expected_sha256="")
        record = common_pb2.Component(
            id=fused_id,
            kind=common_pb2.COMPONENT_KIND_FUSED,
            family=base.family,
            # Where it was derived; any node that lacks the file derives it again from base_id + labels.
            uri=self.store.ssd.path(entry).as_uri(),
            bytes=entry.bytes,
            sha256=entry.sha256,
            format=common_pb2.ARTIFACT_FORMAT_SAFETENSORS,
            base_id=base_id,
            labels={LORAS_LABEL: lora_label},
        )
        stored = await self.register(record)
        log.info("fused overlay registered", extra={"component_id": fused_id, "base_id": base_id, "bytes": entry.bytes})
        return stored, True

    async def rederive(self, rec: Record) -> None:
        """Derives a registered FUSED overlay again (its SSD copy was evicted, or it was fused on another node)."""
        try:
            loras = [(str(d["id"]), float(d["scale"])) for d in json.loads(rec.labels[LORAS_LABEL])]
        except (KeyError, ValueError, TypeError) as exc:
            raise FailedPrecondition(
                f"component {rec.id!r}: FUSED record without a valid {LORAS_LABEL!r} label ({exc}); it cannot be derived"
            ) from None
        recs = await self.store.catalog.get_many([rec.base_id, *(lid for lid, _ in loras)])
        await self._derive(rec.id, recs[0], recs[1:], [s for _, s in loras], expected_sha256=rec.sha256)

    async def _derive(
        self, fused_id: str, base: Record, lora_recs: list[Record], scales: list[float], expected_sha256: str
    ) -> SsdEntry:
        """Computes the overlay of ``lora_recs`` at ``scales`` on ``base`` and publishes it in the SSD tier.

        The overlay is written to ``SSD_DIR/tmp``, hashed, checked against ``expected_sha256``
        (when re-deriving a registered overlay), given room in the SSD tier (utility
        eviction; RESOURCE_EXHAUSTED when nothing can go) and renamed into place: it is
        bounded like every SSD copy, and nothing half-written is ever published.
        """
        store = self.store
        recs = [base, *lora_recs]
        lease = store.leases.open(FUSE_HOLDER, time.time())
        tmp = store.ssd.cache.tmp_path(fused_id)
        try:
            try:
                await store.acquire_leased(recs, lease)
                copies = [store.host.entries[r.id] for r in recs]
                await asyncio.to_thread(self._write_overlay, copies, scales, tmp)
            finally:
                store.release(lease.lease_id)
            digest, size = await asyncio.to_thread(lambda: (artifact_sha256(tmp), artifact_bytes(tmp)))
            if expected_sha256 and digest != expected_sha256.lower():
                raise DataLoss(
                    f"component {fused_id!r}: the overlay derived again from {base.id!r} and its LoRAs hashes to {digest}, "
                    f"the catalog has {expected_sha256} (its inputs or this node's arithmetic differ from where it was "
                    "fused); nothing was published — Fuse the set again under a new fused_id"
                )
            return await store.ssd.publish_derived(fused_id, tmp, digest, size, common_pb2.COMPONENT_KIND_FUSED)
        except BaseException:
            await asyncio.to_thread(store.ssd.cache.discard, tmp)
            raise

    def _write_overlay(self, copies: list[HostEntry], scales: list[float], dest: Path) -> None:
        from diffmesh_instance_manager.overlay_writer import HostCopy, write_overlay  # torch: imported on first Fuse

        views = [self.store.host.view(e) for e in copies]
        try:
            host = [HostCopy(e.component_id, e.plan, v) for e, v in zip(copies, views, strict=True)]
            write_overlay(host[0], list(zip(host[1:], scales, strict=True)), dest)
            del host
        finally:
            for v in views:
                try:
                    v.release()
                except BufferError:
                    pass  # a tensor view still exports it; it goes with the garbage

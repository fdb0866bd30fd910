"""A short-lived cache of catalog records fetched from the coordinator."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from diffmesh.errors import NotFound
from diffmesh.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc
from grpc import aio

log = logging.getLogger(__name__)

_UNREACHABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class CatalogCache:
    """Catalog records by id, each reused for ``ttl_seconds`` after it was fetched.

    Misses are not cached, so a component registered a moment ago is found at once. While
    the coordinator is unreachable, a record fetched earlier is served past its time (the
    router keeps routing on what it knew).
    """

    def __init__(
        self, stub: coordinator_pb2_grpc.CacheCoordinatorServiceStub, ttl_seconds: float, timeout_seconds: float
    ) -> None:
        self._stub = stub
        self._ttl = ttl_seconds
        self._timeout = timeout_seconds
        self._records: dict[str, tuple[float, common_pb2.Component]] = {}
        self._absent: dict[str, float] = {}

    async def get(self, component_id: str) -> common_pb2.Component:
        """The record of ``component_id``; NotFound naming it when the catalog lacks it."""
        hit = self._records.get(component_id)
        now = time.monotonic()
        if hit is not None and now - hit[0] < self._ttl:
            return hit[1]
        try:
            resp = await self._stub.GetComponent(coordinator_pb2.GetComponentRequest(id=component_id), timeout=self._timeout)
        except aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                self._records.pop(component_id, None)
                raise NotFound("component", component_id) from None
            if hit is not None and err.code() in _UNREACHABLE:
                log.warning("coordinator unreachable; serving a cached catalog record", extra={"component_id": component_id})
                return hit[1]
            raise
        self._records[component_id] = (time.monotonic(), resp.component)
        return resp.component

    async def find(self, component_id: str) -> common_pb2.Component | None:
        """The record of an optional component (a plan's FUSED overlay): None when absent or unreachable.

        Unlike :meth:`get`, an absence is remembered for ``ttl_seconds``, so a plan that
        names an overlay not registered yet costs one lookup per period, not one per request.
        """
        absent_at = self._absent.get(component_id)
        if absent_at is not None and time.monotonic() - absent_at < self._ttl:
            return None
        try:
            return await self.get(component_id)
        except NotFound:
            self._absent[component_id] = time.monotonic()
            return None
        except aio.AioRpcError as err:
            log.warning("optional catalog lookup failed", extra={"component_id": component_id, "code": err.code().name})
            self._absent[component_id] = time.monotonic()
            return None

    async def get_many(self, component_ids: list[str]) -> dict[str, common_pb2.Component]:
        """Records of all ``component_ids`` (fetched concurrently); NotFound names the first missing id in order."""
        results = await asyncio.gather(*(self.get(cid) for cid in component_ids), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return {cid: rec for cid, rec in zip(component_ids, results, strict=True) if isinstance(rec, common_pb2.Component)}

"""A short-lived cache of catalog records fetched from the coordinator."""

from __future__ import annotations

import asyncio
import time

import grpc
from diffmesh.errors import NotFound
from diffmesh.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc
from grpc import aio


class CatalogCache:
    """Catalog records by id, each reused for ``ttl_seconds`` after it was fetched.

    Misses are not cached, so a component registered a moment ago is found at once.
    """

    def __init__(
        self, stub: coordinator_pb2_grpc.CacheCoordinatorServiceStub, ttl_seconds: float, timeout_seconds: float
    ) -> None:
        self._stub = stub
        self._ttl = ttl_seconds
        self._timeout = timeout_seconds
        self._records: dict[str, tuple[float, common_pb2.Component]] = {}

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
            raise
        self._records[component_id] = (time.monotonic(), resp.component)
        return resp.component

    async def get_many(self, component_ids: list[str]) -> dict[str, common_pb2.Component]:
        """Records of all ``component_ids`` (fetched concurrently); NotFound names the first missing id in order."""
        results = await asyncio.gather(*(self.get(cid) for cid in component_ids), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return {cid: rec for cid, rec in zip(component_ids, results, strict=True) if isinstance(rec, common_pb2.Component)}

"""Catalog records as the instance manager reads them: through the coordinator, ids validated."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from diffmesh.errors import FailedPrecondition, InvalidArgument, NotFound
from diffmesh.v1 import common_pb2
from grpc import StatusCode, aio

Record = common_pb2.Component
RecordLookup = Callable[[str], Awaitable[Record]]
#: Ids one request may name.
MAX_IDS = 16


class CatalogRecords:
    """Looks records up with ``lookup`` (the coordinator's ``GetComponent``); None: no coordinator configured."""

    def __init__(self, lookup: RecordLookup | None) -> None:
        self.lookup = lookup

    async def get(self, component_id: str) -> Record:
        """The catalog record; FAILED_PRECONDITION when no coordinator is configured."""
        if self.lookup is None:
            raise FailedPrecondition(
                f"component {component_id!r}: no coordinator configured (DIFFMESH_IM_COORDINATOR), so the catalog cannot be read"
            )
        return await self.lookup(component_id)

    async def get_many(self, ids: list[str], field: str = "component_ids") -> list[Record]:
        """Records of ``ids`` in order (validated: 1-16 non-empty ids; each distinct id looked up once)."""
        if not ids:
            raise InvalidArgument(field, "at least one component id is required")
        if len(ids) > MAX_IDS:
            raise InvalidArgument(field, f"at most {MAX_IDS} ids, got {len(ids)}")
        for i, cid in enumerate(ids):
            if not cid:
                raise InvalidArgument(f"{field}[{i}]", "empty id")
        unique = list(dict.fromkeys(ids))
        found = await asyncio.gather(*(self.get(cid) for cid in unique))
        by_id = dict(zip(unique, found, strict=True))
        return [by_id[cid] for cid in ids]

    async def find(self, component_id: str) -> Record | None:
        """The catalog record of ``component_id``, or None when the catalog does not have it."""
        try:
            return await self.get(component_id)
        except NotFound:
            return None
        except aio.AioRpcError as exc:
            if exc.code() == StatusCode.NOT_FOUND:
                return None
            raise

"""Load-ahead: the next queued request's missing components come into HOST while it waits.

Without it a request that waits for the device starts fetching its components only once
it holds the device, so the device idles for the whole REMOTE or SSD fetch — the idle
time the study measured. With it, when a request becomes the next to run (position 1),
the worker asks its instance manager to bring the components its device cache lacks into
the node's HOST tier (:meth:`~diffmesh_worker.loader.Loader.acquire_ahead`, no device
involved). When the request gets the device, its build finds them in HOST, or joins the
fetch still under way, and only the HOST → device step is left.

Only the next request loads ahead, so a worker holds at most one pipeline's worth of
extra HOST leases. It is best effort: a refusal (a full HOST pool, an unknown id) or any
other failure is logged and the request loads as it would have. The lease is released
when the request ends (its build holds its own leases by then). Runs under
``DIFFMESH_POLICY=diffmesh``; the ``lru`` baseline loads on demand, as Ray Serve's
multiplexed replicas do.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from diffmesh_worker.device_cache import DeviceCache
from diffmesh_worker.loader import Loader, PipelineParts

log = logging.getLogger(__name__)


class LoadAhead:
    """One request's early Acquire; :meth:`finish` ends it."""

    def __init__(self, loader: Loader, ids: list[str], request_id: str) -> None:
        self.ids = ids
        self.request_id = request_id
        self._loader = loader
        self._task: asyncio.Task[str] = asyncio.create_task(loader.acquire_ahead(ids), name=f"load-ahead-{request_id}")

    @classmethod
    def start(cls, loader: Loader, cache: DeviceCache, parts: PipelineParts, request_id: str) -> LoadAhead | None:
        """Starts fetching what ``parts`` needs and the device cache lacks; None when nothing is missing."""
        missing = [cid for cid in dict.fromkeys(parts.component_ids()) if cid not in cache]
        if not missing:
            return None
        log.debug("loading ahead", extra={"request_id": request_id, "component_ids": missing})
        return cls(loader, missing, request_id)

    async def finish(self) -> None:
        """Waits for the early Acquire to end and releases its lease (failures are logged, never raised)."""
        try:
            lease_id = await self._task
        except asyncio.CancelledError:
            return
        except grpc.RpcError as exc:
            code = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else "?"
            log.info(
                "load-ahead not done; the request loaded on its own",
                extra={"request_id": self.request_id, "component_ids": self.ids, "code": code},
            )
            return
        except Exception:
            log.exception("load-ahead failed", extra={"request_id": self.request_id})
            return
        if lease_id:
            await self._loader.release(lease_id)

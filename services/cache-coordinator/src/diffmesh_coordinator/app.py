"""CoordinatorApp: the cache coordinator plugged into the shared server bootstrap."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from diffmesh.catalog import load_manifest
from diffmesh.errors import AlreadyExists
from diffmesh.policy_mode import PolicyMode, policy_mode
from diffmesh.v1 import common_pb2, coordinator_pb2_grpc
from grpc import aio

from diffmesh_coordinator.keys import KeyLayout
from diffmesh_coordinator.plan_loop import PlanLoop
from diffmesh_coordinator.popularity import DecayedPopularity
from diffmesh_coordinator.servicer import CoordinatorServicer
from diffmesh_coordinator.settings import CoordinatorSettings
from diffmesh_coordinator.store import CoordinatorStore
from diffmesh_coordinator.view_watch import ViewWatch

log = logging.getLogger(__name__)

SERVICE_NAME = "diffmesh.v1.CacheCoordinatorService"

STOP_TIMEOUT_S = 5.0
"""How long stop waits for the sweeper and the plan loop to end after cancelling them."""


def redact_url(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class CatalogLoadError(RuntimeError):
    """The catalog manifest could not be registered at start."""


class CoordinatorApp:
    """The cache coordinator service (catalog, leases, residency, popularity, the plan loop and the view stream on Redis).

    ``clock`` is the wall clock of popularity and plans; tests inject one to move time
    without sleeping. The policy mode is ``DIFFMESH_POLICY`` (:func:`diffmesh.policy_mode.policy_mode`).
    """

    name = "coordinator"

    def __init__(self, settings: CoordinatorSettings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.mode: PolicyMode = policy_mode()
        self.redis = aioredis.from_url(settings.redis_url, decode_responses=True)
        self.popularity = DecayedPopularity(settings.half_life_seconds, clock=clock)
        self.store = CoordinatorStore(
            self.redis,
            KeyLayout(settings.namespace),
            lease_seconds=settings.lease_seconds,
            request_stream_maxlen=settings.request_stream_maxlen,
            popularity=self.popularity,
            view_stream_maxlen=settings.view_stream_maxlen,
            clock=clock,
        )
        self.watch = ViewWatch(self.store)
        self.plan_loop = PlanLoop(self.store, self.popularity, settings, self.mode)
        self._sweeper: asyncio.Task[None] | None = None
        self._planner: asyncio.Task[None] | None = None

    def add_to_server(self, server: aio.Server) -> list[str]:
        """Adds CacheCoordinatorService."""
        coordinator_pb2_grpc.add_CacheCoordinatorServiceServicer_to_server(CoordinatorServicer(self.store, self.watch), server)
        return [SERVICE_NAME]

    async def start(self, port: int) -> None:
        """Checks Redis, registers the catalog manifest (if any), starts the lease sweeper."""
        try:
            components = load_manifest(self.settings.catalog) if self.settings.catalog else []
            try:
                await self.redis.ping()
            except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as exc:
                raise RuntimeError(f"cannot reach Redis at {redact_url(self.settings.redis_url)}: {exc}") from exc
            if components:
                await self._register_manifest(components)
        except BaseException:
            await self.redis.aclose()
            raise
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="coordinator-sweeper")
        self._planner = asyncio.create_task(self.plan_loop.run(self.watch.closing), name="coordinator-planner")

    async def _register_manifest(self, components: list[common_pb2.Component]) -> None:
        created = 0
        for component in components:
            try:
                _, new = await self.store.register_component(component, replace=self.settings.catalog_replace)
            except AlreadyExists as exc:
                raise CatalogLoadError(
                    f"catalog manifest {self.settings.catalog}: {exc.message} "
                    "(set DIFFMESH_COORDINATOR_CATALOG_REPLACE=true to let the manifest win)"
                ) from exc
            created += int(new)
        log.info(
            "catalog manifest registered",
            extra={"path": self.settings.catalog, "components": len(components), "new_records": created},
        )

    async def _sweep_forever(self) -> None:
        interval = self.settings.sweep_seconds or self.settings.lease_seconds
        closing = self.watch.closing
        while not closing.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(closing.wait(), interval)
                return
            try:
                purged = await self.store.sweep()
                if purged:
                    log.info("lapsed leases purged", extra={"purged": purged})
            except (aioredis.RedisError, OSError) as exc:
                if not closing.is_set():  # a cancellation mid-command can surface as a connection error
                    log.warning("sweep failed", extra={"error": str(exc)})

    async def stop(self) -> None:
        """Ends the watches, stops the sweeper and the plan loop (giving the planner lock up), closes Redis."""
        self.watch.closing.set()
        tasks = [t for t in (self._sweeper, self._planner) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_TIMEOUT_S)
        self._sweeper = self._planner = None
        with contextlib.suppress(aioredis.RedisError, OSError):
            await self.plan_loop.release()
        await self.redis.aclose()

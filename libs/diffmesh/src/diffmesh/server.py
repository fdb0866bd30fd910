"""gRPC server bootstrap shared by every service.

Every service gets the same server: the error interceptor, OpenTelemetry spans on every
RPC, the standard ``grpc.health.v1`` health service, server reflection, and a graceful
drain on SIGTERM/SIGINT (health flips to NOT_SERVING, in-flight RPCs get
``grace_seconds`` to finish, then the service's own ``stop`` runs).

Health is SERVING once the service's ``start`` returned. A service that is not ready then
(a standby worker, ready when activated) defines ``bind_health`` (:class:`HealthGated`): it
receives the marker that sets its health, and its health stays NOT_SERVING until it says so.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import aio_server_interceptor

from diffmesh.channels import GRPC_OPTIONS
from diffmesh.interceptors import ErrorInterceptor
from diffmesh.settings import ServiceSettings
from diffmesh.telemetry import setup_logging, setup_tracing, shutdown_tracing

log = logging.getLogger(__name__)


class Service(Protocol):
    """What a service plugs into the bootstrap."""

    name: str

    def add_to_server(self, server: aio.Server) -> list[str]:
        """Adds the servicers; returns their full service names (for health and reflection)."""
        ...

    async def start(self, port: int) -> None:
        """Starts background work once the server listens on ``port``."""
        ...

    async def stop(self) -> None:
        """Stops background work after the server drained."""
        ...


HealthMarker = Callable[[bool], Awaitable[None]]
"""Sets the health of a server's services and of the server (``""``): SERVING (True) or NOT_SERVING."""


@runtime_checkable
class HealthGated(Protocol):
    """Optional for a service: it decides itself when its health becomes SERVING."""

    def bind_health(self, mark: HealthMarker) -> bool:
        """Keeps ``mark`` (called before ``start``); returns whether to be SERVING once ``start`` returned."""
        ...


@dataclass
class RunningServer:
    """A started server: the gRPC server, its bound port and its health servicer."""

    server: aio.Server
    port: int
    service: Service
    health: health.aio.HealthServicer
    service_names: list[str] = field(default_factory=list)

    async def stop(self, grace: float = 5.0) -> None:
        """Marks NOT_SERVING, drains in-flight RPCs for ``grace`` seconds, stops the service."""
        for name in [*self.service_names, ""]:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)
        await self.service.stop()


async def start_server(service: Service, host: str = "127.0.0.1", port: int = 0) -> RunningServer:
    """Builds and starts the server for ``service``; returns once it serves."""
    server = aio.server(interceptors=[aio_server_interceptor(), ErrorInterceptor()], options=GRPC_OPTIONS)
    names = service.add_to_server(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)

    async def mark(serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in [*names, ""]:
            await health_servicer.set(name, status)

    ready_at_start = True
    if isinstance(service, HealthGated):
        ready_at_start = service.bind_health(mark)
        if not ready_at_start:
            await mark(False)  # the servicer answers SERVING for "" until told otherwise
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    await server.start()
    try:
        await service.start(bound)
    except BaseException:
        await server.stop(0)
        raise
    if ready_at_start:
        await mark(True)
    log.info("serving", extra={"service": service.name, "port": bound, "ready": ready_at_start})
    return RunningServer(server, bound, service, health_servicer, names)


async def serve(service: Service, settings: ServiceSettings) -> None:
    """Runs ``service`` until SIGTERM or SIGINT, then drains and exits."""
    setup_logging(service.name, settings.log_level, settings.log_format)
    setup_tracing(service.name)
    running = await start_server(service, settings.host, settings.port)
    if settings.port_file:
        Path(settings.port_file).write_text(str(running.port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining", extra={"service": service.name, "grace_s": settings.grace_seconds})
    await running.stop(settings.grace_seconds)
    shutdown_tracing()
    log.info("stopped", extra={"service": service.name})


class ServerThread:
    """Runs a service's server on its own event loop in a background thread.

    Used by contract tests and by anything that embeds a service in a synchronous program.
    """

    def __init__(self, service: Service, host: str = "127.0.0.1", port: int = 0) -> None:
        self.service = service
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._running: RunningServer | None = None
        self._thread = threading.Thread(target=self._run, args=(host, port), name=f"server-{service.name}", daemon=True)
        self._thread.start()
        self._ready.wait(60)
        if self._error is not None:
            raise self._error
        if self._running is None:
            raise TimeoutError(f"{service.name} did not start within 60 s")

    def _run(self, host: str, port: int) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self._running = self.loop.run_until_complete(start_server(self.service, host, port))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the constructor
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    @property
    def port(self) -> int:
        """Bound port."""
        assert self._running is not None
        return self._running.port

    @property
    def address(self) -> str:
        """``127.0.0.1:port``."""
        return f"127.0.0.1:{self.port}"

    def call(self, coro: object, timeout: float = 60.0) -> object:
        """Runs a coroutine on the server's loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def stop(self, grace: float = 1.0) -> None:
        """Drains and stops the server and its loop."""
        if self._running is not None:
            self.call(self._running.stop(grace))
            self._running = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)

"""A whole diffmesh on one machine: Redis, an OTLP span collector and the four services as processes.

:class:`LocalMesh` is what ``diffmesh run`` and the end-to-end tests start::

    with LocalMesh(MeshConfig(run_dir=Path("out/run"), models_dir=Path(".diffmesh/models"))) as mesh:
        client = Client(mesh.router_address)

Start order: Redis (unless ``REDIS_URL``), the OTLP collector (unless
``OTEL_EXPORTER_OTLP_ENDPOINT``), demo models (when missing), the coordinator (with the
catalog), then the instance manager, the workers and the router together; ready means
every health service answers SERVING and the coordinator lists every worker. Stop runs in
reverse order and reports orphans and leaked shared-memory segments.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from diffmesh.launcher.processes import ChildProcess, ServiceFailed, ServiceSpec, free_port, shm_segments
from diffmesh.redis_server import RedisServer
from diffmesh.shm import SHM_DIR, node_prefix
from diffmesh.span_collector import SpanCollector
from diffmesh.v1 import coordinator_pb2, coordinator_pb2_grpc

Progress = Callable[[str], None]


def stderr_progress(line: str) -> None:
    """Progress lines on stderr, prefixed so they stand apart from service output."""
    print(f"[diffmesh] {line}", file=sys.stderr, flush=True)


@dataclass
class MeshConfig:
    """What to start.

    ``redis_url``/``otlp_endpoint``: ``None`` takes ``REDIS_URL``/``OTEL_EXPORTER_OTLP_ENDPOINT``
    from the environment, and when that is unset too (or the value is ``""``) the mesh
    starts its own redis-server / in-process OTLP collector.
    """

    run_dir: Path
    models_dir: Path
    workers: int = 2
    node_id: str = "node-1"
    device: str = "auto"
    host_pool_bytes: int = 256 * 1024 * 1024
    redis_url: str | None = None
    otlp_endpoint: str | None = None
    startup_timeout_s: float = 180.0
    stop_grace_s: float = 20.0
    progress: Progress = field(default=stderr_progress)


def ensure_demo_models(models_dir: Path, progress: Progress) -> Path:
    """The catalog path under ``models_dir``, writing the demo models when they are missing or stale.

    A ``catalog.json`` that is not a demo catalog (a user's own models) is used as it is.
    """
    catalog = models_dir / "catalog.json"
    if catalog.exists() and not _is_demo_catalog(catalog):
        progress(f"using the models of {catalog}")
        return catalog
    progress(f"demo models in {models_dir}: checking (the first time writes them, ~10 s)")
    started = time.monotonic()
    from diffmesh.demo.models import write_demo_models  # imports torch: only when needed

    path = write_demo_models(models_dir, progress=lambda line: progress(f"  {line}"))
    progress(f"demo models ready ({time.monotonic() - started:.1f} s)")
    return Path(path)


def _is_demo_catalog(catalog: Path) -> bool:
    try:
        components = json.loads(catalog.read_text()).get("components", [])
    except (OSError, ValueError):
        return True  # unreadable: let the generator rewrite it
    return all(str(c.get("labels", {}).get("generator", "")).startswith("diffmesh-demo") for c in components)


class LocalMesh:
    """The running mesh; use as a context manager or call :meth:`start` and :meth:`stop`."""

    def __init__(self, config: MeshConfig) -> None:
        self.config = config
        self.run_dir = config.run_dir.resolve()
        self.models_dir = config.models_dir.resolve()
        self.log_dir = self.run_dir / "logs"
        self.processes: list[ChildProcess] = []
        self.collector: SpanCollector | None = None
        self.redis: RedisServer | None = None
        self.redis_url = ""
        self.otlp_endpoint = ""
        self.catalog_path: Path | None = None
        self.problems: list[str] = []
        self._shm_before: set[str] = set()
        self._started = False

    # -- addresses -------------------------------------------------------------------------
    def _process(self, name: str) -> ChildProcess:
        for proc in self.processes:
            if proc.name == name:
                return proc
        raise KeyError(name)

    @property
    def router_address(self) -> str:
        """``host:port`` of the router."""
        return self._process("router").address

    @property
    def coordinator_address(self) -> str:
        """``host:port`` of the coordinator."""
        return self._process("coordinator").address

    @property
    def instance_manager_address(self) -> str:
        """``host:port`` of the instance manager."""
        return self._process("instance-manager").address

    def worker_addresses(self) -> dict[str, str]:
        """Worker id → ``host:port``."""
        return {p.name: p.address for p in self.processes if p.spec.script == "diffmesh-worker"}

    # -- start -----------------------------------------------------------------------------
    def start(self) -> LocalMesh:
        """Starts everything and waits until the mesh is ready; cleans up and re-raises on failure."""
        self._started = True
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        say = self.config.progress
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._shm_before = shm_segments()

        self.redis_url = self.config.redis_url if self.config.redis_url is not None else os.environ.get("REDIS_URL", "")
        if self.redis_url:
            say(f"redis: using REDIS_URL {self.redis_url}")
        else:
            self.redis = RedisServer().start()
            self.redis_url = self.redis.url
            say(f"redis: started a private redis-server at {self.redis_url}")

        endpoint = self.config.otlp_endpoint
        if endpoint is None:
            endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
        if endpoint:
            self.otlp_endpoint = endpoint
            say(f"traces: exporting to {endpoint} (OTEL_EXPORTER_OTLP_ENDPOINT)")
        else:
            self.collector = SpanCollector().start()
            self.otlp_endpoint = self.collector.endpoint
            say(f"traces: in-process OTLP collector at {self.otlp_endpoint}")

        self.catalog_path = ensure_demo_models(self.models_dir, say)
        base_env = self._base_env()

        coordinator = self._spawn(self._coordinator_spec(), base_env)
        self._wait_ready(coordinator)
        later = [self._im_spec(coordinator.address)]
        im_address = later[0].address
        later += [self._worker_spec(i, coordinator.address, im_address) for i in range(1, self.config.workers + 1)]
        later.append(self._router_spec(coordinator.address))
        for proc in [self._spawn(spec, base_env) for spec in later]:
            self._wait_ready(proc)
        self._wait_workers_registered()

    def _base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "REDIS_URL": self.redis_url,
                "OTEL_EXPORTER_OTLP_ENDPOINT": self.otlp_endpoint,
                "OTEL_BSP_SCHEDULE_DELAY": "200",
                "PYTHONUNBUFFERED": "1",
                # the hub is unreachable: never try it
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
            }
        )
        return env

    def _common(self, prefix: str, port: int) -> dict[str, str]:
        return {f"{prefix}HOST": "127.0.0.1", f"{prefix}PORT": str(port), f"{prefix}GRACE_SECONDS": "5"}

    def _coordinator_spec(self) -> ServiceSpec:
        port, p = free_port(), "DIFFMESH_COORDINATOR_"
        env = {**self._common(p, port), f"{p}REDIS_URL": self.redis_url, f"{p}CATALOG": str(self.catalog_path)}
        return ServiceSpec("coordinator", "diffmesh-coordinator", port, env)

    def _im_spec(self, coordinator: str) -> ServiceSpec:
        port, p = free_port(), "DIFFMESH_IM_"
        env = {
            **self._common(p, port),
            f"{p}NODE_ID": self.config.node_id,
            f"{p}COORDINATOR": coordinator,
            f"{p}ADVERTISE_HOST": "127.0.0.1",
            f"{p}SSD_DIR": str(self.run_dir / "ssd"),
            f"{p}ALLOWED_ROOTS": json.dumps([str(self.models_dir)]),
        }
        if f"{p}HOST_CAPACITY_BYTES" not in os.environ:
            # A pre-allocated HOST pool, so local runs take the O_DIRECT → pool path.
            env[f"{p}HOST_CAPACITY_BYTES"] = str(self.config.host_pool_bytes)
        return ServiceSpec("instance-manager", "diffmesh-instance-manager", port, env)

    def _worker_spec(self, index: int, coordinator: str, instance_manager: str) -> ServiceSpec:
        port, p = free_port(), "DIFFMESH_WORKER_"
        env = {
            **self._common(p, port),
            f"{p}WORKER_ID": f"worker-{index}",
            f"{p}NODE_ID": self.config.node_id,
            f"{p}COORDINATOR": coordinator,
            f"{p}INSTANCE_MANAGER": instance_manager,
            f"{p}ADVERTISE_HOST": "127.0.0.1",
            f"{p}DEVICE": self.config.device,
        }
        if f"{p}TORCH_THREADS" not in os.environ:
            # Share the cores between the workers: oversubscribed torch/OpenMP threads spin
            # and make CPU denoising several times slower.
            env[f"{p}TORCH_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.config.workers))
        return ServiceSpec(f"worker-{index}", "diffmesh-worker", port, env)

    def _router_spec(self, coordinator: str) -> ServiceSpec:
        port, p = free_port(), "DIFFMESH_ROUTER_"
        return ServiceSpec("router", "diffmesh-router", port, {**self._common(p, port), f"{p}COORDINATOR": coordinator})

    def _spawn(self, spec: ServiceSpec, base_env: dict[str, str]) -> ChildProcess:
        proc = ChildProcess(spec, self.log_dir, base_env)
        self.processes.append(proc)
        return proc.start()

    def _wait_ready(self, proc: ChildProcess) -> None:
        waited = proc.wait_serving(self.config.startup_timeout_s)
        self.config.progress(f"{proc.name}: SERVING on {proc.address} (pid {proc.pid}, {waited:.1f} s)")

    def _wait_workers_registered(self) -> None:
        want = self.config.workers
        deadline = time.monotonic() + self.config.startup_timeout_s
        seen = -1
        with grpc.insecure_channel(self.coordinator_address) as channel:
            stub = coordinator_pb2_grpc.CacheCoordinatorServiceStub(channel)
            while True:
                try:
                    reply = stub.ListNodes(coordinator_pb2.ListNodesRequest(), timeout=5)
                    seen = sum(len(node.workers) for node in reply.nodes)
                except grpc.RpcError as err:
                    if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                        raise ServiceFailed(f"coordinator ListNodes failed: {err.code().name}: {err.details()}") from None
                if seen >= want:
                    self.config.progress(f"coordinator lists {seen} workers: mesh ready")
                    return
                for proc in self.processes:
                    if not proc.running():
                        raise proc.failure(f"exited with status {proc.returncode}")
                if time.monotonic() > deadline:
                    raise ServiceFailed(f"only {max(seen, 0)} of {want} workers registered with the coordinator")
                time.sleep(0.25)

    # -- stop ------------------------------------------------------------------------------
    def stop(self) -> list[str]:
        """Stops everything in reverse order; returns the problems found (orphans, leaked shm).

        Idempotent: later calls return the problems of the first.
        """
        if not self._started:
            return self.problems
        self._started = False
        problems = self.problems
        # Router first (no new requests), then the workers together, the instance manager, the coordinator.
        order = ["router", "diffmesh-worker", "instance-manager", "coordinator"]
        stages: dict[str, list[ChildProcess]] = {}
        for proc in self.processes:
            key = proc.name if proc.name in order else proc.spec.script
            stages.setdefault(key, []).append(proc)
        for key in [*order, *[k for k in stages if k not in order]]:
            for proc in stages.get(key, []):
                proc.terminate()
            for proc in stages.get(key, []):
                problems += proc.wait_stopped(self.config.stop_grace_s)
        # Only segments of our node that were not there before: other meshes may share /dev/shm.
        ours = node_prefix(self.config.node_id)
        leaked = sorted(s for s in shm_segments() - self._shm_before if s.startswith(ours))
        if leaked:
            problems.append(f"leaked shared-memory segments (removed now): {', '.join(leaked)}")
            for name in leaked:
                (SHM_DIR / name).unlink(missing_ok=True)
        # Children flush their spans on SIGTERM, so the collector stops last (its spans stay readable).
        if self.collector is not None:
            self.collector.stop()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        if not problems:
            self.config.progress("stopped cleanly: no processes left, no shared memory leaked")
        return problems

    def __enter__(self) -> LocalMesh:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

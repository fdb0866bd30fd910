"""A whole diffmesh on one machine: Redis, an OTLP span collector and the four services as processes.

:class:`LocalMesh` is what ``diffmesh run`` and the end-to-end tests start::

    with LocalMesh(MeshConfig(run_dir=Path("out/run"), models_dir=Path(".diffmesh/models"))) as mesh:
        client = Client(mesh.router_address)

Start order: Redis (unless ``REDIS_URL``), the OTLP collector (unless
``OTEL_EXPORTER_OTLP_ENDPOINT``), demo models (when missing), the coordinator (with the
catalog), then the instance managers, the workers and the router together; ready means
every health service answers SERVING and the coordinator lists every worker. Stop runs in
reverse order and reports orphans and leaked shared-memory segments.

The topology is ``nodes`` x ``workers`` (default one node, ``node_id``, as ``diffmesh run``
starts it). With several nodes, node ``i`` is ``<node_prefix>-<i>`` (default ``node-<i>``)
with its own instance manager, SSD folder and HOST pool, and workers are numbered across
the mesh (``worker-1`` …), so a worker id names one worker even without its node.
``env`` goes to every service and ``service_env`` to one role (``coordinator``,
``instance-manager``, ``worker``, ``router``), after the launcher's own settings, so it
can override them.
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
    nodes: int = 1
    """Nodes, each with its own instance manager and ``workers`` workers."""
    node_prefix: str = "node"
    """With several nodes, node ``i`` is ``<node_prefix>-<i>`` (an instance manager owns its node id on the host)."""
    ssd_capacity_bytes: int = 0
    """SSD tier capacity of each instance manager; 0: its own default (unbounded)."""
    worker_cache_bytes: int = 0
    """Device-tier budget of each worker; 0: its own default."""
    catalog: Path | None = None
    """A catalog manifest to register instead of ``models_dir/catalog.json`` (no demo models are written)."""
    allowed_roots: list[str] | None = None
    """The instance managers' ``ALLOWED_ROOTS``; None: ``models_dir``."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment of every service (e.g. ``DIFFMESH_POLICY``)."""
    service_env: dict[str, dict[str, str]] = field(default_factory=dict)
    """Extra environment per role: ``coordinator``, ``instance-manager``, ``worker``, ``router``."""
    collect_spans: bool = True
    """False: with no endpoint configured, start no collector and export no spans (saves CPU on long runs)."""

    def node_ids(self) -> list[str]:
        """The node ids: ``[node_id]`` for one node, else ``<node_prefix>-1`` … ``<node_prefix>-<nodes>``."""
        if self.nodes <= 1:
            return [self.node_id]
        return [f"{self.node_prefix}-{i}" for i in range(1, self.nodes + 1)]

    @property
    def total_workers(self) -> int:
        """Workers in the whole mesh."""
        return self.workers * max(1, self.nodes)


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
        """``host:port`` of the (first node's) instance manager."""
        return next(iter(self.instance_manager_addresses().values()))

    def instance_manager_addresses(self) -> dict[str, str]:
        """Node id → ``host:port`` of its instance manager."""
        return {
            p.spec.env.get("DIFFMESH_IM_NODE_ID", p.name): p.address
            for p in self.processes
            if p.spec.script == "diffmesh-instance-manager"
        }

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
        elif not self.config.collect_spans:
            say("traces: off")
        else:
            self.collector = SpanCollector().start()
            self.otlp_endpoint = self.collector.endpoint
            say(f"traces: in-process OTLP collector at {self.otlp_endpoint}")

        if self.config.catalog is not None:
            self.catalog_path = self.config.catalog.resolve()
            say(f"catalog: {self.catalog_path}")
        else:
            self.catalog_path = ensure_demo_models(self.models_dir, say)
        base_env = self._base_env()

        coordinator = self._spawn(self._coordinator_spec(), base_env)
        self._wait_ready(coordinator)
        later: list[ServiceSpec] = []
        index = 0
        for node_id in self.config.node_ids():
            im = self._im_spec(coordinator.address, node_id)
            later.append(im)
            for _ in range(self.config.workers):
                index += 1
                later.append(self._worker_spec(index, coordinator.address, im.address, node_id))
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
        env.update(self.config.env)
        return env

    def _with_role_env(self, role: str, env: dict[str, str]) -> dict[str, str]:
        return {**env, **self.config.service_env.get(role, {})}

    def _common(self, prefix: str, port: int) -> dict[str, str]:
        return {f"{prefix}HOST": "127.0.0.1", f"{prefix}PORT": str(port), f"{prefix}GRACE_SECONDS": "5"}

    def _coordinator_spec(self) -> ServiceSpec:
        port, p = free_port(), "DIFFMESH_COORDINATOR_"
        env = {**self._common(p, port), f"{p}REDIS_URL": self.redis_url, f"{p}CATALOG": str(self.catalog_path)}
        return ServiceSpec("coordinator", "diffmesh-coordinator", port, self._with_role_env("coordinator", env))

    def _im_spec(self, coordinator: str, node_id: str) -> ServiceSpec:
        port, p = free_port(), "DIFFMESH_IM_"
        single = self.config.nodes <= 1
        roots = self.config.allowed_roots if self.config.allowed_roots is not None else [str(self.models_dir)]
        env = {
            **self._common(p, port),
            f"{p}NODE_ID": node_id,
            f"{p}COORDINATOR": coordinator,
            f"{p}ADVERTISE_HOST": "127.0.0.1",
            f"{p}SSD_DIR": str(self.run_dir / "ssd" if single else self.run_dir / "ssd" / node_id),
            f"{p}ALLOWED_ROOTS": json.dumps(roots),
        }
        if f"{p}HOST_CAPACITY_BYTES" not in os.environ:
            # A pre-allocated HOST pool, so local runs take the O_DIRECT → pool path.
            env[f"{p}HOST_CAPACITY_BYTES"] = str(self.config.host_pool_bytes)
        if self.config.ssd_capacity_bytes > 0:
            env[f"{p}SSD_CAPACITY_BYTES"] = str(self.config.ssd_capacity_bytes)
        name = "instance-manager" if single else f"instance-manager-{node_id}"
        return ServiceSpec(name, "diffmesh-instance-manager", port, self._with_role_env("instance-manager", env))

    def _worker_spec(self, index: int, coordinator: str, instance_manager: str, node_id: str) -> ServiceSpec:
        port, p = free_port(), "DIFFMESH_WORKER_"
        env = {
            **self._common(p, port),
            f"{p}WORKER_ID": f"worker-{index}",
            f"{p}NODE_ID": node_id,
            f"{p}COORDINATOR": coordinator,
            f"{p}INSTANCE_MANAGER": instance_manager,
            f"{p}ADVERTISE_HOST": "127.0.0.1",
            f"{p}DEVICE": self.config.device,
        }
        if f"{p}TORCH_THREADS" not in os.environ:
            # Share the cores between the workers: oversubscribed torch/OpenMP threads spin
            # and make CPU denoising several times slower.
            env[f"{p}TORCH_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.config.total_workers))
        if self.config.worker_cache_bytes > 0:
            env[f"{p}CACHE_BYTES"] = str(self.config.worker_cache_bytes)
        return ServiceSpec(f"worker-{index}", "diffmesh-worker", port, self._with_role_env("worker", env))

    def _router_spec(self, coordinator: str) -> ServiceSpec:
        port, p = free_port(), "DIFFMESH_ROUTER_"
        env = {**self._common(p, port), f"{p}COORDINATOR": coordinator}
        return ServiceSpec("router", "diffmesh-router", port, self._with_role_env("router", env))

    def _spawn(self, spec: ServiceSpec, base_env: dict[str, str]) -> ChildProcess:
        proc = ChildProcess(spec, self.log_dir, base_env)
        self.processes.append(proc)
        return proc.start()

    def _wait_ready(self, proc: ChildProcess) -> None:
        waited = proc.wait_serving(self.config.startup_timeout_s)
        self.config.progress(f"{proc.name}: SERVING on {proc.address} (pid {proc.pid}, {waited:.1f} s)")

    def _wait_workers_registered(self) -> None:
        want = self.config.total_workers
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
        # Only segments of our nodes that were not there before: other meshes may share /dev/shm.
        ours = tuple(node_prefix(node_id) for node_id in self.config.node_ids())
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

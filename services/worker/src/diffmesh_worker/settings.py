"""Worker settings (environment prefix ``DIFFMESH_WORKER_``)."""

from __future__ import annotations

from diffmesh.ports import INSTANCE_MANAGER_PORT, loopback
from diffmesh.settings import NODE_ID_PATTERN, ServiceSettings, default_node_id
from pydantic import Field
from pydantic_settings import SettingsConfigDict


class WorkerSettings(ServiceSettings):
    """Settings of one worker (one per device)."""

    model_config = SettingsConfigDict(env_prefix="DIFFMESH_WORKER_", extra="ignore")

    worker_id: str = Field("worker-0", pattern=NODE_ID_PATTERN, description="Worker id, unique within its node.")
    node_id: str = Field(
        default_factory=default_node_id,
        pattern=NODE_ID_PATTERN,
        json_schema_extra={"doc_default": "host name"},
        description="Node id: its instance manager's (the same default, so the two agree on one machine).",
    )
    coordinator: str = Field(
        "",
        description="Coordinator `host:port`; empty: no registration and no residency reports (so no router finds this "
        "worker).",
    )
    instance_manager: str = Field(
        loopback(INSTANCE_MANAGER_PORT),
        description="This node's instance manager `host:port`; the default is the instance manager's port of the port "
        "plan on this machine.",
    )
    advertise_host: str = Field(
        "127.0.0.1",
        description="Host registered with the coordinator: the router reaches this worker at `<advertise_host>:<port>`.",
    )
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="`auto` (CUDA when present, else CPU), `cpu` or `cuda[:N]`."
    )
    max_queue: int = Field(16, ge=0, description="Requests that may wait for the device; beyond that `RESOURCE_EXHAUSTED`.")
    load_ahead: bool = Field(
        True,
        description="Under `DIFFMESH_POLICY=diffmesh`, the next queued request's missing components are fetched into HOST "
        "while it waits, so the device does not idle through the fetch once the request runs.",
    )
    cache_bytes: int = Field(
        0, ge=0, description="Device-tier budget in bytes; 0 = 80 % of GPU memory (CUDA) or 50 % of RAM (CPU)."
    )
    cache_max_components: int = Field(64, ge=1, description="Most components kept built on the device.")
    torch_threads: int = Field(
        0,
        ge=0,
        description="CPU threads torch may use (`torch.set_num_threads`); 0 = torch's default (use 1 or 2 when several CPU "
        "workers share a host).",
    )
    skeleton_keys: int = Field(
        8,
        ge=0,
        description="Architectures (module class + config) that keep a spare meta-device skeleton, built ahead while the "
        "device is idle, so a cold load skips building one; 0 = no spares.",
    )
    acquire_timeout_seconds: float = Field(300.0, gt=0, description="Deadline of the instance manager's `Acquire` call.")
    report_timeout_seconds: float = Field(
        5.0, gt=0, description="Deadline of coordinator calls (register, heartbeat, residency and load reports)."
    )
    load_report_interval_seconds: float = Field(
        0.05,
        ge=0,
        description="Shortest gap between two load reports (`ReportLoad`: queue, running, free device memory); changes "
        "in between are coalesced into the next report (the latest wins).",
    )
    popularity_half_life_seconds: float = Field(
        600.0,
        gt=0,
        description="Half-life of the decayed counts of this worker's requests per component, the reuse rates of the "
        "device tier's utility eviction.",
    )
    eviction_horizon_seconds: float = Field(
        300.0,
        gt=0,
        description="Horizon of the device tier's utility eviction: a component's worth is P(reused within it) x reload "
        "seconds / bytes. Unused with `DIFFMESH_POLICY=lru` (LRU eviction).",
    )
    plan_retry_seconds: float = Field(
        5.0,
        gt=0,
        description="How often a HOT replica's pre-build that could not finish (a failure, the overlay not in the catalog "
        "yet) is tried again.",
    )
    plan_reconnect_seconds: float = Field(
        1.0,
        gt=0,
        description="First wait before following the coordinator's plans again after the stream broke (doubling up to 30 "
        "s). No plans are followed with `DIFFMESH_POLICY=lru` or without a coordinator.",
    )
    standby: bool = Field(
        False,
        description="Start as a warm standby: imports done and the gRPC server up, but health NOT_SERVING, `Run` "
        "refused, no registration, load reports or plans until activated by `WorkerService.Activate` (which may set "
        "the worker and node ids, instance manager and coordinator) or by `SIGUSR1` (with these settings). An idle "
        "standby costs the memory of one worker process; it saves the process start (seconds) on scale-out.",
    )

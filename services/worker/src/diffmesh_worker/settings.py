"""Worker settings (environment prefix ``DIFFMESH_WORKER_``)."""

from __future__ import annotations

import re
import socket

from diffmesh.settings import ServiceSettings
from pydantic import Field
from pydantic_settings import SettingsConfigDict


def _default_node_id() -> str:
    # Same default as the instance manager's, so a worker and its node agree out of the box.
    return re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:64] or "node"


class WorkerSettings(ServiceSettings):
    """Settings of one worker (one per device)."""

    model_config = SettingsConfigDict(env_prefix="DIFFMESH_WORKER_", extra="ignore")

    worker_id: str = Field("worker-0", pattern=r"^[A-Za-z0-9._-]{1,64}$", description="Worker id, unique within its node.")
    node_id: str = Field(
        default_factory=_default_node_id, pattern=r"^[A-Za-z0-9._-]{1,64}$", description="Node id (the instance manager's)."
    )
    coordinator: str = Field("", description="Coordinator `host:port`; empty: do not register or report residency.")
    instance_manager: str = Field("127.0.0.1:50052", description="This node's instance manager `host:port`.")
    advertise_host: str = Field("127.0.0.1", description="Host the router uses to reach this worker.")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="`auto` (CUDA when present), `cpu`, `cuda[:N]`.")
    max_queue: int = Field(16, ge=0, description="Requests that may wait for the device; more → RESOURCE_EXHAUSTED.")
    cache_bytes: int = Field(
        0, ge=0, description="Device-tier cache budget in bytes; 0 = 80% of device memory (CUDA) or 50% of RAM (CPU)."
    )
    cache_max_components: int = Field(64, ge=1, description="Most components kept built on the device.")
    torch_threads: int = Field(
        0,
        ge=0,
        description="CPU threads torch may use (set_num_threads); 0 = torch's default. Several CPU workers on one host: 1-2.",
    )
    skeleton_keys: int = Field(
        8,
        ge=0,
        description="Architectures (module class + config) given a spare meta skeleton built ahead for cold loads; 0 = none.",
    )
    acquire_timeout_seconds: float = Field(300.0, gt=0, description="Deadline of an InstanceManager.Acquire call.")
    report_timeout_seconds: float = Field(
        5.0, gt=0, description="Deadline of coordinator calls (register, heartbeat, residency)."
    )

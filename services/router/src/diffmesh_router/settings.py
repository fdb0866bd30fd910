"""Router settings, read from ``DIFFMESH_ROUTER_*`` environment variables."""

from __future__ import annotations

from diffmesh.ports import COORDINATOR_PORT, loopback
from diffmesh.settings import ServiceSettings
from pydantic import Field
from pydantic_settings import SettingsConfigDict


class RouterSettings(ServiceSettings):
    """Settings of the router (see the README's table)."""

    model_config = SettingsConfigDict(env_prefix="DIFFMESH_ROUTER_", extra="ignore")

    coordinator: str = Field(
        loopback(COORDINATOR_PORT),
        description="Cache coordinator `host:port` (catalog, the view's change stream, request records); the default is "
        "the coordinator's port of the port plan on this machine.",
    )
    catalog_cache_seconds: float = Field(
        5.0, ge=0, description="How long a catalog record is reused before asking the coordinator again (misses are not cached)."
    )
    nodes_refresh_seconds: float = Field(
        2.0,
        gt=0,
        description="Cold-start placement only (before the view replica synced): how long the `ListNodes` worker list "
        "is reused; refreshed sooner when no worker is known or one was unreachable.",
    )
    record_flush_seconds: float = Field(
        1.0, gt=0, description="Interval of the batched `RecordRequests` flush to the coordinator."
    )
    record_buffer_max: int = Field(
        50_000, ge=1, description="Request records kept while the coordinator is unreachable; the oldest are dropped beyond it."
    )
    coordinator_timeout_seconds: float = Field(5.0, gt=0, description="Timeout of each coordinator call.")
    max_request_seconds: float = Field(900.0, gt=0, description="Timeout of the worker call when the client sets no deadline.")
    view_reconnect_seconds: float = Field(
        0.2,
        gt=0,
        description="First wait before following the coordinator's view (`WatchView`) again after the stream broke; "
        "doubles per failed attempt up to `view_reconnect_max_seconds`. Meanwhile the router routes on its last view.",
    )
    view_reconnect_max_seconds: float = Field(5.0, gt=0, description="Longest wait between two attempts to follow the view.")
    full_wait_seconds: float = Field(
        30.0,
        ge=0,
        description="When every eligible worker answered `RESOURCE_EXHAUSTED` (queue full), how long a request waits for "
        "room (woken when a request ends or a worker reports room) before the client gets `RESOURCE_EXHAUSTED` with a "
        "retry hint; the client's deadline bounds it too. 0: answer at once.",
    )
    host_gbps: float = Field(
        8.0,
        gt=0,
        description="HOST→device rate (GB/s) of the completion-time estimate until requests measured it: `make "
        "bench-load` route (e) on this machine (`--size small`: 0.163 GB ready from a HOST handle in 0.020 s). A load "
        "from a slower tier chains the hops below with this one.",
    )
    ssd_gbps: float = Field(
        2.1,
        gt=0,
        description="SSD→HOST rate (GB/s) assumed until measured: `make bench-load` route (c) on this machine.",
    )
    peer_gbps: float = Field(
        1.0,
        gt=0,
        description="Rate (GB/s) of a copy streamed from another node's instance manager (PEER) into this node; not "
        "measured by `make bench-load` (one machine), so a conservative node-to-node figure.",
    )
    remote_gbps: float = Field(
        0.23,
        gt=0,
        description="REMOTE→SSD rate (GB/s) assumed until measured: `make bench-load` route (f) on this machine, one "
        "range in flight.",
    )
    learn_load_rates: bool = Field(
        True,
        description="Replace the end-to-end HOST, SSD and REMOTE load rates the hops above give by what finished "
        "requests measured (`loads[].bytes / seconds` of their results per source tier, averaged over recent requests); "
        "PEER keeps its setting (instance managers report a peer copy as an SSD load, where it landed, so it counts "
        "in the SSD rate).",
    )
    compute_seconds_per_megapixel_step: float = Field(
        0.2,
        gt=0,
        description="Denoising seconds per step per megapixel per image assumed for a worker until its finished "
        "requests measured it (then the mean of the measured workers is the default of the others); 0.2 is an SD1.5 "
        "UNet on a datacenter GPU (512x512, ~20 steps/s).",
    )
    asymmetric_loading: bool = Field(
        True,
        description="Estimate a pipeline's load as its base plus the slowest adapter (workers start building the base "
        "while adapters load); false: the loads add up.",
    )

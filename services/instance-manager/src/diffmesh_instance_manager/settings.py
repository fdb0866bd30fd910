"""Instance manager settings (environment prefix ``DIFFMESH_IM_``)."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Annotated

from diffmesh.settings import NODE_ID_PATTERN, ServiceSettings, default_node_id
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from diffmesh_instance_manager.fetch_options import DEFAULT_IN_FLIGHT, S3Options

NODE_ID_RE = re.compile(NODE_ID_PATTERN)


class InstanceManagerSettings(ServiceSettings):
    """Settings of one instance manager (one per node)."""

    model_config = SettingsConfigDict(env_prefix="DIFFMESH_IM_", extra="ignore")

    node_id: str = Field(
        default_factory=default_node_id,
        json_schema_extra={"doc_default": "host name"},
        description="Node id, unique in the mesh (`[A-Za-z0-9._-]{1,64}`); also the shared-memory name prefix "
        "`dm_<node_id>_`.",
    )
    coordinator: str = Field(
        "",
        description="Coordinator `host:port`; empty: no catalog and no reporting, so `Acquire`, `Prefetch` and `Fuse` "
        "answer `FAILED_PRECONDITION` (`Stats` and health still serve).",
    )
    advertise_host: str = Field(
        "127.0.0.1",
        description="Host registered with the coordinator as this node's instance manager address "
        "(`<advertise_host>:<port>`).",
    )
    ssd_dir: str = Field("", description="SSD cache directory; empty: `<tmp>/diffmesh-ssd-<node_id>`.")
    ssd_capacity_bytes: int = Field(0, ge=0, description="SSD tier capacity in bytes; 0 = unbounded.")
    host_capacity_bytes: int = Field(
        0,
        ge=0,
        description="HOST tier size in bytes. > 0: one pre-allocated shared-memory pool of this size (at least one 2 MiB "
        "block), split into size classes; 0 = unbounded, one segment per component (no pool).",
    )
    allowed_roots: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Where artifacts may come from: directories or `file://` prefixes, `http(s)://host[:port]/path/` URL "
        "prefixes and `s3://bucket/prefix/` prefixes (`s3://bucket`: the whole bucket); comma-separated or JSON list. "
        "**Empty refuses every URI.** Fused overlays need no root: they are derived on the node.",
    )
    remote_ranges_in_flight: int = Field(
        DEFAULT_IN_FLIGHT,
        ge=1,
        le=64,
        description="Ranged reads in flight per http(s)/s3 file, each holding one 8 MiB range in memory. Object stores "
        "cap each connection's bandwidth, so parallel ranges are how one fetch reaches the store's.",
    )
    s3_endpoint_url: str = Field(
        "",
        description="Endpoint of an S3-compatible store (MinIO, SeaweedFS, Ceph RGW, R2, …) for `s3://` artifacts; "
        "empty: AWS S3.",
    )
    s3_region: str = Field("", description="S3 region; empty: botocore's default (`AWS_REGION`, `~/.aws/config`).")
    s3_access_key_id: str = Field(
        "",
        description="S3 access key id, set together with `S3_SECRET_ACCESS_KEY`; both empty: the standard AWS credential "
        "chain (`AWS_*` variables, `~/.aws`, an instance or container role).",
    )
    s3_secret_access_key: SecretStr = Field(
        SecretStr(""),
        description="S3 secret access key, set together with `S3_ACCESS_KEY_ID`; never logged.",
    )
    s3_anonymous: bool = Field(False, description="Unsigned S3 requests, for public buckets; no credentials are looked up.")
    config_max_bytes: int = Field(
        16 * 1024 * 1024, ge=0, description="Cap in bytes on one component's inline config files (JSON, tokenizer vocab/merges)."
    )
    retry_after_seconds: float = Field(
        2.0, gt=0, description="Retry hint sent with `RESOURCE_EXHAUSTED` (a tier full of leased, pinned or in-use copies)."
    )
    pool_classes: int = Field(
        5,
        ge=1,
        le=64,
        description="Size classes of the HOST pool (weighted k-means over the catalog's component sizes).",
    )
    pool_prefault: bool = Field(
        True,
        description="Touch every page of the HOST pool at start (seconds per GB; loads then allocate nothing).",
    )
    direct_io: bool = Field(
        True,
        description="SSD → HOST reads with `O_DIRECT` (a buffered fallback is chosen automatically where refused, e.g. "
        "tmpfs); `false`: buffered.",
    )
    pinned_components: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Component ids the hot plan pins: never evicted from SSD or HOST; comma-separated or JSON list.",
    )
    peer_fetch: bool = Field(
        True,
        description="On an SSD miss, fetch the component from another node's instance manager whose SSD holds it (the "
        "PEER tier, found with the coordinator's `Locate`, sha256-checked like REMOTE) before REMOTE; `false`: REMOTE "
        "only. Off under `DIFFMESH_POLICY=lru` whatever this says.",
    )
    plan_reconnect_seconds: float = Field(
        1.0,
        gt=0,
        description="First wait before following the coordinator's plan again after the stream broke (doubling up to "
        "30 s while the coordinator is down). Plans are not followed under `DIFFMESH_POLICY=lru`.",
    )
    lease_ttl_seconds: float = Field(
        300.0,
        ge=0,
        description="A holder's leases end after this long without a new `Acquire`/`Fuse` by it and without it being a "
        "live worker of this node at the coordinator; 0 = never.",
    )

    @field_validator("node_id")
    @classmethod
    def _check_node_id(cls, value: str) -> str:
        if not NODE_ID_RE.match(value):
            raise ValueError("node_id must match [A-Za-z0-9._-]{1,64}")
        return value

    @field_validator("allowed_roots", "pinned_components", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _check_s3(self) -> InstanceManagerSettings:
        if bool(self.s3_access_key_id) != bool(self.s3_secret_access_key.get_secret_value()):
            raise ValueError("s3_access_key_id and s3_secret_access_key are set together (or neither: the AWS chain)")
        return self

    def s3_options(self) -> S3Options:
        """How the ``s3://`` fetcher reaches S3."""
        return S3Options(
            endpoint_url=self.s3_endpoint_url,
            region=self.s3_region,
            access_key_id=self.s3_access_key_id,
            secret_access_key=self.s3_secret_access_key.get_secret_value(),
            anonymous=self.s3_anonymous,
        )

    def ssd_path(self) -> Path:
        """The SSD cache directory to use."""
        return Path(self.ssd_dir) if self.ssd_dir else Path(tempfile.gettempdir()) / f"diffmesh-ssd-{self.node_id}"

"""Instance manager settings (environment prefix ``DIFFMESH_IM_``)."""

from __future__ import annotations

import re
import socket
import tempfile
from pathlib import Path
from typing import Annotated

from diffmesh.settings import ServiceSettings
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from diffmesh_instance_manager.remote import DEFAULT_IN_FLIGHT
from diffmesh_instance_manager.s3_fetch import S3Options

NODE_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def _default_node_id() -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:64] or "node"


class InstanceManagerSettings(ServiceSettings):
    """Settings of one instance manager (one per node)."""

    model_config = SettingsConfigDict(env_prefix="DIFFMESH_IM_", extra="ignore")

    node_id: str = Field(default_factory=_default_node_id, description="Node id, unique in the mesh (`[A-Za-z0-9._-]`).")
    coordinator: str = Field(
        "", description="Coordinator `host:port`; empty: no catalog, so Acquire/Prefetch fail with FAILED_PRECONDITION."
    )
    advertise_host: str = Field("127.0.0.1", description="Host other services use to reach this instance manager.")
    ssd_dir: str = Field("", description="SSD cache directory; empty: `<tmp>/diffmesh-ssd-<node_id>`.")
    ssd_capacity_bytes: int = Field(0, ge=0, description="SSD tier capacity; 0 = unbounded.")
    host_capacity_bytes: int = Field(0, ge=0, description="HOST (shared-memory) tier capacity; 0 = unbounded.")
    allowed_roots: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Directories (or `file://` prefixes), `http(s)://host[:port]/path/` and `s3://bucket/prefix/` prefixes "
        "REMOTE may read; comma-separated or JSON. Empty refuses every URI.",
    )
    remote_ranges_in_flight: int = Field(
        DEFAULT_IN_FLIGHT,
        ge=1,
        le=64,
        description="Ranged reads in flight per http(s)/s3 file (each holds one 8 MiB range in memory).",
    )
    s3_endpoint_url: str = Field(
        "", description="S3 endpoint for `s3://` artifacts (MinIO, SeaweedFS, Ceph, R2…); empty: AWS S3 of `s3_region`."
    )
    s3_region: str = Field("", description="S3 region; empty: botocore's default (AWS_REGION, ~/.aws/config).")
    s3_access_key_id: str = Field(
        "", description="S3 access key; empty: the standard AWS credential chain (AWS_* variables, ~/.aws, instance role)."
    )
    s3_secret_access_key: SecretStr = Field(SecretStr(""), description="S3 secret key (with `s3_access_key_id`).")
    s3_anonymous: bool = Field(False, description="Unsigned S3 requests (public buckets); no credentials are looked up.")
    config_max_bytes: int = Field(
        16 * 1024 * 1024, ge=0, description="Cap on a component's inline config files (JSON, tokenizer)."
    )
    retry_after_seconds: float = Field(
        2.0, gt=0, description="Retry hint sent with RESOURCE_EXHAUSTED when the HOST tier is all leased."
    )
    pool_classes: int = Field(5, ge=1, le=64, description="Size classes of the HOST pool (weighted k-means over catalog sizes).")
    pool_prefault: bool = Field(True, description="Touch every page of the HOST pool at start (loads then allocate nothing).")
    direct_io: bool = Field(True, description="SSD -> HOST with O_DIRECT (buffered fallback where refused); false: buffered.")
    pinned_components: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Component ids the hot plan pins: never evicted from SSD or HOST; comma-separated or JSON.",
    )
    lease_ttl_seconds: float = Field(
        300.0,
        ge=0,
        description="A holder's leases end after this long without a new Acquire and without being a live worker at the "
        "coordinator; 0 = never.",
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

"""REMOTE over ``s3://`` through s3fs: ranged ``GetObject`` reads with resume (see :mod:`.ranged_fetch`).

Works with AWS S3 and S3-compatible stores (MinIO, SeaweedFS, Ceph RGW, R2…) through
``endpoint_url``. Credentials are the ones configured (:class:`S3Options`), else the
standard AWS chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``~/.aws``, an
instance or container role); ``anonymous`` sends unsigned requests for public buckets.
A folder artifact is every object under the key prefix (one ``ListObjectsV2`` walk).
s3fs's own retries are off: a failed range is retried — and resumed from its start —
by :class:`~diffmesh_instance_manager.ranged_fetch.RangedFetcher`, so an interrupted
transfer never restarts the whole object; botocore's standard retry mode still handles
throttling on each call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diffmesh.errors import DiffmeshError, FailedPrecondition, NotFound, PermissionDenied, Unavailable

from diffmesh_instance_manager.ranged_fetch import DEFAULT_CHUNK, DEFAULT_RETRIES, RangedFetcher
from diffmesh_instance_manager.remote import DEFAULT_IN_FLIGHT, Source


@dataclass(frozen=True)
class S3Options:
    """How to reach S3: endpoint, region, credentials and timeouts."""

    endpoint_url: str = ""
    region: str = ""
    access_key_id: str = ""
    secret_access_key: str = ""
    anonymous: bool = False
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0


class S3Fetcher(RangedFetcher):
    """``s3://bucket/key`` fetcher: ranged reads with resume, sha256 while streaming."""

    label = "S3"

    def __init__(
        self,
        options: S3Options | None = None,
        chunk: int = DEFAULT_CHUNK,
        retries: int = DEFAULT_RETRIES,
        in_flight: int = DEFAULT_IN_FLIGHT,
    ) -> None:
        import s3fs

        super().__init__(chunk, retries, in_flight)
        o = options or S3Options()
        kwargs: dict[str, Any] = {
            "anon": o.anonymous,
            "skip_instance_cache": True,
            "use_listings_cache": False,  # a listing must reflect the bucket now, not a minute ago
            "config_kwargs": {
                "retries": {"max_attempts": 3, "mode": "standard"},
                "connect_timeout": o.connect_timeout_s,
                "read_timeout": o.read_timeout_s,
                # Several fetches, each with ``in_flight`` ranged GETs, share the client's pool.
                "max_pool_connections": max(32, 4 * in_flight),
            },
        }
        if o.endpoint_url:
            kwargs["endpoint_url"] = o.endpoint_url
        if o.region:
            kwargs["client_kwargs"] = {"region_name": o.region}
        if o.access_key_id and not o.anonymous:
            kwargs["key"] = o.access_key_id
            kwargs["secret"] = o.secret_access_key
        self.options = o
        self.fs = s3fs.S3FileSystem(**kwargs)
        self.fs.retries = 1  # ranges are retried here, resuming from the failed range

    def _translate(self, what: str, url: str, exc: BaseException) -> DiffmeshError:
        """The diffmesh error for an s3fs/botocore failure outside range reads."""
        from botocore.exceptions import NoCredentialsError

        if isinstance(exc, FileNotFoundError):
            return NotFound("artifact", url)
        if isinstance(exc, PermissionError):
            return PermissionDenied(f"{what}: S3 refused {url}: {exc}")
        if isinstance(exc, NoCredentialsError):
            return FailedPrecondition(
                f"{what}: no S3 credentials for {url}: set DIFFMESH_IM_S3_ACCESS_KEY_ID and DIFFMESH_IM_S3_SECRET_ACCESS_KEY, "
                "the AWS_* variables or an instance role, or DIFFMESH_IM_S3_ANONYMOUS=true for a public bucket"
            )
        return Unavailable(f"{what}: S3 request for {url} failed: {exc}")

    def size(self, what: str, url: str) -> int:
        """The object's size (``HeadObject``)."""
        try:
            info = self.fs.info(url)
        except Exception as exc:  # noqa: BLE001 - botocore/aiohttp errors, translated
            raise self._translate(what, url, exc) from None
        if info.get("type") != "file":
            raise NotFound("artifact", url)
        return int(info["size"])

    def read_range(self, url: str, start: int, end: int) -> bytes:
        """One ranged ``GetObject``."""
        from botocore.exceptions import NoCredentialsError

        try:
            return bytes(self.fs.cat_file(url, start=start, end=end))
        except NoCredentialsError as exc:
            raise self._translate("S3", url, exc) from None

    def list_folder(self, source: Source, base: str) -> list[str]:
        """Keys under the prefix ``base``, relative to it."""
        what = f"component {source.component_id!r}"
        prefix = base.removeprefix("s3://")
        try:
            found = self.fs.find(base, detail=True)
        except Exception as exc:  # noqa: BLE001 - botocore/aiohttp errors, translated
            raise self._translate(what, source.uri, exc) from None
        out: list[str] = []
        for name, info in found.items():
            if info.get("type") == "directory" or not name.startswith(prefix):
                continue
            out.append(name[len(prefix) :])
        return out

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

from collections.abc import Callable
from typing import Any, TypeVar

from diffmesh.errors import FailedPrecondition, NotFound, PermissionDenied, Unavailable

from diffmesh_instance_manager.fetch_common import Source
from diffmesh_instance_manager.fetch_options import DEFAULT_IN_FLIGHT, S3Options
from diffmesh_instance_manager.ranged_fetch import BASE_TRANSPORT_ERRORS, DEFAULT_CHUNK, DEFAULT_RETRIES, RangedFetcher

T = TypeVar("T")

_NO_CREDENTIALS = (
    "{what}: no S3 credentials for {url}: set DIFFMESH_IM_S3_ACCESS_KEY_ID and DIFFMESH_IM_S3_SECRET_ACCESS_KEY, "
    "the AWS_* variables or an instance role, or DIFFMESH_IM_S3_ANONYMOUS=true for a public bucket"
)


def _s3_transport_errors() -> tuple[type[BaseException], ...]:
    """What s3fs raises when the network fails: botocore's connection and HTTP-client errors (endpoint unreachable,
    connection closed, read/connect timeouts, a cut body), a reply cut short or unparseable, aiohttp's client errors
    (aiobotocore's transport) and urllib3's; plus sockets and timeouts (OSError). s3fs turns S3 error replies into
    OSError subclasses, so a 5xx is covered too."""
    import aiohttp
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError, IncompleteReadError
    from botocore.parsers import ResponseParserError
    from urllib3.exceptions import HTTPError as Urllib3Error

    return (
        *BASE_TRANSPORT_ERRORS,
        BotoConnectionError,
        HTTPClientError,
        IncompleteReadError,
        ResponseParserError,
        aiohttp.ClientError,
        Urllib3Error,
    )


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
        from botocore.exceptions import NoCredentialsError

        super().__init__(chunk, retries, in_flight)
        self._no_credentials = NoCredentialsError
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
        self.transport_errors = _s3_transport_errors()

    def _call(self, what: str, url: str, call: Callable[[], T]) -> T:
        """``call()`` with s3fs/botocore failures outside range reads as diffmesh errors; anything else (a bug) propagates."""
        try:
            return call()
        except FileNotFoundError:
            raise NotFound("artifact", url) from None
        except PermissionError as exc:
            raise PermissionDenied(f"{what}: S3 refused {url}: {exc}") from None
        except self._no_credentials:
            raise FailedPrecondition(_NO_CREDENTIALS.format(what=what, url=url)) from None
        except self.transport_errors as exc:
            raise Unavailable(f"{what}: S3 request for {url} failed: {exc}") from None

    def size(self, what: str, url: str) -> int:
        """The object's size (``HeadObject``)."""
        info = self._call(what, url, lambda: self.fs.info(url))
        if info.get("type") != "file":
            raise NotFound("artifact", url)
        return int(info["size"])

    def read_range(self, url: str, start: int, end: int) -> bytes:
        """One ranged ``GetObject`` (transfer failures propagate: :class:`RangedFetcher` retries the range)."""
        try:
            return bytes(self.fs.cat_file(url, start=start, end=end))
        except self._no_credentials:
            raise FailedPrecondition(_NO_CREDENTIALS.format(what="S3", url=url)) from None

    def list_folder(self, source: Source, base: str) -> list[str]:
        """Keys under the prefix ``base``, relative to it."""
        what = f"component {source.component_id!r}"
        prefix = base.removeprefix("s3://")
        found = self._call(what, source.uri, lambda: self.fs.find(base, detail=True))
        out: list[str] = []
        for name, info in found.items():
            if info.get("type") == "directory" or not name.startswith(prefix):
                continue
            out.append(name[len(prefix) :])
        return out

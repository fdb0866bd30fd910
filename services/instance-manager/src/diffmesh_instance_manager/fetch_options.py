"""Plain options of the REMOTE fetchers: defaults and how to reach S3.

Data only (no fetching code, no third-party imports), so the settings module can build
these without importing any fetcher.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_IN_FLIGHT = 4
"""Ranged reads in flight per fetched file (``DIFFMESH_IM_REMOTE_RANGES_IN_FLIGHT``)."""


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

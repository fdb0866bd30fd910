"""What a standby worker becomes when activated: its settings with the ``ActivateRequest``'s fields applied.

A field the request sets replaces the setting of the same name; an unset one keeps it. The
result is validated as the settings are at start-up (the id patterns), and an address the
request sets must be ``host:port`` or a gRPC target URI (``dns:``, ``unix:``, ``ipv4:`` …; the
coordinator's may be empty: no registration). A bad field is ``INVALID_ARGUMENT`` naming
it, and the worker stays on standby.
"""

from __future__ import annotations

import re
from typing import Final, Literal

from diffmesh.errors import InvalidArgument
from diffmesh.v1 import worker_pb2
from pydantic import ValidationError

from diffmesh_worker.settings import WorkerSettings

FIELDS: Final[tuple[Literal["worker_id", "node_id", "instance_manager", "coordinator"], ...]] = (
    "worker_id",
    "node_id",
    "instance_manager",
    "coordinator",
)
"""The request fields, each named like the setting it replaces."""

_HOST_PORT = re.compile(r"^(?:[^\s:\[\]]+|\[[0-9A-Fa-f:.]+\]):(\d{1,5})$")
# Name-resolver schemes of gRPC target URIs (grpc/doc/naming.md); their syntax is gRPC's to check.
_TARGET_URI = re.compile(r"^(?:dns|unix|unix-abstract|ipv4|ipv6|vsock):\S+$")


def activated_settings(current: WorkerSettings, request: worker_pb2.ActivateRequest) -> WorkerSettings:
    """``current`` with the fields ``request`` sets; raises :class:`InvalidArgument` naming a bad one."""
    changes: dict[str, str] = {name: getattr(request, name) for name in FIELDS if request.HasField(name)}
    try:
        # model_validate checks the fields without reading the environment again (BaseSettings.__init__ would).
        settings = WorkerSettings.model_validate({**current.model_dump(), **changes})
    except ValidationError as err:
        first = err.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else "request"
        raise InvalidArgument(name, first["msg"]) from None
    if not settings.instance_manager:
        raise InvalidArgument("instance_manager", "required: the worker cannot load without its node's instance manager")
    for name in ("instance_manager", "coordinator"):
        if changes.get(name):  # an empty coordinator: no registration
            _check_address(name, changes[name])
    return settings


def _check_address(name: str, value: str) -> None:
    if _TARGET_URI.match(value):
        return
    match = _HOST_PORT.match(value)
    if match is None or not 0 < int(match.group(1)) < 65536:
        raise InvalidArgument(name, f"{value!r} is not host:port (port 1-65535) nor a gRPC target URI")

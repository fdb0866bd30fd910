"""The mesh's port plan: which port each service listens on in a deployment.

One plan, used by the services' address defaults (a router's default coordinator, a
worker's default instance manager), by ``compose.yaml`` and the Dockerfiles (a static
test checks them against it) and by the README. The services themselves bind port 0 (a
free port) unless told otherwise, and ``diffmesh run`` and the tests always use free
ports, so the plan never collides with a second mesh on the same machine.
"""

from __future__ import annotations

ROUTER_PORT = 50051
"""The router: the public API clients call."""

COORDINATOR_PORT = 50052
"""The cache coordinator."""

INSTANCE_MANAGER_PORT = 50053
"""A node's instance manager (one per node)."""

WORKER_PORT_BASE = 50054
"""The first worker of a node; worker ``i`` (0-based) listens on ``WORKER_PORT_BASE + i``."""


def loopback(port: int) -> str:
    """``127.0.0.1:<port>``: the address of a service on this machine."""
    return f"127.0.0.1:{port}"


def worker_port(index: int) -> int:
    """The port of the node's worker number ``index`` (0-based)."""
    if index < 0:
        raise ValueError(f"worker index must be >= 0, not {index}")
    return WORKER_PORT_BASE + index

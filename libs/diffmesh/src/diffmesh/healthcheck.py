"""gRPC health probe for container healthchecks: ``python -m diffmesh.healthcheck HOST:PORT [SERVICE]``.

Exits 0 when the server answers SERVING on the standard ``grpc.health.v1`` protocol, 1
otherwise (with the reason on stderr).
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout: float = 3.0) -> tuple[bool, str]:
    """Asks ``address`` for the health of ``service`` ("" = the whole server)."""
    try:
        with grpc.insecure_channel(address) as channel:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError as err:
        return False, f"{address}: {err.code().name}: {err.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    return resp.status == health_pb2.HealthCheckResponse.SERVING, f"{address}: {status}"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in {"-h", "--help"}:
        print(__doc__, file=sys.stderr)
        return 2
    ok, message = check(args[0], args[1] if len(args) > 1 else "")
    print(message, file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

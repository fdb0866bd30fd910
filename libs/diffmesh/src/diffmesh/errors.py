"""The diffmesh error model.

Handlers raise these exceptions; :mod:`diffmesh.interceptors` turns each into its gRPC
status in one place. Messages name the offending field or id so that clients can act on
them without reading server logs.
"""

from __future__ import annotations

import grpc


class DiffmeshError(Exception):
    """Base of every error that maps to a gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        """Extra trailing metadata sent with the status."""
        return ()


class InvalidArgument(DiffmeshError):
    """A request field is malformed or out of range (INVALID_ARGUMENT)."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"invalid {field}: {problem}")
        self.field = field

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("diffmesh-field", self.field),)


class NotFound(DiffmeshError):
    """A referenced entity does not exist (NOT_FOUND)."""

    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, what: str, ident: str) -> None:
        super().__init__(f"{what} {ident!r} not found")
        self.what = what
        self.ident = ident


class AlreadyExists(DiffmeshError):
    """A different entity with the same id already exists (ALREADY_EXISTS)."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(DiffmeshError):
    """The system is not in a state that allows the operation (FAILED_PRECONDITION)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class DataLoss(DiffmeshError):
    """An artifact is corrupt or does not match its recorded digest (DATA_LOSS)."""

    code = grpc.StatusCode.DATA_LOSS


class Unavailable(DiffmeshError):
    """No capacity or dependency is reachable right now; retrying may help (UNAVAILABLE)."""

    code = grpc.StatusCode.UNAVAILABLE


class Unimplemented(DiffmeshError):
    """The request asks for a feature this build does not provide (UNIMPLEMENTED)."""

    code = grpc.StatusCode.UNIMPLEMENTED


class PermissionDenied(DiffmeshError):
    """The request touches something outside what is allowed (PERMISSION_DENIED)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(DiffmeshError):
    """A bounded resource is full; the client should retry later (RESOURCE_EXHAUSTED)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(f"{message}; retry after {retry_after_s:g} s")
        self.retry_after_s = retry_after_s

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("retry-after-ms", str(int(self.retry_after_s * 1000))),)


def retry_after_ms(err: grpc.RpcError) -> int | None:
    """The retry hint (milliseconds) of a RESOURCE_EXHAUSTED error received by a client."""
    trailing = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == "retry-after-ms":
            return int(value)
    return None

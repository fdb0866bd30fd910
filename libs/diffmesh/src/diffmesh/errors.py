"""The diffmesh error model, shared by servers and clients.

One hierarchy maps to and from gRPC status codes:

* servers raise these exceptions in handlers; :mod:`diffmesh.interceptors` turns each
  into its status code, message and trailing metadata (the offending field,
  ``diffmesh-field``; the retry hint, ``retry-after-ms``);
* clients turn a failed call back into the same class with :func:`from_rpc_error`,
  restoring ``field`` and ``retry_after_s`` from the trailers.

Each class declares its status code; :data:`BY_CODE` (derived from those declarations)
is the reverse direction. Messages name the offending field or id so that clients can act
on them without reading server logs. This module imports nothing server-side.
"""

from __future__ import annotations

from typing import Any, TypeVar

import grpc

FIELD_KEY = "diffmesh-field"
"""Trailing-metadata key naming the offending request field."""

RETRY_AFTER_KEY = "retry-after-ms"
"""Trailing-metadata key holding the retry hint in milliseconds."""

TRAILER_KEYS = frozenset({FIELD_KEY, RETRY_AFTER_KEY})
"""The trailing-metadata keys the error model reads and writes."""

_E = TypeVar("_E", bound="DiffmeshError")


class DiffmeshError(Exception):
    """Base of every error that maps to a gRPC status.

    ``code`` is the status, ``message`` (also ``details``) the text sent with it,
    ``field`` the offending request field and ``retry_after_s`` the retry hint, when known.
    ``str()`` gives ``"CODE: message"``.
    """

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, field: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.retry_after_s = retry_after_s

    @property
    def details(self) -> str:
        """The status message (the name gRPC gives it)."""
        return self.message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        """Trailing metadata sent with the status: the field and the retry hint, where set."""
        md: list[tuple[str, str]] = []
        if self.field is not None:
            md.append((FIELD_KEY, self.field))
        if self.retry_after_s is not None:
            md.append((RETRY_AFTER_KEY, str(round(self.retry_after_s * 1000))))
        return tuple(md)

    @classmethod
    def restore(cls: type[_E], message: str, field: str | None = None, retry_after_s: float | None = None) -> _E:
        """An instance from a received status, bypassing the subclass's message formatting."""
        err = cls.__new__(cls)
        DiffmeshError.__init__(err, message, field=field, retry_after_s=retry_after_s)
        return err


class InvalidArgument(DiffmeshError):
    """A request field is malformed or out of range (INVALID_ARGUMENT); ``field`` names it."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"invalid {field}: {problem}", field=field)


class NotFound(DiffmeshError):
    """A referenced entity does not exist (NOT_FOUND)."""

    code = grpc.StatusCode.NOT_FOUND
    what = ""
    ident = ""

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


class DeadlineExceeded(DiffmeshError):
    """The call did not finish within its deadline (DEADLINE_EXCEEDED)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(DiffmeshError):
    """A bug or an unexpected failure on the server (INTERNAL); its log has the traceback."""

    code = grpc.StatusCode.INTERNAL


class ResourceExhausted(DiffmeshError):
    """A bounded resource is full; retry after ``retry_after_s`` seconds (RESOURCE_EXHAUSTED)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(f"{message}; retry after {retry_after_s:g} s", retry_after_s=retry_after_s)


BY_CODE: dict[grpc.StatusCode, type[DiffmeshError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        DataLoss,
        Unavailable,
        Unimplemented,
        PermissionDenied,
        DeadlineExceeded,
        Internal,
        ResourceExhausted,
    )
}
"""Status code → its class; codes not listed come back as a plain :class:`DiffmeshError`."""


def error_for_status(
    code: grpc.StatusCode, details: str, field: str | None = None, retry_after_s: float | None = None
) -> DiffmeshError:
    """The error of the hierarchy for a status ``code`` with its message and trailers' values."""
    cls = BY_CODE.get(code)
    if cls is not None:
        return cls.restore(details, field, retry_after_s)
    err = DiffmeshError.restore(details, field, retry_after_s)
    err.code = code
    return err


def _trailers(err: Any) -> tuple[tuple[str, Any], ...]:
    trailing = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    return tuple(trailing or ())


def retry_after_ms(err: grpc.RpcError) -> int | None:
    """The retry hint (milliseconds) of a failed call received by a client."""
    for key, value in _trailers(err):
        if key == RETRY_AFTER_KEY:
            return int(value)
    return None


def from_rpc_error(err: grpc.RpcError) -> DiffmeshError:
    """The error of the hierarchy for a failed gRPC call (sync or aio), trailers restored."""
    call: Any = err  # grpc.Call / aio.AioRpcError: code(), details(), trailing_metadata()
    code: grpc.StatusCode = call.code() if hasattr(call, "code") else grpc.StatusCode.UNKNOWN
    details: str = (call.details() if hasattr(call, "details") else None) or code.name
    field: str | None = None
    retry_after_s: float | None = None
    for key, value in _trailers(call):
        if key == FIELD_KEY:
            field = str(value)
        elif key == RETRY_AFTER_KEY:
            retry_after_s = int(value) / 1000
    return error_for_status(code, details, field, retry_after_s)

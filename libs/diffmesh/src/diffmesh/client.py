"""Client SDK for the diffmesh router (``diffmesh.v1.RouterService``).

Two clients with the same methods: :class:`Client` (blocking) and :class:`AsyncClient`
(``grpc.aio``). Both propagate the current OpenTelemetry context, so a caller's span and
the mesh's spans form one trace. gRPC failures are raised as :class:`DiffmeshClientError`
subclasses that carry the status code, the message, and (where the server sent them) the
offending field and the retry hint.

Example::

    with Client("127.0.0.1:50051") as client:
        result = client.generate("sd15-base-a", "a red fox", loras=[Lora("lora-ink", 0.8)],
                                 steps=4, width=64, height=64, seed=7)
        open("fox.png", "wb").write(result.images[0].png)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass

import grpc
from grpc import aio
from opentelemetry.instrumentation.grpc import client_interceptor
from opentelemetry.instrumentation.grpc.grpcext import intercept_channel
from typing_extensions import TypedDict, Unpack

from diffmesh.channels import open_channel
from diffmesh.server import GRPC_OPTIONS
from diffmesh.v1 import common_pb2, router_pb2, router_pb2_grpc

StreamEvent = common_pb2.ProgressQueued | common_pb2.ProgressLoading | common_pb2.ProgressStep | common_pb2.GenerationResult
"""One event of :meth:`Client.generate_stream`; the last one is the :class:`GenerationResult`."""

DEFAULT_TIMEOUT_S = 300.0


class GenerationOptions(TypedDict, total=False):
    """Keyword options of the generate calls (see ``GenerationParams`` in common.proto)."""

    negative_prompt: str
    steps: int
    guidance_scale: float
    seed: int
    width: int
    height: int
    num_images: int
    task: common_pb2.Task.ValueType
    init_image: bytes
    mask_image: bytes
    strength: float


@dataclass(frozen=True)
class Lora:
    """A LoRA adapter to apply, by catalog id, at ``scale`` (finite, within [-4, 4])."""

    id: str
    scale: float = 1.0


@dataclass(frozen=True)
class ControlNet:
    """A ControlNet by catalog id with its conditioning image (PNG/JPEG bytes) and scale."""

    id: str
    image: bytes
    scale: float = 1.0


class DiffmeshClientError(Exception):
    """A router call failed; ``code`` is the gRPC status, ``details`` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str, field: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.field = field
        self.retry_after_s = retry_after_s


class InvalidArgumentError(DiffmeshClientError):
    """The request is malformed; ``field`` names the offending field when known."""


class NotFoundError(DiffmeshClientError):
    """A referenced model id does not exist."""


class ResourceExhaustedError(DiffmeshClientError):
    """The mesh is full; retry after ``retry_after_s`` seconds."""


class UnavailableError(DiffmeshClientError):
    """The router or the capacity behind it is unreachable right now; retrying may help."""


class DeadlineExceededError(DiffmeshClientError):
    """The call did not finish within its timeout."""


class FailedPreconditionError(DiffmeshClientError):
    """The mesh is not in a state that allows the request."""


class PermissionDeniedError(DiffmeshClientError):
    """The request touches something it may not."""


class DataLossError(DiffmeshClientError):
    """An artifact is corrupt or does not match its digest."""


_ERRORS: dict[grpc.StatusCode, type[DiffmeshClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.DATA_LOSS: DataLossError,
}


def error_from_rpc(err: grpc.RpcError) -> DiffmeshClientError:
    """The typed client error for a failed gRPC call."""
    code: grpc.StatusCode = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN  # type: ignore[attr-defined]
    details: str = (err.details() if hasattr(err, "details") else None) or str(err)  # type: ignore[attr-defined]
    field = None
    retry_after_s = None
    trailing = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None  # type: ignore[attr-defined]
    for key, value in trailing or ():
        if key == "diffmesh-field":
            field = str(value)
        elif key == "retry-after-ms":
            retry_after_s = int(value) / 1000
    return _ERRORS.get(code, DiffmeshClientError)(code, details, field, retry_after_s)


def build_pipeline(base_id: str, loras: Sequence[Lora] = (), controlnets: Sequence[ControlNet] = ()) -> common_pb2.PipelineSpec:
    """The ``PipelineSpec`` of a base with LoRAs (in order) and ControlNets."""
    return common_pb2.PipelineSpec(
        base_id=base_id,
        loras=[common_pb2.LoraRef(id=lo.id, scale=lo.scale) for lo in loras],
        controlnets=[common_pb2.ControlNetRef(id=c.id, image=c.image, scale=c.scale) for c in controlnets],
    )


def build_params(
    prompt: str,
    *,
    negative_prompt: str = "",
    steps: int = 20,
    guidance_scale: float = 0.0,
    seed: int = 0,
    width: int = 512,
    height: int = 512,
    num_images: int = 1,
    task: common_pb2.Task.ValueType = common_pb2.TASK_TXT2IMG,
    init_image: bytes = b"",
    mask_image: bytes = b"",
    strength: float = 0.0,
) -> common_pb2.GenerationParams:
    """The ``GenerationParams`` message (zero values mean the server's defaults, see the proto)."""
    return common_pb2.GenerationParams(
        prompt=prompt,
        negative_prompt=negative_prompt,
        steps=steps,
        guidance_scale=guidance_scale,
        seed=seed,
        width=width,
        height=height,
        num_images=num_images,
        task=task,
        init_image=init_image,
        mask_image=mask_image,
        strength=strength,
    )


def stream_event(response: router_pb2.GenerateStreamResponse) -> StreamEvent | None:
    """The event carried by one ``GenerateStreamResponse`` (None when empty)."""
    which = response.WhichOneof("event")
    return getattr(response, which) if which else None


def _list_request(kind: common_pb2.ComponentKind.ValueType, family: str, page_token: str) -> router_pb2.ListModelsRequest:
    return router_pb2.ListModelsRequest(kind=kind, family=family, page_size=1000, page_token=page_token)


class Client:
    """Blocking client of the router at ``address`` (``host:port``)."""

    def __init__(self, address: str, timeout: float = DEFAULT_TIMEOUT_S, channel: grpc.Channel | None = None) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = channel or intercept_channel(
            grpc.insecure_channel(address, options=GRPC_OPTIONS), client_interceptor()
        )
        self._stub = router_pb2_grpc.RouterServiceStub(self._channel)

    def generate(
        self,
        base_id: str,
        prompt: str,
        *,
        loras: Sequence[Lora] = (),
        controlnets: Sequence[ControlNet] = (),
        tenant: str = "",
        request_id: str = "",
        timeout: float | None = None,
        **params: Unpack[GenerationOptions],
    ) -> common_pb2.GenerationResult:
        """Generates images and returns the result (``params``: see :class:`GenerationOptions`)."""
        request = router_pb2.GenerateRequest(
            request_id=request_id,
            pipeline=build_pipeline(base_id, loras, controlnets),
            params=build_params(prompt, **params),
            tenant=tenant,
        )
        try:
            response: router_pb2.GenerateResponse = self._stub.Generate(request, timeout=timeout or self.timeout)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        return response.result

    def generate_stream(
        self,
        base_id: str,
        prompt: str,
        *,
        loras: Sequence[Lora] = (),
        controlnets: Sequence[ControlNet] = (),
        tenant: str = "",
        request_id: str = "",
        timeout: float | None = None,
        **params: Unpack[GenerationOptions],
    ) -> Iterator[StreamEvent]:
        """Yields queued, loading and step events, then the :class:`GenerationResult`."""
        request = router_pb2.GenerateStreamRequest(
            request_id=request_id,
            pipeline=build_pipeline(base_id, loras, controlnets),
            params=build_params(prompt, **params),
            tenant=tenant,
        )
        try:
            for response in self._stub.GenerateStream(request, timeout=timeout or self.timeout):
                event = stream_event(response)
                if event is not None:
                    yield event
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None

    def list_models(self, kind: common_pb2.ComponentKind.ValueType = common_pb2.COMPONENT_KIND_UNSPECIFIED,
                    family: str = "") -> list[common_pb2.Component]:
        """Every model (all pages), optionally of one kind and family."""
        out: list[common_pb2.Component] = []
        token = ""
        while True:
            try:
                page: router_pb2.ListModelsResponse = self._stub.ListModels(
                    _list_request(kind, family, token), timeout=self.timeout
                )
            except grpc.RpcError as err:
                raise error_from_rpc(err) from None
            out.extend(page.models)
            token = page.next_page_token
            if not token:
                return out

    def get_model(self, model_id: str) -> router_pb2.GetModelResponse:
        """One model and where its copies live; :class:`NotFoundError` when unknown."""
        try:
            response: router_pb2.GetModelResponse = self._stub.GetModel(
                router_pb2.GetModelRequest(id=model_id), timeout=self.timeout
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        return response

    def close(self) -> None:
        """Closes the channel."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """``asyncio`` client of the router at ``address``; same methods as :class:`Client`, awaitable."""

    def __init__(self, address: str, timeout: float = DEFAULT_TIMEOUT_S, channel: aio.Channel | None = None) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = channel or open_channel(address)
        self._stub = router_pb2_grpc.RouterServiceStub(self._channel)

    async def generate(
        self,
        base_id: str,
        prompt: str,
        *,
        loras: Sequence[Lora] = (),
        controlnets: Sequence[ControlNet] = (),
        tenant: str = "",
        request_id: str = "",
        timeout: float | None = None,
        **params: Unpack[GenerationOptions],
    ) -> common_pb2.GenerationResult:
        """Generates images and returns the result (``params``: see :class:`GenerationOptions`)."""
        request = router_pb2.GenerateRequest(
            request_id=request_id,
            pipeline=build_pipeline(base_id, loras, controlnets),
            params=build_params(prompt, **params),
            tenant=tenant,
        )
        try:
            response: router_pb2.GenerateResponse = await self._stub.Generate(request, timeout=timeout or self.timeout)
        except aio.AioRpcError as err:
            raise error_from_rpc(err) from None
        return response.result

    async def generate_stream(
        self,
        base_id: str,
        prompt: str,
        *,
        loras: Sequence[Lora] = (),
        controlnets: Sequence[ControlNet] = (),
        tenant: str = "",
        request_id: str = "",
        timeout: float | None = None,
        **params: Unpack[GenerationOptions],
    ) -> AsyncIterator[StreamEvent]:
        """Yields queued, loading and step events, then the :class:`GenerationResult`."""
        request = router_pb2.GenerateStreamRequest(
            request_id=request_id,
            pipeline=build_pipeline(base_id, loras, controlnets),
            params=build_params(prompt, **params),
            tenant=tenant,
        )
        call = self._stub.GenerateStream(request, timeout=timeout or self.timeout)
        try:
            async for response in call:
                event = stream_event(response)
                if event is not None:
                    yield event
        except aio.AioRpcError as err:
            raise error_from_rpc(err) from None
        finally:
            call.cancel()

    async def list_models(self, kind: common_pb2.ComponentKind.ValueType = common_pb2.COMPONENT_KIND_UNSPECIFIED,
                          family: str = "") -> list[common_pb2.Component]:
        """Every model (all pages), optionally of one kind and family."""
        out: list[common_pb2.Component] = []
        token = ""
        while True:
            try:
                page: router_pb2.ListModelsResponse = await self._stub.ListModels(
                    _list_request(kind, family, token), timeout=self.timeout
                )
            except aio.AioRpcError as err:
                raise error_from_rpc(err) from None
            out.extend(page.models)
            token = page.next_page_token
            if not token:
                return out

    async def get_model(self, model_id: str) -> router_pb2.GetModelResponse:
        """One model and where its copies live; :class:`NotFoundError` when unknown."""
        try:
            response: router_pb2.GetModelResponse = await self._stub.GetModel(
                router_pb2.GetModelRequest(id=model_id), timeout=self.timeout
            )
        except aio.AioRpcError as err:
            raise error_from_rpc(err) from None
        return response

    async def close(self) -> None:
        """Closes the channel."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

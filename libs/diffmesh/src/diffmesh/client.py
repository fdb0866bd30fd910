"""Client SDK for the diffmesh router (``diffmesh.v1.RouterService``).

Two clients with the same methods: :class:`Client` (blocking) and :class:`AsyncClient`
(``grpc.aio``); both are thin wrappers over the shared request builders below. Both
propagate the current OpenTelemetry context, so a caller's span and the mesh's spans form
one trace. gRPC failures are raised as the :mod:`diffmesh.errors` hierarchy — the same
classes the servers raise — carrying the status code, the message, and (where the server
sent them) the offending field and the retry hint. The ``*Error`` names below are that
hierarchy under the SDK's names. Nothing server-side is imported.

Example::

    with Client("127.0.0.1:50051") as client:
        result = client.generate("sd15-base-a", "a red fox", loras=[Lora("lora-ink", 0.8)],
                                 steps=4, width=64, height=64, seed=7)
        open("fox.png", "wb").write(result.images[0].png)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import grpc
from grpc import aio
from typing_extensions import TypedDict, Unpack

from diffmesh import errors
from diffmesh.channels import open_blocking_channel, open_channel
from diffmesh.v1 import common_pb2, router_pb2, router_pb2_grpc

StreamEvent = common_pb2.ProgressQueued | common_pb2.ProgressLoading | common_pb2.ProgressStep | common_pb2.GenerationResult
"""One event of :meth:`Client.generate_stream`; the last one is the :class:`GenerationResult`."""

DEFAULT_TIMEOUT_S = 300.0
LIST_PAGE_SIZE = 1000


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


# The SDK's names of the one error hierarchy (``except InvalidArgumentError`` catches
# exactly what a server raised as ``InvalidArgument``).
DiffmeshClientError = errors.DiffmeshError
InvalidArgumentError = errors.InvalidArgument
NotFoundError = errors.NotFound
ResourceExhaustedError = errors.ResourceExhausted
UnavailableError = errors.Unavailable
DeadlineExceededError = errors.DeadlineExceeded
FailedPreconditionError = errors.FailedPrecondition
PermissionDeniedError = errors.PermissionDenied
DataLossError = errors.DataLoss
error_from_rpc = errors.from_rpc_error


@contextmanager
def _raising_diffmesh_errors() -> Iterator[None]:
    """Re-raises a failed call (sync or aio) as its :mod:`diffmesh.errors` class."""
    try:
        yield
    except grpc.RpcError as err:
        raise errors.from_rpc_error(err) from None


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


_Generate = TypeVar("_Generate", router_pb2.GenerateRequest, router_pb2.GenerateStreamRequest)


def generate_request(
    message: type[_Generate],
    base_id: str,
    prompt: str,
    loras: Sequence[Lora],
    controlnets: Sequence[ControlNet],
    tenant: str,
    request_id: str,
    params: GenerationOptions,
) -> _Generate:
    """A ``GenerateRequest`` or ``GenerateStreamRequest`` (``message``) for one generate call."""
    return message(
        request_id=request_id,
        pipeline=build_pipeline(base_id, loras, controlnets),
        params=build_params(prompt, **params),
        tenant=tenant,
    )


def list_request(kind: common_pb2.ComponentKind.ValueType, family: str, page_token: str) -> router_pb2.ListModelsRequest:
    """One page request of ``ListModels``."""
    return router_pb2.ListModelsRequest(kind=kind, family=family, page_size=LIST_PAGE_SIZE, page_token=page_token)


class Client:
    """Blocking client of the router at ``address`` (``host:port``)."""

    def __init__(self, address: str, timeout: float = DEFAULT_TIMEOUT_S, channel: grpc.Channel | None = None) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = channel or open_blocking_channel(address)
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
        request = generate_request(router_pb2.GenerateRequest, base_id, prompt, loras, controlnets, tenant, request_id, params)
        with _raising_diffmesh_errors():
            response: router_pb2.GenerateResponse = self._stub.Generate(request, timeout=timeout or self.timeout)
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
        request = generate_request(
            router_pb2.GenerateStreamRequest, base_id, prompt, loras, controlnets, tenant, request_id, params
        )
        with _raising_diffmesh_errors():
            for response in self._stub.GenerateStream(request, timeout=timeout or self.timeout):
                event = stream_event(response)
                if event is not None:
                    yield event

    def list_models(
        self, kind: common_pb2.ComponentKind.ValueType = common_pb2.COMPONENT_KIND_UNSPECIFIED, family: str = ""
    ) -> list[common_pb2.Component]:
        """Every model (all pages), optionally of one kind and family."""
        out: list[common_pb2.Component] = []
        token = ""
        while True:
            with _raising_diffmesh_errors():
                page: router_pb2.ListModelsResponse = self._stub.ListModels(
                    list_request(kind, family, token), timeout=self.timeout
                )
            out.extend(page.models)
            token = page.next_page_token
            if not token:
                return out

    def get_model(self, model_id: str) -> router_pb2.GetModelResponse:
        """One model and where its copies live; :class:`NotFoundError` when unknown."""
        with _raising_diffmesh_errors():
            response: router_pb2.GetModelResponse = self._stub.GetModel(
                router_pb2.GetModelRequest(id=model_id), timeout=self.timeout
            )
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
        request = generate_request(router_pb2.GenerateRequest, base_id, prompt, loras, controlnets, tenant, request_id, params)
        with _raising_diffmesh_errors():
            response: router_pb2.GenerateResponse = await self._stub.Generate(request, timeout=timeout or self.timeout)
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
        request = generate_request(
            router_pb2.GenerateStreamRequest, base_id, prompt, loras, controlnets, tenant, request_id, params
        )
        call = self._stub.GenerateStream(request, timeout=timeout or self.timeout)
        try:
            with _raising_diffmesh_errors():
                async for response in call:
                    event = stream_event(response)
                    if event is not None:
                        yield event
        finally:
            call.cancel()

    async def list_models(
        self, kind: common_pb2.ComponentKind.ValueType = common_pb2.COMPONENT_KIND_UNSPECIFIED, family: str = ""
    ) -> list[common_pb2.Component]:
        """Every model (all pages), optionally of one kind and family."""
        out: list[common_pb2.Component] = []
        token = ""
        while True:
            with _raising_diffmesh_errors():
                page: router_pb2.ListModelsResponse = await self._stub.ListModels(
                    list_request(kind, family, token), timeout=self.timeout
                )
            out.extend(page.models)
            token = page.next_page_token
            if not token:
                return out

    async def get_model(self, model_id: str) -> router_pb2.GetModelResponse:
        """One model and where its copies live; :class:`NotFoundError` when unknown."""
        with _raising_diffmesh_errors():
            response: router_pb2.GetModelResponse = await self._stub.GetModel(
                router_pb2.GetModelRequest(id=model_id), timeout=self.timeout
            )
        return response

    async def close(self) -> None:
        """Closes the channel."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

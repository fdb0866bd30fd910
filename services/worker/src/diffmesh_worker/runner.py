"""One request at a time per device: the FIFO slot, and denoising in the device thread.

:class:`DeviceSlot` is the worker's queue: at most one request holds the device (loading
and denoising), at most ``max_queue`` wait, in arrival order, and each waiter can follow
its position. Background work (the plan's pre-builds) takes the device only while it is
idle (:meth:`DeviceSlot.try_background`) and gives it up at its next step once a request
waits (:attr:`DeviceSlot.requests_waiting`): it has a lower priority than every request.
:func:`denoise` runs a diffusers pipeline in the device thread, reporting every finished
step and checking an interrupt flag in the step callback so that a cancelled request
stops within one step.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffmesh.errors import ResourceExhausted
from diffmesh.v1 import common_pb2

from diffmesh_worker import adapters
from diffmesh_worker.assemble import BuiltBase, BuiltControlNet, make_pipeline
from diffmesh_worker.images import encode_png
from diffmesh_worker.validation import Job


@dataclass(eq=False)
class Ticket:
    """A request's place in the slot's queue."""

    granted: bool = False
    granted_at: float = 0.0
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class DeviceSlot:
    """FIFO admission to the device: one running request, at most ``max_queue`` waiting.

    ``on_change`` is called (in the event loop) whenever the queue length, the running
    request or the background holder changes.
    """

    def __init__(self, max_queue: int, on_change: Callable[[], None] | None = None) -> None:
        self.max_queue = max_queue
        self.on_change = on_change
        self._waiting: deque[Ticket] = deque()
        self._running: Ticket | None = None
        self._background: Ticket | None = None
        self._avg_run_s = 5.0  # until measured

    @property
    def queue_length(self) -> int:
        """Requests waiting."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Requests holding the device (0 or 1); background work does not count."""
        return 0 if self._running is None else 1

    @property
    def idle(self) -> bool:
        """True when no request holds or waits for the device and no background work holds it."""
        return self._running is None and not self._waiting and self._background is None

    @property
    def requests_waiting(self) -> bool:
        """True when a request waits: background work gives the device up at its next step."""
        return bool(self._waiting)

    def enter(self) -> Ticket:
        """Takes a place: the device at once when idle, else the end of the queue; RESOURCE_EXHAUSTED when full.

        A request waiting only for background work counts as the running one (it gets the
        device at the background's next step), so it does not take a queue place.
        """
        ticket = Ticket()
        if self.idle:
            self._grant(ticket)
            self._changed()
            return ticket
        behind_background = 1 if self._running is None and self._waiting else 0
        if self._running is not None or self._waiting:
            if len(self._waiting) - behind_background >= self.max_queue:
                wait_s = self._avg_run_s * (len(self._waiting) + 1)
                raise ResourceExhausted(
                    f"worker queue is full ({len(self._waiting)} waiting, max_queue={self.max_queue})",
                    retry_after_s=round(min(max(wait_s, 0.5), 60.0), 1),
                )
        self._waiting.append(ticket)
        self._changed()
        return ticket

    def try_background(self) -> Ticket | None:
        """The device for background work if it is idle now, else None (release with :meth:`release_background`)."""
        if not self.idle:
            return None
        ticket = Ticket(granted=True, granted_at=time.monotonic())
        self._background = ticket
        self._changed()
        return ticket

    def release_background(self, ticket: Ticket) -> None:
        """Ends background work; the first waiting request gets the device."""
        if ticket is not self._background:
            return
        self._background = None
        if self._waiting and self._running is None:
            self._grant(self._waiting.popleft())
            self._notify()
        self._changed()

    def position(self, ticket: Ticket) -> int:
        """Requests ahead of ``ticket`` (the running one or background work included); 0 once it holds the device."""
        if ticket.granted:
            return 0
        try:
            ahead = 0 if self._running is None and self._background is None else 1
            return self._waiting.index(ticket) + ahead
        except ValueError:
            return 0

    async def positions(self, ticket: Ticket) -> AsyncIterator[int]:
        """Yields the ticket's position now and whenever it changes, until it holds the device."""
        last: int | None = None
        while not ticket.granted:
            ticket.changed.clear()
            pos = self.position(ticket)
            if pos != last:
                last = pos
                yield pos
            if ticket.granted:
                break
            await ticket.changed.wait()
        if last is None:
            yield 0

    def leave(self, ticket: Ticket) -> None:
        """Gives up a place (cancelled while waiting) or the device."""
        if ticket is self._running:
            self.release(ticket)
        elif ticket in self._waiting:
            self._waiting.remove(ticket)
            self._notify()
            self._changed()

    def release(self, ticket: Ticket) -> None:
        """Frees the device after ``ticket``'s request ended; the next waiter gets it."""
        if ticket is not self._running:
            return
        ran = time.monotonic() - ticket.granted_at
        self._avg_run_s = 0.8 * self._avg_run_s + 0.2 * ran
        self._running = None
        if self._waiting:
            self._grant(self._waiting.popleft())
        self._notify()
        self._changed()

    def _grant(self, ticket: Ticket) -> None:
        ticket.granted = True
        ticket.granted_at = time.monotonic()
        self._running = ticket
        ticket.changed.set()

    def _notify(self) -> None:
        for ticket in self._waiting:
            ticket.changed.set()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()


class Interrupted(Exception):
    """Raised in the step callback when the request was cancelled."""


@dataclass
class PipelineModules:
    """The device-resident modules of one request's pipeline: its base (or overlay) and ControlNets."""

    base: BuiltBase
    controlnets: list[BuiltControlNet]


def _call_kwargs(pipe: Any, job: Job, callback: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    generators = [torch.Generator("cpu").manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF) for seed in job.seeds]
    kwargs: dict[str, Any] = dict(
        prompt=job.prompt,
        negative_prompt=job.negative_prompt or None,
        num_inference_steps=job.steps,
        guidance_scale=job.guidance_scale,
        height=job.height,
        width=job.width,
        num_images_per_prompt=job.num_images,
        generator=generators,
        output_type="pil",
        callback_on_step_end=callback,
    )
    conditions = [c.image for c in job.controlnets]
    scales = [c.scale for c in job.controlnets]
    if conditions:
        kwargs["controlnet_conditioning_scale"] = scales[0] if len(scales) == 1 else scales
    condition: Any = conditions[0] if len(conditions) == 1 else conditions
    if job.task == common_pb2.TASK_TXT2IMG:
        if conditions:
            kwargs["image"] = condition
    else:
        kwargs["image"] = job.init_image
        kwargs["strength"] = job.strength
        if job.task == common_pb2.TASK_INPAINT:
            kwargs["mask_image"] = job.mask_image
        if conditions:
            kwargs["control_image"] = condition
    accepted = inspect.signature(pipe.__call__).parameters
    return {k: v for k, v in kwargs.items() if k in accepted}


def denoise(
    modules: PipelineModules, job: Job, cancelled: threading.Event, on_step: Callable[[int, int], None]
) -> list[common_pb2.Image]:
    """Runs the job's pipeline (in the device thread) and returns its PNG images.

    Raises :class:`Interrupted` when ``cancelled`` is set during denoising.
    """
    if cancelled.is_set():
        raise Interrupted()
    adapters.activate(modules.base, job.loras)
    pipe: Any = make_pipeline(modules.base, modules.controlnets, job.task)

    def callback(pipeline: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if cancelled.is_set():
            raise Interrupted()
        on_step(index + 1, int(getattr(pipeline, "num_timesteps", job.steps) or job.steps))
        return tensors

    output = pipe(**_call_kwargs(pipe, job, callback))
    images = output.images
    result = []
    for image, seed in zip(images, job.seeds, strict=True):
        if image.size != (job.width, job.height):
            image = image.resize((job.width, job.height))
        result.append(common_pb2.Image(png=encode_png(image), width=job.width, height=job.height, seed=seed))
    return result

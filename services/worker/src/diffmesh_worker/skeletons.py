"""Spare meta-device module skeletons, built ahead so that a cold load skips the meta build.

Building a large module on the meta device from its config is pure Python work (an SD1.5
UNet: 0.4-0.8 s) that sits on the path of every cold load. :class:`SkeletonPool` keeps ONE
spare skeleton per architecture, keyed by (module class, canonical config JSON), for at
most ``max_keys`` architectures (the least recently used is dropped).
:meth:`SkeletonPool.take` hands the spare out (or builds one in the caller's thread when
none is ready) and queues a replacement that one background thread builds. A skeleton is
handed out once only: ``load_state_dict(assign=True)`` turns it into the loaded module.

Thread safety:

- Replacements are built under ``with torch.device("meta")``, a thread-local torch function
  mode, so tensors created meanwhile by the device thread are unaffected. The first
  skeleton of a key is built in the caller's thread with accelerate's
  ``init_empty_weights(include_buffers=False)``: it patches ``nn.Module.register_parameter``
  process-wide, so such builds are serialised by a lock and never run in the background.
  Their buffers (made by the constructor, absent from the state dict, e.g. CLIP's
  ``position_ids``) are kept as the key's template and cloned into every replacement, whose
  buffers the meta mode left empty.
- CPU contention: a build is GIL-bound Python. Replacements are built only while
  ``is_idle()`` says the device has no request (checked before each build; a build under
  way is not interrupted, so a request arriving meanwhile shares the CPU with at most one
  build). Lowering the thread's OS priority instead was rejected: a niced thread that holds
  the GIL gets descheduled and the denoising thread then waits for the GIL (priority
  inversion).
"""

from __future__ import annotations

import copy
import json
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from accelerate import init_empty_weights
from diffusers.configuration_utils import ConfigMixin
from transformers import PreTrainedModel

log = logging.getLogger(__name__)

M = TypeVar("M", bound=torch.nn.Module)
Key = tuple[type, str]

# accelerate's init_empty_weights patches nn.Module process-wide: one such build at a time.
_PATCH_LOCK = threading.Lock()


def config_key(cls: type, config: Mapping[str, Any]) -> Key:
    """The pool key of ``cls`` built from ``config``: the class and the config as canonical JSON."""
    return cls, json.dumps(dict(config), sort_keys=True, separators=(",", ":"), default=repr)


def construct(cls: type[M], config: Mapping[str, Any]) -> M:
    """``cls`` built from ``config`` (diffusers ``from_config``, or transformers ``cls(config_class)``)."""
    if issubclass(cls, PreTrainedModel):
        return cls(cls.config_class.from_dict(dict(config)))  # type: ignore[attr-defined]
    if issubclass(cls, ConfigMixin):
        return cls.from_config(dict(config))  # type: ignore[attr-defined,no-any-return]
    raise TypeError(f"{cls.__name__} is neither a diffusers nor a transformers model class")


def build_skeleton(cls: type[M], config: Mapping[str, Any]) -> M:
    """``cls`` with parameters on the meta device and real buffers (the caller's thread; serialised)."""
    with _PATCH_LOCK, init_empty_weights(include_buffers=False):
        return construct(cls, config)


def build_meta(cls: type[M], config: Mapping[str, Any], buffers: Mapping[str, torch.Tensor]) -> M:
    """``cls`` built wholly on the meta device (thread-local), its buffers cloned from ``buffers``."""
    with torch.device("meta"):
        module = construct(cls, config)
    for name, buffer in list(module.named_buffers()):
        if not buffer.is_meta:
            continue
        if name not in buffers:
            raise RuntimeError(f"{cls.__name__}: no template for buffer {name!r}")
        owner, _, attr = name.rpartition(".")
        module.get_submodule(owner)._buffers[attr] = buffers[name].clone()
    return module


@dataclass
class _Slot:
    cls: type
    config: dict[str, Any]
    buffers: dict[str, torch.Tensor]
    spare: torch.nn.Module | None = None
    queued: bool = False


class SkeletonPool:
    """Spare meta skeletons per (class, config), refilled in the background (see the module docstring)."""

    def __init__(self, max_keys: int = 8, is_idle: Callable[[], bool] | None = None, idle_poll_s: float = 0.05) -> None:
        self.max_keys = max_keys
        self._is_idle = is_idle or (lambda: True)
        self._idle_poll_s = idle_poll_s
        self._cond = threading.Condition()
        self._slots: OrderedDict[Key, _Slot] = OrderedDict()
        self._queue: deque[Key] = deque()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.built_ahead = 0  # skeletons built by the background thread
        self.built_inline = 0  # skeletons built in a caller's thread (no spare was ready)

    def keys(self) -> list[Key]:
        """The architectures held, least recently used first."""
        with self._cond:
            return list(self._slots)

    def ready(self, cls: type, config: Mapping[str, Any]) -> bool:
        """Whether a spare for ``cls``/``config`` is there now."""
        with self._cond:
            slot = self._slots.get(config_key(cls, config))
            return slot is not None and slot.spare is not None

    def wait_ready(self, cls: type, config: Mapping[str, Any], timeout: float) -> bool:
        """Waits up to ``timeout`` seconds for a spare for ``cls``/``config``; whether one is there."""
        key = config_key(cls, config)
        with self._cond:
            return self._cond.wait_for(lambda: (s := self._slots.get(key)) is not None and s.spare is not None, timeout=timeout)

    def take(self, cls: type[M], config: Mapping[str, Any]) -> M:
        """A fresh meta skeleton of ``cls`` for ``config``, never handed out before; queues its replacement."""
        key = config_key(cls, config)
        spare: torch.nn.Module | None = None
        buffers: dict[str, torch.Tensor] | None = None
        with self._cond:
            slot = self._slots.get(key)
            if slot is not None:
                self._slots.move_to_end(key)
                spare, slot.spare = slot.spare, None
                buffers = slot.buffers
        if spare is None:
            if buffers is None:  # first of its key: built here, its buffers kept as the key's template
                spare = build_skeleton(cls, config)
                buffers = {n: b.detach().clone() for n, b in spare.named_buffers() if not b.is_meta}
            else:
                spare = build_meta(cls, config, buffers)
            with self._cond:
                self.built_inline += 1
        assert buffers is not None
        if self.max_keys > 0:
            self._schedule(key, cls, config, buffers)
        return spare  # type: ignore[return-value]

    def _schedule(self, key: Key, cls: type, config: Mapping[str, Any], buffers: dict[str, torch.Tensor]) -> None:
        with self._cond:
            if self._closed:
                return
            slot = self._slots.get(key)
            if slot is None:
                slot = self._slots[key] = _Slot(cls, copy.deepcopy(dict(config)), buffers)
                while len(self._slots) > self.max_keys:
                    self._slots.popitem(last=False)
            if slot.spare is None and not slot.queued:
                slot.queued = True
                self._queue.append(key)
            if self._thread is None:
                self._thread = threading.Thread(target=self._refill, name="skeleton-refill", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _next(self) -> tuple[Key, _Slot] | None:
        """The next slot to refill once the device is idle; None when closed."""
        with self._cond:
            while True:
                if self._closed:
                    return None
                if not self._queue:
                    self._cond.wait()
                    continue
                if not self._is_idle():
                    self._cond.wait(timeout=self._idle_poll_s)
                    continue
                key = self._queue.popleft()
                slot = self._slots.get(key)
                if slot is None:  # dropped (least recently used) since it was queued
                    continue
                slot.queued = False
                if slot.spare is None:
                    return key, slot

    def _refill(self) -> None:
        while (job := self._next()) is not None:
            key, slot = job
            try:
                module: torch.nn.Module = build_meta(slot.cls, slot.config, slot.buffers)
            except Exception:
                log.exception("building a spare skeleton failed", extra={"module": slot.cls.__name__})
                continue
            with self._cond:
                if self._slots.get(key) is slot and slot.spare is None:
                    slot.spare = module
                    self.built_ahead += 1
                self._cond.notify_all()

    def close(self, timeout: float = 10.0) -> None:
        """Stops the refill thread (after the build under way) and drops every spare."""
        with self._cond:
            self._closed = True
            self._slots.clear()
            self._queue.clear()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

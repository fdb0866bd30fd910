"""The workload the simulator replays: components, pipelines and requests."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

TASKS = ("TXT2IMG", "IMG2IMG", "INPAINT")


@dataclass(frozen=True)
class Component:
    """One loadable unit: ``BASE``, ``LORA`` or ``CONTROLNET``."""

    cid: str
    kind: str
    family: str
    nbytes: int


@dataclass(frozen=True)
class Pipeline:
    """A base plus LoRAs (with scales) and ControlNets; indices into ``Workload.components``."""

    key: str
    base: int
    loras: tuple[int, ...] = ()
    scales: tuple[float, ...] = ()
    controlnets: tuple[int, ...] = ()


@dataclass
class Workload:
    """Requests in arrival order with the catalog they use.

    ``arrival_s`` is seconds since the first arrival in the workload's own clock;
    ``start_epoch_s`` is the absolute time of arrival 0 (time-of-day buckets use it).
    """

    name: str
    components: list[Component]
    pipelines: list[Pipeline]
    arrival_s: np.ndarray
    pipeline: np.ndarray
    images: np.ndarray
    steps: np.ndarray
    tenant: np.ndarray
    task: np.ndarray
    start_epoch_s: float = 0.0
    exec_time_s: np.ndarray | None = None
    """Observed end-to-end seconds per request when the source has them (calibration)."""
    notes: dict[str, object] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.arrival_s.shape[0])

    def head(self, n: int) -> Workload:
        """The first ``n`` requests (same catalog)."""
        return Workload(
            name=self.name,
            components=self.components,
            pipelines=self.pipelines,
            arrival_s=self.arrival_s[:n],
            pipeline=self.pipeline[:n],
            images=self.images[:n],
            steps=self.steps[:n],
            tenant=self.tenant[:n],
            task=self.task[:n],
            start_epoch_s=self.start_epoch_s,
            exec_time_s=None if self.exec_time_s is None else self.exec_time_s[:n],
            notes=dict(self.notes),
        )

    def window(self, start_s: float, end_s: float) -> Workload:
        """Requests arriving in ``[start_s, end_s)`` (workload seconds), re-based to start at 0."""
        sel = (self.arrival_s >= start_s) & (self.arrival_s < end_s)
        idx = np.flatnonzero(sel)
        t0 = float(self.arrival_s[idx[0]]) if idx.size else float(start_s)
        return Workload(
            name=f"{self.name}[{start_s:.0f}s,{end_s:.0f}s)",
            components=self.components,
            pipelines=self.pipelines,
            arrival_s=self.arrival_s[idx] - t0,
            pipeline=self.pipeline[idx],
            images=self.images[idx],
            steps=self.steps[idx],
            tenant=self.tenant[idx],
            task=self.task[idx],
            start_epoch_s=self.start_epoch_s + t0,
            exec_time_s=None if self.exec_time_s is None else self.exec_time_s[idx],
            notes=dict(self.notes),
        )

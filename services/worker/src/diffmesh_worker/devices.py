"""Which device this worker runs on, and how much memory it has."""

from __future__ import annotations

from pathlib import Path

import torch
from diffmesh.errors import FailedPrecondition


def resolve_device(setting: str) -> str:
    """``auto`` → ``cuda:0`` when CUDA is present, else ``cpu``; explicit CUDA needs CUDA."""
    if setting == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda"):
        if not torch.cuda.is_available():
            raise FailedPrecondition(f"device {setting!r} requested but CUDA is not available")
        return setting if ":" in setting else "cuda:0"
    return "cpu"


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                out[key] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    except OSError:
        pass
    return out


def memory(device: str) -> tuple[int, int]:
    """(total, free) bytes of the device's memory (CPU: RAM from /proc/meminfo)."""
    if device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info(torch.device(device))
        return int(total), int(free)
    info = _meminfo()
    total = info.get("MemTotal", 0)
    return total, info.get("MemAvailable", info.get("MemFree", 0))


def default_cache_bytes(device: str) -> int:
    """Default device-cache budget: 80% of GPU memory, or half the RAM on CPU."""
    total, _ = memory(device)
    return int(total * (0.8 if device.startswith("cuda") else 0.5))

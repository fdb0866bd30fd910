"""The demo request set of ``diffmesh run``, or a set read from a JSON file.

The default set, built from the catalog: txt2img without LoRA, with one LoRA, with two
LoRAs at different scales, one ControlNet request (with a generated conditioning image),
and a repeat of the first (warm: every component already on the worker).

A ``--requests`` file is a JSON list of objects::

    {"name": "fox", "base_id": "sd15-tiny-a", "prompt": "a red fox",
     "loras": [{"id": "lora-ink", "scale": 0.8}],
     "controlnet": {"id": "controlnet-edges", "image": "edges.png", "scale": 1.0},
     "steps": 4, "width": 64, "height": 64, "seed": 1, "num_images": 1,
     "guidance_scale": 7.5, "negative_prompt": ""}

Only ``name`` and ``base_id`` are required; a ControlNet ``image`` path is relative to the
file, and a missing ``image`` means the generated conditioning image.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffmesh.client import ControlNet, Lora

DEFAULT_SIZE = 64
DEFAULT_STEPS = 4


@dataclass(frozen=True)
class DemoRequest:
    """One request of the demo set."""

    name: str
    base_id: str
    prompt: str = "a lighthouse on a cliff at dusk"
    loras: tuple[Lora, ...] = ()
    controlnets: tuple[ControlNet, ...] = field(default=(), repr=False)
    negative_prompt: str = ""
    steps: int = DEFAULT_STEPS
    guidance_scale: float = 7.5
    seed: int = 1
    width: int = DEFAULT_SIZE
    height: int = DEFAULT_SIZE
    num_images: int = 1


def encode_png(width: int, height: int, rgb: bytes) -> bytes:
    """An 8-bit RGB PNG of ``rgb`` (``width * height * 3`` bytes, row-major)."""
    if len(rgb) != width * height * 3:
        raise ValueError(f"expected {width * height * 3} RGB bytes, got {len(rgb)}")
    rows = b"".join(b"\x00" + rgb[y * width * 3 : (y + 1) * width * 3] for y in range(height))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def edges_image(width: int = DEFAULT_SIZE, height: int = DEFAULT_SIZE) -> bytes:
    """A conditioning image like an edge map: white outlines of a circle and a square on black."""
    pixels = bytearray(width * height * 3)
    cx, cy, r = width * 0.35, height * 0.4, min(width, height) * 0.22
    x0, y0, x1, y1 = int(width * 0.55), int(height * 0.55), int(width * 0.9), int(height * 0.9)
    for y in range(height):
        for x in range(width):
            on_circle = abs(((x - cx) ** 2 + (y - cy) ** 2) ** 0.5 - r) < 1.0
            on_square = (x0 <= x <= x1 and y in (y0, y1)) or (y0 <= y <= y1 and x in (x0, x1))
            if on_circle or on_square:
                i = (y * width + x) * 3
                pixels[i : i + 3] = b"\xff\xff\xff"
    return encode_png(width, height, bytes(pixels))


def _catalog_ids(catalog: Path) -> dict[str, list[str]]:
    """Kind (``BASE``/``LORA``/``CONTROLNET``) → sorted ids of a catalog.json."""
    out: dict[str, list[str]] = {"BASE": [], "LORA": [], "CONTROLNET": []}
    for comp in json.loads(catalog.read_text()).get("components", []):
        kind = str(comp.get("kind", "")).removeprefix("COMPONENT_KIND_")
        out.setdefault(kind, []).append(str(comp["id"]))
    return {kind: sorted(ids) for kind, ids in out.items()}


def demo_requests(catalog: Path, size: int = DEFAULT_SIZE, steps: int = DEFAULT_STEPS) -> list[DemoRequest]:
    """The default demo set for the models of ``catalog``."""
    ids = _catalog_ids(catalog)
    if not ids["BASE"]:
        raise ValueError(f"{catalog} lists no BASE model")
    base, loras, controlnets = ids["BASE"][0], ids["LORA"], ids["CONTROLNET"]
    common: dict[str, Any] = {"width": size, "height": size, "steps": steps}
    out = [DemoRequest("txt2img", base, "a lighthouse on a cliff at dusk", seed=1, **common)]
    if loras:
        out.append(DemoRequest("one-lora", base, "a fox in the snow", loras=(Lora(loras[0], 1.0),), seed=2, **common))
    if len(loras) >= 2:
        two = (Lora(loras[0], 0.8), Lora(loras[1], 0.4))
        out.append(DemoRequest("two-loras", base, "a harbour with sailing boats", loras=two, seed=3, **common))
    if controlnets:
        cn = (ControlNet(controlnets[0], edges_image(size, size), 1.0),)
        out.append(DemoRequest("controlnet", base, "a round window and a door", controlnets=cn, seed=4, **common))
    out.append(DemoRequest("txt2img-warm", base, out[0].prompt, seed=1, **common))
    return out


def load_requests(path: Path) -> list[DemoRequest]:
    """Requests from a JSON file (format in the module docstring); ValueError names the bad entry."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read requests file {path}: {err}") from None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty JSON list of requests")
    return [_request(path.parent, i, entry) for i, entry in enumerate(entries)]


def _request(folder: Path, index: int, entry: Any) -> DemoRequest:
    where = f"request #{index}"
    if not isinstance(entry, dict) or not entry.get("name") or not entry.get("base_id"):
        raise ValueError(f"{where}: an object with 'name' and 'base_id' is required")
    try:
        loras = tuple(Lora(str(lo["id"]), float(lo.get("scale", 1.0))) for lo in entry.get("loras", []))
        controlnets: tuple[ControlNet, ...] = ()
        size = (int(entry.get("width", DEFAULT_SIZE)), int(entry.get("height", DEFAULT_SIZE)))
        if cn := entry.get("controlnet"):
            image = (folder / cn["image"]).read_bytes() if cn.get("image") else edges_image(*size)
            controlnets = (ControlNet(str(cn["id"]), image, float(cn.get("scale", 1.0))),)
        return DemoRequest(
            name=str(entry["name"]),
            base_id=str(entry["base_id"]),
            prompt=str(entry.get("prompt", DemoRequest.prompt)),
            loras=loras,
            controlnets=controlnets,
            negative_prompt=str(entry.get("negative_prompt", "")),
            steps=int(entry.get("steps", DEFAULT_STEPS)),
            guidance_scale=float(entry.get("guidance_scale", 7.5)),
            seed=int(entry.get("seed", 1)),
            width=size[0],
            height=size[1],
            num_images=int(entry.get("num_images", 1)),
        )
    except (KeyError, TypeError, ValueError, OSError) as err:
        raise ValueError(f"{where} ({entry.get('name')}): {err}") from None

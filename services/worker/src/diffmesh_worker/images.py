"""Encoding PNG results (request images are decoded by :mod:`diffmesh.request_validation`)."""

from __future__ import annotations

import io

from PIL import Image


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes of ``image``."""
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()

"""Decoding request images (ControlNet conditions, init images, masks) and encoding PNG results."""

from __future__ import annotations

import io
import warnings

from diffmesh.errors import InvalidArgument
from PIL import Image, UnidentifiedImageError

# Requests carry images of at most this many pixels (a decompression bomb guard: a small
# PNG can claim gigapixels). 4096² covers any size the API accepts, with room to spare.
MAX_INPUT_PIXELS = 4096 * 4096
MAX_INPUT_BYTES = 32 * 1024 * 1024
ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP"}


def decode_image(data: bytes, field: str, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """Decodes PNG/JPEG/WebP bytes into a ``mode`` image resized to ``size`` (width, height).

    Raises :class:`InvalidArgument` naming ``field`` when the bytes are empty, too large,
    not a supported image format, or corrupt.
    """
    if not data:
        raise InvalidArgument(field, "image is empty")
    if len(data) > MAX_INPUT_BYTES:
        raise InvalidArgument(field, f"image is {len(data)} bytes; at most {MAX_INPUT_BYTES} allowed")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            probe = Image.open(io.BytesIO(data))
            if probe.format not in ALLOWED_FORMATS:
                raise InvalidArgument(field, f"unsupported image format {probe.format}; use PNG or JPEG")
            width, height = probe.size
            if width <= 0 or height <= 0 or width * height > MAX_INPUT_PIXELS:
                raise InvalidArgument(field, f"image is {width}x{height}; at most {MAX_INPUT_PIXELS} pixels allowed")
            probe.verify()  # structure and checksums; the object is unusable afterwards
            image: Image.Image = Image.open(io.BytesIO(data))
            image.load()
    except InvalidArgument:
        raise
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as exc:
        raise InvalidArgument(field, f"not a decodable PNG or JPEG image ({type(exc).__name__})") from exc
    image = image.convert(mode)
    if image.size != size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    return image


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes of ``image``."""
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()

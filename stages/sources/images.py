"""The one image reader: PNG/JPEG bytes -> uint8 3 x H x W, for ingest and predict alike.

Untrusted images are read with caps tied to what a picture can need (docs/threat-model.md):
the encoded file is at most :func:`~stages.sources.safety.max_file_bytes`, the decoded image
at most :func:`max_pixels` (checked from the header, before any pixel is decoded), and PNG
text/ICC chunks at most 1 MB each, 1 MB in all. Only the PNG and JPEG decoders are tried.
16-bit greyscale PNGs are scaled to 8 bits (Pillow's own conversion clips them to white).
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np

from stages.errors import UserError
from stages.sources.safety import env_number

if TYPE_CHECKING:
    from PIL import Image

#: Default cap on decoded pixels (CONVFLOW_MAX_IMAGE_PIXELS): a 50-megapixel photo.
MAX_IMAGE_PIXELS = 50_000_000
#: Cap on PNG text and ICC chunks, per chunk and per image (Pillow allows 1 MB and 64 MB).
MAX_TEXT_BYTES = 1 << 20
FORMATS = ("PNG", "JPEG")


def max_pixels() -> int:
    """The most pixels an image may decode to."""
    return int(env_number("CONVFLOW_MAX_IMAGE_PIXELS", MAX_IMAGE_PIXELS))


def _grey16_to_8(im: Image.Image) -> Image.Image:
    """A 16-bit greyscale image (Pillow's "I;16" or "I") as 8-bit "L": 0-65535 -> 0-255,
    rounded, so a 16-bit PNG saved from 8-bit values (v * 257) decodes to exactly v."""
    from PIL import Image

    wide = np.asarray(im).clip(0, 65535).astype(np.uint32)
    return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))


def decode_image(data: bytes, where: str, size: tuple[int, int] = (32, 32),
                 ) -> tuple[np.ndarray, tuple[int, int]]:
    """PNG/JPEG ``data`` as uint8 3 x H x W RGB at ``size`` (height, width), and the
    (width, height) it had.

    Any mode becomes RGB; any other size is resized with a box pre-reduction and bilinear
    filter (the same for training and prediction, so inference sees what training saw).
    A bad, oversized or unreadable image is one :class:`UserError` naming ``where``.
    """
    from PIL import Image, ImageFile, PngImagePlugin, UnidentifiedImageError

    PngImagePlugin.MAX_TEXT_CHUNK = MAX_TEXT_BYTES
    PngImagePlugin.MAX_TEXT_MEMORY = MAX_TEXT_BYTES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    limit = max_pixels()
    # our check below replaces Pillow's (a warning, then an error at twice its limit)
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as im:
            w, h = im.size
            if w * h > limit:
                raise UserError(f"{where}: {w} x {h} pixels, more than the {limit:,} allowed "
                                "(a decompression bomb, or a very large photo: shrink it or "
                                "raise CONVFLOW_MAX_IMAGE_PIXELS)")
            if im.mode.startswith("I"):  # 16-bit grey: convert() would clip it to white
                im = _grey16_to_8(im)
            if im.mode != "RGB":
                im = im.convert("RGB")
            if im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR,
                               reducing_gap=2.0)
            pixels = np.asarray(im, dtype=np.uint8)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - Pillow raises many types for a bad file
        if isinstance(err, UnidentifiedImageError):
            reason = "neither PNG nor JPEG data"
        else:
            text = str(err).strip()
            reason = f"{type(err).__name__}: {text.splitlines()[0]}" if text else \
                type(err).__name__
        raise UserError(f"{where}: not a readable PNG/JPEG image ({reason}); replace or "
                        "delete it") from None
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)), (w, h)

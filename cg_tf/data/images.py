"""Image bytes for records: encode pixel arrays, check and normalize encoded files."""

import io
import struct

import numpy as np
from PIL import Image


class DecodeError(ValueError):
    """An image that cannot be decoded or has the wrong shape."""


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of a uint8 HxWxC array (C = 1 or 3)."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[-1] not in (1, 3):
        raise DecodeError(f"expected uint8 HxWx1 or HxWx3 pixels, got {pixels.dtype} "
                          f"{pixels.shape}")
    img = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def normalize_encoded(data: bytes, channels: int,
                      shape: tuple[int | None, ...] | None = None) -> bytes:
    """Checks that `data` decodes fully; returns bytes TensorFlow decodes as `channels`.

    JPEG and PNG already in the wanted mode pass through untouched (no
    re-encoding loss); anything else (CMYK JPEG, palette PNG, GIF, ...) is
    converted and stored as PNG. Raises DecodeError if the bytes do not decode
    or the decoded size differs from a fixed `shape`.
    """
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format
        img.load()
    except Exception as e:  # PIL raises many types for corrupt files.
        raise DecodeError(f"undecodable image: {e}") from e
    if shape is not None and None not in shape[:2] and (img.height, img.width) != tuple(shape[:2]):
        raise DecodeError(f"image is {img.height}x{img.width}, expected "
                          f"{shape[0]}x{shape[1]}")
    mode = "L" if channels == 1 else "RGB"
    if img.mode == mode and fmt in ("JPEG", "PNG"):
        return data
    return encode_png(np.asarray(img.convert(mode)).reshape(img.height, img.width, channels))


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by PNG color type (3: palette indices)


def header_shape(data: bytes) -> tuple[int, int, int]:
    """(height, width, channels) of encoded image bytes, from the header only
    (about a microsecond for PNG; PIL's header parse, tens of microseconds, for
    other formats). Raises DecodeError for bytes that are no image."""
    if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) >= 26:
        width, height = struct.unpack(">II", data[16:24])
        return height, width, _PNG_CHANNELS.get(data[25], 0)
    try:
        img = Image.open(io.BytesIO(data))  # Reads the header, not the pixels.
    except Exception as e:  # PIL raises many types for corrupt files.
        raise DecodeError(f"undecodable image: {e}") from e
    return img.height, img.width, Image.getmodebands(img.mode)

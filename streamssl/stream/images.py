"""Cheap checks of an encoded image before any decoder sees it (part of the samples stage).

``check_image`` sniffs the format from the bytes (never trusting the extension), walks the JPEG, PNG or WebP
structure far enough to tell an image cut short or corrupt from a good one, refuses decompression bombs by
their declared size, and transcodes, once, the rare image whose mode an 8-bit RGB decoder may mishandle
(CMYK, 16-bit, palette, ...) to an 8-bit RGB PNG. Each refusal has a reason from ``streamssl.stream.reasons``.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
import zlib

import numpy as np
from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
"""Member extensions taken as the sample's image, in order of preference when a sample has several."""


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_SUPPORTED_FORMATS = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
_OK_MODES = frozenset({"RGB", "L", "RGBA"})
# After an SOS header the entropy-coded data runs to the next marker: 0xFF followed by anything but a
# stuffed zero or a restart marker (RSTn, 0xD0-0xD7).
_JPEG_ENTROPY_END = re.compile(rb"\xff[^\x00\xd0-\xd7]")


def sniff_format(data: bytes) -> str | None:
    """The image format from its magic bytes: jpeg, png, webp, or gif / bmp / tiff (unsupported); None."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == _PNG_MAGIC:
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


def _jpeg_structure(data: bytes) -> str | None:
    """Walk the JPEG markers to EOI without decoding: None if complete, else "truncated" or "corrupt".

    A JPEG cut short is the common failure of interrupted copies; PIL decodes one silently in part while
    DALI fails, so it is caught here. Segments are skipped by length, so an EXIF thumbnail's own EOI is not
    mistaken for the image's end; bytes after EOI are allowed (some cameras append data).
    """
    n = len(data)
    pos = 2
    while True:
        if pos + 2 > n:
            return "truncated"
        if data[pos] != 0xFF:
            return "corrupt"
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0xD9:  # EOI
            return None
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        if pos + 4 > n:
            return "truncated"
        length = (data[pos + 2] << 8) | data[pos + 3]
        if length < 2:
            return "corrupt"
        pos += 2 + length
        if marker == 0xDA:  # SOS: entropy-coded data follows
            if pos > n:
                return "truncated"
            end = _JPEG_ENTROPY_END.search(data, pos)
            if end is None:
                return "truncated"
            pos = end.start()


def _png_structure(data: bytes) -> str | None:
    """Walk the PNG chunks to IEND: None if complete, else "truncated" or "corrupt" (a critical chunk's CRC
    is wrong; decoders reject those, while they only warn about ancillary chunks)."""
    n = len(data)
    pos = 8
    while True:
        if pos + 12 > n:
            return "truncated"
        (length,) = struct.unpack_from(">I", data, pos)
        kind = data[pos + 4:pos + 8]
        end = pos + 12 + length
        if end > n:
            return "truncated"
        (crc,) = struct.unpack_from(">I", data, end - 4)
        critical = not kind[0] & 0x20  # IHDR, PLTE, IDAT, IEND: upper-case first letter
        if critical and zlib.crc32(memoryview(data)[pos + 4:end - 4]) != crc:
            return "corrupt"
        if kind == b"IEND":
            return None
        pos = end


def _webp_structure(data: bytes) -> str | None:
    """Check the RIFF container length: None if complete, else "truncated"."""
    if len(data) < 12:
        return "truncated"
    (riff_size,) = struct.unpack_from("<I", data, 4)
    return "truncated" if len(data) < 8 + riff_size else None


_STRUCTURE = {"jpeg": _jpeg_structure, "png": _png_structure, "webp": _webp_structure}


def _needs_transcode(kind: str, im: Image.Image, data: bytes) -> bool:
    """True when an 8-bit RGB decoder may mishandle the image: a mode outside RGB/L/RGBA, or a PNG whose
    bit depth is not 8 or whose colour type is palette or grey+alpha (PIL shows 16-bit RGB as "RGB")."""
    if im.mode not in _OK_MODES:
        return True
    if kind == "png":
        bit_depth, colour_type = data[24], data[25]  # IHDR, right after the signature and chunk header
        return bit_depth != 8 or colour_type in (3, 4)
    return False


def _to_rgb_png(im: Image.Image) -> bytes:
    """Decode fully and re-encode as 8-bit RGB PNG. 16-bit values are scaled (>> 8), not clipped as PIL's
    own convert("L") of an "I;16" image would; CMYK (Adobe inverted included) goes through PIL's convert."""
    im.load()
    if im.mode.startswith("I"):  # "I;16", "I;16B", "I;16L", "I;16N", "I" (16-bit PNG in older Pillow)
        values = np.asarray(im).astype(np.int64)
        grey = Image.fromarray(np.clip(values >> 8, 0, 255).astype(np.uint8), "L")
        rgb = grey.convert("RGB")
    elif im.mode == "F":
        grey = Image.fromarray(np.clip(np.asarray(im), 0, 255).astype(np.uint8), "L")
        rgb = grey.convert("RGB")
    else:
        try:
            rgb = im.convert("RGB")
        except ValueError:  # modes without a direct RGB conversion go through RGBA (alpha is dropped)
            rgb = im.convert("RGBA").convert("RGB")
    out = io.BytesIO()
    rgb.save(out, "PNG", compress_level=1)  # rare path: favour speed over size
    return out.getvalue()


def check_image(data: bytes, ext: str, *, max_pixels: int) -> tuple[bytes | None, str | None]:
    """Cheap checks before a decoder sees the image; no pixel is decoded unless a transcode is needed.

    In order: empty; magic bytes (``not_image``, or ``unsupported`` for gif/bmp/tiff and for an ``ext``
    outside ``IMAGE_EXTS``); PIL header parse without decode (``corrupt``); declared pixel count above
    ``max_pixels`` (``too_large``: a decompression bomb is rejected from its header alone, without
    allocating); structure walk (``truncated`` / ``corrupt``: JPEG markers to EOI, PNG chunks with CRCs to
    IEND, WebP RIFF length); mode. Images in RGB, L or RGBA at 8 bits pass unchanged; others (CMYK, 16-bit,
    palette, grey+alpha, 1-bit) are transcoded to 8-bit RGB PNG bytes.

    Args:
        data: the encoded image bytes of one tar member.
        ext: the member's extension (lower case, without the dot).
        max_pixels: the largest width x height accepted.

    Returns:
        ``(bytes, None)``: the bytes to decode (the input, or a PNG transcode); or ``(None, reason)`` with a
        reason from ``BAD_REASONS``.
    """
    if not data:
        return None, "empty"
    if ext.lower() not in IMAGE_EXTS:
        return None, "unsupported"
    kind = sniff_format(data)
    if kind is None:
        return None, "not_image"
    if kind not in _SUPPORTED_FORMATS:
        return None, "unsupported"
    structure = _STRUCTURE[kind]
    try:
        with warnings.catch_warnings():
            # The pixel limit is ours (max_pixels); PIL's bomb warning would only repeat it, and its
            # warnings about odd metadata (corrupt EXIF) would flood the log from a stream of images.
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(data), formats=[_SUPPORTED_FORMATS[kind]])
    except Image.DecompressionBombError:
        return None, "too_large"
    except Exception:  # PIL raises many types for broken headers (SyntaxError, OSError, struct.error, ...)
        return None, "truncated" if structure(data) == "truncated" else "corrupt"
    width, height = im.size
    if width <= 0 or height <= 0:
        return None, "corrupt"
    if width * height > max_pixels:
        return None, "too_large"
    problem = structure(data)
    if problem is not None:
        return None, problem
    if not _needs_transcode(kind, im, data):
        return data, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _to_rgb_png(im), None
    except Exception:  # the full decode found what the header walk could not
        return None, "corrupt"



__all__ = ["IMAGE_EXTS", "check_image", "sniff_format"]

"""Fuzz targets for outside bytes: image checks and decoding, the tar reader; each with the inputs hypothesis
draws for it and the contract it keeps (fuzz_text.py has those of text: URLs, Redis entries, configuration).

Shared by tests/test_fuzz.py (a bounded number of examples per target, in the suite) and benchmarks/fuzz.py
(100,000 inputs; crashes and the slowest input per target). A ``check_*`` function feeds one input to the
code and asserts the contract; an ``AssertionError`` is a broken contract, any other exception a crash.
The contract: bad input is skipped and counted under a reason of ``BAD_REASONS``; never an exception, a
hang, or a sample lost without a count.

Image bytes come from a pool of small real images (every format and mode the stream meets, and the ones it
refuses), mutated: truncated, bytes flipped near the header or anywhere, ranges inserted, deleted or
spliced from another image. Tars are built from members drawn over names, types, formats and compressions,
then mutated the same way.
"""

from __future__ import annotations

import functools
import io
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hypothesis import strategies as st
from PIL import Image

from streamssl.augment.reference import MultiCropTransform, decode_rgb
from streamssl.augment.spec import CropGroup, MultiCropSpec
from streamssl.stream.images import IMAGE_EXTS, check_image, sniff_format
from streamssl.stream.reasons import BAD_REASONS
from streamssl.stream.shards import Sample, read_shard

MAX_PIXELS = 1 << 22
"""The pixel limit the fuzzed checks run with (4 Mpx; the default, 40 Mpx, only makes legal decodes slower)."""
MAX_MEMBER_BYTES = 6000
"""The member size limit of the fuzzed tar reader: some pool images are over it, so the limit is exercised."""
SPEC = MultiCropSpec(groups=(CropGroup(1, 16, 0.3, 1.0), CropGroup(1, 8, 0.05, 0.3)))


# --------------------------------------------------------------------------------------------- images


def _pixels(rng: np.random.Generator, height: int, width: int, channels: int) -> np.ndarray:
    shape = (height, width) if channels == 1 else (height, width, channels)
    return rng.integers(0, 256, shape, dtype=np.uint8)


@functools.cache
def image_pool() -> tuple[tuple[bytes, str], ...]:
    """(encoded bytes, extension) of small real images: JPEG (baseline, progressive, grey, CMYK), PNG (RGB,
    RGBA, grey, grey+alpha, palette, 1-bit, 16-bit), WebP (lossy, lossless), and GIF, BMP, TIFF."""
    rng = np.random.default_rng(0)
    out: list[tuple[bytes, str]] = []

    def add(image: Image.Image, fmt: str, ext: str, **kw: Any) -> None:
        buf = io.BytesIO()
        image.save(buf, fmt, **kw)
        out.append((buf.getvalue(), ext))

    for height, width in ((1, 1), (3, 17), (24, 32), (64, 4)):
        rgb = Image.fromarray(_pixels(rng, height, width, 3), "RGB")
        add(rgb, "JPEG", "jpg", quality=80)
        add(rgb, "PNG", "png")
        add(rgb, "WEBP", "webp", quality=70)
    rgb = Image.fromarray(_pixels(rng, 20, 28, 3), "RGB")
    add(rgb, "JPEG", "jpeg", progressive=True, quality=70)
    add(rgb.convert("L"), "JPEG", "jpg")
    add(rgb.convert("CMYK"), "JPEG", "jpg")
    add(rgb.convert("RGBA"), "PNG", "png")
    add(rgb.convert("L"), "PNG", "png")
    add(rgb.convert("LA"), "PNG", "png")
    add(rgb.convert("P"), "PNG", "png")
    add(rgb.convert("1"), "PNG", "png")
    add(Image.fromarray(_pixels(rng, 12, 10, 1).astype(np.uint16) * 257), "PNG", "png")  # I;16
    add(rgb, "WEBP", "webp", lossless=True)
    add(rgb, "GIF", "jpg")
    add(rgb, "BMP", "png")
    add(rgb, "TIFF", "jpg")
    return tuple(out)


@st.composite
def mutated_bytes(draw: st.DrawFn, base: bytes) -> bytes:
    """``base`` with 0-4 mutations: cut, flip a byte (near the header or anywhere), insert, delete, splice."""
    data = bytearray(base)
    pool = image_pool()
    for _ in range(draw(st.sampled_from((0, 0, 1, 1, 2, 3, 4)))):
        op = draw(st.sampled_from(("cut", "flip", "flip_head", "insert", "delete", "splice")))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "cut":
            del data[pos:]
        elif op == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "flip_head" and data:
            data[min(pos, draw(st.integers(0, 40)), len(data) - 1)] = draw(st.sampled_from((0, 1, 0x7F, 0xFF)))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 64))]
        elif op == "splice":
            other = draw(st.sampled_from(pool))[0]
            start = draw(st.integers(0, len(other)))
            data[pos:] = other[start:]
    return bytes(data)


@st.composite
def image_inputs(draw: st.DrawFn) -> tuple[bytes, str]:
    """(bytes, extension): a pool image, its declared size changed or not, mutated or not, or random
    bytes; the extension usually fits."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=256)), draw(st.sampled_from(IMAGE_EXTS))
    base, ext = draw(st.sampled_from(image_pool()))
    if draw(st.integers(0, 3)) == 0:
        ext = draw(st.sampled_from((*IMAGE_EXTS, "JPG", "gif", "txt", "")))
    if draw(st.integers(0, 3)) == 0:
        base = _resized(base, draw(st.integers(0, 65535)), draw(st.integers(0, 65535)))
    return draw(mutated_bytes(base)), ext


def _resized(data: bytes, width: int, height: int) -> bytes:
    """``data`` with the size its header declares replaced (PNG's IHDR, CRC kept valid; JPEG's SOF): how
    decompression bombs and lying headers look."""
    out = bytearray(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 33:
        out[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
        out[29:33] = zlib.crc32(bytes(out[12:29])).to_bytes(4, "big")
    elif data[:2] == b"\xff\xd8":
        for marker in (b"\xff\xc0", b"\xff\xc2"):
            at = data.find(marker)
            if at >= 0 and at + 9 <= len(data):
                out[at + 5:at + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(out)


def check_image_input(inp: tuple[bytes, str]) -> None:
    """``check_image`` says ok or a known reason; what it passes passes again unchanged, and either decodes
    to (3, H, W) uint8 within the pixel limit, giving finite views of the right sizes, or is refused by the
    decoder (counted as ``decode_error``)."""
    data, ext = inp
    checked, reason = check_image(data, ext, max_pixels=MAX_PIXELS)
    if checked is None:
        assert reason in BAD_REASONS, reason
        return
    assert reason is None and sniff_format(checked) in ("jpeg", "png", "webp")
    again_ext = "png" if checked is not data else ext
    assert check_image(checked, again_ext, max_pixels=MAX_PIXELS) == (checked, None)
    image = decode_rgb(checked)
    if image is None:
        return
    assert image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3
    assert image.shape[1] * image.shape[2] <= MAX_PIXELS
    views = _transform()(image, torch.Generator().manual_seed(0))
    for view, size in zip(views, SPEC.view_sizes, strict=True):
        assert view.shape == (3, size, size) and bool(torch.isfinite(view).all())


@functools.cache
def _transform() -> MultiCropTransform:
    return MultiCropTransform(SPEC)


# --------------------------------------------------------------------------------------------- tars

_MEMBER_TYPES = (tarfile.REGTYPE,) * 6 + (tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE)
_KEYS = ("a", "b", "dir/c", "__meta__", "a.b", "k" * 120, "./d", "é", "", "x/", "..")
_EXTS = ("jpg", "JPG", "png", "webp", "jpeg", "cls", "txt", "json", "")


@dataclass(frozen=True)
class TarInput:
    """A tar to read: its bytes, and for a clean one (not mutated, one image per distinct key) what each
    key group must become: True (a sample, these bytes) or False (counted)."""

    data: bytes
    expected: tuple[bool, ...] | None = None


def _member_data(draw: st.DrawFn, ext: str) -> bytes:
    kind = draw(st.integers(0, 5))
    if kind <= 2:
        return draw(st.sampled_from(image_pool()))[0]
    if kind == 3 or ext.lower() == "cls":
        return draw(st.sampled_from((b"3", b" 7\n", b"x", b"", b"\xff", b"99999999999999999999")))
    if kind == 4:
        return draw(mutated_bytes(draw(st.sampled_from(image_pool()))[0]))
    return draw(st.binary(max_size=64))


def tar_bytes(members: list[tuple[str, int, bytes]], fmt: int, compression: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{compression}", format=fmt) as archive:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.REGTYPE:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
            else:
                info.linkname = "a.jpg" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
                archive.addfile(info)
    return buf.getvalue()


@st.composite
def tar_inputs(draw: st.DrawFn) -> TarInput:
    """A tar of 0-8 members over odd names, types, formats and compressions, mutated or clean; or random
    bytes."""
    if draw(st.integers(0, 14)) == 0:
        return TarInput(draw(st.binary(max_size=2048)))
    fmt = draw(st.sampled_from((tarfile.GNU_FORMAT, tarfile.PAX_FORMAT)))
    compression = draw(st.sampled_from(("", "", "", "gz", "bz2", "xz")))
    if draw(st.booleans()):  # clean: distinct keys, one image member each (+ maybe a label and a text member)
        members, expected = [], []
        for k in range(draw(st.integers(0, 6))):
            ext = draw(st.sampled_from(("jpg", "png", "webp", "jpeg", "JPG", "txt")))
            data = _member_data(draw, ext)
            members.append((f"s{k}.{ext}", tarfile.REGTYPE, data))
            if draw(st.booleans()):
                members.append((f"s{k}.cls", tarfile.REGTYPE, b"1"))
            ok = len(data) <= MAX_MEMBER_BYTES and check_image(data, ext.lower(), max_pixels=MAX_PIXELS)[0] is not None
            expected.append(ok)
        return TarInput(tar_bytes(members, fmt, compression), tuple(expected))
    members = []
    for _ in range(draw(st.integers(0, 8))):
        key = draw(st.one_of(st.sampled_from(_KEYS), st.text(max_size=12)))
        ext = draw(st.sampled_from(_EXTS))
        name = f"{key}.{ext}" if ext else key
        members.append((name, draw(st.sampled_from(_MEMBER_TYPES)), _member_data(draw, ext)))
    try:
        data = tar_bytes(members, fmt, compression)
    except (ValueError, UnicodeError):  # a name the tar format cannot hold (NUL, surrogates)
        data = tar_bytes([], fmt, compression)
    return TarInput(draw(mutated_bytes(data)))


def check_tar_input(inp: TarInput, workdir: Path) -> None:
    """``read_shard`` of the tar never raises: it yields samples that pass the image check and counts each
    bad one exactly once (a ``(index, None)`` per count, but for ``shard_error``, counted at most once per
    shard). A clean tar loses nothing: every key group is a sample or a count, as expected."""
    path = workdir / "fuzz.tar"
    path.write_bytes(inp.data)
    reasons: list[str] = []
    results = list(read_shard(str(path), max_member_bytes=MAX_MEMBER_BYTES, max_pixels=MAX_PIXELS,
                              on_bad=reasons.append))
    assert set(reasons) <= set(BAD_REASONS), reasons
    assert reasons.count("shard_error") <= 1
    assert sum(sample is None for _, sample in results) == len(reasons) - reasons.count("shard_error")
    indices = [index for index, _ in results]
    assert indices == sorted(set(indices))
    for _, sample in results:
        if sample is not None:
            assert isinstance(sample, Sample) and sample.ext in IMAGE_EXTS and isinstance(sample.key, str)
            assert sample.label is None or isinstance(sample.label, int)
            assert check_image(sample.data, sample.ext, max_pixels=MAX_PIXELS) == (sample.data, None)
    if inp.expected is not None:
        assert "shard_error" not in reasons, reasons
        assert [sample is not None for _, sample in results] == list(inp.expected)

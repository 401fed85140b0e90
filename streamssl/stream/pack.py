"""Pack a folder of images into WebDataset shards: how a stream's input is made, outside the flow.

``pack_shards`` walks a folder (recursively, in sorted order so that the same folder gives the same
shards), keeps the images the stream accepts (``images.check_image``: jpg, jpeg, png, webp; CMYK, 16-bit
and other awkward modes transcoded once to 8-bit RGB PNG), and writes them with webdataset's
``TarWriter``, ``per_shard`` samples a shard. Each shard is written under a hidden temporary name beside
its final one and renamed into place (``os.replace``) once complete, so a reader, a followed folder
(``source.FolderSource``) included, never sees a partial shard under a final name.

With ``max_side`` images whose longer side exceeds it are scaled down (antialiased) and re-encoded: JPEG
stays JPEG (quality 95), anything else becomes PNG. Shards at about the resolution the views need are
the cheapest speed-up of a CPU data path: decoding and antialiased cropping cost in proportion to the
stored pixels, whatever the view size (FFCV's ``max_resolution`` and DALI's ImageNet recipes do the same).

With ``labels=True`` the first sub-folder under ``src_dir`` names a sample's class (``src/cat/1.jpg`` is
class ``cat``); classes are sorted, each sample gets a ``.cls`` member with the class index, and
``classes.json`` (a JSON list, index -> name) is written beside the shards, also atomically.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from PIL import Image
from webdataset import TarWriter

from streamssl.atomic import write_atomic
from streamssl.errors import RuntimeFailure, UsageError
from streamssl.stream.images import IMAGE_EXTS, check_image

log = logging.getLogger(__name__)

# Generous: packing is offline and the stream applies its own, configured limit when reading.
PACK_MAX_PIXELS = 1 << 30
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_/-]")
_MAX_KEY = 90  # plus ".jpeg" stays within a ustar name (100 bytes)


def _shard_path(out_pattern: str, index: int) -> Path:
    try:
        return Path(out_pattern % index)
    except TypeError:
        raise UsageError(f"out_pattern {out_pattern!r}: expected one printf-style index such as "
                         "shards/shard-%06d.tar") from None


def _key(rel: Path, index: int) -> str:
    """A webdataset key from a relative path: no dots (webdataset splits the extension at the first dot of
    the file name), no characters that need quoting, short enough for a ustar header, unique (``index``
    is appended when the path had to be changed)."""
    plain = rel.with_suffix("").as_posix()
    key = _KEY_UNSAFE.sub("_", plain)
    if key != plain or len(key) > _MAX_KEY:
        key = f"{key[:_MAX_KEY - 10]}_{index:09d}"
    return key


def _images(src_dir: Path) -> Iterator[Path]:
    for path in sorted(src_dir.rglob("*")):
        if path.suffix.lower().lstrip(".") in IMAGE_EXTS and path.is_file():
            yield path


def downscale(data: bytes, ext: str, max_side: int) -> tuple[bytes, str]:
    """``data`` scaled so that its longer side is at most ``max_side`` (Lanczos, aspect kept), re-encoded as
    JPEG quality 95 when it was a JPEG and as PNG otherwise; ``(data, ext)`` unchanged when already small
    enough. ``data`` must have passed ``images.check_image`` (8-bit RGB, L or RGBA)."""
    with Image.open(io.BytesIO(data)) as im:
        if max(im.size) <= max_side:
            return data, ext
        jpeg = im.format == "JPEG"
        im.draft(im.mode, (max_side, max_side))  # JPEG: decode at 1/2, 1/4 or 1/8 scale when that suffices
        small = im.convert(im.mode)  # loads the pixels; a copy that outlives the file
    small.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if jpeg:
        small.save(out, format="JPEG", quality=95)
        return out.getvalue(), "jpg"
    small.save(out, format="PNG")
    return out.getvalue(), "png"


def pack_shards(src_dir: str | os.PathLike[str], out_pattern: str, *, per_shard: int = 1000,
                labels: bool = False, max_side: int = 0,
                on_skip: Callable[[Path, str], None] | None = None) -> list[Path]:
    """Pack the images under ``src_dir`` into WebDataset shards.

    Args:
        src_dir: folder searched recursively for ``*.jpg``, ``*.jpeg``, ``*.png``, ``*.webp``; other files
            are ignored.
        out_pattern: printf-style shard path with one index, e.g. ``shards/shard-%06d.tar`` (index from 0).
        per_shard: samples per shard (the last shard may hold fewer). About 1000 images of a few hundred
            KB gives shards of a few hundred MB, a good unit for streaming and acknowledgement.
        labels: store the class of each image (its first sub-folder under ``src_dir``) in ``.cls`` and
            write ``classes.json`` beside the shards. Images directly in ``src_dir`` have no class and are
            skipped.
        on_skip: called with (path, reason) for each image skipped: a reason from
            ``reasons.BAD_REASONS``, ``"unreadable"`` or ``"no_class"``. Skips are also logged.

    Returns:
        The shard paths written, in order.
    """
    src = Path(src_dir)
    if not src.is_dir():
        raise UsageError(f"src_dir {str(src_dir)!r}: no such folder" if not src.exists() else
                         f"src_dir {str(src_dir)!r}: not a folder")
    if per_shard < 1:
        raise UsageError(f"per_shard must be >= 1, got {per_shard}")
    if max_side < 0:
        raise UsageError(f"max_side must be >= 0 (0: keep the size), got {max_side}")
    if _shard_path(out_pattern, 0) == _shard_path(out_pattern, 1):  # fail early on a pattern without an index
        raise UsageError(f"out_pattern {out_pattern!r}: names the same file for every shard; put one index in it, "
                         "such as shards/shard-%06d.tar")

    images = list(_images(src))
    classes = sorted({p.relative_to(src).parts[0] for p in images if len(p.relative_to(src).parts) > 1})
    class_index = {name: k for k, name in enumerate(classes)}
    skipped: Counter[str] = Counter()

    def skip(path: Path, reason: str) -> None:
        skipped[reason] += 1
        log.warning("pack: %s skipped: %s", path, reason)
        if on_skip is not None:
            on_skip(path, reason)

    def samples() -> Iterator[dict[str, bytes | str]]:
        used: set[str] = set()
        for n, path in enumerate(images):
            rel = path.relative_to(src)
            if labels and len(rel.parts) < 2:
                skip(path, "no_class")
                continue
            ext = path.suffix.lower().lstrip(".")
            try:
                data = path.read_bytes()
            except OSError:
                skip(path, "unreadable")
                continue
            checked, reason = check_image(data, ext, max_pixels=PACK_MAX_PIXELS)
            if checked is None:
                skip(path, reason or "corrupt")
                continue
            key = _key(rel, n)
            if key in used:  # a.jpg beside a.png: the same key would merge them into one sample
                key = f"{key[:_MAX_KEY - 10]}_{n:09d}"
            used.add(key)
            out_ext = "png" if checked is not data else ext
            if max_side:
                checked, out_ext = downscale(checked, out_ext, max_side)
            sample: dict[str, bytes | str] = {"__key__": key, out_ext: checked}
            if labels:
                sample["cls"] = str(class_index[rel.parts[0]]).encode()
            yield sample

    written: list[Path] = []
    pending = samples()
    for first in pending:  # a shard is opened only once it has a first sample; images stream through
        path = _shard_path(out_pattern, len(written))
        n_written = 0

        def write(stream: BinaryIO, first: dict[str, bytes | str] = first) -> None:
            nonlocal n_written
            # mtime fixed: the same images give byte-identical shards.
            with TarWriter(stream, encoder=False, mtime=0) as sink:
                for sample in itertools.chain([first], itertools.islice(pending, per_shard - 1)):
                    sink.write(sample)
                    n_written += 1

        write_atomic(path, write)
        written.append(path)
        log.info("pack: wrote %s (%d samples)", path, n_written)

    if labels:
        classes_path = (written[0].parent if written else _shard_path(out_pattern, 0).parent) / "classes.json"

        def write_classes(stream: BinaryIO) -> None:
            stream.write(json.dumps(classes).encode())

        write_atomic(classes_path, write_classes)
    if skipped:
        log.warning("pack: skipped %d images: %s", sum(skipped.values()), dict(skipped))
    if not images:
        raise UsageError(f"{src}: no images to pack ({', '.join('*.' + e for e in IMAGE_EXTS)}, searched "
                         "recursively)")
    if not written:
        raise RuntimeFailure(f"{src}: none of the {len(images)} images could be packed (skipped: "
                             f"{dict(skipped)}); nothing written")
    return written


__all__ = ["downscale", "pack_shards"]

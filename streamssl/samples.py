"""Tar members -> samples: the second stage of the flow (source -> samples -> augment -> learner).

For each shard URL from a source (source.py) this stage reads the tar members, groups them by key into
samples, keeps one image per sample (``jpg``, ``jpeg``, ``png`` or ``webp``; a ``.cls`` label when present;
other members ignored), runs cheap checks before any decoder sees the bytes, and mixes shards through a
shuffle buffer. It never decodes pixels in Python except to transcode the rare image whose mode an 8-bit
RGB decoder may mishandle (CMYK, 16-bit, palette, ...), once, to an 8-bit RGB PNG.

What comes from webdataset: opening (``webdataset.gopen`` through ``source.open_shard``), grouping members
by key (``webdataset.tariterators.group_by_keys``, with its error-handler convention). What is written here
because webdataset does not do it: the tar member loop (to enforce a member size limit *before* reading a
member, and to notice a shard cut short or with garbage in its middle, which ``tarfile`` otherwise treats
as a quiet end of archive), the image checks, the shuffle buffer (webdataset's ``filters.shuffle`` cannot
drain while the source is idle, which would hold samples and their shards' acks until more shards come),
and the stream position for resume.

Bad input never stops the stream: a bad sample is skipped and counted through an injected
``on_bad(reason)`` callback with a reason from ``BAD_REASONS`` (a bounded label set for metrics); an
unreadable shard is counted once as ``shard_error`` and the stream moves on to the next shard.

Position and acknowledgement (``SampleStream``): every sample of a shard is *settled* when it left the
shuffle buffer to the consumer or was dropped as bad. A shard is done, and ``source.mark_done(url)`` is
called (an XACK for Redis), only when the whole shard was read and every sample of it settled. A checkpoint
stores, per open shard, the settled member indices; on resume those are skipped and everything else of the
shard is read again, including samples that sat in the shuffle buffer when the checkpoint was taken: they
had not reached the learner, so delivery is at-least-once, never at-most-once.
"""

from __future__ import annotations

import io
import logging
import random
import re
import struct
import tarfile
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar

import numpy as np
from PIL import Image
from webdataset.tariterators import base_plus_ext, group_by_keys

from streamssl.backoff import RateLimitedLog, ShardBackoff
from streamssl.config import SourceConfig
from streamssl.reasons import BAD_REASONS
from streamssl.source import ShardSource, SourceError, open_shard

log = logging.getLogger(__name__)
_shard_log = RateLimitedLog(log, limit=20, interval_s=60.0)  # a stream of dead shards must not flood the log
IDLE_LOG_FIRST_S = 10.0  # a quiet source is reported after this long, then every IDLE_LOG_EVERY_S
IDLE_LOG_EVERY_S = 60.0

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
"""Member extensions taken as the sample's image, in order of preference when a sample has several."""


OnBad = Callable[[str], None]
T = TypeVar("T")
_EXHAUSTED = object()


def _ignore(reason: str) -> None:
    """Default ``on_bad``: drop the count (the daemon injects a counter)."""


@dataclass(frozen=True)
class Sample:
    """One image of the stream, still encoded; what the augment stage decodes."""

    key: str     # tar member key (path without extension)
    data: bytes  # encoded image bytes
    ext: str     # "jpg" | "jpeg" | "png" | "webp"
    url: str     # shard URL
    index: int   # ordinal of this sample within its shard (0-based)
    label: int | None = None  # the sample's ``.cls`` member, when the shard has labels


# --------------------------------------------------------------------------------------------- image checks

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


# --------------------------------------------------------------------------------------------- tar reading


class ShardError(Exception):
    """A shard that cannot be read to its end: cut short, garbage inside, unreadable."""


class _Oversized:
    """Stands in for the data of a member larger than max_member_bytes (never read)."""

    def __repr__(self) -> str:
        return "<oversized member>"


OVERSIZED = _Oversized()
_WANTED_EXTS = frozenset((*IMAGE_EXTS, "cls"))


def _clean_tail(fileobj: Any) -> bool:
    """After tarfile stopped: was it at the end-of-archive marker? A tar ends with zero blocks; tarfile
    also stops quietly at a header that fails its checksum (garbage inside) or at a missing header (cut
    at a member boundary). What is left must be non-empty and all zeros."""
    n_rest = 0
    while True:
        chunk = fileobj.read(1 << 20)
        if not chunk:
            return n_rest > 0
        n_rest += len(chunk)
        if chunk.strip(b"\0"):
            return False


def tar_members(stream: IO[bytes], *, max_member_bytes: int, handler: Callable[[BaseException], bool],
                url: str = "") -> Iterator[dict[str, Any]]:
    """The regular members of one tar stream as webdataset file samples: ``{"fname", "data", "__url__"}``.

    Streams the tar (``r|*``: plain or compressed), like ``webdataset.tariterators.tar_file_iterator``, with
    what that lacks: a member over ``max_member_bytes`` is not read (its data is ``OVERSIZED``); members
    that are neither images nor ``.cls`` are not read (data ``None``) but still delimit samples; a shard
    that ends anywhere but at its end-of-archive marker, or breaks mid-member, calls ``handler`` once and
    ends (the rest of the shard cannot be trusted to line up).
    """
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as archive:
            while True:
                info = archive.next()
                if info is None:
                    break
                archive.members = []  # a streaming TarFile keeps every header otherwise
                if not info.isreg():
                    continue
                prefix, suffix = base_plus_ext(info.name)  # webdataset's key/extension split
                if prefix is None or info.name.rsplit("/", 1)[-1].startswith("__"):  # no key; __meta__
                    continue
                if suffix.lower() not in _WANTED_EXTS:
                    data: Any = None
                elif info.size > max_member_bytes:
                    data = OVERSIZED
                else:
                    member = archive.extractfile(info)
                    data = member.read() if member is not None else b""
                yield {"fname": info.name, "data": data, "__url__": url}
            if not _clean_tail(archive.fileobj):
                raise ShardError("tar stopped before its end-of-archive marker (cut short or garbage inside)")
    except Exception as exc:
        handler(exc)


class _ShardErrors:
    """A webdataset-style error handler for one shard: counts ``shard_error`` once, logs, continues."""

    def __init__(self, url: str, on_bad: OnBad) -> None:
        self.url = url
        self.on_bad = on_bad
        self.counted = False

    def __call__(self, exc: BaseException) -> bool:
        if not self.counted:
            self.counted = True
            self.on_bad("shard_error")
            _shard_log.warning("shard %s: %s: %s", self.url, type(exc).__name__, exc)
        return True


def _label(data: Any) -> int | None:
    if not isinstance(data, bytes):
        return None
    try:
        return int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return None


def _to_sample(group: dict[str, Any], index: int, url: str, *, max_pixels: int,
               on_bad: OnBad) -> Sample | None:
    """One key group -> a checked Sample, or None after counting why not."""
    ext = next((e for e in IMAGE_EXTS if e in group), None)
    if ext is None:
        on_bad("unsupported")
        return None
    data = group[ext]
    if data is OVERSIZED:
        on_bad("too_large")
        return None
    checked, reason = check_image(data, ext, max_pixels=max_pixels)
    if checked is None:
        on_bad(reason or "corrupt")
        log.debug("shard %s: sample %s (%d) skipped: %s", url, group.get("__key__"), index, reason)
        return None
    if checked is not data:
        ext = "png"
    else:
        kind = sniff_format(checked)
        if kind == "png" or kind == "webp":
            ext = kind
        elif ext not in ("jpg", "jpeg"):  # a JPEG under another image extension
            ext = "jpg"
    return Sample(key=str(group["__key__"]), data=checked, ext=ext, url=url, index=index,
                  label=_label(group.get("cls")))


def read_shard(url: str, *, allow_pipe: bool = False, max_member_bytes: int = 64 << 20,
               max_pixels: int = 40_000_000, on_bad: OnBad = _ignore,
               skip: Iterable[int] = ()) -> Iterator[tuple[int, Sample | None]]:
    """Read one shard: ``(index, Sample)`` per good sample, ``(index, None)`` per bad one (already counted).

    ``index`` is the sample's ordinal among the key groups of the shard (0-based, stable across re-reads);
    indices in ``skip`` are passed over without a check or a count (they were consumed before a restart).
    A refused URL counts ``refused_url``; an unreadable shard, or one that breaks, counts ``shard_error``
    once; either way the generator simply ends, and the caller moves on.
    """
    errors = _ShardErrors(url, on_bad)
    skipped = frozenset(skip)
    try:
        stream = open_shard(url, allow_pipe=allow_pipe)
    except SourceError as exc:
        log.warning("%s", exc)
        on_bad("refused_url")
        return
    except Exception as exc:
        errors(exc)
        return
    try:
        members = tar_members(stream, max_member_bytes=max_member_bytes, handler=errors, url=url)
        for index, group in enumerate(group_by_keys(members, handler=errors)):
            if index in skipped:
                continue
            yield index, _to_sample(group, index, url, max_pixels=max_pixels, on_bad=on_bad)
    finally:
        try:
            stream.close()
        except Exception as exc:  # a pipe (curl) reports its failure on close
            errors(exc)


# --------------------------------------------------------------------------------------------- the stream


def _to_ranges(indices: set[int]) -> list[list[int]]:
    """{0, 1, 2, 5} -> [[0, 3], [5, 6]] (half-open): settled indices, compact in a checkpoint."""
    out: list[list[int]] = []
    for i in sorted(indices):
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def _from_ranges(ranges: Iterable[Iterable[int]]) -> set[int]:
    out: set[int] = set()
    for start, stop in ranges:
        out.update(range(int(start), int(stop)))
    return out


def shuffled(items: Iterable[T | None], size: int, rng: random.Random) -> Iterator[T]:
    """A shuffle buffer of ``size`` items: once full, each new item displaces a random one, which is
    yielded. A ``None`` in ``items`` (the source is idle) drains the buffer: a quiet stream delivers what it
    holds rather than keep it until more arrives. At the end the rest comes out in random order."""
    buf: list[T] = []

    def pick() -> T:
        k = rng.randrange(len(buf))
        buf[k], buf[-1] = buf[-1], buf[k]
        return buf.pop()

    for item in items:
        if item is None:
            while buf:
                yield pick()
            continue
        buf.append(item)
        if len(buf) >= max(size, 1):
            yield pick()
    while buf:
        yield pick()


@dataclass(eq=False)
class _OpenShard:
    url: str
    settled: set[int] = field(default_factory=set)  # indices handed out or dropped as bad
    n_buffered: int = 0  # samples of this shard waiting in the shuffle buffer
    eof: bool = False  # read to its end (or to an unrecoverable error)


class SampleStream:
    """Source + shard reading + checks + shuffle buffer, with a resumable position.

    Iterate it for ``Sample`` s. Shards from the source are read one after another; good samples pass
    through a shuffle buffer of ``cfg.shuffle_buffer`` samples (0: none) seeded from ``cfg.seed``, which
    drains whenever the source is idle; bad ones are counted through ``on_bad``. When the last sample of a
    shard leaves the stream, ``ack(url)`` is called (default ``source.mark_done``: XACK for Redis, recorded
    for a followed folder).

    ``state_dict()`` holds the source's state and, per open shard, its URL and the indices already settled
    (handed out or dropped). ``load_state_dict()`` restores both; iteration then first re-reads the open
    shards, skipping settled indices, then continues with the source. Samples that were in the shuffle
    buffer at checkpoint time are read again: at-least-once. The buffer's order after a resume is seeded
    anew (from the seed and the number of samples handed out), so it is not bit-identical to an unbroken run.

    ``defer_ack=True`` holds acknowledgements back until ``commit()``: the daemon calls ``commit()`` once the
    checkpoint with the last ``state_dict()`` is safely written, so a crash between checkpoints cannot ack a
    shard whose samples the restored model never saw. Without it, shards acked after the last checkpoint are
    not read again after a crash.

    Use from one thread: take ``state_dict()`` between two samples, in the thread that iterates.
    """

    def __init__(self, source: ShardSource, cfg: SourceConfig, *, on_bad: OnBad = _ignore,
                 ack: Callable[[str], None] | None = None, defer_ack: bool = False) -> None:
        self.source = source
        self.cfg = cfg
        self.on_bad = on_bad
        self.ack = ack if ack is not None else source.mark_done
        self.defer_ack = defer_ack
        self.n_samples = 0  # samples handed out, over restarts
        self.n_shards_done = 0
        self._open: list[_OpenShard] = []
        self._restored: list[_OpenShard] = []
        self._ack_on_start: list[str] = []  # done before the restored checkpoint, not acked then
        self._uncommitted: list[str] = []  # done shards whose ack waits for commit()
        self._n_in_state = 0  # how many of _uncommitted the last state_dict() recorded
        self._lock = threading.RLock()
        # Set except while commit() waits for the lock: the iterating thread then waits before its next call
        # into the source. Without it a source that polls back to back (an idle Redis stream) re-takes the lock
        # the moment it lets go and can starve commit() for minutes; with it commit() waits for at most the
        # one call in flight (one poll: source.poll_s).
        self._source_turn = threading.Event()
        self._source_turn.set()
        self._closed = threading.Event()
        self.backoff = ShardBackoff()
        self._misses = 0  # shards in a row that gave no sample (failed, or skipped while backing off)
        self._all_failing_log = RateLimitedLog(log, limit=1, interval_s=60.0)
        self.idle_since: float | None = None  # monotonic time the source went quiet; None while shards flow
        self._next_idle_log = IDLE_LOG_FIRST_S

    # ------------------------------------------------------------------ reading

    def _read(self, shard: _OpenShard) -> Iterator[tuple[_OpenShard, Sample]]:
        cfg = self.cfg
        # One sample of look-ahead: the shard's end is known before its last sample is handed on, so the
        # shard is acked as that sample leaves the stream, not when the consumer asks for the one after.
        held: Sample | None = None
        failed, good = False, 0

        def on_bad(reason: str) -> None:
            nonlocal failed
            failed = failed or reason in ("shard_error", "refused_url")
            self.on_bad(reason)

        for index, sample in read_shard(shard.url, allow_pipe=cfg.allow_pipe,
                                        max_member_bytes=cfg.max_member_bytes, max_pixels=cfg.max_pixels,
                                        on_bad=on_bad, skip=shard.settled):
            if sample is None:
                shard.settled.add(index)
                continue
            good += 1
            if held is not None:
                shard.n_buffered += 1
                yield shard, held
            held = sample
        shard.eof = True
        if held is not None:
            shard.n_buffered += 1
            yield shard, held
        if good:
            self.backoff.succeeded(shard.url)
            self._misses = 0
        elif failed:
            delay = self.backoff.failed(shard.url)
            self._misses += 1
            log.debug("shard %s failed %d time(s) in a row; not tried again for %.0f s", shard.url,
                      self.backoff.failures(shard.url), delay)
        self._maybe_done(shard)

    def _entries(self) -> Iterator[tuple[_OpenShard, Sample] | None]:
        restored, self._restored = self._restored, []
        for shard in restored:
            yield from self._read(shard)
        urls = iter(self.source)
        while True:
            self._source_turn.wait()  # a waiting commit() goes first
            with self._lock:  # commit() may ack from another thread: never while the source moves
                url = next(urls, _EXHAUSTED)
            if url is _EXHAUSTED:
                return
            if url is None:  # idle tick from the source
                self._note_idle()
                yield None
                continue
            self.idle_since, self._next_idle_log = None, IDLE_LOG_FIRST_S
            shard = _OpenShard(url)
            self._open.append(shard)
            wait = self.backoff.wait_s(url)
            if wait > 0:  # it failed lately
                self._misses += 1
                if self._misses < self.backoff.n_failing:  # others may work: skip it, settled like a failed shard
                    shard.eof = True
                    self._maybe_done(shard)
                    continue
                self._all_failing_log.warning(
                    "all %d shard URLs met lately are failing (%s, ...); next try in %.0f s, backing off up to "
                    "%.0f s", self.backoff.n_failing, url, wait, self.backoff.max_s)
                yield None  # the shuffle buffer drains while we wait
                if self._closed.wait(wait):
                    return
            yield from self._read(shard)

    def _note_idle(self) -> None:
        now = time.monotonic()
        if self.idle_since is None:
            self.idle_since = now
        elif now - self.idle_since >= self._next_idle_log:
            describe = getattr(self.source, "describe", None)
            log.info("waiting for new shards (%s) for %.0f s", describe() if describe else "the source",
                     now - self.idle_since)
            self._next_idle_log += IDLE_LOG_EVERY_S

    def idle_seconds(self) -> float:
        """How long the source has had no new shard (0 while shards flow); readable from any thread."""
        since = self.idle_since
        return 0.0 if since is None else time.monotonic() - since

    def _maybe_done(self, shard: _OpenShard) -> None:
        if not shard.eof or shard.n_buffered > 0 or shard not in self._open:
            return
        self._open.remove(shard)
        self.n_shards_done += 1
        if self.defer_ack:
            with self._lock:
                self._uncommitted.append(shard.url)
        else:
            self.ack(shard.url)

    def __iter__(self) -> Iterator[Sample]:
        # The restored checkpoint covers these shards: safe to ack now, whatever defer_ack says.
        for url in self._ack_on_start:
            self.ack(url)
        self._ack_on_start = []
        rng = random.Random(self.cfg.seed * 1_000_003 + self.n_samples)
        for shard, sample in shuffled(self._entries(), self.cfg.shuffle_buffer, rng):
            shard.n_buffered -= 1
            shard.settled.add(sample.index)
            self.n_samples += 1
            self._maybe_done(shard)  # before the yield: the sample is handed out at this point
            yield sample

    def close(self) -> None:
        """Stop waiting for shards (from another thread too): iteration ends at the next poll."""
        self._closed.set()
        self.source.close()

    # ------------------------------------------------------------------ position

    def commit(self, state: dict[str, Any] | None = None) -> None:
        """Ack the shards done as of ``state`` (a ``state_dict()`` result), or as of the last ``state_dict()``.

        With a prefetching consumer the last ``state_dict()`` runs ahead of what was trained on: pass the state
        that the checkpoint recorded. Safe to call from another thread than the iterating one: it waits for at
        most the source call in flight there.
        """
        self._source_turn.clear()
        try:
            self._commit(state)
        finally:
            self._source_turn.set()

    def _commit(self, state: dict[str, Any] | None) -> None:
        with self._lock:
            if state is not None:
                covered = set(state.get("unacked", ()))
                done = [url for url in self._uncommitted if url in covered]
                self._uncommitted = [url for url in self._uncommitted if url not in covered]
                self._n_in_state = 0
            else:
                n = len(self._uncommitted) if not self.defer_ack else self._n_in_state
                done, self._uncommitted = self._uncommitted[:n], self._uncommitted[n:]
                self._n_in_state = 0
            for url in done:
                self.ack(url)

    def state_dict(self) -> dict[str, Any]:
        """A JSON-serialisable position: source state, open shards with their settled indices."""
        with self._lock:
            return self._state_dict()

    def _state_dict(self) -> dict[str, Any]:
        self._n_in_state = len(self._uncommitted)
        return {
            "source": self.source.state_dict(),
            "open": [{"url": s.url, "settled": _to_ranges(s.settled)} for s in self._open],
            "unacked": [*self._ack_on_start, *self._uncommitted],
            "n_samples": self.n_samples,
            "n_shards_done": self.n_shards_done,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state_dict()``; call before iterating."""
        self.source.load_state_dict(state.get("source", {}))
        self._open = [_OpenShard(str(shard["url"]), _from_ranges(shard.get("settled", ())))
                      for shard in state.get("open", ())]
        self._restored = list(self._open)
        self._ack_on_start = [str(u) for u in state.get("unacked", ())]
        self._uncommitted = []
        self._n_in_state = 0
        self.n_samples = int(state.get("n_samples", 0))
        self.n_shards_done = int(state.get("n_shards_done", 0))


__all__ = [
    "BAD_REASONS", "IMAGE_EXTS", "OVERSIZED", "Sample", "SampleStream", "ShardError", "check_image",
    "read_shard", "shuffled", "sniff_format", "tar_members",
]

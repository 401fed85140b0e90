"""One shard -> checked samples (part of the samples stage): the tar member loop and the key grouping.

What comes from webdataset: opening (``webdataset.gopen`` through ``source.open_shard``), grouping members
by key (``webdataset.tariterators.group_by_keys``, with its error-handler convention). What is written here
because webdataset does not do it: the tar member loop, to enforce a member size limit *before* reading a
member and to notice a shard cut short or with garbage in its middle, which ``tarfile`` otherwise treats as
a quiet end of archive. A bad sample is skipped and counted through ``on_bad(reason)``; an unreadable shard
is counted once as ``shard_error`` and reading simply ends.
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from webdataset.tariterators import base_plus_ext, group_by_keys

from streamssl.stream.backoff import RateLimitedLog
from streamssl.stream.images import IMAGE_EXTS, check_image, sniff_format
from streamssl.stream.source import SourceError, open_shard
from streamssl.urls import redact, redact_text

log = logging.getLogger("streamssl.stream.samples")  # one logger for the stage: operators filter on it
_shard_log = RateLimitedLog(log, limit=20, interval_s=60.0)  # a stream of dead shards must not flood the log

OnBad = Callable[[str], None]


def ignore_bad(reason: str) -> None:
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

    @property
    def id(self) -> str:
        """Stable across restarts and processes: the shard URL and the member key (there is no dataset index)."""
        return f"{self.url}#{self.key}"


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
            _shard_log.warning("shard %s: %s: %s", redact(self.url), type(exc).__name__, redact_text(str(exc)))
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
        log.debug("shard %s: sample %s (%d) skipped: %s", redact(url), group.get("__key__"), index, reason)
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
               max_pixels: int = 40_000_000, on_bad: OnBad = ignore_bad,
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



__all__ = ["OVERSIZED", "OnBad", "Sample", "ShardError", "read_shard", "tar_members"]

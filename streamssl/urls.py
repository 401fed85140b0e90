"""Which URLs streamssl accepts, in one place: shard URLs (the source) and Redis URLs (source and store).

Checked when the configuration is resolved, so that a mistyped scheme stops the run before anything starts,
and again where URLs arrive at run time (a Redis ingest stream carries URLs from others).
"""

from __future__ import annotations

import re
from urllib.parse import urlparse, urlsplit, urlunsplit
from urllib.request import url2pathname

from streamssl.errors import UsageError

REDIS_SCHEMES = ("redis://", "rediss://")
SHARD_SCHEMES = ("", "file", "http", "https")


class SourceError(UsageError, ValueError):
    """A shard URL or source specification is refused or unusable. The message names the URL."""


def is_redis_url(url: str) -> bool:
    return url.startswith(REDIS_SCHEMES)


def check_url(url: str, *, allow_pipe: bool = False) -> str:
    """Return the shard URL ``url`` if its scheme is allowed, else raise ``SourceError`` naming it.

    Allowed: local paths, ``file://``, ``http://``, ``https://``; ``pipe:`` only with ``allow_pipe``
    (webdataset runs the rest of a ``pipe:`` URL as a shell command). Everything else (``s3://``, ``gs://``,
    ``ftp://``, ``-`` for stdin, ...) is refused rather than guessed at.
    """
    if not isinstance(url, str) or not url.strip():
        raise SourceError(f"shard URL {url!r}: empty")
    if url.startswith("pipe:"):
        if allow_pipe:
            return url
        raise SourceError(f"shard URL {url!r}: pipe: URLs run shell commands and are refused; set "
                          "source.allow_pipe = true only if every producer of URLs is trusted")
    if url == "-":
        raise SourceError(f"shard URL {url!r}: reading shards from stdin is not supported")
    scheme = urlparse(url).scheme.lower()
    if scheme in SHARD_SCHEMES:
        return url
    raise SourceError(f"shard URL {url!r}: scheme {scheme!r} is not allowed (local paths, file://, "
                      "http://, https://; pipe: with source.allow_pipe; redis:// for an ingest stream)")


def check_redis_url(url: str, what: str) -> str:
    """Return ``url`` if it is a ``redis://`` or ``rediss://`` URL with a valid port, else raise naming ``what``."""
    if not is_redis_url(url):
        scheme = urlparse(url).scheme or url
        raise SourceError(f"{what} {redact(url)!r}: expected redis://[:password@]host:port/db or rediss:// "
                          f"(TLS), not {scheme!r}")
    try:
        urlparse(url).port  # noqa: B018 - raises on a port that is no number or out of range
    except ValueError as exc:
        raise SourceError(f"{what} {redact(url)!r}: {exc}") from None
    return url


def local_path(url: str) -> str:
    """The local path of a plain path or ``file://`` URL (as webdataset's opener reads it)."""
    return url2pathname(urlparse(url).path) if url.lower().startswith("file:") else url


def redact(url: str) -> str:
    """The URL without its password: safe for logs, errors and ``streamssl status``."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, sep, _ = userinfo.partition(":")
        netloc = f"{user}:***@{hostport}" if sep else netloc
    # redis-py also takes ?password=... in the query
    query = re.sub(r"(^|&)(password=)[^&]*", r"\1\2***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


__all__ = ["REDIS_SCHEMES", "SHARD_SCHEMES", "SourceError", "check_redis_url", "check_url", "is_redis_url",
           "local_path", "redact"]

"""Which URLs streamssl accepts, in one place: shard URLs (the source) and Redis URLs (source and store).

Checked when the configuration is resolved, so that a mistyped scheme stops the run before anything starts,
and again where URLs arrive at run time (a Redis ingest stream carries URLs from others).
"""

from __future__ import annotations

import re
from urllib.parse import urlparse, urlsplit, urlunsplit
from urllib.request import url2pathname

import braceexpand

from streamssl.errors import UsageError

MAX_PATTERN_URLS = 1_000_000
"""The most URLs one brace pattern may expand to: ``{1..1000000000}`` would fill the memory, not a list."""
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
        raise SourceError(f"shard URL {redact(url)!r}: pipe: URLs run shell commands and are refused; set "
                          "source.allow_pipe = true only if every producer of URLs is trusted")
    if url == "-":
        raise SourceError(f"shard URL {url!r}: reading shards from stdin is not supported")
    try:
        scheme = urlparse(url).scheme.lower()
    except ValueError as exc:  # "Invalid IPv6 URL": urllib's words, never the password
        raise SourceError(f"shard URL {redact(url)!r}: {exc}") from None
    if scheme in SHARD_SCHEMES:
        return url
    raise SourceError(f"shard URL {redact(url)!r}: scheme {scheme!r} is not allowed (local paths, file://, "
                      "http://, https://; pipe: with source.allow_pipe; redis:// for an ingest stream)")


_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?|([A-Za-z])\.\.([A-Za-z])(?:\.\.(-?\d+))?")


def _brace_scan(pattern: str) -> tuple[int, bool]:
    """Without expanding ``pattern``: an upper bound of the URLs ``braceexpand`` makes of it (the product over
    its brace groups of each group's alternatives, commas + 1, or range length; counting stops past the
    limit), and whether its braces balance as ``braceexpand`` counts them (a backslash escapes the next
    character)."""
    bound, depth, stack, pos = 1, 0, [], 0
    while pos < len(pattern) and bound <= MAX_PATTERN_URLS:
        char = pattern[pos]
        if char == "\\":
            pos += 1  # an escaped character is no brace or comma
        elif char == "{":
            depth += 1
            stack.append([pos, 0])
        elif char == ",":
            if stack:
                stack[-1][1] += 1
        elif char == "}":
            depth -= 1
            if stack:
                start, commas = stack.pop()
                bound *= max(commas + 1, _range_size(pattern, start + 1, pos))
        pos += 1
    return bound, depth == 0


def _range_size(pattern: str, start: int, end: int) -> int:
    """The length of the range ``pattern[start:end]`` is (``1..10``, ``a..e..2``), or 0."""
    found = _RANGE.fullmatch(pattern, start, end)
    if found is None:
        return 0
    if max(len(g or "") for g in found.groups()) > 18:  # int() of 5,000 digits raises
        return MAX_PATTERN_URLS + 1
    if found.group(1) is not None:
        step = abs(int(found.group(3) or 1)) or 1
        return abs(int(found.group(2)) - int(found.group(1))) // step + 1
    step = abs(int(found.group(6) or 1)) or 1
    return abs(ord(found.group(5)) - ord(found.group(4))) // step + 1


def check_pattern(pattern: str) -> str:
    """Return the shard pattern ``pattern`` if its braces balance and it makes at most ``MAX_PATTERN_URLS``
    URLs, else raise ``SourceError`` naming it; nothing is expanded (the configuration checks this)."""
    bound, balanced = _brace_scan(pattern)
    if bound > MAX_PATTERN_URLS:
        raise SourceError(f"shard pattern {redact(pattern)!r}: expands to more than {MAX_PATTERN_URLS:,} URLs; "
                          "split the shards into folders, or follow a folder")
    if not balanced:
        raise SourceError(f"shard pattern {redact(pattern)!r}: unbalanced braces (a literal brace is \\{{)")
    return pattern


def expand_braces(pattern: str) -> list[str]:
    """``pattern`` brace-expanded as webdataset does (``braceexpand``) after ``check_pattern``, or
    ``SourceError`` naming it (also for a URL part that does not parse)."""
    check_pattern(pattern)
    try:
        parts = list(braceexpand.braceexpand(pattern))
        for part in parts:
            if "[" in part or "]" in part or not part.isascii():  # what urllib may refuse ("Invalid IPv6 URL")
                urlparse(part)
    except ValueError as exc:  # braceexpand's UnbalancedBracesError is one
        raise SourceError(f"shard pattern {redact(pattern)!r}: {exc}") from None
    return parts


def check_redis_url(url: str, what: str) -> str:
    """Return ``url`` if it is a ``redis://`` or ``rediss://`` URL with a valid port, else raise naming ``what``."""
    if not is_redis_url(url):
        try:
            scheme = urlparse(url).scheme or redact(url)
        except ValueError:
            scheme = redact(url)
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


_USERINFO = re.compile(r"(//[^/?#@:]*:)[^/?#]*@")
_PASSWORD_QUERY = re.compile(r"(password=)[^&#]*")


def redact_text(text: str) -> str:
    """``text`` (an error message, a command line) with every ``//user:password@`` and ``password=...`` in it
    masked: for messages that quote URLs, such as curl's through webdataset."""
    return _USERINFO.sub(r"\1***@", _PASSWORD_QUERY.sub(r"\1***", text))


def redact(url: str) -> str:
    """The URL without its password: safe for logs, errors and ``streamssl status``. Never raises."""
    try:
        parts = urlsplit(url)
    except ValueError:  # "Invalid IPv6 URL": no netloc to trust
        parts = None
    if parts is None or "@" not in parts.netloc:  # no scheme urllib knows ("pipe:curl https://u:pw@h/")
        return redact_text(url)
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, sep, _ = userinfo.partition(":")
    netloc = f"{user}:***@{hostport}" if sep else parts.netloc
    # redis-py also takes ?password=... in the query
    query = re.sub(r"(^|&)(password=)[^&]*", r"\1\2***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


__all__ = ["MAX_PATTERN_URLS", "REDIS_SCHEMES", "SHARD_SCHEMES", "SourceError", "check_pattern", "check_redis_url",
           "check_url", "expand_braces", "is_redis_url", "local_path", "redact", "redact_text"]

"""Fuzz targets for outside text: URLs (shard, Redis, brace patterns), Redis stream entries, configuration
(``--set`` values, ``STREAMSSL_*`` variables, profile files); each with the inputs hypothesis draws for it
and the contract it keeps (fuzz_bytes.py has images and tars; both serve tests/test_fuzz.py and
benchmarks/fuzz.py). The contract: a value is accepted, or refused with the project's error
(``SourceError``, ``ConfigError``) and a message that names it and never shows a password; a Redis entry
is handed out, or skipped and counted; nothing raises another exception or hangs.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from hypothesis import strategies as st

from streamssl.stream.reasons import BAD_REASONS
from streamssl.stream.shards import read_shard
from tests.fuzz_bytes import MAX_PIXELS, image_pool, tar_bytes

EXPAND_AT_MOST = 100_000
"""Patterns are expanded only up to this bound: expanding costs ~2 us a URL, work in proportion to what it
makes (a pattern of up to MAX_PATTERN_URLS is legal); above it only the refusal without expanding is checked."""
SECRET = "SECRET"
"""Every password the URL target draws starts with this; no message may contain it."""


# --------------------------------------------------------------------------------------------- URLs


@dataclass(frozen=True)
class UrlInput:
    url: str
    secret: bool  # the password (or ?password=) of a well-formed URL carries SECRET


@st.composite
def url_inputs(draw: st.DrawFn) -> UrlInput:
    """A shard, Redis or brace-pattern URL assembled from parts (schemes allowed and not, a percent-encoded
    password starting with SECRET, broken IPv6 hosts, bad ports, query options), or arbitrary text."""
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return UrlInput(draw(st.text(max_size=40)), False)
    if kind == 1:  # brace patterns: ranges, lists, nesting, escapes, unbalanced
        parts = st.sampled_from(("{a,b}", "{1..3}", "{000..010}", "{1..100000000}", "{a..e..2}", "{", "}",
                                 "\\", ",", "..", "{x,{y,z}}", "shards/", ".tar", "*", "?", "[", "http://h/"))
        return UrlInput("".join(draw(st.lists(parts, max_size=8))), False)
    scheme = draw(st.sampled_from(("", "file", "http", "https", "HTTP", "redis", "rediss", "s3", "gs", "ftp",
                                   "pipe", "data", "1a", "redis+x")))
    password = SECRET + draw(st.text(max_size=8))
    user = draw(st.sampled_from(("", "learner", "u")))
    userinfo = draw(st.sampled_from(("", f"{user}:{quote(password, safe='')}@", f"{user}@")))
    host = draw(st.sampled_from(("127.0.0.1", "localhost", "[::1]", "[", "[::1", "h", "", "ex ample")))
    port = draw(st.sampled_from(("", ":6379", ":0", ":99999", ":x", ":-1", ":")))
    path = draw(st.sampled_from(("", "/", "/0", "/15", "/x", "/a.tar", "/{a,b}.tar", "/%zz")))
    query = draw(st.sampled_from(("", f"?password={quote(password, safe='')}", "?db=1", "?socket_timeout=x",
                                  "?ssl_cert_reqs=bogus", "?protocol=9", "?health_check_interval=-1")))
    head = f"{scheme}://" if scheme and scheme != "pipe" else ("pipe:curl https://" if scheme else "")
    url = f"{head}{userinfo}{host}{port}{path}{query}"
    return UrlInput(url, bool(head) and (SECRET in userinfo or SECRET in query))  # no scheme: a file name


def check_url_input(inp: UrlInput) -> None:
    """Every URL check accepts the URL or raises SourceError / ConfigError, and no message, nor ``redact``,
    shows the password; ``pipe:`` is refused unless allowed; a pattern expands to at most MAX_PATTERN_URLS."""
    from streamssl.config import ConfigError, SourceConfig, StoreConfig
    from streamssl.redis_client import connect
    from streamssl.urls import (
        MAX_PATTERN_URLS,
        SourceError,
        _brace_scan,
        check_redis_url,
        check_url,
        expand_braces,
        redact,
    )

    url = inp.url

    def refused_cleanly(call: Callable[[], Any], errors: tuple[type[Exception], ...] = (SourceError,)) -> bool:
        try:
            call()
        except errors as exc:
            assert str(exc) and not (inp.secret and SECRET in str(exc)), str(exc)
            return True
        return False

    assert isinstance(redact(url), str)
    if inp.secret:
        assert SECRET not in redact(url), redact(url)
    refused_cleanly(lambda: check_url(url, allow_pipe=True))
    if url.startswith("pipe:"):
        assert refused_cleanly(lambda: check_url(url))
    else:
        refused_cleanly(lambda: check_url(url))
    if not refused_cleanly(lambda: check_redis_url(url, "store.url")):
        refused_cleanly(lambda: connect(url, what="store.url").close())  # builds the client; connects nowhere
    if _brace_scan(url)[0] <= EXPAND_AT_MOST:
        try:
            assert len(expand_braces(url)) <= MAX_PATTERN_URLS
        except SourceError as exc:
            assert not (inp.secret and SECRET in str(exc))
    refused_cleanly(lambda: SourceConfig(urls=(url,)), (ConfigError,))
    refused_cleanly(lambda: StoreConfig(url=url), (ConfigError,))


# --------------------------------------------------------------------------------------------- Redis entries


@st.composite
def redis_entries(draw: st.DrawFn) -> list[dict[bytes, bytes]]:
    """1-5 stream entries of arbitrary fields; most with a ``url`` field: a good shard (``{shard}``, filled in
    by the check), refused schemes, ``pipe:`` that would leave a mark, junk and non-UTF-8 bytes."""
    value = st.one_of(st.sampled_from((b"{shard}", b"{shard}", b"s3://bucket/x.tar", b"pipe:touch {mark}",
                                       b"-", b"", b"\xff\xfe/x.tar", b"/no/such.tar", b"redis://127.0.0.1:1/0",
                                       b"{a", b"{1..100000000}")),
                      st.binary(max_size=24))
    name = st.one_of(st.just(b"url"), st.sampled_from((b"URL", b"\xff", b"", b"url ")), st.binary(max_size=8))
    return draw(st.lists(st.dictionaries(name, value, min_size=1, max_size=3), min_size=1, max_size=5))


def check_redis_entries(entries: list[dict[bytes, bytes]], redis_url: str, workdir: Path, key: str) -> None:
    """Through ``RedisStreamSource``: every entry with a non-empty ``url`` is handed out (in order), every
    other one skipped, counted and acknowledged; each URL handed out is read or counted by ``read_shard``
    (never run: no ``pipe:``), and once marked done nothing is left pending."""
    import redis

    from streamssl.stream.redis_source import RedisStreamSource

    shard, mark = workdir / "good.tar", workdir / "pipe-ran"
    if not shard.exists():
        shard.write_bytes(tar_bytes([("s0.jpg", tarfile.REGTYPE, image_pool()[0][0])], tarfile.GNU_FORMAT, ""))
    raw = redis.Redis.from_url(redis_url)
    expected = []
    for fields in entries:
        fields = {k: v.replace(b"{shard}", bytes(shard)).replace(b"{mark}", bytes(mark)) for k, v in fields.items()}
        raw.xadd(key, fields)
        if fields.get(b"url"):
            expected.append(fields[b"url"].decode("utf-8", "replace"))
    source = RedisStreamSource(redis_url, stream_key=key, group="g", consumer="c", poll_s=0.01)
    try:
        urls = []
        for url in source:
            if url is None:  # an idle tick: the stream is read to its end
                break
            urls.append(url)
        assert urls == expected and source.n_skipped_entries == len(entries) - len(expected)
        for url in urls:
            reasons: list[str] = []
            for _ in read_shard(url, max_pixels=MAX_PIXELS, on_bad=reasons.append):
                pass
            assert set(reasons) <= set(BAD_REASONS)
            source.mark_done(url)
        assert source.pending_count() == 0
        assert not mark.exists(), "a pipe: URL from the stream ran"
    finally:
        source.close()
        source._client.close()
        raw.delete(key)
        raw.close()


# --------------------------------------------------------------------------------------------- configuration


def _keys() -> tuple[str, ...]:
    import dataclasses

    from streamssl.config import SECTIONS

    return tuple(f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls))


_VALUE_TEXTS = ("0", "-1", "1", "3", "64", "0.5", "1e-3", "1e999", "nan", "inf", "-0", "9" * 30, "true", "False",
                "yes", "[1, 2]", "[[1]]", "[\"a\", 1]", "[]", "[0.3, 0.1]", "{a = 1}", "1979-05-27", "\"s\"", "'q'",
                "\"unterminated", "[1,", "a,b", "", " ", "1\nx = 2", "resnet18", "swav", "fifo", "cpu", "auto",
                "redis://127.0.0.1:1/0", "[\"shards/{a,b}.tar\"]", "[\"{1..100000000}\"]", "[\"pipe:ls\"]")


@st.composite
def override_texts(draw: st.DrawFn) -> str:
    """A ``--set`` item: a real key (or junk) = a value that fits, does not, or is not TOML."""
    key = draw(st.one_of(st.sampled_from(_keys()), st.text(max_size=12)))
    value = draw(st.one_of(st.sampled_from(_VALUE_TEXTS), st.text(max_size=12),
                           st.integers().map(str), st.floats().map(repr)))
    return draw(st.sampled_from((f"{key}={value}", f"{key} = {value}", key, value)))


@dataclass(frozen=True)
class ConfigInput:
    overrides: tuple[str, ...] = ()
    environ: tuple[tuple[str, str], ...] = ()
    profile: bytes | None = None  # a profile file's bytes


def _toml_literal(value: Any) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value != value:
        return "nan"
    return json.dumps(value) if not isinstance(value, float) or abs(value) != float("inf") else "inf"


@st.composite
def profile_bytes(draw: st.DrawFn) -> bytes:
    """A profile file: tables of real (or junk) keys with drawn values, a shipped profile mutated, or bytes."""
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.binary(max_size=200))
    if kind == 1:
        shipped = sorted((Path(__file__).resolve().parent.parent / "pipelines").glob("*.toml"))
        from tests.fuzz_bytes import mutated_bytes

        return draw(mutated_bytes(draw(st.sampled_from(shipped)).read_bytes()))
    scalars = st.one_of(st.integers(), st.floats(), st.booleans(), st.text(max_size=10),
                        st.sampled_from((0, 1, 64, 0.5, "swav", "resnet18", "cpu")))
    values = st.one_of(scalars, st.lists(scalars, max_size=3))
    tables: dict[str, list[str]] = {}
    for _ in range(draw(st.integers(1, 6))):
        dotted = draw(st.one_of(st.sampled_from(_keys()), st.text(min_size=1, max_size=10)))
        section, _, key = dotted.partition(".")
        tables.setdefault(section, []).append(f"{key or 'k'} = {_toml_literal(draw(values))}")
    text = "\n".join(f"[{section}]\n" + "\n".join(lines) for section, lines in tables.items())
    return text.encode("utf-8", "surrogatepass")


@st.composite
def config_inputs(draw: st.DrawFn) -> ConfigInput:
    """``--set`` items, ``STREAMSSL_*`` variables, or a profile file."""
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return ConfigInput(overrides=tuple(draw(st.lists(override_texts(), min_size=1, max_size=4))))
    if kind == 1:
        names = st.one_of(st.sampled_from(_keys()).map(lambda k: "STREAMSSL_" + k.replace(".", "_").upper()),
                          st.text(max_size=10).map(lambda t: "STREAMSSL_" + t))
        values = st.one_of(st.sampled_from(_VALUE_TEXTS), st.text(max_size=12))
        return ConfigInput(environ=tuple(draw(st.dictionaries(names, values, min_size=1, max_size=3)).items()))
    return ConfigInput(profile=draw(profile_bytes()))


def check_config_input(inp: ConfigInput, workdir: Path) -> None:
    """``resolve`` returns a Config or raises ConfigError with a message; a Config it returns survives its
    own TOML (``config show``'s output) unchanged."""
    from streamssl.config import Config, ConfigError, resolve

    profile = None
    if inp.profile is not None:
        profile = workdir / "fuzz.toml"
        profile.write_bytes(inp.profile)
    try:
        cfg = resolve(profile, environ=dict(inp.environ), overrides=inp.overrides)
    except ConfigError as exc:
        assert str(exc).strip()
        return
    assert isinstance(cfg, Config)
    shown = workdir / "shown.toml"
    shown.write_text(cfg.to_toml(), encoding="utf-8")
    assert resolve(shown, environ={}) == cfg

"""One way to make a Redis client, for every part that talks to Redis (the ingest source, the prototype
store, ``streamssl ingest`` and ``status``): the same URL check, timeouts and TLS options everywhere, and one
answer to "is this error our credentials?" (a configuration error, never retried as if transient).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis
from redis import exceptions as redis_errors

from streamssl.urls import SourceError, check_redis_url, redact


@dataclass(frozen=True)
class TLSFiles:
    """``rediss://`` only: the CA bundle that signed the server's certificate (empty: the system store) and
    the client certificate and key for mutual TLS (empty: none)."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    @classmethod
    def of(cls, store_cfg: Any) -> TLSFiles:
        """The TLS files of a ``StoreConfig`` (they serve the ingest stream too)."""
        return cls(store_cfg.tls_ca_file, store_cfg.tls_cert_file, store_cfg.tls_key_file)


NO_TLS = TLSFiles()


def connect(url: str, *, what: str = "Redis URL", socket_timeout_s: float | None = None,
            connect_timeout_s: float = 5.0, tls: TLSFiles = NO_TLS, **kwargs: Any) -> redis.Redis:
    """A client for a ``redis://`` or ``rediss://`` URL (password or user:password in it). Nothing connects
    here; ``kwargs`` go to ``redis.Redis`` (``decode_responses``, ``retry``)."""
    check_redis_url(url, what)
    options: dict[str, Any] = {"socket_timeout": socket_timeout_s, "socket_connect_timeout": connect_timeout_s,
                               **kwargs}
    if url.startswith("rediss://"):
        for key, value in (("ssl_ca_certs", tls.ca_file), ("ssl_certfile", tls.cert_file),
                           ("ssl_keyfile", tls.key_file)):
            if value:
                options[key] = value
    try:
        return redis.Redis.from_url(url, **options)
    except ValueError as exc:  # a malformed URL; redis-py's message carries no password
        raise SourceError(f"{what} {redact(url)!r}: {exc}") from None


AUTH_ERRORS = (redis_errors.AuthenticationError, redis_errors.AuthorizationError, redis_errors.NoPermissionError)


def is_auth_error(exc: BaseException) -> bool:
    """Whether Redis refused our credentials or rights: wrong or missing password, unknown user, no ACL right.
    (redis-py raises some of these as plain ``ResponseError`` or ``ConnectionError`` with the server's word.)"""
    if isinstance(exc, AUTH_ERRORS):
        return True
    text = str(exc)
    return isinstance(exc, redis_errors.RedisError) and (
        text.startswith(("NOAUTH", "WRONGPASS", "NOPERM", "Authentication required", "invalid username-password"))
        or "must be called with the client already authenticated" in text)


def auth_hint(url: str) -> str:
    return (f"Redis at {redact(url)} refused our credentials: check the password (redis://:PASSWORD@host:port/db "
            "or redis://USER:PASSWORD@...) and the user's ACL rights")


__all__ = ["AUTH_ERRORS", "NO_TLS", "TLSFiles", "auth_hint", "connect", "is_auth_error"]

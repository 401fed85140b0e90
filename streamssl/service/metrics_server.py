"""The HTTP side of the metrics: ``/metrics`` (the registry's exposition) and ``/healthz`` (``Metrics.health``)
from a daemon thread, and a bind failure told as the configuration error it is."""

from __future__ import annotations

import errno
import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from streamssl.errors import UsageError
from streamssl.service.metrics import Metrics

log = logging.getLogger("streamssl.service.metrics")


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a slow scraper never blocks shutdown


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsBindError(UsageError, OSError):
    """The metrics server cannot bind its address: a configuration error (metrics.host, metrics.port)."""


def _bind_hint(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
        return ("metrics.host is not an address of this machine: use 127.0.0.1, 0.0.0.0 for every interface, or "
                "one of the machine's own addresses")
    if exc.errno == errno.EADDRINUSE:
        return "another process (another run?) holds the port: set metrics.port=0 for a free one, or -1 for none"
    if exc.errno == errno.EACCES:
        return "ports below 1024 need privileges: use a higher metrics.port"
    return "set metrics.port=0 for a free port, or -1 for no metrics server"


class MetricsServer:
    """Serves ``/metrics`` (the registry's exposition) and ``/healthz`` from a daemon thread; 404 elsewhere.

    Starts at construction. Args:
        metrics: the run's metrics (read for /healthz).
        registry: the registry to expose (the one ``metrics`` is registered on, plus any other collectors).
        host: address to bind to (127.0.0.1 by default in the config; 0.0.0.0 or :: to expose it).
        port: port to bind to; 0 picks a free one (see ``.port``).
        stall_s: /healthz answers 503 when no step completed for this long.
    """

    def __init__(self, metrics: Metrics, registry: CollectorRegistry, *, host: str, port: int,
                 stall_s: float) -> None:
        handler = _handler(metrics, registry, stall_s)
        server_cls = _Server6 if ":" in host else _Server
        try:
            self._server = server_cls((host, port), handler)
        except OSError as exc:
            raise MetricsBindError(f"cannot serve metrics on {host}:{port} ({exc}): {_bind_hint(exc)}") from None
        self.host = host
        self.port: int = self._server.server_address[1]
        self._closed = False
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="streamssl-metrics", daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) actually bound."""
        return self._server.server_address[0], self.port

    def close(self) -> None:
        """Stop serving and release the port. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _handler(metrics: Metrics, registry: CollectorRegistry, stall_s: float) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "streamssl-metrics"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                self._reply(200, encoder(registry), content_type)
            elif path == "/healthz":
                healthy, body = metrics.health(stall_s)
                self._reply(200 if healthy else 503, json.dumps(body).encode() + b"\n", "application/json")
            else:
                self._reply(404, b"not found: try /metrics or /healthz\n", "text/plain; charset=utf-8")

        def _reply(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("%s " + fmt, self.address_string(), *args)  # scrapes every 15 s: not worth INFO

    return Handler


__all__ = ["MetricsBindError", "MetricsServer"]

"""A real Prometheus (the ``prometheus`` binary) scraping a running daemon: the scrape config works, the
streamssl series arrive, and the project's alert rules (ops/prometheus/alerts.yml) load and evaluate
against them. promtool's unit tests of the rules (tests/test_ops.py) feed synthetic series; this one does
not. Skips only where the binary is absent (CI installs it).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.test_daemon import DaemonProcess

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "ops" / "prometheus" / "alerts.yml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(base: str, path: str, **params: str) -> Any:
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=5) as reply:
        body = json.loads(reply.read())
    assert body["status"] == "success", body
    return body["data"]


def poll(what: str, timeout_s: float, probe, log: Path) -> Any:
    """``probe()`` until it returns something true; on time out, fail naming ``what`` with Prometheus' log."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            found = probe()
            if found:
                return found
            last = "not yet"
        except OSError as exc:  # not listening yet
            last = exc
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what} (last: {last}); prometheus log tail:\n"
                f"{log.read_text()[-2000:] if log.exists() else '(none)'}")


@pytest.mark.slow
def test_prometheus_scrapes_a_running_daemon_and_evaluates_the_alert_rules(
        tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("no prometheus binary (Debian: apt-get install prometheus)")
    d = DaemonProcess(tmp_path, "run.max_steps=0", "checkpoint.every_steps=1000")  # the embedded demo stream
    daemons.append(d)
    target = re.match(r"http://([^/]+)/metrics", d.metrics_url()).group(1)  # type: ignore[union-attr]

    config = tmp_path / "prometheus.yml"
    config.write_text(f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - {json.dumps(str(ALERTS))}
scrape_configs:
  - job_name: streamssl
    metrics_path: /metrics
    static_configs:
      - targets: [{json.dumps(target)}]
""")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "prometheus.log"
    with log.open("w") as out:
        prom = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"], stdout=out, stderr=subprocess.STDOUT)
    try:
        poll("Prometheus to be ready", 30, lambda: urllib.request.urlopen(f"{base}/-/ready", timeout=2).status == 200,
             log)
        up = poll("the daemon's target to be up", 30,
                  lambda: api(base, "/api/v1/query", query='up{job="streamssl"} == 1')["result"], log)
        assert up[0]["metric"]["instance"] == target
        steps = poll("streamssl_learner_steps_total to reach Prometheus", 30,
                     lambda: api(base, "/api/v1/query", query="streamssl_learner_steps_total")["result"], log)
        assert float(steps[0]["value"][1]) >= 0 and steps[0]["metric"]["job"] == "streamssl"

        names = set(re.findall(r"^\s*- alert: (\w+)", ALERTS.read_text(), re.M))
        assert len(names) >= 5
        scraped_at = time.time()

        def evaluated() -> dict[str, dict[str, Any]] | None:
            rules = {r["name"]: r for g in api(base, "/api/v1/rules")["groups"] for r in g["rules"]}
            done = all(_timestamp(r.get("lastEvaluation", "")) > scraped_at for r in rules.values())
            return rules if rules.keys() == names and done else None

        rules = poll("every alert rule evaluated after the first scrape", 30, evaluated, log)
        for name, rule in rules.items():
            assert rule["health"] == "ok", (name, rule.get("lastError"))
        assert rules["StreamsslDown"]["state"] == "inactive"  # up == 1: its expression saw the live target
        stalled = api(base, "/api/v1/query", query="time() - streamssl_daemon_start_timestamp_seconds")["result"]
        assert stalled and 0 <= float(stalled[0]["value"][1]) < 600  # the series the time-based rules use
    finally:
        prom.send_signal(signal.SIGTERM)
        try:
            prom.wait(timeout=20)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait(timeout=10)
    d.proc.send_signal(signal.SIGTERM)
    assert d.wait(120) == 0, d.output


def _timestamp(text: str) -> float:
    """Seconds since the epoch of Prometheus' RFC 3339 times (nanoseconds cut to microseconds)."""
    from datetime import datetime

    match = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", text)
    if match is None:
        return 0.0
    fraction = (match.group(2) or ".0")[:7]
    zone = "+00:00" if match.group(3) == "Z" else match.group(3)
    return datetime.fromisoformat(f"{match.group(1)}{fraction}{zone}").timestamp()

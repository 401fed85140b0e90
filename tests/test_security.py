"""Security, end to end: Redis AUTH (a requirepass password and an ACL user) over TLS with certificates made
here (a CA, a server and a client certificate: mutual TLS) for the prototype store, the ingest source and a
daemon using both; credentials never in logs, ``streamssl status`` or /metrics; no pickle anywhere;
``pipe:`` refused and the metrics server on 127.0.0.1 unless asked otherwise.

(The plain-TCP AUTH cases and the server-only TLS case of the store are in tests/test_store.py; the
source's password and refused URLs in tests/test_source.py.)
"""

from __future__ import annotations

import ast
import logging
import re
import shutil
import signal
import socket
import subprocess
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import redis
from typer.testing import CliRunner

from streamssl.config import MetricsConfig, SourceConfig, resolve
from streamssl.config.layers import find_profile
from streamssl.redis_client import TLSFiles
from streamssl.store import RedisPrototypeStore, StoreAuthError, StoreUnavailable
from streamssl.stream.redis_source import RedisAuthError, RedisStreamSource, SourceUnavailable, publish_urls
from streamssl.stream.shards import read_shard
from tests.test_daemon import DaemonProcess, make_shards, wait_for
from tests.test_source import write_shard
from tests.test_store import protos, spawn_redis  # noqa: F401 (spawn_redis: a fixture)

ROOT = Path(__file__).resolve().parent.parent
STORE_PW, LEARNER_PW = "store-pw-Zq81", "learner-pw-Xk27"


def _openssl(*args: str) -> None:
    done = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        pytest.skip(f"openssl {args[0]} failed: {done.stderr[-300:]}")


@pytest.fixture
def certs(tmp_path: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, both signed by the CA."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make certificates")
    d = tmp_path / "tls"
    d.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "ca.key"), "-out",
             str(d / "ca.pem"), "-days", "1", "-subj", "/CN=streamssl test CA")
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, subject in (("server", "/CN=127.0.0.1"), ("client", "/CN=learner")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / f"{name}.key"), "-out",
                 str(d / f"{name}.csr"), "-subj", subject)
        extra = ["-extfile", str(d / "server.ext")] if name == "server" else []
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"), "-CAkey",
                 str(d / "ca.key"), "-CAcreateserial", "-out", str(d / f"{name}.pem"), "-days", "1", *extra)
    return {"ca": d / "ca.pem", "server": d / "server.pem", "server_key": d / "server.key",
            "client": d / "client.pem", "client_key": d / "client.key"}


@pytest.fixture
def tls_redis(spawn_redis, certs: dict[str, Path]) -> tuple[int, TLSFiles]:  # noqa: F811
    """A redis-server speaking TLS only, asking for client certificates, with a requirepass password and an
    ACL user ``learner`` allowed the ``streamssl:*`` keys alone."""
    port = spawn_redis("--tls-cert-file", str(certs["server"]), "--tls-key-file", str(certs["server_key"]),
                       "--tls-ca-cert-file", str(certs["ca"]), "--tls-auth-clients", "yes",
                       "--requirepass", STORE_PW, tls=True)
    tls = TLSFiles(str(certs["ca"]), str(certs["client"]), str(certs["client_key"]))
    admin = redis.Redis(host="127.0.0.1", port=port, password=STORE_PW, ssl=True, ssl_ca_certs=tls.ca_file,
                        ssl_certfile=tls.cert_file, ssl_keyfile=tls.key_file)
    admin.acl_setuser("learner", enabled=True, passwords=[f"+{LEARNER_PW}"], keys=["streamssl:*"],
                      commands=["+@all"])
    admin.close()
    return port, tls


def store_url(port: int, userinfo: str = f":{STORE_PW}") -> str:
    return f"rediss://{userinfo}@127.0.0.1:{port}/0"


# --------------------------------------------------------------------------------------------- the store


def test_the_store_over_mutual_tls_as_an_acl_user(tls_redis) -> None:
    port, tls = tls_redis
    files = {"tls_ca_file": tls.ca_file, "tls_cert_file": tls.cert_file, "tls_key_file": tls.key_file}
    owner = RedisPrototypeStore(store_url(port), **files)  # the default user, by requirepass
    assert owner.write(protos(0), 1, expected_version=None) == 1
    learner = RedisPrototypeStore(store_url(port, f"learner:{LEARNER_PW}"), **files)
    np.testing.assert_array_equal(learner.read()[0], protos(0))  # type: ignore[index]
    assert learner.write(protos(1), 2, expected_version=1) == 2
    with pytest.raises(StoreAuthError) as refused:  # outside its keys
        RedisPrototypeStore(store_url(port, f"learner:{LEARNER_PW}"), prefix="other", **files).read()
    with pytest.raises(StoreAuthError) as wrong:
        RedisPrototypeStore(store_url(port, "learner:wrong-pw-Vb55"), **files).read()
    with pytest.raises(StoreUnavailable):  # no client certificate: the handshake fails
        RedisPrototypeStore(store_url(port), tls_ca_file=tls.ca_file, socket_timeout_s=2).read()
    for err in (refused, wrong):
        assert LEARNER_PW not in str(err.value) and "wrong-pw-Vb55" not in str(err.value)


# --------------------------------------------------------------------------------------------- the source


def next_url(source: RedisStreamSource) -> str | None:
    for url in source:
        if url is not None:
            return url
    return None


def test_the_source_over_mutual_tls_with_a_password_and_an_acl_user(tls_redis, tmp_path: Path) -> None:
    port, tls = tls_redis
    shard = str(write_shard(tmp_path / "a.tar", 2))
    publish_urls(store_url(port), [shard], tls=tls)  # the producer: the default user's password
    source = RedisStreamSource(store_url(port, f"learner:{LEARNER_PW}"), consumer="c1", poll_s=0.05, tls=tls)
    assert next_url(source) == shard
    assert [s.key for _, s in read_shard(shard) if s is not None] == ["k000", "k001"]
    source.mark_done(shard)
    assert source.pending_count() == 0
    source.close()

    admin = redis.Redis(host="127.0.0.1", port=port, password=STORE_PW, ssl=True, ssl_ca_certs=tls.ca_file,
                        ssl_certfile=tls.cert_file, ssl_keyfile=tls.key_file)
    admin.acl_setuser("outsider", enabled=True, passwords=["+outsider-pw-Hh90"], keys=["other:*"],
                      commands=["+@all"])
    admin.close()
    for userinfo in ("outsider:outsider-pw-Hh90", "learner:wrong-pw-Vb55", ":wrong-pw-Vb55"):
        refused = RedisStreamSource(store_url(port, userinfo), consumer="c2", poll_s=0.05, tls=tls)
        with pytest.raises(RedisAuthError, match="refused our credentials") as err:
            next_url(refused)
        assert err.value.exit_code == 2
        assert "pw-Hh90" not in str(err.value) and "wrong-pw" not in str(err.value)
    with pytest.raises(SourceUnavailable, match=r"(?i)certificate|ssl|tls") as err:  # no client certificate
        publish_urls(store_url(port), [shard], tls=TLSFiles(tls.ca_file))
    assert STORE_PW not in str(err.value)


# --------------------------------------------------------------------------------------------- credentials


def test_credentials_never_reach_the_logs(tmp_path: Path, caplog) -> None:
    """Every failure path that logs a URL: a Redis source and a store that cannot connect, an http shard that
    fails (curl's own message quotes the URL), a refused shard URL."""
    from streamssl.store import BackgroundWriter

    caplog.set_level(logging.DEBUG)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # nothing listens here once the socket closes
    source = RedisStreamSource(f"redis://learner:{LEARNER_PW}@127.0.0.1:{dead}/0", poll_s=0.05, max_backoff_s=0.05)
    reader = threading.Thread(target=lambda: next(iter(source), None), daemon=True)
    reader.start()
    writer = BackgroundWriter(RedisPrototypeStore(f"redis://:{STORE_PW}@127.0.0.1:{dead}/0", socket_timeout_s=0.5),
                              min_backoff_s=0.05, max_backoff_s=0.1)
    writer.submit(protos(0), 1)
    bad: list[str] = []
    for url in (f"http://learner:{LEARNER_PW}@127.0.0.1:{dead}/x.tar",
                f"s3://learner:{LEARNER_PW}@bucket/x.tar", f"pipe:curl -s https://u:{STORE_PW}@h/x.tar"):
        list(read_shard(url, on_bad=bad.append))
    wait_for(lambda: writer.n_failures >= 1 and source.n_reconnects >= 1, 30, "the failures to be logged")
    source.close()
    writer.close()
    reader.join(timeout=10)
    assert bad == ["shard_error", "refused_url", "refused_url"]
    text = caplog.text
    assert "127.0.0.1" in text and "x.tar" in text  # the failures were logged ...
    assert LEARNER_PW not in text and STORE_PW not in text  # ... without the passwords


@pytest.mark.slow
def test_a_daemon_on_tls_redis_keeps_its_credentials_out_of_output_status_and_metrics(
        tmp_path: Path, tls_redis, daemons: list[DaemonProcess]) -> None:
    """``streamssl run`` with the store (requirepass) and the ingest source (an ACL user) on one mutual-TLS
    Redis: it trains on the published shards, and neither its output, nor /metrics, nor ``streamssl
    status`` (text and JSON, with the right and with a wrong password) shows a password."""
    port, tls = tls_redis
    shards = make_shards(tmp_path, 2)
    publish_urls(store_url(port), shards, tls=tls)
    tls_sets = [f"store.tls_ca_file={tls.ca_file}", f"store.tls_cert_file={tls.cert_file}",
                f"store.tls_key_file={tls.key_file}"]
    source_url = store_url(port, f"learner:{LEARNER_PW}")
    d = DaemonProcess(tmp_path, f"store.url={store_url(port)}", f'source.urls=["{source_url}"]',
                      "store.every_steps=1", "checkpoint.every_steps=1", *tls_sets)
    daemons.append(d)
    metrics_url = d.metrics_url()
    assert metrics_url.startswith("http://127.0.0.1:")  # the default bind address
    admin = redis.Redis(host="127.0.0.1", port=port, password=STORE_PW, ssl=True, ssl_ca_certs=tls.ca_file,
                        ssl_certfile=tls.cert_file, ssl_keyfile=tls.key_file)
    wait_for(lambda: int(admin.hget("streamssl:prototypes", "step") or 0) >= 2, 240, "two steps in the store")
    wait_for(lambda: admin.xinfo_groups("streamssl:shards")[0]["pending"] == 0, 120, "both shards acknowledged")
    exposition = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    assert "streamssl_learner_steps_total" in exposition

    runner = CliRunner()
    shown = [runner.invoke(app_(), ["status", "--store", store_url(port), *flags,
                                    *[a for s in tls_sets for a in ("--set", s)]]) for flags in ([], ["--json"])]
    assert all(r.exit_code == 0 for r in shown), [r.output for r in shown]
    assert "version" in shown[0].output and '"learners"' in shown[1].output
    wrong = runner.invoke(app_(), ["status", "--store", store_url(port, ":wrong-pw-Vb55"),
                                   *[a for s in tls_sets for a in ("--set", s)]])
    assert wrong.exit_code == 2 and "refused our credentials" in wrong.output
    d.proc.send_signal(signal.SIGTERM)
    assert d.wait(120) == 0, d.output
    assert "stopped after" in d.output and "***" in d.output  # the source named, its password masked
    for where, text in (("daemon output", d.output), ("/metrics", exposition), ("status", shown[0].output),
                        ("status --json", shown[1].output), ("status, wrong password", wrong.output)):
        for secret in (STORE_PW, LEARNER_PW, "wrong-pw-Vb55"):
            assert secret not in text, f"{secret} in {where}"
    admin.close()


def app_():
    from streamssl.cli import app

    return app


# --------------------------------------------------------------------------------------------- pickle


def _package_files() -> list[Path]:
    return sorted([*(ROOT / "streamssl").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")])


def test_no_code_path_loads_pickle() -> None:
    """An AST scan of the package and the benchmarks: no pickle, dill, cloudpickle, joblib or shelve imports,
    no ``numpy.load(allow_pickle=True)``, and every ``torch.load`` call with ``weights_only=True``. It must
    find the checkpoint loader's call, so that it cannot pass by finding nothing."""
    banned = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve"}
    loads, problems = [], []
    for path in _package_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        where = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.module == "torch":
                    names += [f"torch.{a.name}" for a in node.names]
                for name in names:
                    if name.split(".")[0] in banned or name == "torch.load":
                        problems.append(f"{where}:{node.lineno}: imports {name}")
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            keywords = {k.arg: k.value for k in node.keywords}
            owner = node.func.value
            if node.func.attr == "load" and isinstance(owner, ast.Name) and owner.id == "torch":
                loads.append(f"{where}:{node.lineno}")
                flag = keywords.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    problems.append(f"{where}:{node.lineno}: torch.load without weights_only=True")
            flag = keywords.get("allow_pickle")
            if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                problems.append(f"{where}:{node.lineno}: allow_pickle")
            if node.func.attr in ("read_pickle", "to_pickle"):
                problems.append(f"{where}:{node.lineno}: {node.func.attr}")
    assert not problems, problems
    assert any(str(Path("streamssl/service/checkpoint.py")) in call for call in loads), loads


# --------------------------------------------------------------------------------------------- defaults


def test_pipe_urls_stay_refused_by_default() -> None:
    assert SourceConfig().allow_pipe is False
    for profile in sorted((ROOT / "pipelines").glob("*.toml")):
        cfg = resolve(profile, environ={})
        assert cfg.source.allow_pipe is False, profile.name
        with pytest.raises(Exception, match="pipe: URLs run shell commands"):
            resolve(profile, environ={}, overrides=['source.urls=["pipe:curl -s https://h/x.tar"]'])


def _listening_addresses(port: int) -> list[str]:
    """The local addresses of the TCP sockets listening on ``port``, from /proc/net/tcp and tcp6."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.append(socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1])
                             if len(address) == 8 else f"ipv6:{address}")
    return found


def test_the_metrics_server_binds_this_machine_only_by_default() -> None:
    from prometheus_client import CollectorRegistry

    from streamssl.service.metrics import Metrics
    from streamssl.service.metrics_server import MetricsServer

    assert MetricsConfig().host == "127.0.0.1"
    for profile in sorted((ROOT / "pipelines").glob("*.toml")):
        assert resolve(find_profile(profile), environ={}).metrics.host == "127.0.0.1", profile.name
    registry = CollectorRegistry()
    with MetricsServer(Metrics(registry), registry, host=MetricsConfig().host, port=0, stall_s=60) as server:
        assert server.address[0] == "127.0.0.1"
        if Path("/proc/net/tcp").exists():
            assert _listening_addresses(server.port) == ["127.0.0.1"]
        outward = _outward_address()
        if outward is not None:  # another interface of this machine: nothing answers there
            with pytest.raises(OSError), socket.create_connection((outward, server.port), timeout=2):
                pass


def _outward_address() -> str | None:
    """An address of this machine other than loopback, if it has one (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: routing only
            address = probe.getsockname()[0]
    except OSError:
        return None
    return None if re.match(r"127\.", address) else address

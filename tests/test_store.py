"""Prototype store: both implementations against one contract, on a real redis-server (never a mock)."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from streamssl.config import StoreConfig
from streamssl.store import (
    BackgroundWriter,
    CorruptPrototypes,
    LocalPrototypeStore,
    PrototypeMeta,
    PrototypeStore,
    RedisPrototypeStore,
    StoreAuthError,
    StoreUnavailable,
    UnknownVersion,
    VersionConflict,
    format_status,
    open_store,
)

LOGGER = "streamssl.store"


def protos(seed: int, k: int = 16, d: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((k, d)).astype(np.float32)


def wait_for(cond: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=["local", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PrototypeStore]:
    if request.param == "local":
        st: PrototypeStore = LocalPrototypeStore(tmp_path / "store", history=3, writer="w1")
    else:
        server = request.getfixturevalue("redis_server")
        st = RedisPrototypeStore(server.url, prefix="t", history=3, writer="w1")
    yield st
    st.close()


@pytest.fixture
def rstore(redis_server) -> Iterator[RedisPrototypeStore]:
    st = RedisPrototypeStore(redis_server.url, prefix="t", history=3, writer="w1")
    yield st
    st.close()


# --------------------------------------------------------------------------------------------- contract


def test_store_is_a_leaf_without_torch() -> None:
    code = ("import sys, streamssl.store; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('streamssl.learner.engine', "
            "'streamssl.service.daemon', 'streamssl.service.metrics', 'streamssl.config', 'prometheus_client'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_round_trip_values_shape_dtype_and_meta(store: PrototypeStore) -> None:
    assert isinstance(store, PrototypeStore)
    assert store.read() is None and store.meta() is None and store.history() == []
    arr = protos(0, 32, 5)
    t0 = time.time()
    version = store.write(arr, 100, expected_version=0)
    got = store.read()
    assert got is not None
    out, meta = got
    assert version == 1 and out.dtype == np.float32 and out.shape == (32, 5)
    np.testing.assert_array_equal(out, arr)
    assert isinstance(meta, PrototypeMeta)
    assert (meta.version, meta.step, meta.shape, meta.dtype, meta.writer) == (1, 100, (32, 5), "<f4", "w1")
    assert meta.checksum.startswith("sha256:") and t0 - 1 <= meta.written_at <= time.time() + 1
    assert store.meta() == meta
    out[0, 0] = 123.0  # the returned array is the caller's own
    np.testing.assert_array_equal(store.read()[0], arr)  # type: ignore[index]


def test_float64_and_torch_inputs_are_stored_as_float32(store: PrototypeStore) -> None:
    torch = pytest.importorskip("torch")
    store.write(protos(1).astype(np.float64), 1, expected_version=None)
    assert store.read()[0].dtype == np.float32  # type: ignore[index]
    t = torch.randn(4, 3, dtype=torch.bfloat16)
    store.write(t, 2, expected_version=None)
    np.testing.assert_array_equal(store.read()[0], t.float().numpy())  # type: ignore[index]


def test_write_rejects_non_matrices_and_non_finite(store: PrototypeStore) -> None:
    with pytest.raises(ValueError, match="K, D"):
        store.write(np.zeros(5, np.float32), 1, expected_version=None)
    with pytest.raises(ValueError, match="NaN"):
        store.write(np.full((2, 2), np.nan, np.float32), 1, expected_version=None)
    assert store.meta() is None


def test_versions_increment_and_compare_and_set(store: PrototypeStore) -> None:
    assert [store.write(protos(i), i, expected_version=i) for i in range(4)] == [1, 2, 3, 4]
    with pytest.raises(VersionConflict) as info:
        store.write(protos(9), 9, expected_version=2)
    assert (info.value.expected, info.value.actual) == (2, 4) and "expected version 2, found 4" in str(info.value)
    meta = store.meta()
    assert meta is not None and (meta.version, meta.step) == (4, 3)  # the losing write changed nothing
    assert store.write(protos(9), 9, expected_version=None) == 5  # None: unconditional


def test_history_is_capped_and_readable(store: PrototypeStore) -> None:
    arrays = {v: protos(v) for v in range(1, 7)}
    for v, arr in arrays.items():
        assert store.write(arr, v * 10, expected_version=None) == v
    hist = store.history()
    assert [m.version for m in hist] == [6, 5, 4, 3]  # the current one and history=3 earlier ones
    assert [m.step for m in hist] == [60, 50, 40, 30]
    for v in (3, 4, 6):
        out, meta = store.read(version=v)  # type: ignore[misc]
        np.testing.assert_array_equal(out, arrays[v])
        assert meta.version == v and meta.step == v * 10
    with pytest.raises(UnknownVersion, match="version 2"):
        store.read(version=2)
    with pytest.raises(UnknownVersion):
        store.read(version=7)


def test_redis_history_keys_are_pruned(redis_server) -> None:
    client = redis.Redis.from_url(redis_server.url)
    st = RedisPrototypeStore(redis_server.url, prefix="h", history=2)
    for i in range(5):
        st.write(protos(i), i, expected_version=None)
    assert sorted(client.keys("h:*")) == [b"h:prototypes", b"h:prototypes:history", b"h:prototypes:v:3",
                                          b"h:prototypes:v:4"]
    assert client.lrange("h:prototypes:history", 0, -1) == [b"4", b"3"]
    st0 = RedisPrototypeStore(redis_server.url, prefix="h", history=0)  # shrinking the history drops it
    assert st0.write(protos(9), 9, expected_version=5) == 6
    assert sorted(client.keys("h:*")) == [b"h:prototypes"]
    assert [m.version for m in st0.history()] == [6]


def test_local_history_files_are_pruned(tmp_path: Path) -> None:
    st = LocalPrototypeStore(tmp_path, history=1)
    for i in range(4):
        st.write(protos(i), i, expected_version=None)
    assert sorted(p.name for p in tmp_path.glob("prototypes-*")) == ["prototypes-v000000000003.bin",
                                                                     "prototypes-v000000000004.bin"]
    assert not list(tmp_path.glob(".*.tmp"))  # no temp files left behind


def test_local_compare_and_set_between_two_instances(tmp_path: Path) -> None:
    a, b = LocalPrototypeStore(tmp_path, writer="a"), LocalPrototypeStore(tmp_path, writer="b")
    assert a.write(protos(0), 1, expected_version=0) == 1
    assert b.write(protos(1), 2, expected_version=1) == 2
    with pytest.raises(VersionConflict):
        a.write(protos(2), 3, expected_version=1)
    assert a.meta().writer == "b"  # type: ignore[union-attr]


def test_redis_layout_is_raw_float32_bytes_never_pickle(rstore: RedisPrototypeStore, redis_server) -> None:
    arr = protos(3, 7, 3)
    rstore.write(arr, 42, expected_version=None)
    client = redis.Redis.from_url(redis_server.url)
    assert client.type("t:prototypes") == b"hash"
    fields = client.hgetall("t:prototypes")
    assert set(fields) == {b"data", b"shape", b"dtype", b"version", b"step", b"written_at", b"writer", b"checksum"}
    assert fields[b"data"] == arr.astype("<f4").tobytes() and len(fields[b"data"]) == 7 * 3 * 4
    assert not fields[b"data"].startswith(b"\x80")  # no pickle protocol header
    assert json.loads(fields[b"shape"]) == [7, 3] and fields[b"dtype"] == b"<f4"
    assert fields[b"version"] == b"1" and fields[b"step"] == b"42" and fields[b"writer"] == b"w1"
    rstore.heartbeat("node*[1]", {"step": 42}, ttl_s=30)  # glob characters in an id are harmless
    assert 0 < client.pttl("t:learner:node*[1]") <= 30_000  # SET with PX: Redis expires it
    assert json.loads(client.get("t:learner:node*[1]"))["info"] == {"step": 42}
    assert [e["learner_id"] for e in rstore.learners()] == ["node*[1]"]


@pytest.mark.parametrize(("field", "value", "match"), [
    ("data", lambda d: d[:-1] + bytes([d[-1] ^ 1]), "checksum"),
    ("checksum", lambda d: b"sha256:" + b"0" * 64, "checksum"),
    ("shape", lambda d: b"[3, 3]", "bytes, but shape"),
    ("shape", lambda d: b"[21]", "not \\[K, D\\]"),
    ("shape", lambda d: b"pickle", "malformed"),
    ("dtype", lambda d: b"<f8", "dtype"),
    ("data", lambda d: d + b"\0\0\0\0", "bytes, but shape"),
    ("version", lambda d: b"x", "malformed"),
])
def test_redis_tampered_hash_is_corrupt(rstore: RedisPrototypeStore, redis_server, field, value, match) -> None:
    rstore.write(protos(4, 7, 3), 1, expected_version=None)
    client = redis.Redis.from_url(redis_server.url)
    client.hset("t:prototypes", field, value(client.hget("t:prototypes", "data")))
    with pytest.raises(CorruptPrototypes, match=match):
        rstore.read()


def test_redis_missing_field_is_corrupt(rstore: RedisPrototypeStore, redis_server) -> None:
    rstore.write(protos(4), 1, expected_version=None)
    redis.Redis.from_url(redis_server.url).hdel("t:prototypes", "checksum")
    with pytest.raises(CorruptPrototypes, match="'checksum' is missing"):
        rstore.read()


def _flip_last_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x40
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(("tamper", "match"), [
    (_flip_last_byte, "checksum"),
    (lambda p: p.write_bytes(p.read_bytes()[:-3]), "bytes, but shape"),
    (lambda p: p.write_bytes(p.read_bytes().replace(b'"shape": [16, 8]', b'"shape": [8, 8]', 1)), "bytes, but"),
    (lambda p: p.write_bytes(p.read_bytes().replace(b'"<f4"', b'"<f8"', 1)), "dtype"),
    (lambda p: p.write_bytes(b"\x80\x04garbage"), "magic"),
    (lambda p: p.write_bytes(p.read_bytes().replace(b'"version": 1', b'"version": 7', 1)), "says version"),
])
def test_local_tampered_file_is_corrupt(tmp_path: Path, tamper, match) -> None:
    st = LocalPrototypeStore(tmp_path)
    arr = protos(5)
    st.write(arr, 1, expected_version=None)
    path = tmp_path / "prototypes-v000000000001.bin"
    # the file is a text header and the raw bytes, nothing else
    assert path.read_bytes().endswith(arr.astype("<f4").tobytes())
    tamper(path)
    with pytest.raises(CorruptPrototypes, match=match):
        st.read()


# --------------------------------------------------------------------------------------------- heartbeats, status


def test_heartbeats_expire(store: PrototypeStore) -> None:
    store.heartbeat("learner-a", {"step": 5, "images_per_s": 12.5, "host": "h"}, ttl_s=0.4)
    store.heartbeat("learner-b", {"step": 7}, ttl_s=30)
    live = store.learners()
    assert [e["learner_id"] for e in live] == ["learner-a", "learner-b"]
    assert live[0]["info"] == {"step": 5, "images_per_s": 12.5, "host": "h"}
    assert 0 <= live[0]["heartbeat_age_s"] < 5 and live[1]["expires_in_s"] > 20
    wait_for(lambda: [e["learner_id"] for e in store.learners()] == ["learner-b"], 5, "learner-a to expire")
    store.heartbeat("learner-a", {"step": 6}, ttl_s=30)  # it comes back
    assert [e["info"]["step"] for e in store.learners()] == [6, 7]


def test_local_heartbeat_ids_cannot_escape_the_folder(tmp_path: Path) -> None:
    st = LocalPrototypeStore(tmp_path / "s")
    st.heartbeat("../../evil/x", {"step": 1}, ttl_s=30)
    st.heartbeat("a/b", {"step": 2}, ttl_s=30)
    st.heartbeat("a_b", {"step": 3}, ttl_s=30)  # sanitises like "a/b" but stays distinct
    assert [p.parent for p in tmp_path.rglob("*.json")] == [tmp_path / "s"] * 3
    assert sorted(e["learner_id"] for e in st.learners()) == ["../../evil/x", "a/b", "a_b"]


def test_heartbeat_info_must_be_json(store: PrototypeStore) -> None:
    with pytest.raises(TypeError, match="JSON"):
        store.heartbeat("x", {"step": object()}, ttl_s=1)  # type: ignore[dict-item]


def test_checkpoint_record(store: PrototypeStore) -> None:
    assert store.last_checkpoint() is None
    store.record_checkpoint({"path": "ckpt/step-100.pt", "step": 100, "time": time.time()})
    store.record_checkpoint({"path": "ckpt/step-200.pt", "step": 200, "time": time.time()})
    last = store.last_checkpoint()
    assert last is not None and last["path"] == "ckpt/step-200.pt" and last["step"] == 200


def test_status_and_format_status(store: PrototypeStore) -> None:
    empty = store.status()
    assert empty["prototypes"] is None and empty["learners"] == [] and empty["last_checkpoint"] is None
    text = format_status(empty)
    assert "none written yet" in text and "0 live" in text and "none recorded" in text
    store.write(protos(0, 64, 8), 500, expected_version=None)
    store.write(protos(1, 64, 8), 600, expected_version=None)
    store.heartbeat("gpu-node-1:4242", {"step": 600, "images_per_s": 190.25}, ttl_s=30)
    store.record_checkpoint({"path": "runs/x/ckpt-600.pt", "step": 600, "time": time.time() - 30})
    status = store.status()
    json.dumps(status)  # JSON-able
    proto = status["prototypes"]
    assert (proto["version"], proto["step"], proto["shape"], proto["writer"]) == (2, 600, [64, 8], "w1")
    assert 0 <= proto["age_s"] < 10 and status["history"] == [2, 1]
    assert status["learners"][0]["learner_id"] == "gpu-node-1:4242"
    assert status["learners"][0]["info"]["images_per_s"] == 190.25
    assert status["last_checkpoint"]["step"] == 600 and 29 <= status["last_checkpoint"]["age_s"] < 40
    text = format_status(status)
    assert "version 2, step 600, 64 x 8 float32" in text
    assert "gpu-node-1:4242" in text and "images_per_s=190.2" in text and "1 live" in text
    assert "runs/x/ckpt-600.pt, step 600" in text and "2 version(s) readable: 2, 1" in text


# --------------------------------------------------------------------------------------------- connection


def test_open_store_picks_the_implementation(tmp_path: Path) -> None:
    local = open_store(StoreConfig(url="", history=4), local_dir=str(tmp_path))
    assert isinstance(local, LocalPrototypeStore) and local.history_len == 4
    remote = open_store(StoreConfig(url="redis://:s3cret@127.0.0.1:1/0", prefix="p", history=2),
                        local_dir=str(tmp_path))
    assert isinstance(remote, RedisPrototypeStore) and remote.key == "p:prototypes" and remote.history_len == 2
    assert "s3cret" not in remote.location and "***" in remote.location
    with pytest.raises(ValueError, match="redis://"):
        open_store(StoreConfig(url="http://127.0.0.1:1/"), local_dir=str(tmp_path))


def test_unreachable_redis_is_a_clear_quick_error() -> None:
    st = RedisPrototypeStore(f"redis://:pw@127.0.0.1:{free_port()}/0", socket_timeout_s=1.0)  # no connect here
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable, match="unreachable while writing prototypes") as info:
        st.write(protos(0), 1, expected_version=None)
    assert time.monotonic() - t0 < 5 and "pw@" not in str(info.value)
    for call in (st.read, st.status, st.learners):
        with pytest.raises(StoreUnavailable):
            call()


@pytest.fixture
def spawn_redis(tmp_path: Path) -> Iterator[Callable[..., int]]:
    """Start extra redis-servers with arguments of the test's choosing; returns the port."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no redis-server on PATH")
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(*args: str, tls: bool = False) -> int:
        port = free_port()
        port_args = ["--port", "0", "--tls-port", str(port)] if tls else ["--port", str(port)]
        proc = subprocess.Popen([binary, *port_args, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                 "--dir", str(tmp_path), "--loglevel", "warning", *args],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return port
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.skip(f"redis-server with {' '.join(args)} did not start")
                time.sleep(0.05)

    yield spawn
    for proc in procs:
        proc.kill()
        proc.wait(timeout=10)


def test_auth_password_and_acl_user(spawn_redis) -> None:
    port = spawn_redis("--requirepass", "right-pw")
    ok = RedisPrototypeStore(f"redis://:right-pw@127.0.0.1:{port}/0")
    assert ok.write(protos(0), 1, expected_version=0) == 1
    admin = redis.Redis(port=port, password="right-pw")
    admin.acl_setuser("learner", enabled=True, passwords=["+user-pw"], keys=["streamssl:*"], commands=["+@all"])
    user = RedisPrototypeStore(f"redis://learner:user-pw@127.0.0.1:{port}/0")
    assert user.read()[1].version == 1  # type: ignore[index]
    for url in (f"redis://:wrong-pw@127.0.0.1:{port}/0", f"redis://learner:wrong-pw@127.0.0.1:{port}/0",
                f"redis://127.0.0.1:{port}/0"):
        with pytest.raises(StoreAuthError, match="refused our credentials") as info:
            RedisPrototypeStore(url).read()
        assert "wrong-pw" not in str(info.value)
    other = RedisPrototypeStore(f"redis://learner:user-pw@127.0.0.1:{port}/0", prefix="forbidden")
    with pytest.raises(StoreAuthError):  # the ACL does not grant these keys
        other.write(protos(0), 1, expected_version=None)


def test_rediss_url_configures_tls() -> None:
    st = RedisPrototypeStore("rediss://:pw@127.0.0.1:6390/0", tls_ca_file="ca.pem", tls_cert_file="c.pem",
                             tls_key_file="k.pem")
    pool = st._client.connection_pool
    assert issubclass(pool.connection_class, redis.SSLConnection)
    kw = pool.connection_kwargs
    assert (kw["ssl_ca_certs"], kw["ssl_certfile"], kw["ssl_keyfile"]) == ("ca.pem", "c.pem", "k.pem")
    assert kw["password"] == "pw" and kw["socket_timeout"] == 2.0
    assert not issubclass(RedisPrototypeStore("redis://127.0.0.1:6390/0")._client.connection_pool.connection_class,
                          redis.SSLConnection)


def test_rediss_against_a_tls_server(spawn_redis, tmp_path: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                           "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                           "-addext", "subjectAltName=IP:127.0.0.1"], capture_output=True, timeout=30)
    if made.returncode != 0:
        pytest.skip("openssl could not make a certificate")
    port = spawn_redis("--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
                       "--tls-auth-clients", "no", "--requirepass", "tls-pw", tls=True)
    st = RedisPrototypeStore(f"rediss://:tls-pw@127.0.0.1:{port}/0", tls_ca_file=str(cert))
    assert st.write(protos(0), 1, expected_version=None) == 1
    np.testing.assert_array_equal(st.read()[0], protos(0))  # type: ignore[index]
    with pytest.raises(StoreUnavailable):  # a plain-text client cannot talk to it
        RedisPrototypeStore(f"redis://:tls-pw@127.0.0.1:{port}/0", socket_timeout_s=1).read()
    untrusted = RedisPrototypeStore(f"rediss://:tls-pw@127.0.0.1:{port}/0")  # system CAs: our cert is unknown
    with pytest.raises(StoreUnavailable, match=r"(?i)certificate"):
        untrusted.read()


# --------------------------------------------------------------------------------------------- BackgroundWriter


def fast_writer(st: PrototypeStore, **kw) -> BackgroundWriter:
    return BackgroundWriter(st, min_backoff_s=0.05, max_backoff_s=0.2, **kw)


def test_writer_writes_latest_and_reports(store: PrototypeStore) -> None:
    results: list[tuple[bool, float]] = []
    w = fast_writer(store, on_result=lambda ok, s: results.append((ok, s)))
    try:
        arr = protos(0)
        w.submit(arr, 10)
        arr[:] = 0  # submit copied it
        assert w.flush(5)
        out, meta = store.read()  # type: ignore[misc]
        np.testing.assert_array_equal(out, protos(0))
        assert meta.step == 10 and w.n_writes == 1 and w.last_success_step == 10 and w.lag_steps == 0
        assert results and results[0][0] is True and results[0][1] >= 0
        w.heartbeat("me", {"step": 10}, ttl_s=30)
        w.record_checkpoint({"path": "c.pt", "step": 10})
        assert w.flush(5)
        assert [e["learner_id"] for e in store.learners()] == ["me"]
        assert store.last_checkpoint()["path"] == "c.pt"  # type: ignore[index]
        w.submit(np.full((2, 2), np.inf, np.float32), 20)
        assert w.n_rejected == 1 and w.flush(5) and store.meta().step == 10  # type: ignore[union-attr]
        assert w.n_failures == 0 and not w.outage
    finally:
        w.close()


def test_writer_survives_redis_outage_and_catches_up(redis_server, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    st = RedisPrototypeStore(redis_server.url, prefix="o", socket_timeout_s=1.0, writer="me")
    w = fast_writer(st)
    try:
        w.submit(protos(0), 100)
        assert w.flush(5) and st.meta().version == 1  # type: ignore[union-attr]
        redis_server.stop()
        for step in range(110, 200, 10):
            t0 = time.monotonic()
            w.submit(protos(step), step)
            assert time.monotonic() - t0 < 0.5  # never waits for the store (a write would block for the 1 s timeout)
        wait_for(lambda: w.n_failures >= 3, 10, "failed attempts")
        assert w.outage and w.lag_steps == 90 and w.last_success_step == 100 and w.n_writes == 1
        assert not w.flush(0.3)  # cannot write while down; returns after its timeout
        warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "write failed" in warnings[0].getMessage()
        assert "training goes on" in warnings[0].getMessage()
        w.submit(protos(999), 200)
        redis_server.start()  # empty: it keeps nothing
        wait_for(lambda: w.lag_steps == 0 and not w.outage, 10, "catch-up after restart")
        out, meta = st.read()  # type: ignore[misc]
        np.testing.assert_array_equal(out, protos(999))  # the newest submission, not the ones in between
        assert meta.step == 200 and meta.version == 1 and meta.writer == "me"
        assert w.n_conflicts == 0 and w.n_writes == 2
        infos = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.INFO]
        assert sum("writes resumed after a" in m for m in infos) == 1
        assert [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING] == warnings
        w.submit(protos(1), 210)
        assert w.flush(5) and st.meta().version == 2  # type: ignore[union-attr]
    finally:
        w.close()


def test_writer_with_redis_down_at_start(redis_server, caplog) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    redis_server.stop()
    st = RedisPrototypeStore(redis_server.url, prefix="d", socket_timeout_s=1.0)
    w = fast_writer(st)
    try:
        w.heartbeat("me", {"step": 1}, ttl_s=30)
        for step in (1, 2, 3):
            w.submit(protos(step), step)
        wait_for(lambda: w.n_failures >= 2, 10, "failed attempts")
        assert w.outage and w.last_success_step is None and w.lag_steps == 2
        redis_server.start()
        assert w.flush(10)
        assert not w.outage and w.lag_steps == 0 and w.last_success_step == 3
        np.testing.assert_array_equal(st.read()[0], protos(3))  # type: ignore[index]
        assert [e["learner_id"] for e in st.learners()] == ["me"]
        levels = [r.levelno for r in caplog.records if r.name == LOGGER]
        assert levels == [logging.WARNING, logging.INFO]
    finally:
        w.close()


def test_writer_conflict_policy_last_writer_wins(rstore: RedisPrototypeStore, redis_server, caplog) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    w = fast_writer(rstore)
    other = RedisPrototypeStore(redis_server.url, prefix="t", history=3, writer="intruder")
    try:
        w.submit(protos(0), 10)
        assert w.flush(5) and w.last_version == 1
        other.write(protos(50), 50, expected_version=None)  # version 2 from someone else
        w.submit(protos(1), 20)
        assert w.flush(5)
        meta = rstore.meta()
        assert meta is not None and (meta.version, meta.writer, meta.step) == (3, "w1", 20)
        assert w.n_conflicts == 1 and w.n_failures == 0 and w.last_version == 3
        assert rstore.read(version=2)[1].writer == "intruder"  # type: ignore[index]  # kept for rollback
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "intruder" in warnings[0] and "last writer wins" in warnings[0]
        other.write(protos(51), 51, expected_version=None)
        w.submit(protos(2), 30)
        assert w.flush(5) and w.n_conflicts == 2
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1  # once per other writer
    finally:
        w.close()


def test_writer_flush_and_close_on_shutdown(tmp_path: Path) -> None:
    st = LocalPrototypeStore(tmp_path)
    w = fast_writer(st)
    for step in range(5):
        w.submit(protos(step), step)
    assert w.flush(5) and st.meta().step == 4  # type: ignore[union-attr]
    w.close()
    assert not w._thread.is_alive()
    w.submit(protos(9), 9)  # after close: dropped, no error
    assert w.flush(0.1) and st.meta().step == 4  # type: ignore[union-attr]


def test_writer_callback_errors_do_not_escape(tmp_path: Path, caplog) -> None:
    def bad(ok: bool, seconds: float) -> None:
        raise RuntimeError("metrics broke")

    w = fast_writer(LocalPrototypeStore(tmp_path), on_result=bad)
    try:
        w.submit(protos(0), 1)
        assert w.flush(5) and w.n_writes == 1
        assert any("on_result" in r.getMessage() for r in caplog.records)
    finally:
        w.close()

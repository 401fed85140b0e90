"""Every command fed a mistake answers with one ``error:`` line (exit 2 for usage and configuration errors, 1 for
run-time failures), never a traceback; ``--debug`` shows the traceback instead."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from streamssl.cli import app

runner = CliRunner()
TINY = ["model.arch=resnet18", "model.hidden_dim=32", "model.out_dim=16", "model.n_prototypes=16",
        "learner.batch_size=8", "augment.sizes=[24,12]", "metrics.port=-1", "run.max_steps=2"]


def sets(*items: str) -> list[str]:
    return [x for item in items for x in ("--set", item)]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_error_line(result, code: int, says: str) -> None:
    err = result.stderr
    assert result.exit_code == code, (result.exit_code, err, result.output[-500:])
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert says in err, err


def run_args(tmp_path: Path, *items: str) -> list[str]:
    return ["run", *sets(*TINY, f"checkpoint.dir={tmp_path / 'run'}", *items)]


@pytest.mark.parametrize(("items", "says"), [
    (("source.urls=['/nonexistent/shard-*.tar']",), "match no shard"),
    (("source.urls=['/nonexistent/folder']",), "none of the 1 shards exists"),
    (("source.urls=['pipe:cat a.tar']",), "pipe: URLs run shell commands"),
    (("source.urls=['ftp://host/a.tar']",), "scheme 'ftp' is not allowed"),
    (("store.url=http://x",), "store.url 'http://x': expected redis://"),
    (("source.urls=[\"a\",",), "does not parse as a TOML value"),
    (("checkpoint.dir=",), "checkpoint.dir: empty"),
    (("metrics.port=0", "metrics.host=256.1.1.1"), "not an address of this machine"),
])
def test_run_configuration_mistakes(tmp_path: Path, items: tuple[str, ...], says: str) -> None:
    one_error_line(runner.invoke(app, run_args(tmp_path, *items)), 2, says)


def test_checkpoint_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    result = runner.invoke(app, run_args(tmp_path, f"checkpoint.dir={tmp_path / 'file'}"))
    one_error_line(result, 2, "is a file, not a folder")


def test_eval_and_export_mistakes(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(4096))
    for args, code, says in (
        (["eval", "knn", "--checkpoint", "/nonexistent.pt", "--dataset", "fashion-mnist"], 2, "no such checkpoint"),
        (["eval", "knn", "--checkpoint", str(junk), "--dataset", "fashion-mnist"], 2, "not a complete checkpoint"),
        (["eval", "knn", "--checkpoint", "pixels", "--dataset", str(tmp_path / "nope")], 2, "no such folder"),
        (["eval", "cluster", "--checkpoint", "pixels", "--dataset", "x"], 2, "knn or linear"),
        (["export", "--checkpoint", str(junk), "--format", "keras", str(tmp_path / "o")], 2, "'keras': unknown"),
        (["export", "--checkpoint", "/nonexistent.pt", str(tmp_path / "o")], 2, "no such checkpoint"),
    ):
        one_error_line(runner.invoke(app, args), code, says)
    # the advice torch gives for such files (load with weights_only=False) is never repeated
    assert "weights_only" not in runner.invoke(app, ["export", "--checkpoint", str(junk), "x"]).stderr


def test_status_mistakes(tmp_path: Path) -> None:
    one_error_line(runner.invoke(app, ["status", "--store", "http://x"]), 2, "expected redis://")
    one_error_line(runner.invoke(app, ["status", *sets(f"checkpoint.dir={tmp_path / 'none'}")]), 1,
                   "the folder does not exist")


def test_ingest_mistakes(tmp_path: Path, redis_server) -> None:
    shard = tmp_path / "a.tar"
    shard.write_bytes(b"")
    port = closed_port()
    one_error_line(runner.invoke(app, ["ingest", str(shard), "--store", f"redis://127.0.0.1:{port}/0"]), 1,
                   "unreachable")
    one_error_line(runner.invoke(app, ["ingest", "ftp://h/a.tar", "--store", redis_server.url]), 2, "'ftp'")
    one_error_line(runner.invoke(app, ["ingest", str(tmp_path / "missing.tar"), "--store", redis_server.url]), 2,
                   "no such file")
    one_error_line(runner.invoke(app, ["ingest", str(shard), "--store", "http://x"]), 2, "expected redis://")
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.config_set("requirepass", "s3cret")
    client.close()
    for url in (f"redis://:wrong@127.0.0.1:{redis_server.port}/0", redis_server.url):
        one_error_line(runner.invoke(app, ["ingest", str(shard), "--store", url]), 2, "refused our credentials")


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    from streamssl.service.checkpoint import CheckpointError

    args = ["export", "--checkpoint", "/nonexistent.pt", str(tmp_path / "o")]
    result = runner.invoke(app, ["--debug", *args])
    assert isinstance(result.exception, CheckpointError)
    result = runner.invoke(app, args, env={"STREAMSSL_DEBUG": "1"})
    assert isinstance(result.exception, CheckpointError)
    assert runner.invoke(app, ["config", "show"], env={"STREAMSSL_DEBUG": "1"}).exit_code == 0  # not a config key

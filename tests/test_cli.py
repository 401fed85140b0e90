"""The CLI end to end, through Typer's runner and as the installed console script."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from streamssl import __version__
from streamssl.cli import app
from streamssl.stream.shards import read_shard

runner = CliRunner()
TINY = ["--set", "model.arch=resnet18", "--set", "model.hidden_dim=32", "--set", "model.out_dim=16",
        "--set", "model.n_prototypes=16", "--set", "learner.batch_size=8", "--set", "augment.sizes=[24,12]",
        "--set", "model.small_stem=false", "--set", "learner.queue_length=16", "--set", "learner.queue_start_step=0"]


def test_version_and_help() -> None:
    assert runner.invoke(app, ["version"]).stdout.strip() == __version__
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("run", "config", "bench", "shards", "ingest", "version"):
        assert command in result.stdout


@pytest.mark.parametrize(("command", "says"), [
    (["run"], ["--config", "--set", "Ctrl-C"]), (["config", "show"], ["--json", "PROFILE"]),
    (["bench", "learner"], ["--steps", "--warmup"]), (["bench", "augment"], ["--shards", "--backend"]),
    (["shards", "pack"], ["SRC_DIR", "OUT_PATTERN", "--max-side"]), (["ingest"], ["URLS", "--store"]),
    (["status"], ["--store", "--json"]), (["eval"], ["--checkpoint", "--dataset"]),
    (["export"], ["--format", "OUT"]), (["report"], ["RUN_DIR", "--out"])])
def test_every_command_has_help(command: list[str], says: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    for word in says:  # its own arguments and options, not some other command's page
        assert word.lower() in result.stdout.lower(), (command, word)


def test_config_show_resolves_overrides() -> None:
    result = runner.invoke(app, ["config", "show", "cpu-small", "--json", "--set", "learner.epsilon=0.03"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["learner"]["epsilon"] == 0.03


def test_bad_override_is_one_clear_error() -> None:
    result = runner.invoke(app, ["config", "show", "--set", "learner.epsilon=-1"])
    assert result.exit_code == 2
    assert "learner.epsilon" in result.stderr and "Traceback" not in result.stderr


def test_run_trains_on_the_demo_stream_and_stops_at_max_steps(tmp_path: Path) -> None:
    result = runner.invoke(app, ["run", *TINY, "--set", "run.max_steps=4", "--set", "run.log_every_steps=2",
                                 "--set", f"checkpoint.dir={tmp_path}", "--set", "metrics.port=0"])
    assert result.exit_code == 0, result.output
    assert "embedded demo images" in result.stdout and "Ctrl-C" in result.stdout and "/metrics" in result.stdout
    # the status hint names this run's folder, whatever --set chose it
    assert f"streamssl status --config cpu-small --set checkpoint.dir={tmp_path}" in result.stdout
    progress = [line for line in result.stdout.splitlines() if "img/s" in line]
    assert len(progress) == 2 and "code entropy" in progress[0] and "skipped" in progress[0]
    records = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "event" not in r] == [2, 4]  # one record per progress line
    # a skipped (non-finite) step consumes its batch without counting as a step
    summary = re.search(r"stopped after (\d+) steps \((\d+) images in this run.*skipped steps (\d+)", result.stdout)
    assert summary is not None, result.stdout
    steps, images, skipped = map(int, summary.groups())
    assert steps == 4 and images == 8 * (steps + skipped)
    assert (tmp_path / "ckpt-000000000004.pt").is_file()
    # the demo photographs (up to 740 px) were packed at the resolution the views need
    shards = sorted(tmp_path.glob("demo-shards-*px/demo-*.tar"))
    assert shards, list(tmp_path.iterdir())
    side = int(shards[0].parent.name.removeprefix("demo-shards-").removesuffix("px"))
    sizes = [Image.open(io.BytesIO(s.data)).size for _, s in read_shard(str(shards[0])) if s is not None]
    assert len(sizes) > 10 and max(map(max, sizes)) == side


def test_bench_learner_prints_json() -> None:
    result = runner.invoke(app, ["bench", "learner", *TINY, "--steps", "2", "--warmup", "1"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    assert figures["batch_size"] == 8 and figures["images_per_s"] > 0
    assert 0 < figures["method_share"] < 1 and figures["queue_used"] is True


def test_console_script_installed() -> None:
    beside = Path(sys.executable).parent / "streamssl"
    exe = str(beside) if beside.exists() else shutil.which("streamssl")
    assert exe, "the streamssl console script is not installed"
    out = subprocess.run([exe, "version"], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == __version__


def test_shards_pack_and_ingest(tmp_path: Path, redis_server) -> None:
    import redis
    from PIL import Image

    for cls in ("cats", "dogs"):
        (tmp_path / "src" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (40 * i, 80, 120)).save(tmp_path / "src" / cls / f"{i}.png")
    result = runner.invoke(app, ["shards", "pack", str(tmp_path / "src"), str(tmp_path / "out" / "s-%06d.tar"),
                                 "--per-shard", "4", "--labels"])
    assert result.exit_code == 0, result.output
    shards = result.stdout.split()
    assert [Path(s).name for s in shards] == ["s-000000.tar", "s-000001.tar"]
    result = runner.invoke(app, ["ingest", *shards, "--store", redis_server.url])
    assert result.exit_code == 0, result.output
    client = redis.Redis.from_url(redis_server.url)
    entries = client.xrange("streamssl:shards")
    assert [e[1][b"url"].decode() for e in entries] == shards


def test_eval_and_export_commands(tmp_path: Path) -> None:
    from tests.test_eval import clustered_folder
    from tests.test_export import make_checkpoint

    clustered_folder(tmp_path / "data", n=30)
    ckpt = make_checkpoint(tmp_path / "ckpt", small_stem=False)
    for task in ("knn", "linear"):
        result = runner.invoke(app, ["eval", task, "--checkpoint", str(ckpt), "--dataset", str(tmp_path / "data")])
        assert result.exit_code == 0, result.output
        figures = json.loads(result.stdout)
        assert figures["task"] == task and 0 <= figures["top1"] <= figures["top5"] <= 1
        assert figures["n_train"] == 24 and figures["n_test"] == 6 and figures["image_size"] == 32
    result = runner.invoke(app, ["eval", "knn", "--checkpoint", "pixels", "--dataset", str(tmp_path / "data"),
                                 "--image-size", "24"])
    assert result.exit_code == 0 and json.loads(result.stdout)["image_size"] == 24
    result = runner.invoke(app, ["export", "--checkpoint", str(ckpt), str(tmp_path / "t.pth")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "t.pth").is_file() and json.loads(result.stdout)["arch"] == "resnet18"
    assert runner.invoke(app, ["eval", "cluster", "--checkpoint", "x", "--dataset", "y"]).exit_code == 2


@pytest.mark.parametrize(("method", "says", "not_said"), [
    ("swav", "SwAV, K=", None), ("deepcluster", "centroids", None), ("simclr", "SimCLR, T=0.2", "K="),
    ("moco", "MoCo v2, queue 4096", "K="), ("byol", "BYOL, momentum 0.99 -> 0.999", "K="),
    ("npid", "NPID, memory 16384", "K="),
])
def test_the_start_line_sizes_the_method_it_runs(method: str, says: str, not_said: str | None) -> None:
    from streamssl.cli import method_summary
    from streamssl.config import resolve

    line = method_summary(resolve(None, overrides=[f"learner.method={method}"]))
    assert says in line
    assert not_said is None or not_said not in line


def test_the_start_line_names_the_replay_buffer() -> None:
    from streamssl.cli import replay_summary
    from streamssl.config import resolve

    assert replay_summary(resolve(None)) == ""
    line = replay_summary(resolve(None, overrides=["replay.policy=minred", "replay.max_samples=5000"]))
    assert line == ", replay minred of 5000 samples / 256 MiB, ratio 1 from 1000"

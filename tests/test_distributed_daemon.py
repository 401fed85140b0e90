"""``streamssl run`` under torchrun with 2 gloo processes on the CPU: every method as a daemon on a Redis source
(rank 0 alone writes; each rank's part in the checkpoint; every shard acknowledged once a checkpoint covers
it), ranks that wait together while one rank's source is idle (longer than the collective timeout), a killed
rank that fails the job fast and a restart that loses no shard, and a resume from 2 ranks to 1."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import torch

from streamssl.learner.methods import METHODS
from streamssl.stream.redis_source import publish_urls
from tests.test_daemon import TINY, make_shards

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.dist, pytest.mark.slow, pytest.mark.timeout(600)]


def streamssl_run(run_dir: Path, *overrides: str, nproc: int = 2) -> subprocess.Popen[str]:
    """``torchrun --standalone --nproc-per-node N -m streamssl.cli run`` (one plain process for ``nproc=1``)."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                 "-m", "streamssl.cli"] if nproc > 1 else [sys.executable, "-m", "streamssl.cli"])
    args = [*launcher, "run", "--config", "cpu-small"]
    for item in [*TINY, f"checkpoint.dir={run_dir}", "metrics.port=-1", "dist.timeout_s=60", *overrides]:
        args += ["--set", item]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMSSL_", "RANK", "WORLD_SIZE"))}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)


def finish(proc: subprocess.Popen[str], timeout_s: float = 240) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout_s} s:\n{out[-4000:]}") from None
    return out


def newest_checkpoint(run_dir: Path) -> dict:
    path = sorted(run_dir.glob("ckpt-*.pt"))[-1]
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_on_two_ranks_from_redis(method: str, redis_server, tmp_path: Path) -> None:
    shards = make_shards(tmp_path, 16, per_shard=8)  # 2 ranks x 4 steps x 8 images need 8; a rank may read more
    publish_urls(redis_server.url, shards)
    run_dir = tmp_path / "run"
    out = finish(streamssl_run(run_dir, f"source.urls=[\"{redis_server.url}\"]", f"learner.method={method}",
                               "run.max_steps=4", "checkpoint.every_steps=2", "source.claim_idle_s=600"))
    assert "Traceback" not in out, out[-4000:]
    state = newest_checkpoint(run_dir)
    assert state["learner"]["step"] == 4 and state["learner"]["method"] == method
    assert len(state["ranks"]) == 2 and state["images"] == 4 * 2 * 8  # every rank's batch counted
    positions = [part["position"] for part in state["ranks"]]
    assert all(p is not None and p["source"]["kind"] == "redis" for p in positions)
    # Each rank read its own shards: the entries open on the two ranks are distinct.
    open_ids = [entry[1] for p in positions for entry in p["source"]["open"]]
    assert len(open_ids) == len(set(open_ids))
    # rank 0 alone wrote history and progress
    history = (run_dir / "history.jsonl").read_text().splitlines()
    assert len([line for line in history if '"step"' in line]) == 4
    assert len(re.findall(r"^step +4 \|", out, re.M)) == 1, out[-3000:]


def test_ranks_wait_together_while_one_source_is_idle(tmp_path: Path) -> None:
    """A followed folder whose shards all hash to rank 0: rank 1 has nothing for longer than the collective
    timeout; both wait (no step, no timeout), then a shard for rank 1 arrives and the job steps on."""
    shards = [Path(s) for s in make_shards(tmp_path, 6, per_shard=8)]
    folder = tmp_path / "follow"
    folder.mkdir()
    import zlib

    def name_for(rank: int, i: int) -> str:
        k = 0
        while zlib.crc32(f"s{i}-{k}.tar".encode()) % 2 != rank:
            k += 1
        return f"s{i}-{k}.tar"

    for i, shard in enumerate(shards[:3]):
        os.link(shard, folder / name_for(0, i))
    run_dir = tmp_path / "run"
    # torchvision's multi-crop: DALI's first pipeline build can hold the interpreter for seconds on a busy
    # 2-core machine, which a short collective timeout would take for a dead rank
    proc = streamssl_run(run_dir, f"source.urls=[\"{folder}\"]", "source.settle_s=0", "run.max_steps=3",
                         "augment.backend=torchvision", "dist.timeout_s=20", "dist.wait_log_s=5")
    time.sleep(60)  # three times the collective timeout
    assert proc.poll() is None, "the job died while one rank's source was idle"
    assert not list(run_dir.glob("ckpt-*.pt"))  # no step was taken
    for i, shard in enumerate(shards[3:]):
        os.link(shard, folder / name_for(1, 10 + i))
    out = finish(proc)
    assert proc.returncode == 0, out[-4000:]
    assert "waiting" in out and "without a batch" in out
    assert newest_checkpoint(run_dir)["learner"]["step"] == 3


def test_killed_rank_fails_fast_and_restart_loses_no_shard(redis_server, tmp_path: Path) -> None:
    shards = make_shards(tmp_path, 24, per_shard=8)
    ids = publish_urls(redis_server.url, shards)
    run_dir = tmp_path / "run"
    common = (f"source.urls=[\"{redis_server.url}\"]", "checkpoint.every_steps=2", "source.claim_idle_s=1")
    proc = streamssl_run(run_dir, *common, "run.max_steps=100")
    deadline = time.monotonic() + 180
    while not list(run_dir.glob("ckpt-*.pt")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert list(run_dir.glob("ckpt-*.pt")), finish(proc, 5)
    workers = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "streamssl.cli"], capture_output=True, text=True)
    pids = [int(p) for p in workers.stdout.split()]
    assert len(pids) == 2, workers.stdout
    killed_at = time.monotonic()
    os.kill(pids[1], 9)
    out = finish(proc, 120)
    assert proc.returncode != 0 and time.monotonic() - killed_at < 90, out[-3000:]
    # The restart resumes and reads on until its time is up, long after the stream ran dry (the old
    # consumers' entries are re-claimed after claim_idle_s); its final checkpoint covers every shard read.
    out = finish(streamssl_run(run_dir, *common, "run.max_seconds=60"))
    assert "resumed from" in out, out[-4000:]
    client = redis.Redis.from_url(redis_server.url)
    assert client.xlen("streamssl:shards") == len(ids)
    pending = {str(entry["message_id"], "ascii")
               for entry in client.xpending_range("streamssl:shards", "learners", "-", "+", 1000)}
    # Once the stream is dry a rank can be left holding samples it cannot train alone (ranks step together:
    # the other rank has no batch). Such a shard stays pending, and the final checkpoint holds it open on that
    # rank, so the next start resumes it. Every other shard was trained on and acknowledged. (The checkpoint's
    # open entries also include the shards it covers, acknowledged right after it was written.)
    held = {entry_id for part in newest_checkpoint(run_dir)["ranks"]
            for _, entry_id in part["position"]["source"]["open"]}
    assert pending <= held, (f"{len(pending - held)} of {len(ids)} shards neither acknowledged nor held by the "
                             f"final checkpoint: {sorted(pending - held)}\n{out[-3000:]}")
    assert len(pending) < len(ids) // 2, pending  # the restart trained through the stream


def test_resume_from_two_ranks_to_one(tmp_path: Path) -> None:
    shards = make_shards(tmp_path, 8, per_shard=8)
    pattern = str(Path(shards[0]).parent / "s-{000000..000007}.tar")
    run_dir = tmp_path / "run"
    common = (f"source.urls=[\"{pattern}\"]", "learner.queue_length=32", "checkpoint.every_steps=2")
    out = finish(streamssl_run(run_dir, *common, "run.max_steps=4"))
    assert newest_checkpoint(run_dir)["learner"]["step"] == 4, out[-3000:]
    queues = [part["extra"]["queue"]["rows"].shape[1] for part in newest_checkpoint(run_dir)["ranks"]]
    assert queues == [16, 16]  # the job's 32 rows, half on each rank
    out = finish(streamssl_run(run_dir, *common, "run.max_steps=6", nproc=1))
    assert "written by 2 ranks, this job has 1" in out and "resumed from" in out, out[-3000:]
    state = newest_checkpoint(run_dir)
    assert state["learner"]["step"] == 6 and "ranks" not in state
    assert state["learner"]["extra"]["queue"]["rows"].shape[1] == 32

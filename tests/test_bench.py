"""The benchmark's memory summary: warm-up covers the buffers' fill, and a leak is told from a plateau."""

from __future__ import annotations

import dataclasses

from streamssl.augment.reference import MultiCropDataset
from streamssl.config import Config, resolve
from streamssl.tools.bench import memory_warmup_steps, rss_summary

MB = 2**20


def test_memory_warmup_covers_the_shuffle_buffer_fill() -> None:
    cfg = Config()
    cfg = dataclasses.replace(cfg, source=dataclasses.replace(cfg.source, shuffle_buffer=1000),
                              learner=dataclasses.replace(cfg.learner, batch_size=64),
                              augment=dataclasses.replace(cfg.augment, prefetch=2))
    # 1000 images need 16 batches of 64 to fill the buffer, then the prefetched batches and one more.
    assert memory_warmup_steps(cfg, warmup=5) == 16 + 2 + 1
    assert memory_warmup_steps(cfg, warmup=40) == 40
    no_buffer = dataclasses.replace(cfg, source=dataclasses.replace(cfg.source, shuffle_buffer=0))
    assert memory_warmup_steps(no_buffer, warmup=5) == 5


def test_rss_summary_tells_a_plateau_from_a_leak() -> None:
    # 600 steps, one per second: memory climbs 1 MB per step while the buffer fills (20 steps), then either
    # stays at 1020 MB with a transient +150 MB spike every 50 steps (the allocator: a plateau), or climbs
    # 0.1 MB per step (a leak: 360 MB per hour).
    fill = [(float(t), (1000 + t) * MB) for t in range(20)]
    plateau = fill + [(float(t), (1170 if t % 50 == 0 else 1020) * MB) for t in range(20, 600)]
    leak = fill + [(float(t), int((1020 + 0.1 * (t - 20)) * MB)) for t in range(20, 600)]

    flat = rss_summary(plateau, warm_step=20)
    assert flat["rss_warm_peak_mb"] == 1170 and flat["rss_peak_mb"] == 1170
    assert flat["rss_growth"] == 0  # the spikes are in both windows: no growth
    assert abs(flat["rss_trend_mb_per_h"]) < 1

    climbing = rss_summary(leak, warm_step=20)
    assert climbing["rss_warm_peak_mb"] == 1034.4  # 144 s into the 579 s after warm-up
    assert 0.042 < climbing["rss_growth"] < 0.043  # 1077.9 MB at the end
    assert 355 < climbing["rss_trend_mb_per_h"] < 365
    assert 10 <= len(climbing["rss_timeline"]) <= 13 and climbing["rss_timeline"][0] == [0, 1000]


def test_rss_summary_with_too_few_steps() -> None:
    assert rss_summary([(float(t), MB) for t in range(10)], warm_step=5)["rss_growth"] is None


def test_sinkhorn_precision_orders_the_three_ways_of_scoring() -> None:
    """bfloat16 scores move the codes most, float32 scores of bfloat16 embeddings less, float32 throughout
    hardly at all, each against the float64 reference."""
    from streamssl.tools.bench import sinkhorn_precision

    cfg = resolve("cpu-small", environ={}, overrides=["learner.batch_size=64", "learner.queue_length=0"])
    result = sinkhorn_precision(cfg, spread=1.0)
    errors = [result[name]["mean_tv_distance"] for name in ("bf16", "fp32_from_bf16_emb", "fp32")]
    assert errors[0] > 2 * errors[1] > 0 and errors[1] > 100 * errors[2]
    assert result["fp32"]["argmax_agreement"] == 1.0 and result["rows"] == 64


# -- bench augment: the shards it reads, and what its clock covers ----------------------------------------


class _RecordedDataset:
    """``MultiCropDataset`` that appends, per image made, when making it started and ended (perf_counter:
    CLOCK_MONOTONIC on Linux, one clock for the DataLoader's worker processes and this one) to ``path``."""

    path = ""

    def __init__(self, items, spec) -> None:  # type: ignore[no-untyped-def]
        self.inner = MultiCropDataset(items, spec)  # the real one, imported before the test replaces it
        self.log = type(self).path  # an instance attribute: it reaches workers that are spawned, not forked

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
        import time

        start = time.perf_counter()
        item = self.inner[i]
        with open(self.log, "a") as f:
            f.write(f"{start} {time.perf_counter()}\n")
        return item


def _tiny_augment(**changes: object):  # type: ignore[no-untyped-def]
    from streamssl.config import AugmentConfig

    return AugmentConfig(n_views=(1, 2), sizes=(32, 16), min_scale=(0.5, 0.1), max_scale=(1.0, 0.5), **changes)


def test_bench_augment_reads_every_pattern_run_takes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Braces, globs and both at once, through the source's own expansion (webdataset's shard list alone
    took braces only: a glob read nothing); run's refusals hold too (pipe: counted, braces that do not
    balance an error)."""
    import pytest

    from streamssl.augment.bench import read_images, write_shards
    from streamssl.urls import SourceError

    write_shards(tmp_path, n_images=6, per_shard=2)  # shard-000000.tar .. shard-000002.tar
    brace = read_images(str(tmp_path / "shard-{000000..000002}.tar"), 100)
    assert len(brace) == 6
    assert read_images(str(tmp_path / "shard-*.tar"), 100) == brace
    assert read_images(str(tmp_path / "shard-00000[0-2].tar"), 100) == brace
    assert len(read_images(str(tmp_path / "shard-{000000,000002}*"), 100)) == 4  # braces, then a glob in each
    bad: list[str] = []
    assert read_images(f"pipe:cat {tmp_path}/shard-000000.tar", 100, on_bad=bad.append) == []
    assert bad == ["refused_url"]
    with pytest.raises(SourceError, match="unbalanced"):
        read_images(str(tmp_path / "shard-{000000..000002.tar"), 100)


def test_bench_augment_cli_takes_a_glob(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from typer.testing import CliRunner

    from streamssl.augment.bench import write_shards
    from streamssl.cli import app

    write_shards(tmp_path, n_images=4, per_shard=2)
    result = CliRunner().invoke(app, ["bench", "augment", "--shards", str(tmp_path / "*.tar"), "--backend",
                                      "torchvision", "--batches", "2", "--batch-size", "2", "--config", "cpu-small",
                                      "--set", "augment.n_threads=1", "--set", "augment.sizes=[32,16]"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["images"] == 4


def test_bench_torchvision_times_every_image_it_counts(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Each image the DataLoader's workers made was made while the clock ran, and each was counted: none
    made ahead on an untimed clock (a warm-up batch taken before the clock started let the workers make
    n_threads x prefetch batches for free: a short run printed 1,259 img/s at 49.8 CPU-ms an image on 2
    cores)."""
    import time
    from types import SimpleNamespace

    import streamssl.augment.bench as bench
    import streamssl.augment.reference as reference

    pattern = bench.write_shards(tmp_path / "shards", n_images=6, per_shard=3)
    _RecordedDataset.path = str(tmp_path / "made.txt")
    monkeypatch.setattr(reference, "MultiCropDataset", _RecordedDataset)
    clock: list[float] = []

    def perf_counter() -> float:
        clock.append(time.perf_counter())
        return clock[-1]

    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=perf_counter))  # the bench's clock only
    result = bench.bench_augment(pattern, "torchvision", 3, _tiny_augment(n_threads=2, prefetch=2), batch_size=2)
    made = [tuple(map(float, line.split())) for line in (tmp_path / "made.txt").read_text().splitlines()]
    assert len(clock) == 2  # started, stopped
    assert result["images"] == len(made) == 6  # 3 batches of 2: every image made is counted, no untimed one
    assert clock[0] <= min(start for start, _ in made) and max(end for _, end in made) <= clock[1]
    assert result["seconds"] == round(clock[1] - clock[0], 4)

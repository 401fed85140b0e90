"""The benchmark's memory summary: warm-up covers the buffers' fill, and a leak is told from a plateau."""

from __future__ import annotations

import dataclasses

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

"""Benchmarks of the learner on pre-made tensors: figures printed on demand, never asserted in tests."""

from __future__ import annotations

import dataclasses
import os
import platform
import signal
import statistics
import tempfile
import threading
import time
from typing import Any

import torch

from streamssl.config import Config
from streamssl.devices import pick_device, use_device
from streamssl.learner.engine import Learner
from streamssl.learner.methods import method_settings


def bench_learner(cfg: Config, *, steps: int = 10, warmup: int = 2) -> dict[str, Any]:
    """Time ``steps`` learner steps (after ``warmup`` untimed ones) on random views of the configured shapes.

    Returns a JSON-able dict: step time, images/s, the time of every part of the step and the share spent in
    the method's own parts beyond the network (SwAV: Sinkhorn with the queue's scores, loss, prototype
    normalisation and queue push).
    """
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    device = pick_device(cfg.run.device)
    learner = Learner.build(cfg.model, cfg.learner, device=device, settings=method_settings(cfg),
                            sync_bn=cfg.dist.sync_bn)  # as the daemon builds it (one process: no effect)
    queue = getattr(learner.method, "queue", None)
    batch = cfg.learner.batch_size
    generator = torch.Generator().manual_seed(0)
    use_device(device)
    # On the device before the clock starts: the learner is timed, not the copy of its input.
    views = [torch.randn(batch, 3, size, size, generator=generator).to(device)
             for size, count in zip(cfg.augment.sizes, cfg.augment.n_views, strict=True) for _ in range(count)]
    if queue is not None:  # measure the steady state: a full queue taking part in Sinkhorn
        queue.start_step = 0
        queue.filled = queue.length
        queue.rows.copy_(torch.nn.functional.normalize(torch.randn_like(queue.rows), dim=2))
    for _ in range(warmup):
        learner.step(views, progress=0.0)  # progress: any value for the budget schedule; timing ignores the lr
    stats = [learner.step(views, progress=0.0) for _ in range(steps)]
    total = statistics.fmean(s.total_s for s in stats)

    method_s = statistics.fmean(s.method_s for s in stats)
    return {
        "benchmark": "learner",
        "device": str(device), "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "method": learner.method.name, "arch": cfg.model.arch, "batch_size": batch,
        "views": [list(cfg.augment.n_views), list(cfg.augment.sizes)],
        "n_prototypes": cfg.model.n_prototypes, "queue_length": cfg.learner.queue_length,
        "embed_dim": getattr(learner.method, "embed_dim", None),
        "params": sum(p.numel() for p in learner.method.parameters() if p.requires_grad), "bf16": learner.use_bf16,
        "channels_last": cfg.model.channels_last,
        "steps": steps, "step_s": round(total, 4), "images_per_s": round(batch / total, 2),
        "method_share": round(method_s / total, 5),
        "breakdown_s": {name: round(statistics.fmean(s.times[name] for s in stats), 5) for name in stats[-1].times},
        "queue_used": queue is not None and queue.active(learner.step_count),
    }


def _rss_bytes() -> int:
    """Resident set size of this process now (Linux), 0 where unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def bench_run(cfg: Config, *, steps: int = 20, warmup: int = 5, minutes: float = 0.0) -> dict[str, Any]:
    """The daemon's images/s on its real data path beside the learner's compute-bound images/s on pre-made
    tensors, and their ratio (1.0: the data path costs the learner nothing). The resident memory is sampled
    after every step (see ``rss_summary``); with ``minutes`` the daemon runs that long instead of ``steps``,
    to show growth after warm-up. Memory counts as warm once the shuffle buffer is full
    (``memory_warmup_steps``): filling it is the daemon's largest deliberate allocation, not growth."""
    from streamssl.service.daemon import Daemon

    # Both sides in the steady state: bench_learner scores a full queue in every Sinkhorn, so the daemon
    # starts its queue at once and its timing starts only after the queue has filled.
    cfg = dataclasses.replace(cfg, learner=dataclasses.replace(cfg.learner, queue_start_step=0))
    if cfg.learner.queue_length:
        warmup = max(warmup, -(-cfg.learner.queue_length // cfg.learner.batch_size) + 1)
    compute = bench_learner(cfg, steps=max(3, min(steps, 50)), warmup=3)  # 10 steps varied by +-10% here
    marks: list[tuple[float, int]] = []  # (time, RSS) after each step

    def on_line(line: str) -> None:
        if line.startswith("step "):
            marks.append((time.monotonic(), _rss_bytes()))

    with tempfile.TemporaryDirectory(prefix="streamssl-bench-") as tmp:
        run = dataclasses.replace(cfg.run, log_every_steps=1,
                                  max_steps=0 if minutes else warmup + steps)
        daemon_cfg = dataclasses.replace(
            cfg, run=run, metrics=dataclasses.replace(cfg.metrics, port=-1),
            checkpoint=dataclasses.replace(cfg.checkpoint, dir=tmp, every_steps=10**9, every_s=10**9, resume=False),
            store=dataclasses.replace(cfg.store, url=""))
        daemon = Daemon(daemon_cfg, echo=on_line)
        if minutes:
            timer = threading.Timer(minutes * 60, lambda: os.kill(os.getpid(), signal.SIGINT))
            timer.start()
        try:
            daemon.run()
        finally:
            if minutes:
                timer.cancel()
    timed = marks[warmup:]
    if len(timed) < 2:
        raise RuntimeError(f"the daemon made {len(marks)} steps; need more than warmup + 1")
    daemon_ips = (len(timed) - 1) * cfg.learner.batch_size / (timed[-1][0] - timed[0][0])
    result: dict[str, Any] = {
        "benchmark": "run", "arch": cfg.model.arch, "batch_size": cfg.learner.batch_size,
        "backend": cfg.augment.backend, "steps_timed": len(timed) - 1,
        "seconds": round(timed[-1][0] - timed[0][0], 1),
        "daemon_images_per_s": round(daemon_ips, 2), "learner_images_per_s": compute["images_per_s"],
        "ratio": round(daemon_ips / compute["images_per_s"], 3),
    }
    return result | rss_summary(marks, memory_warmup_steps(cfg, warmup))


def memory_warmup_steps(cfg: Config, warmup: int) -> int:
    """Steps before the daemon's memory can be steady: the timing warm-up, and the steps that fill the
    shuffle buffer (it holds ``source.shuffle_buffer`` encoded images once full) and the prefetch queue."""
    fill = -(-cfg.source.shuffle_buffer // cfg.learner.batch_size) + cfg.augment.prefetch + 1
    return max(warmup, fill)


def rss_summary(marks: list[tuple[float, int]], warm_step: int) -> dict[str, Any]:
    """Resident memory over a run from (time, RSS) marks, one per step, counted from step ``warm_step`` (the
    buffers are full): the peak over the first quarter of that time against the peak over all of it
    (``rss_growth``: transient spikes of the allocator show in both, only growth raises the second), the
    trend of the floor (MB per hour between the lowest RSS of the first and of the last quarter: a leak
    raises it, a plateau with spikes leaves it flat) and ~12 samples to look at."""
    timed = marks[warm_step:]
    if len(timed) < 8 or not timed[0][1]:
        return {"rss_warm_step": warm_step, "rss_growth": None}
    t_start, t_end = timed[0][0], timed[-1][0]
    first = [m for m in timed if m[0] <= t_start + (t_end - t_start) / 4]
    last = [m for m in timed if m[0] >= t_end - (t_end - t_start) / 4]
    warm_peak, peak = max(r for _, r in first), max(r for _, r in timed)
    # Leaked memory is never given back, so a leak raises even the lowest RSS; spikes do not move minima.
    (t_a, floor_a), (t_b, floor_b) = min(first, key=lambda m: m[1]), min(last, key=lambda m: m[1])
    trend = (floor_b - floor_a) / 2**20 / ((t_b - t_a) / 3600) if t_b > t_a else None
    t0 = marks[0][0]
    stride = max(1, len(marks) // 12)
    return {
        "rss_warm_step": warm_step, "rss_warm_peak_mb": round(warm_peak / 2**20, 1),
        "rss_peak_mb": round(peak / 2**20, 1), "rss_growth": round(peak / warm_peak - 1, 4),
        "rss_trend_mb_per_h": round(trend, 1) if trend is not None else None,
        "rss_timeline": [[round(t - t0), round(r / 2**20)] for t, r in marks[::stride]],
    }


def _sinkhorn_float64(scores: torch.Tensor, n_iters: int, eps: float) -> torch.Tensor:
    """Textbook Sinkhorn-Knopp in float64 (Cuturi 2013; SwAV's Algorithm 1): the reference the codes the
    learner computes are compared with."""
    q = torch.exp((scores - scores.max()) / eps).T  # (K, B)
    n_protos, n_samples = q.shape
    q /= q.sum()
    for _ in range(n_iters):
        q /= q.sum(dim=1, keepdim=True) * n_protos
        q /= q.sum(dim=0, keepdim=True) * n_samples
    return (q * n_samples).T  # (B, K), rows sum to 1


def sinkhorn_precision(cfg: Config, *, device: str | torch.device = "cpu", rows: int | None = None,
                       spread: float = 0.3, seed: int = 0) -> dict[str, Any]:
    """How far SwAV's codes move when the prototype scores they come from are computed in bfloat16.

    Under autocast the prototype layer returns bfloat16 scores: 8 significant bits, so a score near 1 is off
    by up to 2^-8, and exp(score / eps) by up to 8% at eps = 0.05. Three ways of making the scores, each fed
    to the learner's ``sinkhorn`` and compared with a float64 Sinkhorn of the exact scores:
    ``bf16`` (autocast's scores, what the learner used), ``fp32_from_bf16_emb`` (the bfloat16 embeddings
    autocast's head returns, multiplied by the float32 prototypes in float32: what the learner can do at the
    cost of one (rows x D x K) matmul) and ``fp32`` (everything in float32).

    The embeddings sit near their prototypes, as they do once training has structure: a random prototype
    per row plus Gaussian noise of ``spread`` per dimension scale, normalised. ``rows``: the rows Sinkhorn
    sees (the queue's and the batch's); default batch + queue length of ``cfg.learner``.
    """
    from streamssl.learner.methods.sinkhorn import sinkhorn

    device = torch.device(device)
    lc, k, d = cfg.learner, cfg.model.n_prototypes, cfg.model.out_dim
    rows = rows or lc.batch_size + lc.queue_length
    g = torch.Generator().manual_seed(seed)
    protos = torch.nn.functional.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=1)
    centres = protos[torch.randint(0, k, (rows,), generator=g)]
    emb = torch.nn.functional.normalize(centres + spread * torch.randn(rows, d, generator=g, dtype=torch.float64)
                                        / d ** 0.5, dim=1)
    reference = _sinkhorn_float64(emb @ protos.T, lc.sinkhorn_iters, lc.epsilon)
    emb32, protos32 = emb.float().to(device), protos.float().to(device)
    variants = {
        "bf16": (emb32.bfloat16() @ protos32.bfloat16().T).float(),
        "fp32_from_bf16_emb": emb32.bfloat16().float() @ protos32.T,
        "fp32": emb32 @ protos32.T,
    }
    result: dict[str, Any] = {"benchmark": "sinkhorn_precision", "device": str(device), "rows": rows,
                              "n_prototypes": k, "dim": d, "epsilon": lc.epsilon, "iters": lc.sinkhorn_iters,
                              "top_score_mean": round(float((emb * centres).sum(1).mean()), 3)}
    for name, scores in variants.items():
        codes = sinkhorn(scores, n_iters=lc.sinkhorn_iters, eps=lc.epsilon).double().cpu()
        result[name] = {
            "argmax_agreement": round(float((codes.argmax(1) == reference.argmax(1)).double().mean()), 5),
            "max_abs_error": float(f"{float((codes - reference).abs().max()):.3g}"),
            "mean_tv_distance": float(f"{float(0.5 * (codes - reference).abs().sum(1).mean()):.3g}"),
        }
    return result

"""The CUDA path in one run: PASS/FAIL/SKIP lines and figures, in under 10 minutes on one GPU.

    python benchmarks/gpu_check.py                       # on a GPU machine, from the repository root
    python benchmarks/gpu_check.py --json gpu.json       # the figures as JSON too
    python benchmarks/gpu_check.py --device cpu --quick  # the same checks on a CPU, small (CI runs this)

Checks, in order:

1. environment: torch, CUDA, the GPU, bf16, cuDNN; which optional packages import.
2. learner: a ``gpu-resnet50`` step (batch 256, 2x224 + 6x96 views on the device before the clock):
   images/s over timed steps with one synchronisation around them, peak memory, bf16 and channels_last in
   effect, and the learner's event-timed split against that wall clock.
3. sinkhorn: codes of bf16 scores, of float32 scores of bf16 embeddings and of float32 scores, against a
   float64 reference, on the device.
4. resume: a checkpoint written on the device (CUDA RNG states included) loads and continues.
5. twin: the torchvision twin's views into the device through its worker processes and pinned memory,
   bad images dropped and counted.
6. dali: DALI's GPU pipeline with bad inputs (SKIP where nvidia.dali does not import).
7. group: a 1-process NCCL group (gloo on a CPU) all-reduces, and Sinkhorn through it equals Sinkhorn alone.
8. daemon: ``streamssl run`` on the device for a few steps on the embedded demo images with the twin
   (SKIP where webdataset or redis, which the daemon's data path imports, are missing).

It needs torch (with CUDA for the real run), torchvision, numpy, pillow and prometheus-client; DALI,
webdataset and redis-server are optional and their checks say SKIP without them. Exit status 1 when any
check FAILs.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not

import numpy as np
import torch

from streamssl.config import Config, resolve
from streamssl.devices import pick_device, use_device


class Skip(Exception):
    """A check that cannot run here, and why."""


def _imports(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:
        return False
    return True


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _views(cfg: Config, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(cfg.learner.batch_size, 3, size, size, generator=g).to(device)
            for size, count in zip(cfg.augment.sizes, cfg.augment.n_views, strict=True) for _ in range(count)]


def _jpegs(n: int, seed: int = 0) -> list[bytes]:
    from streamssl.augment.bench import synthetic_jpeg

    rng = np.random.default_rng(seed)
    return [synthetic_jpeg(rng) for _ in range(n)]


def check_environment(cfg: Config, device: torch.device, quick: bool) -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda_build": torch.version.cuda, "device": str(device),
                            "optional": {name: _imports(name) for name in ("nvidia.dali", "webdataset", "redis")}}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"gpu": props.name, "capability": f"{props.major}.{props.minor}",
                 "memory_gib": round(props.total_memory / 2**30, 1), "bf16": torch.cuda.is_bf16_supported(),
                 "cudnn": torch.backends.cudnn.version(), "gpus": torch.cuda.device_count()}
    return info


def check_learner(cfg: Config, device: torch.device, quick: bool) -> dict[str, Any]:
    from streamssl.learner.engine import Learner

    learner = Learner.build(cfg.model, cfg.learner, device=device)
    conv_dtypes: set[torch.dtype] = set()
    hook = learner.model.trunk.conv1.register_forward_hook(lambda m, i, out: conv_dtypes.add(out.dtype))
    views = _views(cfg, device)
    steps, warmup = (3, 1) if quick else (20, 5)  # warm-up: cuDNN's algorithm search for each view shape
    for _ in range(warmup):
        learner.step(views, progress=0.0)
    hook.remove()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    stats = [learner.step(views, progress=0.0) for _ in range(steps)]
    _sync(device)
    wall = (time.perf_counter() - start) / steps
    split = {name: round(sum(s.times[name] for s in stats) / steps, 5) for name in stats[-1].times}
    result = {
        "arch": cfg.model.arch, "batch_size": cfg.learner.batch_size, "steps": steps,
        "images_per_s": round(cfg.learner.batch_size / wall, 1), "step_s_wall": round(wall, 4),
        "step_s_reported": round(sum(s.total_s for s in stats) / steps, 4),
        "split_s": split, "split_sum_s": round(sum(split.values()), 4),
        "bf16_in_effect": conv_dtypes == {torch.bfloat16}, "use_bf16": learner.use_bf16,
        "channels_last": learner.model.trunk.conv1.weight.is_contiguous(memory_format=torch.channels_last),
        "skipped": sum(s.skipped for s in stats), "loss": round(stats[-1].loss, 4),
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if not (result["bf16_in_effect"] and result["channels_last"]):
            raise AssertionError(f"bf16 or channels_last not in effect: {result}")
        if result["split_sum_s"] > 1.1 * wall:
            raise AssertionError(f"the split ({result['split_sum_s']} s) exceeds the step ({wall:.4f} s)")
    if result["skipped"]:
        raise AssertionError(f"{result['skipped']} non-finite steps on random views")
    return result


def check_sinkhorn(cfg: Config, device: torch.device, quick: bool) -> dict[str, Any]:
    from streamssl.tools.bench import sinkhorn_precision

    result = {f"spread_{s}": sinkhorn_precision(cfg, device=device, spread=s) for s in (0.3, 3.0)}
    for figures in result.values():
        bf16, fp32_of_bf16 = figures["bf16"]["mean_tv_distance"], figures["fp32_from_bf16_emb"]["mean_tv_distance"]
        if not fp32_of_bf16 < bf16:
            raise AssertionError(f"float32 scores of bf16 embeddings are no closer than bf16 scores: {figures}")
    return result


def check_resume(cfg: Config, device: torch.device, quick: bool) -> dict[str, Any]:
    from streamssl.learner.engine import Learner
    from streamssl.service.checkpoint import CheckpointManager, rng_state, set_rng_state

    small = dataclasses.replace(cfg, learner=dataclasses.replace(cfg.learner, batch_size=8))
    learner = Learner.build(small.model, small.learner, device=device)
    views = _views(small, device)
    learner.step(views)
    with tempfile.TemporaryDirectory() as folder:
        manager = CheckpointManager(folder, keep=2)
        path = manager.save({"learner": learner.state_dict(), "rng": rng_state()}, learner.step_count)
        state = manager.load(map_location="cpu")  # as the daemon loads it: RNG states must stay CPU tensors
        assert state is not None
        resumed = Learner.build(small.model, small.learner, device=device)
        resumed.load_state_dict(state["learner"])
        set_rng_state(state["rng"])
    same = all(torch.equal(a, b) for a, b in zip(learner.model.state_dict().values(),
                                                  resumed.model.state_dict().values(), strict=True))
    on_device = all(p.device == device for p in resumed.model.parameters())
    optimizer_on_device = all(t.device == device for s in resumed.optimizer.state.values() for t in s.values()
                              if isinstance(t, torch.Tensor) and t.dim() > 0)
    stats = resumed.step(views)
    if not (same and on_device and optimizer_on_device and not stats.skipped):
        raise AssertionError(f"resume: same={same} on_device={on_device} optimizer={optimizer_on_device} "
                             f"skipped={stats.skipped}")
    return {"checkpoint": os.path.basename(path), "cuda_rng_saved": "cuda" in state["rng"],
            "step_after_resume": stats.step, "loss": round(stats.loss, 4)}


def check_twin(cfg: Config, device: torch.device, quick: bool) -> dict[str, Any]:
    from streamssl.augment import make_multicrop

    augment = dataclasses.replace(cfg.augment, backend="torchvision", n_threads=2 if quick else 8)
    bad: list[str] = []
    twin = make_multicrop(augment, 64, device=str(device), on_bad=bad.append)
    try:
        images = _jpegs(16 if quick else 64)
        batch = [images[0], images[1][: len(images[1]) // 2], b"not an image", *images[2:]]
        views, kept = twin(batch)  # the first call also starts the workers
        if 1 in kept or 2 in kept or bad != ["decode_error"] * 2:
            raise AssertionError(f"bad images: kept {kept[:4]}..., counted {bad}")
        if not all(v.device == device and v.shape[0] == len(kept) for v in views):
            raise AssertionError(f"views on {[str(v.device) for v in views]}, want {device}")
        batches = 2 if quick else 6
        start = time.perf_counter()
        for _ in range(batches):
            views, _ = twin(images)
        _sync(device)
        seconds = time.perf_counter() - start
    finally:
        twin.close()
    return {"workers": twin.workers, "images_per_s": round(batches * len(images) / seconds, 1),
            "pinned_copy": device.type == "cuda"}


def check_dali(cfg: Config, device: torch.device, quick: bool) -> dict[str, Any]:
    if not _imports("nvidia.dali"):
        raise Skip("nvidia.dali does not import")
    from streamssl.augment.dali import DaliMultiCrop
    from streamssl.augment.spec import MultiCropSpec

    bad: list[str] = []
    multicrop = DaliMultiCrop(MultiCropSpec.from_config(cfg.augment), 64, device=str(device), n_threads=4,
                              on_bad=bad.append)
    images = _jpegs(16 if quick else 64, seed=1)
    batch = [images[0], images[1][: len(images[1]) // 2], b"not an image", *images[2:]]
    views, kept = multicrop(batch)
    if 2 in kept or "decode_error" not in bad or 0 not in kept:
        raise AssertionError(f"bad images: kept {kept[:4]}..., counted {bad}")  # nvJPEG may decode the half
    start = time.perf_counter()
    for _ in range(2 if quick else 10):
        views, _ = multicrop(images)
    _sync(device)
    seconds = time.perf_counter() - start
    return {"half_jpeg": "decoded" if 1 in kept else "dropped", "rebuilds": multicrop.n_rebuilds,
            "images_per_s": round((2 if quick else 10) * len(images) / seconds, 1),
            "views_on": str(views[0].device)}


def check_group(cfg: Config, device: torch.device, quick: bool) -> dict[str, Any]:
    import torch.distributed as dist

    from streamssl.learner.methods.sinkhorn import sinkhorn, torch_distributed_reduce

    backend = "nccl" if device.type == "cuda" else "gloo"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            **({"device_id": device} if device.type == "cuda" else {}))
    try:
        x = torch.arange(4.0, device=device)
        dist.all_reduce(x)
        scores = torch.nn.functional.normalize(torch.randn(512, 64, device=device), dim=1) @ \
            torch.nn.functional.normalize(torch.randn(300, 64, device=device), dim=1).T
        alone = sinkhorn(scores)
        reduced = sinkhorn(scores, reduce=torch_distributed_reduce)
        if not (torch.equal(x, torch.arange(4.0, device=device)) and torch.allclose(alone, reduced)):
            raise AssertionError("a 1-process all-reduce changed the values")
    finally:
        dist.destroy_process_group()
    return {"backend": backend}


def check_daemon(cfg: Config, device: torch.device, quick: bool) -> dict[str, Any]:
    missing = [name for name in ("webdataset", "redis") if not _imports(name)]
    if missing:
        raise Skip(f"{' and '.join(missing)} not installed (the daemon's data path imports them)")
    from streamssl.service.daemon import Daemon

    steps = 3 if quick else 20
    with tempfile.TemporaryDirectory() as folder:
        run_cfg = resolve(PROFILE, environ={}, overrides=[
            *(QUICK if quick else []), "augment.backend=torchvision", "learner.batch_size=32", f"run.device={device}",
            f"run.max_steps={steps}", "metrics.port=-1", "store.url=", f"checkpoint.dir={folder}",
            "learner.queue_start_step=0", "learner.freeze_prototypes_steps=0", "run.log_every_steps=1"])
        lines: list[str] = []
        start = time.perf_counter()
        summary = Daemon(run_cfg, echo=lines.append).run()
        seconds = time.perf_counter() - start
        wrote = summary.checkpoint is not None and Path(summary.checkpoint).is_file()
    if summary.error is not None or summary.steps != steps or not wrote:
        raise AssertionError(f"daemon: {summary}; last lines {lines[-3:]}")
    return {"steps": summary.steps, "images": summary.images, "seconds": round(seconds, 1),
            "last_line": lines[-1][:160] if lines else ""}


CHECKS: list[tuple[str, Callable[[Config, torch.device, bool], dict[str, Any]]]] = [
    ("environment", check_environment), ("learner", check_learner), ("sinkhorn", check_sinkhorn),
    ("resume", check_resume), ("twin", check_twin), ("dali", check_dali), ("group", check_group),
    ("daemon", check_daemon),
]
PROFILE = "gpu-resnet50"
QUICK = ["model.arch=resnet18", "model.hidden_dim=64", "model.out_dim=32", "model.n_prototypes=64",
         "learner.batch_size=16", "learner.queue_length=32", "augment.sizes=[64,32]", "augment.n_views=[2,2]"]
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--quick", action="store_true", help="a small model and few steps (a smoke test)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these checks")
    parser.add_argument("--json", default=None, help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    cfg = resolve(PROFILE, environ={}, overrides=[*(QUICK if args.quick else []), f"run.device={device}"])
    results: dict[str, Any] = {}
    failed = False
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"FAIL environment: {device} asked for, but torch {torch.__version__} sees no CUDA device")
        return 1
    use_device(device)
    for name, check in CHECKS:
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        try:
            figures = check(cfg, device, args.quick)
            status = "PASS"
        except Skip as exc:
            figures, status = {"reason": str(exc)}, "SKIP"
        except Exception as exc:  # a failed check is reported and the others still run
            figures, status = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc(limit=4)}, "FAIL"
            failed = True
        figures["check_s"] = round(time.perf_counter() - start, 1)
        results[name] = {"status": status, **figures}
        shown = {k: v for k, v in figures.items() if k != "trace"}
        print(f"{status} {name}: {json.dumps(shown, default=str)}", flush=True)
        if status == "FAIL":
            print(figures["trace"], file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    print("FAIL: some checks failed" if failed else "PASS: every check that could run passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

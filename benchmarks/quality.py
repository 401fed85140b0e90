"""Quality benchmark (issues 5 and 18): kNN top-1 and a linear probe on Fashion-MNIST after a fixed
wall-clock budget on this machine, for every method streamssl has and lightly's counterpart of each.

One command, in order, never two trainings at once:

1. packs the 60,000 Fashion-MNIST training images as PNG, without labels, into WebDataset shards under
   ``WORKDIR/shards`` (once; later runs reuse them);
2. for each method of ``--methods`` (swav, simclr, moco, byol, deepcluster, npid, or ``all``): trains
   streamssl on them as a stream, ``streamssl run --config pipelines/fmnist-cpu.toml --set
   learner.method=METHOD`` with ``run.max_seconds`` = the budget and a checkpoint every ``--snapshot-min``
   minutes; then, where lightly has the method (SwaV, SimCLR, MoCo, BYOL), lightly's implementation
   (``benchmarks/lightly_baseline.py``) for the same budget on the same images with the same views, trunk,
   batch, schedule and the method's own settings (read from the resolved streamssl profile), saving its
   trunk as often;
3. after each training (never during one) evaluates its snapshots: the weighted kNN of ``streamssl.learner.evaluate``
   (k=20, T=0.07, cosine) on the full test set against the full training set, and on the last snapshot a
   linear probe (multinomial logistic regression on the frozen, standardised features, full-batch L-BFGS:
   the SwAV paper's protocol of a linear classifier on frozen features); features at the global view size.
   Baselines the same two ways: raw pixels (normalised as ``streamssl eval --checkpoint pixels``, and as the
   trunk sees them) and an untrained trunk;
4. writes ``WORKDIR/results.json`` after every run (budget, per-snapshot elapsed seconds, images seen, both
   scores, machine information and the exact commands), ``WORKDIR/quality.png`` (kNN against minutes) and
   prints the table and its Markdown (``benchmarks/quality_report.py`` re-renders them from the JSON).

Elapsed time of a snapshot is wall-clock time since the training loop started (data loading, augmentation
and checkpoint writes included; interpreter start-up and model construction excluded), for both sides.

Needs ``pip install lightly matplotlib`` (benchmark-only requirements, pin torch/torchvision to the installed
versions so pip keeps them). The table of the README (six methods, 12 minutes each, about 2.5 hours)::

    python benchmarks/quality.py --methods all --budget-min 12 --snapshot-min 12 --workdir runs/quality

A quick end-to-end check: ``--methods simclr --budget-min 1 --snapshot-min 0.5 --limit-train 10000
--limit-test 2000``. ``--eval-bf16`` about halves the evaluations on CPUs with native bfloat16.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamssl.config import Config, resolve
from streamssl.devices import native_bf16
from streamssl.learner.evaluate import (
    FASHION_MNIST_DIR,
    WEIGHT_DECAYS,
    LabeledImages,
    extract,
    knn_classify,
    linear_probe,
    load_fashion_mnist,
    load_splits,
    topk_accuracy,
)
from streamssl.learner.methods import METHODS
from streamssl.learner.model import make_trunk, stem_of
from streamssl.service.checkpoint import load_trunk

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from quality_report import machine_info, markdown, plot, table  # noqa: E402

PROFILE = HERE.parent / "pipelines" / "fmnist-cpu.toml"
PIXEL_MEAN, PIXEL_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)  # as `streamssl eval --checkpoint pixels`
LIGHTLY_METHODS = ("swav", "simclr", "moco", "byol")  # the methods lightly_baseline.py trains


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", default="swav",
                   help=f"Comma-separated methods ({', '.join(METHODS)}) or 'all'.")
    p.add_argument("--budget-min", type=float, default=12.0, help="Wall-clock training budget per run, minutes.")
    p.add_argument("--snapshot-min", type=float, default=2.0, help="Snapshot (and kNN) every this many minutes.")
    p.add_argument("--only", choices=("streamssl", "lightly", "both"), default="both",
                   help="Which side to run (lightly only for the methods it has).")
    p.add_argument("--workdir", type=Path, default=Path("runs/quality"),
                   help="Shards, runs, results.json and quality.png go here.")
    p.add_argument("--fashion-mnist", default=FASHION_MNIST_DIR, help="Folder of the Fashion-MNIST idx files.")
    p.add_argument("--profile", default=str(PROFILE), help="streamssl profile of the runs.")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="Extra streamssl override (repeatable); the lightly side follows view, trunk, batch "
                        "and method-setting changes.")
    p.add_argument("--lightly-arg", action="append", default=[], metavar="ARG",
                   help="Extra argument for lightly_baseline.py (repeatable), e.g. --lightly-arg=--lr=1e-3.")
    p.add_argument("--per-shard", type=int, default=1000, help="Images per shard when packing.")
    p.add_argument("--k", type=int, default=20, help="kNN neighbours.")
    p.add_argument("--temperature", type=float, default=0.07, help="kNN vote temperature.")
    p.add_argument("--no-linear", action="store_true", help="kNN only: skip the linear probes.")
    p.add_argument("--linear-weight-decays", type=float, nargs="+", default=list(WEIGHT_DECAYS),
                   help="The probe's L2 grid, chosen on a held-out tenth of the training set; one value: no "
                        "choice (the README table of 2026-12-02: 1e-4 with --linear-iters 100).")
    p.add_argument("--linear-iters", type=int, default=500, help="L-BFGS iterations of each probe fit.")
    p.add_argument("--limit-train", type=int, default=0, help="kNN memory and probe training set: at most this "
                   "many training images (0: all 60,000). For quick checks only.")
    p.add_argument("--limit-test", type=int, default=0, help="At most this many test images (0: all 10,000). "
                   "For quick checks only.")
    p.add_argument("--eval-bf16", action="store_true",
                   help="Run the frozen trunk under bfloat16 autocast when extracting features (about twice as "
                        "fast on CPUs with bf16 support; kNN and probe stay float32). Default: float32.")
    p.add_argument("--eval-size", type=int, default=0,
                   help="Side in pixels at which the trunks see the 28 px test and memory images; 0: the global "
                        "view size. Raw pixels stay at 28.")
    p.add_argument("--skip-train", action="store_true",
                   help="Do not train: evaluate the runs already in WORKDIR (e.g. after an interrupted run).")
    p.add_argument("--no-baselines", action="store_true", help="Skip the raw-pixel and untrained-trunk scores.")
    args = p.parse_args(argv)
    if args.budget_min <= 0 or args.snapshot_min <= 0:
        p.error("--budget-min and --snapshot-min must be > 0")
    names = list(METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        p.error(f"--methods: unknown {unknown or args.methods!r}; choose from {', '.join(METHODS)} or all")
    args.methods = names
    return args


def planned_runs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(side, method) in training order: each method's streamssl run, then lightly's, so a pair is measured
    close in time (the machine's speed drifts within a session)."""
    runs = []
    for method in args.methods:
        if args.only in ("streamssl", "both"):
            runs.append(("streamssl", method))
        if args.only in ("lightly", "both") and method in LIGHTLY_METHODS:
            runs.append(("lightly", method))
    return runs


# ---------------------------------------------------------------------------------------------- data


def pack(workdir: Path, fashion_mnist: str, per_shard: int) -> str:
    """Pack the training images (PNG, no labels) into shards once; return the brace pattern of the shards."""
    from PIL import Image

    from streamssl.stream.pack import pack_shards

    shard_dir = workdir / "shards"
    done = shard_dir / "packed.json"
    if done.is_file():
        return json.loads(done.read_text())["pattern"]
    images = load_fashion_mnist(fashion_mnist, "train").images  # the labels are dropped here
    png_dir = workdir / "png"
    shutil.rmtree(png_dir, ignore_errors=True)
    png_dir.mkdir(parents=True)
    t = time.perf_counter()
    for i, image in enumerate(images):
        Image.fromarray(np.ascontiguousarray(image[..., 0]), "L").save(png_dir / f"{i:06d}.png")
    shutil.rmtree(shard_dir, ignore_errors=True)
    written = pack_shards(png_dir, str(shard_dir / "s-%06d.tar"), per_shard=per_shard)
    shutil.rmtree(png_dir)
    pattern = str(shard_dir.resolve() / f"s-{{000000..{len(written) - 1:06d}}}.tar")
    done.write_text(json.dumps({"pattern": pattern, "images": len(images), "shards": len(written),
                                "per_shard": per_shard}))
    print(f"packed {len(images)} images into {len(written)} shards in {time.perf_counter() - t:.0f} s: {pattern}",
          flush=True)
    return pattern


# ---------------------------------------------------------------------------------------------- training


def _stream(cmd: list[str], log_path: Path, marker: str | None = None) -> tuple[int, float | None]:
    """Run ``cmd``, echoing and logging its output; return its exit code and the wall time (time.time()) at
    which a line containing ``marker`` appeared (None if none did)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    print("$ " + " ".join(cmd), flush=True)
    seen_at = None
    with open(log_path, "w") as log, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      text=True, env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if marker and seen_at is None and marker in line:
                seen_at = time.time()
            sys.stdout.write(line)
            log.write(f"{time.time():.3f} {line}")
        return proc.wait(), seen_at


def streamssl_overrides(args: argparse.Namespace, pattern: str, run_dir: Path, method: str) -> list[str]:
    return [
        f"source.urls=[{json.dumps(pattern)}]", "source.cycle=true", f"learner.method={json.dumps(method)}",
        f"run.max_seconds={args.budget_min * 60:g}", "run.max_steps=0", "run.max_images=0",
        f"checkpoint.dir={json.dumps(str(run_dir))}", f"checkpoint.every_s={args.snapshot_min * 60:g}",
        "checkpoint.every_steps=1000000000", "checkpoint.keep=1000", "checkpoint.resume=false",
        "metrics.port=0",  # the "metrics on ..." line marks the start of the loop (the elapsed-time origin)
        *args.overrides,
    ]


def streamssl_command(args: argparse.Namespace, pattern: str, run_dir: Path, method: str) -> list[str]:
    exe = Path(sys.executable).parent / "streamssl"
    cmd = [str(exe) if exe.is_file() else "streamssl", "run", "--config", args.profile]
    for item in streamssl_overrides(args, pattern, run_dir, method):
        cmd += ["--set", item]
    return cmd


def _nums(values: Any) -> list[str]:
    return [f"{v:g}" for v in values]


def _shared(augment: Any, name: str) -> str:
    """A probability every view group shares (lightly's transforms take one value for all views)."""
    values = set(getattr(augment, name))
    if len(values) != 1:
        raise SystemExit(f"augment.{name} differs per view group ({getattr(augment, name)}): lightly's "
                         "transforms take one value for every view")
    return f"{values.pop():g}"


def method_arguments(cfg: Config, method: str) -> list[str]:
    """lightly_baseline.py's arguments for streamssl's settings of ``method`` (temperatures, queue, momenta)."""
    if method == "swav":
        return ["--n-prototypes", str(cfg.model.n_prototypes)]
    if method == "simclr":
        return ["--simclr-temperature", f"{cfg.simclr.temperature:g}"]
    if method == "moco":
        m = cfg.moco
        return ["--moco-temperature", f"{m.temperature:g}", "--moco-queue", str(m.queue_length),
                "--moco-momentum", f"{m.momentum:g}"]
    b = cfg.byol
    return ["--byol-predictor-dim", str(b.predictor_dim), "--byol-momentum", f"{b.momentum:g}",
            "--byol-final-momentum", f"{b.final_momentum:g}", "--byol-momentum-steps", str(b.momentum_steps)]


def lightly_command(args: argparse.Namespace, cfg: Config, out: Path, method: str) -> list[str]:
    """lightly_baseline.py with the data, views, trunk, batch, normalisation, schedule, budget and method
    settings of the streamssl run."""
    a, m, lr = cfg.augment, cfg.model, cfg.learner
    return [sys.executable, str(HERE / "lightly_baseline.py"), "--out", str(out), "--objective", method,
            "--budget-s", f"{args.budget_min * 60:g}", "--snapshot-s", f"{args.snapshot_min * 60:g}",
            "--fashion-mnist", args.fashion_mnist, "--arch", m.arch,
            "--small-stem" if m.small_stem else "--no-small-stem", "--stem-stride", str(m.stem_stride),
            "--stem-pool" if m.stem_pool else "--no-stem-pool",
            "--sizes", *_nums(a.sizes), "--counts", *_nums(a.n_views),
            "--min-scales", *_nums(a.min_scale), "--max-scales", *_nums(a.max_scale),
            "--flip-p", f"{a.flip_p:g}", "--jitter-strength", f"{a.jitter_strength:g}",
            "--jitter-p", _shared(a, "jitter_p"), "--grayscale-p", _shared(a, "grayscale_p"),
            "--blur-p", _shared(a, "blur_p"), "--blur-sigma", *_nums(a.blur_sigma),
            "--mean", *_nums(a.mean), "--std", *_nums(a.std), "--lr", f"{lr.base_lr:g}",
            "--batch-size", str(lr.batch_size), "--hidden-dim", str(m.hidden_dim), "--out-dim", str(m.out_dim),
            "--bf16" if lr.bf16 and native_bf16("cpu") else "--no-bf16",  # as streamssl's learner decides
            "--channels-last" if m.channels_last else "--no-channels-last",
            "--workers", "2", *(["--threads", str(cfg.run.threads)] if cfg.run.threads else []),
            # the profile's schedule shape: a budget-fitted decay for one side only would decide the comparison
            *(["--schedule", "budget", "--final-lr", f"{lr.final_lr:g}"] if lr.schedule == "budget" else []),
            *method_arguments(cfg, method), *args.lightly_arg]


def train_run(args: argparse.Namespace, pattern: str, side: str, method: str) -> dict[str, Any]:
    """Train one run into ``WORKDIR/SIDE-METHOD`` (emptied first); its command and loop start time."""
    out = args.workdir / f"{side}-{method}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log = args.workdir / f"{side}-{method}.log"
    if side == "streamssl":
        cmd = streamssl_command(args, pattern, out, method)
    else:
        cmd = lightly_command(args, resolved(args, pattern, method), out, method)
    launched = time.time()
    code, loop_start = _stream(cmd, log, marker="metrics on " if side == "streamssl" else None)
    info = {"command": cmd, "launched_at": launched, "loop_started_at": loop_start or launched,
            "start_up_s": round((loop_start or launched) - launched, 2), "exit_code": code}
    if code != 0:  # recorded and reported; the other runs of a two-hour table still go ahead
        hint = " (pip install lightly?)" if side == "lightly" else ""
        print(f"{side} {method} failed with exit code {code}; see {log}{hint}", flush=True)
    (out / "timing.json").write_text(json.dumps(info))
    return info


def resolved(args: argparse.Namespace, pattern: str, method: str) -> Config:
    return resolve(args.profile, overrides=streamssl_overrides(args, pattern, args.workdir / "resolve", method))


# ---------------------------------------------------------------------------------------------- evaluation


def score(trunk: torch.nn.Module | None, train: LabeledImages, test: LabeledImages, size: int, mean: Any, std: Any,
          args: argparse.Namespace, *, linear: bool) -> dict[str, Any]:
    """kNN top-1 (and, with ``linear``, the linear probe's) of one frozen trunk (None: raw pixels), from one
    feature extraction; with --eval-bf16 the trunk's forward runs under bfloat16 autocast."""
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=trunk is not None and args.eval_bf16):
        train_feats = extract(trunk, train, size=size, mean=mean, std=std).float()
        test_feats = extract(trunk, test, size=size, mean=mean, std=std).float()
    train_labels, test_labels = torch.from_numpy(train.labels), torch.from_numpy(test.labels)
    n_classes = max(train.n_classes, test.n_classes)
    knn = knn_classify(train_feats, train_labels, test_feats, n_classes, k=args.k, temperature=args.temperature)
    result: dict[str, Any] = {"knn": topk_accuracy(knn, test_labels)["top1"], "linear": None}
    if linear:
        chosen: dict[str, float] = {}
        probe = linear_probe(train_feats, train_labels, test_feats, n_classes, chosen=chosen,
                             weight_decays=args.linear_weight_decays, max_iter=args.linear_iters)
        result["linear"] = topk_accuracy(probe, test_labels)["top1"]
        result["linear_weight_decay"] = chosen.get("weight_decay", args.linear_weight_decays[0])
    result["eval_s"] = round(time.perf_counter() - t, 2)
    return result


def eval_size(args: argparse.Namespace, view_size: Any) -> int:
    """Side at which a trunk sees the evaluation images: ``--eval-size``, else its global view size."""
    return args.eval_size or int(view_size)


def snapshots(side: str, out: Path) -> list[tuple[Path, torch.nn.Module, dict[str, Any], tuple, tuple, int]]:
    """(path, trunk, info, mean, std, view size) of every snapshot of a run, oldest first."""
    found = []
    if side == "streamssl":
        from streamssl.service.checkpoint import CheckpointManager

        started = json.loads((out / "timing.json").read_text())["loop_started_at"]
        manager = CheckpointManager(out, keep=1000)
        for path in manager.paths():
            state = manager.load(path)
            assert state is not None
            trunk, config = load_trunk(path)
            a = config["augment"]
            info = {"elapsed_s": float(state["saved_at"]) - started, "step": int(state["step"]),
                    "images": int(state.get("images", 0))}
            found.append((path, trunk, info, a["mean"], a["std"], a["sizes"][0]))
    else:
        from lightly_baseline import load_snapshot_trunk

        for path in sorted(out.glob("snap-*.pt")):
            trunk, info = load_snapshot_trunk(path)
            c = info["config"]
            found.append((path, trunk, info, c["mean"], c["std"], c["sizes"][0]))
    return found


def eval_run(args: argparse.Namespace, side: str, method: str, train: LabeledImages, test: LabeledImages,
             ) -> list[dict[str, Any]]:
    """kNN of every snapshot of a run, and the linear probe of its last."""
    rows = []
    found = snapshots(side, args.workdir / f"{side}-{method}")
    for i, (path, trunk, info, mean, std, size) in enumerate(found):
        result = score(trunk, train, test, eval_size(args, size), mean, std, args,
                       linear=not args.no_linear and i == len(found) - 1)
        row = {"path": str(path), "elapsed_s": round(float(info["elapsed_s"]), 1), "step": int(info["step"]),
               "images": int(info["images"]), **result}
        linear = f"  linear {row['linear']:.4f}" if row["linear"] is not None else ""
        print(f"{side} {method}: {row['elapsed_s']:7.1f} s  {row['images']:>7} images  kNN {row['knn']:.4f}"
              f"{linear}", flush=True)
        rows.append(row)
    return rows


def baselines(cfg: Config, train: LabeledImages, test: LabeledImages, args: argparse.Namespace) -> dict[str, Any]:
    """Raw pixels (as `streamssl eval --checkpoint pixels`, and normalised as the trunk's inputs are) and an
    untrained trunk, scored the same two ways as the trained trunks."""
    linear = not args.no_linear
    a = cfg.augment
    out: dict[str, Any] = {}
    for name, mean, std in (("raw pixels", PIXEL_MEAN, PIXEL_STD), ("raw pixels, profile mean/std", a.mean, a.std)):
        out[name] = {**score(None, train, test, 28, mean, std, args, linear=linear), "image_size": 28,
                     "mean": list(mean), "std": list(std)}
        print(f"{name}: {out[name]}", flush=True)
    torch.manual_seed(0)
    stem = stem_of(asdict(cfg.model))
    trunk = make_trunk(cfg.model.arch, **stem).eval()
    size = eval_size(args, a.sizes[0])
    name = f"untrained {cfg.model.arch}"
    out[name] = {**score(trunk, train, test, size, a.mean, a.std, args, linear=linear), "arch": cfg.model.arch,
                 **stem, "image_size": size, "seed": 0}
    print(f"{name}: {out[name]}", flush=True)
    return out


# ---------------------------------------------------------------------------------------------- main


def write(results: dict[str, Any], workdir: Path) -> None:
    results["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    tmp = workdir / ".results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, workdir / "results.json")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    pattern = pack(args.workdir, args.fashion_mnist, args.per_shard)
    cfg = resolved(args, pattern, args.methods[0])
    results: dict[str, Any] = {
        "benchmark": "quality", "dataset": "fashion-mnist", "budget_s": args.budget_min * 60,
        "snapshot_s": args.snapshot_min * 60, "profile": args.profile, "overrides": args.overrides,
        "machine": machine_info(), "started_at": time.time(),
        "views": {"n_views": list(cfg.augment.n_views), "sizes": list(cfg.augment.sizes)},
        "trunk": {"arch": cfg.model.arch, **stem_of(asdict(cfg.model))}, "batch_size": cfg.learner.batch_size,
        "commands": {"quality": [sys.executable, *sys.argv]}, "runs": {},
    }
    train, test = load_splits(f"fashion-mnist:{args.fashion_mnist}", limit_train=args.limit_train,
                              limit_test=args.limit_test)
    results["eval"] = {"knn": {"k": args.k, "temperature": args.temperature}, "k": args.k,
                       "temperature": args.temperature, "linear": None if args.no_linear else
                       {"model": "multinomial logistic regression on standardised features, full-batch L-BFGS",
                        "iterations": args.linear_iters, "weight_decays": args.linear_weight_decays,
                        "chosen_on": "a held-out tenth of the training set, then refitted on all of it"},
                       "n_train": len(train), "n_test": len(test), "image_size": eval_size(args, cfg.augment.sizes[0]),
                       "trunk_dtype": "bfloat16" if args.eval_bf16 else "float32"}
    if not args.no_baselines:  # before the trainings: cheap, and the table has its reference lines early
        results["baselines"] = baselines(cfg, train, test, args)
        write(results, args.workdir)
    for side, method in planned_runs(args):  # one after the other: two trainings never share the cores
        run = f"{side}-{method}"
        info = (json.loads((args.workdir / run / "timing.json").read_text()) if args.skip_train
                else train_run(args, pattern, side, method))
        results["commands"][run] = info["command"]
        results["runs"][run] = {k: v for k, v in info.items() if k != "command"}
        if info.get("exit_code", 0) != 0:
            write(results, args.workdir)
            continue
        print(f"evaluating {run} (kNN{'' if args.no_linear else ' and linear probe'}; no training runs now)",
              flush=True)
        results["runs"][run]["snapshots"] = eval_run(args, side, method, train, test)
        write(results, args.workdir)
    results["finished_at"] = time.time()
    write(results, args.workdir)
    drawn = plot(results, args.workdir / "quality.png")
    print(table(results))
    print()
    print(markdown(results))
    print(f"results: {args.workdir / 'results.json'}" + (f", curve: {args.workdir / 'quality.png'}" if drawn else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

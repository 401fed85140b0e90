"""Quality benchmark (issue 5): kNN top-1 on Fashion-MNIST after a fixed wall-clock budget on this machine.

One command, in order, never two trainings at once:

1. packs the 60,000 Fashion-MNIST training images as PNG, without labels, into WebDataset shards under
   ``WORKDIR/shards`` (once; later runs reuse them);
2. trains streamssl on them as a stream: ``streamssl run --config pipelines/fmnist-cpu.toml`` with
   ``run.max_seconds`` = the budget and a checkpoint every ``--snapshot-min`` minutes;
3. trains lightly's SwaV (``benchmarks/lightly_baseline.py``; with ``--lightly-arg=--objective=simclr`` lightly's
   SimCLR) for the same budget on the same images with the same views, trunk and batch (read from the
   resolved streamssl profile), saving its trunk as often;
4. evaluates every snapshot of both, an untrained trunk and the raw pixels with the weighted kNN of
   ``streamssl.eval`` (k=20, T=0.07, cosine) on the full test set against the full training set, features
   computed at the global view size;
5. writes ``WORKDIR/results.json`` (budget, per-snapshot elapsed seconds, images seen and top-1 for both,
   the baselines, machine information and the exact commands) and ``WORKDIR/quality.png`` (top-1 against
   minutes), and prints a table.

Elapsed time of a snapshot is wall-clock time since the training loop started (data loading, augmentation
and checkpoint writes included; interpreter start-up and model construction excluded), for both methods.

Needs ``pip install lightly matplotlib`` (benchmark-only requirements, pin torch/torchvision to the installed
versions so pip keeps them). Example (the comparison of issue 5)::

    python benchmarks/quality.py --budget-min 12 --snapshot-min 2 --workdir runs/quality

A quick end-to-end check: ``--budget-min 1 --snapshot-min 0.5 --limit-train 10000 --limit-test 2000``. The
evaluations dominate the total time (every snapshot pushes 70,000 images through the trunk); ``--eval-bf16``
about halves them on CPUs with native bfloat16.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamssl import __version__
from streamssl.config import Config, resolve
from streamssl.devices import native_bf16
from streamssl.eval import (
    FASHION_MNIST_DIR,
    LabeledImages,
    evaluate,
    extract,
    knn_classify,
    load_fashion_mnist,
    load_splits,
    load_trunk,
    topk_accuracy,
)
from streamssl.model import make_trunk, stem_of

HERE = Path(__file__).resolve().parent
PROFILE = HERE.parent / "pipelines" / "fmnist-cpu.toml"
PIXEL_MEAN, PIXEL_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)  # as `streamssl eval --checkpoint pixels`


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--budget-min", type=float, default=12.0, help="Wall-clock training budget per method, minutes.")
    p.add_argument("--snapshot-min", type=float, default=2.0, help="Snapshot (and evaluate) every this many minutes.")
    p.add_argument("--only", choices=("streamssl", "lightly", "both"), default="both", help="Which method to run.")
    p.add_argument("--workdir", type=Path, default=Path("runs/quality"),
                   help="Shards, runs, results.json and quality.png go here.")
    p.add_argument("--fashion-mnist", default=FASHION_MNIST_DIR, help="Folder of the Fashion-MNIST idx files.")
    p.add_argument("--profile", default=str(PROFILE), help="streamssl profile of the run.")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="Extra streamssl override (repeatable); the lightly side follows view, trunk and batch "
                        "changes.")
    p.add_argument("--lightly-arg", action="append", default=[], metavar="ARG",
                   help="Extra argument for lightly_baseline.py (repeatable), e.g. --lightly-arg=--n-prototypes=300.")
    p.add_argument("--per-shard", type=int, default=1000, help="Images per shard when packing.")
    p.add_argument("--k", type=int, default=20, help="kNN neighbours.")
    p.add_argument("--temperature", type=float, default=0.07, help="kNN vote temperature.")
    p.add_argument("--limit-train", type=int, default=0, help="kNN memory: at most this many training images "
                   "(0: all 60,000). For quick checks only.")
    p.add_argument("--limit-test", type=int, default=0, help="At most this many test images (0: all 10,000). "
                   "For quick checks only.")
    p.add_argument("--eval-bf16", action="store_true",
                   help="Run the frozen trunk under bfloat16 autocast when extracting features (about twice as "
                        "fast on CPUs with bf16 support; the kNN itself stays float32). Default: float32.")
    p.add_argument("--eval-size", type=int, default=0,
                   help="Side in pixels at which the trunks (trained and untrained, both methods) see the 28 px "
                        "test and memory images; 0: the global view size. Raw pixels stay at 28.")
    p.add_argument("--skip-train", action="store_true",
                   help="Do not train: evaluate the snapshots already in WORKDIR (e.g. after an interrupted run).")
    p.add_argument("--no-baselines", action="store_true", help="Skip the raw-pixel and untrained-trunk kNN.")
    args = p.parse_args(argv)
    if args.budget_min <= 0 or args.snapshot_min <= 0:
        p.error("--budget-min and --snapshot-min must be > 0")
    return args


# ---------------------------------------------------------------------------------------------- data


def pack(workdir: Path, fashion_mnist: str, per_shard: int) -> str:
    """Pack the training images (PNG, no labels) into shards once; return the brace pattern of the shards."""
    from PIL import Image

    from streamssl.pack import pack_shards

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


def streamssl_overrides(args: argparse.Namespace, pattern: str, run_dir: Path) -> list[str]:
    return [
        f"source.urls=[{json.dumps(pattern)}]", "source.cycle=true",
        f"run.max_seconds={args.budget_min * 60:g}", "run.max_steps=0", "run.max_images=0",
        f"checkpoint.dir={json.dumps(str(run_dir))}", f"checkpoint.every_s={args.snapshot_min * 60:g}",
        "checkpoint.every_steps=1000000000", "checkpoint.keep=1000", "checkpoint.resume=false",
        "metrics.port=0",  # the "metrics on ..." line marks the start of the loop (the elapsed-time origin)
        *args.overrides,
    ]


def streamssl_command(args: argparse.Namespace, pattern: str, run_dir: Path) -> list[str]:
    exe = Path(sys.executable).parent / "streamssl"
    cmd = [str(exe) if exe.is_file() else "streamssl", "run", "--config", args.profile]
    for item in streamssl_overrides(args, pattern, run_dir):
        cmd += ["--set", item]
    return cmd


def lightly_command(args: argparse.Namespace, cfg: Config, out: Path) -> list[str]:
    """lightly_baseline.py with the data, views, trunk, batch, normalisation and budget of the streamssl run."""
    a, m, lr = cfg.augment, cfg.model, cfg.learner

    def nums(values: Any) -> list[str]:
        return [f"{v:g}" for v in values]

    return [sys.executable, str(HERE / "lightly_baseline.py"), "--out", str(out),
            "--budget-s", f"{args.budget_min * 60:g}", "--snapshot-s", f"{args.snapshot_min * 60:g}",
            "--fashion-mnist", args.fashion_mnist, "--arch", m.arch,
            "--small-stem" if m.small_stem else "--no-small-stem", "--stem-stride", str(m.stem_stride),
            "--stem-pool" if m.stem_pool else "--no-stem-pool",
            "--sizes", *nums(a.sizes), "--counts", *nums(a.n_views),
            "--min-scales", *nums(a.min_scale), "--max-scales", *nums(a.max_scale),
            "--flip-p", f"{a.flip_p:g}", "--jitter-strength", f"{a.jitter_strength:g}", "--jitter-p", f"{a.jitter_p:g}",
            "--grayscale-p", f"{a.grayscale_p:g}", "--blur-p", f"{a.blur_p:g}", "--blur-sigma", *nums(a.blur_sigma),
            "--mean", *nums(a.mean), "--std", *nums(a.std),
            "--batch-size", str(lr.batch_size), "--hidden-dim", str(m.hidden_dim), "--out-dim", str(m.out_dim),
            "--bf16" if lr.bf16 and native_bf16("cpu") else "--no-bf16",  # as streamssl's learner decides
            "--channels-last" if m.channels_last else "--no-channels-last",
            "--workers", "2", *(["--threads", str(cfg.run.threads)] if cfg.run.threads else []),
            # the profile's schedule shape: a budget-fitted decay for one side only would decide the comparison
            *(["--schedule", "budget", "--final-lr", f"{lr.final_lr:g}"] if lr.schedule == "budget" else []),
            *args.lightly_arg]


def run_streamssl(args: argparse.Namespace, pattern: str, run_dir: Path) -> dict[str, Any]:
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    cmd = streamssl_command(args, pattern, run_dir)
    launched = time.time()
    code, loop_start = _stream(cmd, run_dir.parent / "streamssl.log", marker="metrics on ")
    if code != 0:
        raise SystemExit(f"streamssl run failed with exit code {code}; see {run_dir.parent / 'streamssl.log'}")
    info = {"command": cmd, "launched_at": launched, "loop_started_at": loop_start or launched,
            "start_up_s": round((loop_start or launched) - launched, 2)}
    (run_dir / "timing.json").write_text(json.dumps(info))
    return info


def lightly_objective(cmd: list[str]) -> str:
    """The objective (``swav`` or ``simclr``) a lightly_baseline.py command line trains, as the script reads it."""
    from lightly_baseline import parse_args as lightly_parse_args

    return lightly_parse_args(cmd[2:]).objective


def method_label(results: dict[str, Any], name: str, *, version: bool = False) -> str:
    """``streamssl``, or ``lightly [VERSION] SwaV`` / ``... SimCLR`` after the objective the lightly run trained."""
    if name == "streamssl":
        return name
    objective = {"swav": "SwaV", "simclr": "SimCLR"}[results.get(name, {}).get("objective", "swav")]
    release = results["machine"].get("lightly") if version else None
    return f"lightly {release} {objective}" if release else f"lightly {objective}"


def run_lightly(args: argparse.Namespace, cfg: Config, out: Path) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd = lightly_command(args, cfg, out)
    code, _ = _stream(cmd, out.parent / "lightly.log")
    if code != 0:
        raise SystemExit(f"lightly_baseline.py failed with exit code {code}; see {out.parent / 'lightly.log'} "
                         "(pip install lightly?)")
    info = {"command": cmd}
    (out / "timing.json").write_text(json.dumps(info))
    return info


# ---------------------------------------------------------------------------------------------- evaluation


def knn(trunk: torch.nn.Module | None, train: LabeledImages, test: LabeledImages, size: int, mean: Any, std: Any,
        args: argparse.Namespace) -> dict[str, Any]:
    """streamssl.eval's weighted kNN; with --eval-bf16 the trunk's forward runs under bfloat16 autocast (the
    features, their normalisation and the kNN stay float32)."""
    if trunk is None or not args.eval_bf16:
        return evaluate("knn", trunk, train, test, size=size, mean=mean, std=std, k=args.k,
                        temperature=args.temperature)
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        train_feats = extract(trunk, train, size=size, mean=mean, std=std)
        test_feats = extract(trunk, test, size=size, mean=mean, std=std)
    scores = knn_classify(train_feats.float(), torch.from_numpy(train.labels), test_feats.float(),
                          max(train.n_classes, test.n_classes), k=args.k, temperature=args.temperature)
    return {**topk_accuracy(scores, torch.from_numpy(test.labels)), "seconds": round(time.perf_counter() - t, 2)}


def eval_size(args: argparse.Namespace, view_size: Any) -> int:
    """Side at which a trunk sees the evaluation images: ``--eval-size``, else its global view size."""
    return args.eval_size or int(view_size)


def eval_streamssl(run_dir: Path, train: LabeledImages, test: LabeledImages, args: argparse.Namespace,
                   ) -> list[dict[str, Any]]:
    from streamssl.checkpoint import CheckpointManager

    timing = json.loads((run_dir / "timing.json").read_text())
    rows = []
    for path in CheckpointManager(run_dir, keep=1000).paths():
        state = CheckpointManager(run_dir, keep=1000).load(path)
        assert state is not None
        trunk, config = load_trunk(path)
        augment = config["augment"]
        result = knn(trunk, train, test, eval_size(args, augment["sizes"][0]), augment["mean"], augment["std"],
                     args)
        row = {"path": str(path), "elapsed_s": round(float(state["saved_at"]) - timing["loop_started_at"], 1),
               "step": int(state["step"]), "images": int(state.get("images", 0)),
               "top1": result["top1"], "top5": result["top5"], "eval_s": result["seconds"]}
        print(f"streamssl {row['elapsed_s']:7.1f} s  {row['images']:>7} images  top-1 {row['top1']:.4f}", flush=True)
        rows.append(row)
    return rows


def eval_lightly(out: Path, train: LabeledImages, test: LabeledImages, cfg: Config, args: argparse.Namespace,
                 ) -> list[dict[str, Any]]:
    sys.path.insert(0, str(HERE))
    from lightly_baseline import load_snapshot_trunk

    rows = []
    for path in sorted(out.glob("snap-*.pt")):
        trunk, info = load_snapshot_trunk(path)
        c = info["config"]
        result = knn(trunk, train, test, eval_size(args, c["sizes"][0]), c["mean"], c["std"], args)
        row = {"path": str(path), "elapsed_s": round(float(info["elapsed_s"]), 1), "step": int(info["step"]),
               "images": int(info["images"]), "top1": result["top1"], "top5": result["top5"],
               "eval_s": result["seconds"]}
        print(f"lightly   {row['elapsed_s']:7.1f} s  {row['images']:>7} images  top-1 {row['top1']:.4f}", flush=True)
        rows.append(row)
    return rows


def baselines(cfg: Config, train: LabeledImages, test: LabeledImages, args: argparse.Namespace) -> dict[str, Any]:
    pixels = knn(None, train, test, 28, PIXEL_MEAN, PIXEL_STD, args)
    print(f"raw pixels                          top-1 {pixels['top1']:.4f}", flush=True)
    torch.manual_seed(0)
    stem = stem_of(asdict(cfg.model))
    trunk = make_trunk(cfg.model.arch, **stem).eval()
    size = eval_size(args, cfg.augment.sizes[0])
    untrained = knn(trunk, train, test, size, cfg.augment.mean, cfg.augment.std, args)
    print(f"untrained {cfg.model.arch:<26}top-1 {untrained['top1']:.4f}", flush=True)
    return {"pixels": {"top1": pixels["top1"], "top5": pixels["top5"], "image_size": 28, "mean": PIXEL_MEAN,
                       "std": PIXEL_STD},
            "untrained": {"top1": untrained["top1"], "top5": untrained["top5"], "arch": cfg.model.arch, **stem,
                          "image_size": size, "seed": 0}}


# ---------------------------------------------------------------------------------------------- report


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "streamssl": __version__,
                            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    try:
        import lightly

        info["lightly"] = lightly.__version__
    except ImportError:
        info["lightly"] = None
    return info


def plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no curve drawn", flush=True)
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, style in (("streamssl", "o-"), ("lightly", "s-")):
        rows = results.get(name, {}).get("snapshots") or []
        if rows:
            label = method_label(results, name, version=True)
            ax.plot([r["elapsed_s"] / 60 for r in rows], [100 * r["top1"] for r in rows], style, label=label)
    base = results.get("baselines") or {}
    if "pixels" in base:
        ax.axhline(100 * base["pixels"]["top1"], color="grey", ls="--", label="raw pixels")
    if "untrained" in base:
        ax.axhline(100 * base["untrained"]["top1"], color="grey", ls=":",
                   label=f"untrained {base['untrained']['arch']}")
    ax.set_xlabel("training wall-clock time (minutes)")
    ax.set_ylabel(f"kNN top-1 (%), k={results['eval']['k']}, T={results['eval']['temperature']}")
    ax.set_title(f"Fashion-MNIST, {results['machine']['cpus']} CPU cores, budget {results['budget_s'] / 60:g} min")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def table(results: dict[str, Any]) -> str:
    lines = [f"{'method':<16}{'minutes':>9}{'images':>10}{'top-1 %':>9}"]
    for name in ("streamssl", "lightly"):
        for r in results.get(name, {}).get("snapshots") or []:
            lines.append(f"{method_label(results, name):<16}{r['elapsed_s'] / 60:>9.2f}{r['images']:>10}"
                         f"{100 * r['top1']:>9.2f}")
    for name, r in (results.get("baselines") or {}).items():
        lines.append(f"{name:<16}{'':>9}{'':>10}{100 * r['top1']:>9.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    methods = ("streamssl", "lightly") if args.only == "both" else (args.only,)
    pattern = pack(workdir, args.fashion_mnist, args.per_shard)
    cfg = resolve(args.profile, overrides=streamssl_overrides(args, pattern, workdir / "streamssl"))
    results: dict[str, Any] = {
        "benchmark": "quality", "dataset": "fashion-mnist", "budget_s": args.budget_min * 60,
        "snapshot_s": args.snapshot_min * 60, "profile": args.profile, "overrides": args.overrides,
        "machine": machine_info(), "started_at": time.time(),
        "views": {"n_views": list(cfg.augment.n_views), "sizes": list(cfg.augment.sizes)},
        "trunk": {"arch": cfg.model.arch, **stem_of(asdict(cfg.model))},
        "batch_size": cfg.learner.batch_size,
        "commands": {"quality": [sys.executable, *sys.argv]},
    }
    runs: dict[str, dict[str, Any]] = {}
    if not args.skip_train:
        for name in methods:  # one after the other: the two trainings never share the cores
            runs[name] = (run_streamssl(args, pattern, workdir / "streamssl") if name == "streamssl"
                          else run_lightly(args, cfg, workdir / "lightly"))
    else:
        for name in methods:
            runs[name] = json.loads((workdir / name / "timing.json").read_text())
    for name, info in runs.items():
        results["commands"][name] = info["command"]
        results[name] = {k: v for k, v in info.items() if k != "command"}
    if "lightly" in runs:  # read from the command, so --skip-train on an older run's timing.json knows it too
        results["lightly"]["objective"] = lightly_objective(runs["lightly"]["command"])

    print("evaluating (kNN on the test set; the trainings are over)", flush=True)
    train, test = load_splits(f"fashion-mnist:{args.fashion_mnist}", limit_train=args.limit_train,
                              limit_test=args.limit_test)
    results["eval"] = {"task": "knn", "k": args.k, "temperature": args.temperature, "n_train": len(train),
                       "n_test": len(test), "image_size": eval_size(args, cfg.augment.sizes[0]),
                       "trunk_dtype": "bfloat16" if args.eval_bf16 else "float32"}
    if not args.no_baselines:
        results["baselines"] = baselines(cfg, train, test, args)
    if "streamssl" in runs:
        results["streamssl"]["snapshots"] = eval_streamssl(workdir / "streamssl", train, test, args)
    if "lightly" in runs:
        results["lightly"]["snapshots"] = eval_lightly(workdir / "lightly", train, test, cfg, args)
    results["finished_at"] = time.time()
    results["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    drawn = plot(results, workdir / "quality.png")
    print(table(results))
    print(f"results: {workdir / 'results.json'}" + (f", curve: {workdir / 'quality.png'}" if drawn else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

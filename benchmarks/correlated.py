"""Correlated-stream benchmark (issue 20): what a replay buffer buys when the stream is not shuffled.

Fashion-MNIST's 60,000 training images, labels never reaching the learner, packed as three streams of
1,000-image shards read once in order (``source.cycle=false``, the profile's 2,000-sample shuffle buffer):

``iid``          shuffled (today's stream);
``incremental``  class-incremental: 5 tasks of 2 classes each ({0,1}, {2,3}, ...), one after the other;
``runs``         temporally correlated: runs of 1,000 images of one class, the classes cycling (0, 1, ..., 9,
                 0, 1, ...), six runs per class.

Each stream is trained with every ``--policies`` (none, fifo, reservoir, minred) for the same budget of
``--images`` (default: the one pass, 60,000): the number of images, not seconds, so the figures do not depend
on what else the machine does; the wall time of each run is reported beside them (MinRed's bookkeeping is its
only extra cost). Replay: ``--buffer`` samples, ``replay.ratio = 1``, training from the 1,000th arrival.
One training at a time; evaluated after it, never during one:

- kNN top-1 (k=20, T=0.07) and the linear probe on the full test set against the full training set, on the
  final snapshot (as ``benchmarks/quality.py``, whose scoring this uses);
- class-incremental stream: a snapshot at every fifth of the budget (the task boundaries), each scored by kNN;
  a task's accuracy is the kNN accuracy on its classes' test images; its forgetting is the best accuracy during
  the run minus the final one.

Prints the table and its Markdown, writes ``WORKDIR/results.json`` after every run (keeping the runs of
earlier invocations in the same workdir, so a table can be made in parts)::

    python benchmarks/correlated.py --workdir runs/correlated --eval-bf16 --linear-weight-decays 1e-4 \\
        --linear-iters 100
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamssl.learner.evaluate import FASHION_MNIST_DIR, extract, knn_classify, load_fashion_mnist, load_splits
from streamssl.service.checkpoint import CheckpointManager, load_trunk

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from quality import PROFILE, _stream, eval_size, score  # noqa: E402
from quality_report import machine_info  # noqa: E402

STREAMS = ("iid", "incremental", "runs")
POLICIES = ("none", "fifo", "reservoir", "minred")
TASKS = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--streams", default=",".join(STREAMS), help="Comma-separated, of " + ", ".join(STREAMS))
    p.add_argument("--policies", default=",".join(POLICIES), help="Comma-separated, of " + ", ".join(POLICIES))
    p.add_argument("--images", type=int, default=60_000, help="Training budget per run, in images.")
    p.add_argument("--buffer", type=int, default=10_000, help="replay.max_samples.")
    p.add_argument("--workdir", type=Path, default=Path("runs/correlated"))
    p.add_argument("--fashion-mnist", default=FASHION_MNIST_DIR)
    p.add_argument("--profile", default=str(PROFILE))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--linear-weight-decays", type=float, nargs="+", default=[1e-4])
    p.add_argument("--linear-iters", type=int, default=100)
    p.add_argument("--eval-bf16", action="store_true", help="The trunk's forward under bfloat16 in evaluation.")
    p.add_argument("--eval-size", type=int, default=0)
    p.add_argument("--skip-train", action="store_true", help="Evaluate the runs already in WORKDIR.")
    p.add_argument("--table", action="store_true", help="Print the table of WORKDIR/results.json and stop.")
    args = p.parse_args(argv)
    args.streams = [s for s in args.streams.split(",") if s]
    args.policies = [s for s in args.policies.split(",") if s]
    for name, allowed in (("streams", STREAMS), ("policies", POLICIES)):
        bad = set(getattr(args, name)) - set(allowed)
        if bad:
            p.error(f"--{name}: unknown {sorted(bad)}")
    return args


def stream_order(labels: np.ndarray, stream: str, seed: int = 0) -> np.ndarray:
    """The order in which the stream delivers the training images."""
    rng = np.random.default_rng(seed)
    if stream == "iid":
        return rng.permutation(len(labels))
    by_class = {c: rng.permutation(np.flatnonzero(labels == c)) for c in range(10)}
    if stream == "incremental":
        return np.concatenate([rng.permutation(np.concatenate([by_class[a], by_class[b]])) for a, b in TASKS])
    runs = []  # runs of 1,000 images of one class, classes cycling
    for start in range(0, max(len(v) for v in by_class.values()), 1000):
        runs += [by_class[c][start:start + 1000] for c in range(10) if start < len(by_class[c])]
    return np.concatenate(runs)


def pack(workdir: Path, fashion_mnist: str, stream: str) -> str:
    """Pack the stream's images in its order (PNG, no labels) once; its brace pattern."""
    from PIL import Image

    from streamssl.stream.pack import pack_shards

    shard_dir = workdir / "streams" / stream
    done = shard_dir / "packed.json"
    if done.is_file():
        return json.loads(done.read_text())["pattern"]
    train = load_fashion_mnist(fashion_mnist, "train")
    order = stream_order(train.labels, stream)
    png_dir = workdir / "png"
    shutil.rmtree(png_dir, ignore_errors=True)
    png_dir.mkdir(parents=True)
    for position, i in enumerate(order):  # named by position: pack_shards packs in name order
        Image.fromarray(np.ascontiguousarray(train.images[i][..., 0]), "L").save(png_dir / f"{position:06d}.png")
    shutil.rmtree(shard_dir, ignore_errors=True)
    written = pack_shards(png_dir, str(shard_dir / "s-%06d.tar"), per_shard=1000)
    shutil.rmtree(png_dir)
    pattern = str(shard_dir.resolve() / f"s-{{000000..{len(written) - 1:06d}}}.tar")
    done.write_text(json.dumps({"pattern": pattern, "images": len(order), "shards": len(written),
                                "labels_in_order": train.labels[order][::1000].tolist()}))
    print(f"packed the {stream} stream: {pattern}", flush=True)
    return pattern


def train(args: argparse.Namespace, pattern: str, run_dir: Path, policy: str, batch: int) -> dict[str, Any]:
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    snapshot_steps = max(1, args.images // 5 // batch)  # five snapshots: the incremental stream's task ends
    overrides = [f"source.urls=[{json.dumps(pattern)}]", "source.cycle=false", f"replay.policy={policy}",
                 f"replay.max_samples={args.buffer}", "replay.min_fill=1000", "replay.ratio=1",
                 "run.max_seconds=0", "run.max_steps=0", f"run.max_images={args.images}",
                 f"checkpoint.dir={json.dumps(str(run_dir))}", f"checkpoint.every_steps={snapshot_steps}",
                 "checkpoint.every_s=1e9", "checkpoint.keep=1000", "checkpoint.resume=false", "metrics.port=0",
                 *args.overrides]
    exe = Path(sys.executable).parent / "streamssl"
    cmd = [str(exe) if exe.is_file() else "streamssl", "run", "--config", args.profile]
    for item in overrides:
        cmd += ["--set", item]
    launched = time.time()
    code, loop_start = _stream(cmd, run_dir.parent / f"{run_dir.name}.log", marker="metrics on ")
    return {"command": cmd, "exit_code": code, "wall_s": round(time.time() - (loop_start or launched), 1)}


def task_accuracies(trunk: torch.nn.Module, train_set: Any, test_set: Any, size: int, mean: Any, std: Any,
                    args: argparse.Namespace) -> list[float]:
    """kNN accuracy on each task's classes' test images."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.eval_bf16):
        train_feats = extract(trunk, train_set, size=size, mean=mean, std=std).float()
        test_feats = extract(trunk, test_set, size=size, mean=mean, std=std).float()
    scores = knn_classify(train_feats, torch.from_numpy(train_set.labels), test_feats, 10, k=args.k,
                          temperature=args.temperature)
    hit = (scores.argmax(dim=1).numpy() == test_set.labels)
    return [float(hit[np.isin(test_set.labels, task)].mean()) for task in TASKS]


def evaluate(args: argparse.Namespace, run_dir: Path, stream: str, train_set: Any, test_set: Any) -> dict[str, Any]:
    paths = CheckpointManager(run_dir, keep=1000).paths()
    trunk, config = load_trunk(paths[-1])
    a = config["augment"]
    size = eval_size(args, a["sizes"][0])
    out: dict[str, Any] = score(trunk, train_set, test_set, size, a["mean"], a["std"], args, linear=True)
    if stream == "incremental":
        per_snapshot = []
        for path in paths:
            snap, _ = load_trunk(path)
            per_snapshot.append(task_accuracies(snap, train_set, test_set, size, a["mean"], a["std"], args))
        acc = np.array(per_snapshot)  # (snapshots, tasks)
        out["task_accuracy"] = acc.round(4).tolist()
        out["forgetting"] = (acc.max(axis=0) - acc[-1]).round(4).tolist()
    return out


def markdown(results: dict[str, Any]) -> str:
    iid = results["runs"].get("iid-none", {}).get("eval", {})
    lines = ["| stream | replay | kNN top-1 | of i.i.d. kNN | linear | of i.i.d. linear | forgetting (mean / max, "
             "points) | wall time |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, run in results["runs"].items():
        e = run.get("eval")
        if not e:
            continue
        stream, policy = name.split("-", 1)
        rel_knn = f"{e['knn'] / iid['knn']:.3f}" if iid else "-"
        rel_lin = f"{e['linear'] / iid['linear']:.3f}" if iid and e.get("linear") else "-"
        forgetting = "-"
        if "forgetting" in e:
            f = np.array(e["forgetting"][:-1]) * 100  # the last task cannot be forgotten yet
            forgetting = f"{f.mean():.1f} / {f.max():.1f}"
        lines.append(f"| {stream} | {policy} | {e['knn'] * 100:.2f}% | {rel_knn} | {e['linear'] * 100:.2f}% | "
                     f"{rel_lin} | {forgetting} | {run['wall_s'] / 60:.1f} min |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    from streamssl.config import resolve

    batch = resolve(args.profile, overrides=args.overrides).learner.batch_size
    results_path = args.workdir / "results.json"
    results: dict[str, Any] = {"benchmark": "correlated", "images": args.images, "buffer": args.buffer,
                               "profile": args.profile, "overrides": args.overrides, "machine": machine_info(),
                               "command": [sys.executable, *sys.argv], "runs": {}}
    if results_path.is_file():  # runs of earlier invocations in this workdir stay in the table
        results["runs"] = json.loads(results_path.read_text()).get("runs", {})
    if args.table:
        print(markdown(results))
        return 0
    train_set, test_set = load_splits(f"fashion-mnist:{args.fashion_mnist}")
    for stream in args.streams:
        pattern = pack(args.workdir, args.fashion_mnist, stream)
        for policy in args.policies:
            name = f"{stream}-{policy}"
            run_dir = args.workdir / name
            info = results["runs"].get(name, {}) if args.skip_train else train(args, pattern, run_dir, policy, batch)
            results["runs"][name] = info
            if info.get("exit_code", 1) != 0:
                print(f"{name} failed; see {run_dir}.log", flush=True)
                continue
            info["eval"] = evaluate(args, run_dir, stream, train_set, test_set)
            print(f"{name}: kNN {info['eval']['knn']:.4f} linear {info['eval']['linear']:.4f}"
                  + (f" forgetting {info['eval']['forgetting']}" if "forgetting" in info["eval"] else ""), flush=True)
            results_path.write_text(json.dumps(results, indent=1))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

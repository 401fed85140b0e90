"""Scale-out on this machine (issue 19): the learner step of one process against two gloo ranks, and what the
ranks send each other per step.

Three runs of ``streamssl bench learner`` (``--steps`` timed steps after ``--warmup``, random views of the
profile's shapes, no data path: the step alone; a full SwAV queue), each one after the other:

- ``1 process x 2 threads``, batch B: the machine as one process uses it;
- ``1 process x 1 thread``, batch B: one rank's compute alone;
- ``2 ranks x 1 thread`` (gloo), batch B each (the job's batch 2B: weak scaling, as the authors' fixed batch
  per GPU). Efficiency = its images/s over twice the 1-thread process's: what communication and
  synchronisation leave of perfect scaling.

For the two ranks it also counts what Python sends (every ``torch.distributed`` all-reduce and all-gather:
SyncBatchNorm's statistics, Sinkhorn's sums, the step's finite check) with their bytes and seconds, and
times one all-reduce of the gradient volume that DDP's C++ reducer sends (its buckets are not visible from
Python; DDP overlaps them with the backward pass, the timing here does not)::

    python benchmarks/scaling.py --config cpu-small --steps 20 --json runs/scaling.json

The analysis of these figures for 8 and 64 GPUs is in benchmarks/README.md ("Scaling").
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from quality_report import machine_info  # noqa: E402

from streamssl import distributed  # noqa: E402
from streamssl.config import resolve  # noqa: E402
from streamssl.tools.bench import bench_learner  # noqa: E402


class Counted:
    """Every Python-side collective: calls, bytes and seconds per kind."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = defaultdict(int)
        self.bytes: dict[str, int] = defaultdict(int)
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn: Any) -> Any:
        def counted(tensor_or_list: Any, *args: Any, **kwargs: Any) -> Any:
            t = args[0] if name == "all_gather" else tensor_or_list
            start = time.perf_counter()
            out = fn(tensor_or_list, *args, **kwargs)
            self.seconds[name] += time.perf_counter() - start
            self.calls[name] += 1
            self.bytes[name] += t.numel() * t.element_size()
            return out
        return counted


def timed_steps(args: argparse.Namespace, threads: int) -> dict[str, Any]:
    """``streamssl bench learner``'s figures for the profile on ``threads`` threads."""
    cfg = resolve(args.config, environ={}, overrides=[*args.set, f"run.threads={threads}"])
    return bench_learner(cfg, steps=args.steps, warmup=args.warmup)


def _rank(rank: int, port: int, args: argparse.Namespace, out: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    distributed.init(distributed.world_from_env(), torch.device("cpu"), timeout_s=600)
    counted = Counted()
    dist.all_reduce, dist.all_gather = counted.wrap("all_reduce", dist.all_reduce), counted.wrap(
        "all_gather", dist.all_gather)
    result = timed_steps(args, threads=1)
    steps = args.warmup + args.steps  # counted over every step, the warm-up ones included
    per_step = {k: {"calls": counted.calls[k] / steps, "bytes": counted.bytes[k] / steps,
                    "ms": 1000 * counted.seconds[k] / steps} for k in counted.calls}
    grads = torch.zeros(result["params"])  # DDP's volume, one all-reduce (its buckets overlap the backward)
    dist.barrier()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        dist.all_reduce(grads)
        times.append(time.perf_counter() - start)
    out.put((rank, {**result, "python_collectives_per_step": per_step,
                    "grad_allreduce_ms": 1000 * statistics.median(times)}))
    distributed.shutdown()


def two_ranks(args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_rank, args=(r, port, args, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=3600) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    step_s = max(r["step_s"] for r in results.values())  # the ranks step together: the slower sets the pace
    return {**results[0], "step_s": step_s, "images_per_s": 2 * results[0]["batch_size"] / step_s}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="cpu-small")
    parser.add_argument("--set", action="append", default=[], help="a config override, as `streamssl run --set`")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    one_two = timed_steps(args, threads=2)
    one_one = timed_steps(args, threads=1)
    ranks = two_ranks(args)
    efficiency = ranks["images_per_s"] / (2 * one_one["images_per_s"])
    print(f"machine: {machine_info()}")
    print(f"{'run':<24}{'batch':>7}{'ms/step':>10}{'img/s':>9}")
    for name, r, b in (("1 process x 2 threads", one_two, one_two["batch_size"]),
                       ("1 process x 1 thread", one_one, one_one["batch_size"]),
                       ("2 ranks x 1 thread", ranks, 2 * ranks["batch_size"])):
        print(f"{name:<24}{b:>7}{1000 * r['step_s']:>10.1f}{r['images_per_s']:>9.1f}")
    print(f"scaling efficiency of 2 ranks: {efficiency:.1%} (2-rank img/s over twice the 1-thread process's)")
    print(f"DDP gradients: {ranks['params']:,} floats ({4 * ranks['params'] / 2**20:.1f} MiB) per step; one gloo "
          f"all-reduce of them: {ranks['grad_allreduce_ms']:.1f} ms")
    for kind, c in ranks["python_collectives_per_step"].items():
        print(f"python {kind}: {c['calls']:.0f} calls, {c['bytes'] / 1024:.1f} KiB, {c['ms']:.1f} ms per step")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine_info(), "one_process_two_threads": one_two,
                                         "one_process_one_thread": one_one, "two_ranks": ranks,
                                         "efficiency": efficiency}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

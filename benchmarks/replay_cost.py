"""What a replay buffer costs a training step (issue 20): its bookkeeping per step, beside the step itself.

A buffer of ``--samples`` (10,000) samples with ``--dim`` (128) dimensional embeddings is filled and embedded;
then each step does what the daemon does for a batch of ``--batch`` (128): ``batch`` arrivals (each evicting
one sample by the policy), ``batch`` draws, and, for MinRed, the embeddings of the drawn samples handed back.
Prints the milliseconds per step of each policy, median of ``--steps`` steps, and their share of
``--step-ms``, the learner step it rides beside (default: the fmnist-cpu profile's, about 128 images at
~260 images/s on a 2-core CPU)::

    python benchmarks/replay_cost.py --samples 10000 --dim 128 --batch 128
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from streamssl.stream.replay import ReplayBuffer
from streamssl.stream.shards import Sample


def step_times(policy: str, args: argparse.Namespace) -> list[float]:
    rng = np.random.default_rng(0)
    buf = ReplayBuffer(policy, max_samples=args.samples, max_bytes=1 << 40, seed=0)
    n = 0

    def arrive() -> Sample:
        nonlocal n
        n += 1
        return Sample(key=f"{n:09d}", data=b"x" * 300, ext="png", url="s.tar", index=n)

    for _ in range(args.samples):
        buf.add(arrive())
    for start in range(0, args.samples, 1000):  # every sample embedded once, as after a first pass
        ids = [s.id for s in buf.samples[start:start + 1000]]
        buf.update_embeddings(ids, rng.normal(size=(len(ids), args.dim)).astype(np.float32))
    times = []
    for _ in range(args.steps):
        emb = rng.normal(size=(args.batch, args.dim)).astype(np.float32)
        t = time.perf_counter()
        for _ in range(args.batch):
            buf.add(arrive())
        ids = [buf.draw().id for _ in range(args.batch)]
        buf.update_embeddings(ids, emb)
        times.append(time.perf_counter() - t)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--step-ms", type=float, default=490.0, help="The learner step the bookkeeping rides beside.")
    args = p.parse_args(argv)
    print(f"buffer {args.samples} samples x {args.dim} dims, {args.batch} arrivals and draws a step, "
          f"median of {args.steps} steps")
    for policy in ("fifo", "reservoir", "minred"):
        ms = statistics.median(step_times(policy, args)) * 1000
        print(f"{policy:>9}: {ms:7.2f} ms a step  ({ms / args.step_ms * 100:5.2f}% of a {args.step_ms:g} ms step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Baselines for the quality benchmark: lightly's SwaV, SimCLR, MoCo and BYOL in a plain PyTorch loop, for a
wall-clock budget.

The way a lightly user trains SwaV: lightly's ``SwaVTransform`` (multi-crop views made by PIL/torchvision in
``DataLoader`` workers), ``SwaVProjectionHead``, ``SwaVPrototypes`` renormalised before every step and
``SwaVLoss`` (Sinkhorn-Knopp codes, swapped prediction), Adam. The images are the Fashion-MNIST training
images, read from the idx files with their labels dropped; the trunk is the very one streamssl builds
(``streamssl.learner.model.make_trunk``: a torchvision ResNet, optionally with the small-image stem: a 3x3 conv
of stride 1 or 2, with or without the max-pool), so ``benchmarks/quality.py`` can give both methods the same
data, views, trunk, batch and budget.

``--objective simclr`` trains the seeds' SimCLR instead, on the same views (two) and trunk: lightly's
``SimCLRProjectionHead`` (the same widths as the SwaV head) and ``NTXentLoss`` (the other view of the image is
the positive, the batch's other 2N-2 views the negatives), as an alternative objective to measure SwaV
against on the same stream.

``--objective moco`` is lightly's MoCo v2 recipe: ``MoCoProjectionHead``, a momentum key encoder
(``update_momentum``, ``--moco-momentum``), ``NTXentLoss`` with a memory bank of ``--moco-queue`` keys and
temperature ``--moco-temperature``, symmetrised over the two views; without batch shuffling (lightly's
single-device example has none). ``--objective byol`` is lightly's BYOL: ``BYOLProjectionHead`` and
``BYOLPredictionHead``, an EMA target whose momentum follows lightly's ``cosine_schedule`` from
``--byol-momentum`` to ``--byol-final-momentum`` over ``--byol-momentum-steps`` steps, and
``NegativeCosineSimilarity`` symmetrised over the two views. quality.py passes streamssl's own settings of
each method, so the two sides differ in implementation only.

Every ``--snapshot-s`` seconds of training (wall clock since the loop started, data waits included) and once
more when the budget is spent, the trunk weights are written to ``OUT/snap-<seconds>.pt`` together with the
elapsed seconds, the step and the images seen, so an accuracy-versus-time curve can be drawn.

Needs lightly, a benchmark-only requirement that streamssl itself does not depend on::

    pip install lightly torch==<the installed torch> torchvision==<the installed torchvision>

(pinning torch keeps pip from replacing the installed build). Example::

    python benchmarks/lightly_baseline.py --out runs/lightly --budget-s 720 --snapshot-s 120 \\
        --arch resnet18 --small-stem --sizes 28 --counts 2 --batch-size 64
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from streamssl.config import LearnerConfig
from streamssl.learner.evaluate import FASHION_MNIST_DIR, load_fashion_mnist
from streamssl.learner.model import TRUNK_DIMS, make_trunk, stem_of
from streamssl.learner.optim import lr_at, set_lr

OBJECTIVES = ("swav", "simclr", "moco", "byol")


class UnlabeledImages(Dataset):
    """Grey images as PIL RGB images through a transform; no labels (a dummy 0 keeps lightly's shape)."""

    def __init__(self, images: list[np.ndarray], transform: Any) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[list[Tensor], int]:
        return self.transform(Image.fromarray(self.images[index], "RGB")), 0


class LightlySwaV(nn.Module):
    """Trunk -> lightly SwaVProjectionHead -> L2 normalisation -> lightly SwaVPrototypes."""

    def __init__(self, trunk: nn.Module, feature_dim: int, hidden_dim: int, out_dim: int, n_prototypes: int,
                 freeze_prototypes_steps: int) -> None:
        from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes

        super().__init__()
        self.backbone = trunk
        self.projection_head = SwaVProjectionHead(feature_dim, hidden_dim, out_dim)
        self.prototypes = SwaVPrototypes(out_dim, n_prototypes=n_prototypes,
                                         n_steps_frozen_prototypes=freeze_prototypes_steps)

    def forward(self, x: Tensor, step: int) -> Tensor:
        x = self.backbone(x).flatten(start_dim=1)
        x = nn.functional.normalize(self.projection_head(x), dim=1, p=2)
        return self.prototypes(x, step)


class LightlySimCLR(nn.Module):
    """Trunk -> lightly SimCLRProjectionHead (NTXentLoss normalises the projections itself)."""

    def __init__(self, trunk: nn.Module, feature_dim: int, hidden_dim: int, out_dim: int) -> None:
        from lightly.models.modules import SimCLRProjectionHead

        super().__init__()
        self.backbone = trunk
        self.projection_head = SimCLRProjectionHead(feature_dim, hidden_dim, out_dim)

    def forward(self, x: Tensor, step: int) -> Tensor:
        return self.projection_head(self.backbone(x).flatten(start_dim=1))


class LightlyMoCo(nn.Module):
    """Query encoder (trunk -> MoCoProjectionHead) and its momentum copy for the keys."""

    def __init__(self, trunk: nn.Module, feature_dim: int, hidden_dim: int, out_dim: int) -> None:
        from lightly.models.modules import MoCoProjectionHead

        super().__init__()
        self.backbone = trunk
        self.projection_head = MoCoProjectionHead(feature_dim, hidden_dim, out_dim)
        self._momentum_copies()

    def _momentum_copies(self) -> None:
        """The momentum (key / target) copies of the trunk and the projection head, without gradients."""
        from lightly.models.utils import deactivate_requires_grad

        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

    def forward(self, x: Tensor, step: int) -> Tensor:
        return self.projection_head(self.backbone(x).flatten(start_dim=1))

    def forward_momentum(self, x: Tensor) -> Tensor:
        return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()

    def update_momentum(self, m: float) -> None:
        from lightly.models.utils import update_momentum

        update_momentum(self.backbone, self.backbone_momentum, m=m)
        update_momentum(self.projection_head, self.projection_head_momentum, m=m)


class LightlyBYOL(LightlyMoCo):
    """Online network (trunk -> BYOLProjectionHead -> BYOLPredictionHead) and its EMA target (no predictor)."""

    def __init__(self, trunk: nn.Module, feature_dim: int, hidden_dim: int, out_dim: int,
                 predictor_dim: int) -> None:
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead

        nn.Module.__init__(self)
        self.backbone = trunk
        self.projection_head = BYOLProjectionHead(feature_dim, hidden_dim, out_dim)
        self.prediction_head = BYOLPredictionHead(out_dim, predictor_dim, out_dim)
        self._momentum_copies()

    def forward(self, x: Tensor, step: int) -> Tensor:
        return self.prediction_head(self.projection_head(self.backbone(x).flatten(start_dim=1)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="Folder for the snapshots and log.jsonl.")
    p.add_argument("--budget-s", type=float, default=720.0, help="Wall-clock training budget in seconds.")
    p.add_argument("--snapshot-s", type=float, default=120.0, help="Save the trunk every this many seconds.")
    p.add_argument("--fashion-mnist", default=FASHION_MNIST_DIR, help="Folder of the Fashion-MNIST idx files.")
    p.add_argument("--arch", default="resnet18", choices=sorted(TRUNK_DIMS), help="torchvision ResNet trunk.")
    p.add_argument("--small-stem", action=argparse.BooleanOptionalAction, default=True,
                   help="3x3 first conv of stride --stem-stride, no max-pool unless --stem-pool (the CIFAR stem).")
    p.add_argument("--stem-stride", type=int, default=1, choices=(1, 2),
                   help="Stride of the small stem's conv (streamssl's model.stem_stride).")
    p.add_argument("--stem-pool", action=argparse.BooleanOptionalAction, default=False,
                   help="Keep the 3x3/2 max-pool after the small stem's conv (streamssl's model.stem_pool).")
    p.add_argument("--sizes", type=int, nargs="+", default=[28], help="View side per crop group.")
    p.add_argument("--counts", type=int, nargs="+", default=[2], help="Views per crop group.")
    p.add_argument("--min-scales", type=float, nargs="+", default=[0.3], help="Crop area minimum per group.")
    p.add_argument("--max-scales", type=float, nargs="+", default=[1.0], help="Crop area maximum per group.")
    p.add_argument("--flip-p", type=float, default=0.5, help="Horizontal flip probability.")
    p.add_argument("--jitter-strength", type=float, default=0.4, help="Colour jitter strength (lightly cj_strength).")
    p.add_argument("--jitter-p", type=float, default=0.8, help="Colour jitter probability.")
    p.add_argument("--grayscale-p", type=float, default=0.0, help="Random grayscale probability.")
    p.add_argument("--blur-p", type=float, default=0.0, help="Gaussian blur probability.")
    p.add_argument("--blur-sigma", type=float, nargs=2, default=[0.1, 2.0], help="Gaussian blur sigma range.")
    p.add_argument("--mean", type=float, nargs=3, default=[0.286] * 3, help="Normalisation mean per channel.")
    p.add_argument("--std", type=float, nargs=3, default=[0.353] * 3, help="Normalisation std per channel.")
    p.add_argument("--batch-size", type=int, default=64, help="Images per step.")
    p.add_argument("--hidden-dim", type=int, default=512, help="Projection head hidden width.")
    p.add_argument("--out-dim", type=int, default=128, help="Projection head output width.")
    p.add_argument("--objective", choices=OBJECTIVES, default="swav",
                   help="swav (lightly's SwaV), simclr (NTXentLoss on two views), moco (MoCo v2 with a memory "
                        "bank) or byol (BYOL).")
    p.add_argument("--simclr-temperature", type=float, default=0.2, help="NTXentLoss temperature (simclr only).")
    p.add_argument("--moco-temperature", type=float, default=0.2, help="MoCo InfoNCE temperature.")
    p.add_argument("--moco-queue", type=int, default=4096, help="MoCo memory-bank keys.")
    p.add_argument("--moco-momentum", type=float, default=0.99, help="MoCo key encoder momentum.")
    p.add_argument("--byol-predictor-dim", type=int, default=512, help="BYOL predictor hidden width.")
    p.add_argument("--byol-momentum", type=float, default=0.99, help="BYOL target momentum at step 0.")
    p.add_argument("--byol-final-momentum", type=float, default=0.999, help="BYOL target momentum at the end.")
    p.add_argument("--byol-momentum-steps", type=int, default=10_000, help="Steps of the BYOL momentum cosine.")
    p.add_argument("--n-prototypes", type=int, default=512, help="Prototypes (lightly's CIFAR-10 recipe: 512).")
    p.add_argument("--freeze-prototypes-steps", type=int, default=0, help="Steps with frozen prototypes.")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (lightly's CIFAR-10 recipe: 2e-3).")
    p.add_argument("--schedule", choices=("constant", "budget"), default="constant",
                   help="constant (lightly's recipe), or budget: one cosine from --lr to --final-lr over the "
                        "wall-clock budget (as streamssl's learner.schedule = budget).")
    p.add_argument("--final-lr", type=float, default=0.0, help="Last learning rate of the budget schedule.")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="bfloat16 autocast of the forward pass (the loss runs in float32).")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                   help="channels_last memory format for the trunk and views.")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes.")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0: torch's default.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the initialisation and the data order.")
    p.add_argument("--log-every", type=int, default=10, help="One progress line every this many steps.")
    args = p.parse_args(argv)
    groups = len(args.sizes)
    for name in ("counts", "min_scales", "max_scales"):
        if len(getattr(args, name)) != groups:
            p.error(f"--{name.replace('_', '-')}: needs one value per size ({groups})")
    if args.objective != "swav" and sum(args.counts) != 2:
        p.error(f"--objective {args.objective}: needs exactly two views (--counts sums to {sum(args.counts)})")
    return args


def make_transform(args: argparse.Namespace) -> Any:
    """lightly's SwaVTransform with the given crop groups, jitter, grayscale, blur and normalisation."""
    from lightly.transforms import SwaVTransform

    return SwaVTransform(crop_sizes=tuple(args.sizes), crop_counts=tuple(args.counts),
                         crop_min_scales=tuple(args.min_scales), crop_max_scales=tuple(args.max_scales),
                         hf_prob=args.flip_p, cj_prob=args.jitter_p,
                         cj_strength=args.jitter_strength, random_gray_scale=args.grayscale_p,
                         gaussian_blur=args.blur_p, sigmas=tuple(args.blur_sigma),
                         normalize={"mean": list(args.mean), "std": list(args.std)})


def save_snapshot(out: Path, model: nn.Module, info: dict[str, Any]) -> Path:
    path = out / f"snap-{round(info['elapsed_s']):06d}.pt"
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"trunk": model.backbone.state_dict(), **info}, tmp)
    os.replace(tmp, path)
    return path


def train(args: argparse.Namespace) -> dict[str, Any]:
    import lightly
    from lightly.loss import NegativeCosineSimilarity, NTXentLoss, SwaVLoss
    from lightly.utils.scheduler import cosine_schedule

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    images = load_fashion_mnist(args.fashion_mnist, "train").images  # labels are never used
    dataset = UnlabeledImages(images, make_transform(args))
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        drop_last=True, persistent_workers=args.workers > 0,
                        generator=torch.Generator().manual_seed(args.seed))
    trunk = make_trunk(args.arch, small_stem=args.small_stem, stem_stride=args.stem_stride, stem_pool=args.stem_pool)
    swav = args.objective == "swav"
    model: nn.Module
    if swav:
        model = LightlySwaV(trunk, TRUNK_DIMS[args.arch], args.hidden_dim, args.out_dim, args.n_prototypes,
                            args.freeze_prototypes_steps)
        criterion: nn.Module = SwaVLoss()
    elif args.objective == "simclr":
        model = LightlySimCLR(trunk, TRUNK_DIMS[args.arch], args.hidden_dim, args.out_dim)
        criterion = NTXentLoss(temperature=args.simclr_temperature)
    elif args.objective == "moco":
        model = LightlyMoCo(trunk, TRUNK_DIMS[args.arch], args.hidden_dim, args.out_dim)
        criterion = NTXentLoss(temperature=args.moco_temperature, memory_bank_size=(args.moco_queue, args.out_dim))
    else:
        model = LightlyBYOL(trunk, TRUNK_DIMS[args.arch], args.hidden_dim, args.out_dim, args.byol_predictor_dim)
        criterion = NegativeCosineSimilarity()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    # the budget schedule is streamssl's own (no warmup: lightly's recipe has none)
    schedule = (LearnerConfig(base_lr=args.lr, final_lr=args.final_lr, warmup_steps=0, schedule="budget")
                if args.schedule == "budget" else None)
    n_high = args.counts[0]
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    meta = {"lightly": str(lightly.__version__), "torch": str(torch.__version__), "threads": torch.get_num_threads(),
            "python": platform.python_version()}
    log = open(args.out / "log.jsonl", "a", buffering=1)  # noqa: SIM115 - kept open for the run
    objective = {"swav": f"SwaV, K={args.n_prototypes}", "simclr": f"SimCLR, T={args.simclr_temperature:g}",
                 "moco": f"MoCo v2, T={args.moco_temperature:g}, queue {args.moco_queue}",
                 "byol": f"BYOL, momentum {args.byol_momentum:g}"}[args.objective]
    print(f"lightly {lightly.__version__} {objective}: {args.arch} (small stem {args.small_stem}, stride "
          f"{args.stem_stride}, max-pool {args.stem_pool}), batch "
          f"{args.batch_size}, views {args.counts}x{args.sizes}, budget {args.budget_s:.0f} s",
          flush=True)

    step, seen, snapshots = 0, 0, []
    start = time.monotonic()
    next_snapshot = args.snapshot_s
    window_start, window_images, last_loss = start, 0, math.nan
    model.train()
    done = False
    while not done:
        for views, _ in loader:
            elapsed = time.monotonic() - start
            if elapsed >= args.budget_s:
                done = True
                break
            if schedule is not None:
                set_lr(optimizer, lr_at(step, schedule, progress=elapsed / args.budget_s))
            if args.channels_last:
                views = [v.contiguous(memory_format=torch.channels_last) for v in views]
            if swav:
                model.prototypes.normalize()
            if args.objective == "moco":
                model.update_momentum(args.moco_momentum)
            elif args.objective == "byol":  # lightly's BYOL example: cosine_schedule over the run's steps
                model.update_momentum(cosine_schedule(min(step, args.byol_momentum_steps), args.byol_momentum_steps,
                                                      args.byol_momentum, args.byol_final_momentum))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                outputs = [model(v, step) for v in views]
                keys = ([model.forward_momentum(v) for v in views] if args.objective in ("moco", "byol")
                        else [])
            outputs = [o.float() for o in outputs]
            keys = [k.float() for k in keys]
            if swav:
                loss = criterion(outputs[:n_high], outputs[n_high:])
            elif args.objective == "simclr":
                loss = criterion(*outputs)
            else:  # lightly's examples: each view's queries / predictions against the other view's keys
                loss = 0.5 * (criterion(outputs[0], keys[1]) + criterion(outputs[1], keys[0]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            seen += views[0].shape[0]
            window_images += views[0].shape[0]
            last_loss = float(loss.detach())
            if step % args.log_every == 0:
                now = time.monotonic()
                rate = window_images / (now - window_start)
                print(f"step {step:>6} | {rate:6.1f} img/s | loss {last_loss:6.3f} | {now - start:6.0f} s", flush=True)
                log.write(json.dumps({"time": time.time(), "elapsed_s": round(now - start, 2), "step": step,
                                      "images": seen, "loss": round(last_loss, 5), "images_per_s": round(rate, 2)})
                          + "\n")
                window_start, window_images = now, 0
            elapsed = time.monotonic() - start
            if elapsed >= next_snapshot and elapsed < args.budget_s:
                info = {"elapsed_s": elapsed, "step": step, "images": seen, "loss": last_loss,
                        "config": config, "meta": meta}
                snapshots.append(str(save_snapshot(args.out, model, info)))
                next_snapshot += args.snapshot_s
    elapsed = time.monotonic() - start
    info = {"elapsed_s": elapsed, "step": step, "images": seen, "loss": last_loss, "config": config, "meta": meta,
            "final": True}
    snapshots.append(str(save_snapshot(args.out, model, info)))
    log.close()
    summary = {"steps": step, "images": seen, "seconds": round(elapsed, 1), "last_loss": last_loss,
               "snapshots": snapshots, **meta}
    print(json.dumps(summary), flush=True)
    return summary


def load_snapshot_trunk(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The trunk of a snapshot written by this script (eval mode) and the snapshot's info."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    cfg = state["config"]
    trunk = make_trunk(cfg["arch"], **stem_of(cfg))
    trunk.load_state_dict(state["trunk"])
    return trunk.eval(), {k: v for k, v in state.items() if k != "trunk"}


def main(argv: list[str] | None = None) -> int:
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Throughput of the augment stage alone: images/s and views/s of a backend on real shards.

Reads encoded images from WebDataset tar shards (any pattern ``streamssl run`` takes: braces and globs;
through the samples stage's ``read_shard``, its checks included), holds them in memory so that only the
multi-crop is timed, then runs ``batches`` batches through the chosen backend the way it runs in practice:
DALI through ``DaliMultiCrop`` calls (one warm-up batch untimed: DALI works only when called), torchvision
through a ``DataLoader`` with ``cfg.n_threads`` worker processes over ``MultiCropDataset``, timed from the
moment its workers start and counting every batch, so that what they prefetch is never free.

    python -m streamssl.augment.bench --make-shards DIR      # ~600 synthetic 400x300 JPEGs in 6 shards
    python -m streamssl.augment.bench --shards 'DIR/shard-{000000..000005}.tar' --backend dali --batches 20
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import resource
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from streamssl.config import AugmentConfig


def synthetic_image(rng: np.random.Generator, width: int = 400, height: int = 300) -> np.ndarray:
    """A natural-ish RGB image (H, W, 3) uint8: smooth colour gradients, waves, filled ellipses, noise,
    slightly blurred (so it compresses like a photo rather than like white noise)."""
    from PIL import Image, ImageDraw, ImageFilter

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    corners = rng.uniform(0, 255, (3, 3))
    channels = [c[0] + (c[1] - c[0]) * xx / width + (c[2] - 128) * 0.3 * np.sin(yy / rng.uniform(10, 60))
                for c in corners]
    pixels = np.stack(channels, -1) + rng.normal(0, 12, (height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(8):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        draw.ellipse([x0, y0, x0 + int(rng.integers(10, 120)), y0 + int(rng.integers(10, 120))],
                     fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return np.asarray(image.filter(ImageFilter.GaussianBlur(1)))


def synthetic_jpeg(rng: np.random.Generator, width: int = 400, height: int = 300, quality: int = 90) -> bytes:
    """``synthetic_image`` encoded as a JPEG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(synthetic_image(rng, width, height)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_shards(folder: str | Path, n_images: int = 600, per_shard: int = 100, seed: int = 0) -> str:
    """Write ``n_images`` synthetic JPEGs as WebDataset shards into ``folder``; returns their brace pattern."""
    import webdataset as wds

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_shards = (n_images + per_shard - 1) // per_shard
    for s in range(n_shards):
        with wds.TarWriter(str(folder / f"shard-{s:06d}.tar")) as sink:
            for i in range(s * per_shard, min(n_images, (s + 1) * per_shard)):
                sink.write({"__key__": f"{i:08d}", "jpg": synthetic_jpeg(rng)})
    return str(folder / f"shard-{{000000..{n_shards - 1:06d}}}.tar")


def read_images(shards: str, limit: int, on_bad: Callable[[str], None] | None = None) -> list[bytes]:
    """Up to ``limit`` encoded images from the shards matching ``shards`` (brace and glob patterns, as the
    run's source expands them), read through shards.py (its checks, transcoding and bad-sample reasons,
    counted via ``on_bad``)."""
    images: list[bytes] = []
    for data in _iter_encoded(shards, on_bad or (lambda reason: None)):
        images.append(data)
        if len(images) >= limit:
            break
    return images


def _iter_encoded(shards: str, on_bad: Callable[[str], None]) -> Iterator[bytes]:
    from streamssl.stream.shards import read_shard
    from streamssl.stream.source import expand_pattern

    for url in expand_pattern(shards):
        for _, sample in read_shard(url, on_bad=on_bad):
            if sample is not None:
                yield sample.data


def bench_augment(shards: str, backend: str, batches: int, cfg: AugmentConfig,
                  batch_size: int = 64) -> dict[str, Any]:
    """Time ``batches`` batches of ``batch_size`` images through ``backend`` ("dali" or "torchvision").

    ``shards``: one shard pattern as ``source.urls`` takes it (braces, globs, URLs; ``expand_pattern``), read
    with the samples stage's checks (a ``pipe:`` URL is refused, as in a run that does not allow it).

    What the clock covers, so that no image is made off it:
    - torchvision: from before the DataLoader's ``n_threads`` workers start to the last batch, every batch
      counted. Worker start-up (a fork, the first image of each) is in the figure, and so is the last
      round, where fewer than ``n_threads`` workers may be busy: with few batches the rate is a little low,
      never high. Warming up first and timing the batches after would not be honest: while the warm-up
      batches are made the other workers make up to ``n_threads x prefetch`` more, which the timed part
      would then collect for free (one warm-up batch once printed 1,259 img/s at 49.8 CPU-ms an image on 2
      cores). For a steady-state rate, time many batches per worker (``batches`` >= 10 x ``n_threads``).
    - DALI: one warm-up batch untimed (first-call allocations), then each timed call makes its own batch:
      the pipeline holds no batches ahead (``prefetch_queue_depth`` 1, inputs fed per call).

    Returns a JSON-able dict: images_per_s, views_per_s, backend, batches, batch_size, n_views, n_threads,
    seconds, images (counted: decoded and augmented), bad (count by reason), cpu_ms_per_image (this process
    and its workers, DALI's warm-up batch included in both the CPU time and the images). Images repeat when
    the shards hold fewer than needed.
    """
    from streamssl.augment.spec import MultiCropSpec

    if backend not in ("dali", "torchvision"):
        raise ValueError(f"backend: dali or torchvision, got {backend!r}")
    if batches < 1 or batch_size < 1:
        raise ValueError("batches and batch_size must be >= 1")
    spec = MultiCropSpec.from_config(cfg)
    needed = (batches + (backend == "dali")) * batch_size  # DALI: + the warm-up batch
    bad: Counter[str] = Counter()  # reasons of the samples stage (while reading) and of the augment stage
    images = read_images(shards, needed, on_bad=lambda reason: bad.update([reason]))
    if not images:
        raise ValueError(f"no images in {shards!r}")
    images = [images[i % len(images)] for i in range(needed)]
    timer = _time_dali if backend == "dali" else _time_torchvision
    seconds, n_images, cpu_s = timer(spec, cfg, images, batch_size, bad)
    return {
        "backend": backend, "batches": batches, "batch_size": batch_size, "n_views": spec.n_views,
        "view_sizes": list(spec.view_sizes), "n_threads": cfg.n_threads, "images": n_images,
        "seconds": round(seconds, 4), "images_per_s": round(n_images / seconds, 2),
        "views_per_s": round(n_images * spec.n_views / seconds, 2), "bad": dict(bad),
        # CPU seconds per image (this process and its workers, warm-up batch included): what the images
        # cost whatever else the machine runs; wall-clock rates need otherwise idle cores.
        "cpu_ms_per_image": round(1000 * cpu_s / len(images), 3),
    }


def _cpu_s() -> float:
    """CPU seconds of this process and of its reaped children (DataLoader workers, once joined)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _time_dali(spec: Any, cfg: AugmentConfig, images: list[bytes], batch_size: int,
               bad: Counter[str]) -> tuple[float, int, float]:
    from streamssl.augment.dali import DaliMultiCrop

    multicrop = DaliMultiCrop(spec, batch_size, n_threads=cfg.n_threads, seed=cfg.seed,
                              on_bad=lambda reason: bad.update([reason]))
    cpu_start = _cpu_s()
    multicrop(images[:batch_size])  # warm-up: first-run allocations
    n_images = 0
    start = time.perf_counter()
    for b in range(1, len(images) // batch_size):
        _, kept = multicrop(images[b * batch_size:(b + 1) * batch_size])
        n_images += len(kept)
    return time.perf_counter() - start, n_images, _cpu_s() - cpu_start


def _time_torchvision(spec: Any, cfg: AugmentConfig, images: list[bytes], batch_size: int,
                      bad: Counter[str]) -> tuple[float, int, float]:
    import torch

    from streamssl.augment.reference import MultiCropDataset, collate_views

    cpu_start = _cpu_s()
    loader = torch.utils.data.DataLoader(MultiCropDataset(images, spec), batch_size=batch_size,
                                         num_workers=cfg.n_threads, collate_fn=collate_views,
                                         prefetch_factor=cfg.prefetch if cfg.n_threads > 0 else None)
    # The clock starts before the workers do and every batch counts: with a warm-up batch taken first, the
    # workers would already have made n_threads * prefetch batches on an untimed clock (a short run once
    # printed 1,259 img/s at 49.8 CPU-ms an image on 2 cores). Worker start-up (a fork) is in the figure.
    start = time.perf_counter()
    batches = iter(loader)
    n_images = 0
    for _, kept, dropped in batches:
        n_images += len(kept)
        bad.update(["decode_error"] * len(dropped))
    seconds = time.perf_counter() - start
    del batches  # joins the workers, so that their CPU time is counted
    return seconds, n_images, _cpu_s() - cpu_start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", help="WebDataset shards to read images from: a brace or glob pattern")
    parser.add_argument("--backend", choices=("dali", "torchvision"), default="dali")
    parser.add_argument("--batches", type=int, default=20,
                        help="timed batches (DALI: one more warms up; torchvision: worker start-up is timed, so "
                             "give each worker ten or more for a steady-state rate)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None,
                        help="DALI threads / DataLoader workers (default: the config's n_threads). "
                             "Use the number of free cores.")
    parser.add_argument("--config", default=None, help="run profile (pipelines/NAME.toml); default: defaults")
    parser.add_argument("--make-shards", metavar="DIR", default=None,
                        help="write ~600 synthetic 400x300 JPEGs as shards into DIR, print their pattern, exit")
    args = parser.parse_args(argv)
    if args.make_shards:
        print(write_shards(args.make_shards))
        return
    if not args.shards:
        parser.error("--shards is required (or --make-shards DIR)")
    if args.config:
        from streamssl.config import resolve

        cfg = resolve(args.config).augment
    else:
        cfg = AugmentConfig()
    if args.threads is not None:
        cfg = dataclasses.replace(cfg, n_threads=args.threads)
    print(json.dumps(bench_augment(args.shards, args.backend, args.batches, cfg, args.batch_size)))


if __name__ == "__main__":
    main()

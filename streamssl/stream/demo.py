"""The embedded default stream: real photographs that ship inside an installed package, packed into shards.

When ``source.urls`` is empty, ``streamssl run`` streams the sample images bundled with scikit-image
(astronaut, coffee, chelsea, rocket, motorcycles, ... about two dozen photographs and textures) so that a
newcomer sees the real pipeline (shards -> decode -> multi-crop -> SwAV) with no data and no service. They
are packed once into a local shard and cycled; every pass reshuffles and multi-crop makes every view new.

They are packed at the resolution the views need (``demo_max_side``: 4x the largest view, at least 128 px),
not at their own (up to 740 px): a 32 px view does not need a 512 px PNG decoded and antialiased down, and
on a 2-core CPU the data path shares the cores with the learner.
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from streamssl.stream.pack import pack_shards

log = logging.getLogger("streamssl.stream.demo")


def bundled_images_dir() -> Path:
    """The folder of scikit-image's bundled sample images (found without importing scikit-image)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded demo stream needs scikit-image (pip install scikit-image), "
                           "or set source.urls to your shards")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    if not folder.is_dir():
        raise RuntimeError(f"scikit-image is installed without its sample images ({folder} is missing)")
    return folder


def demo_max_side(view_sizes: Iterable[int]) -> int:
    """Longer side of the packed demo images for views of these sizes: 4x the largest, at least 128 px."""
    return max(128, 4 * max(view_sizes, default=0))


def demo_shards(out_dir: str | Path, max_side: int = 0) -> str:
    """Pack the bundled images into ``out_dir`` (once) and return a shard pattern for them; with
    ``max_side`` > 0 the images are scaled down so that their longer side is at most that."""
    out = Path(out_dir)
    existing = sorted(out.glob("demo-*.tar"))
    if not existing:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="streamssl-demo-") as tmp:
            for path in sorted(bundled_images_dir().iterdir()):
                if path.suffix.lower() not in (".png", ".jpg", ".jpeg") or path.stat().st_size < 10_000:
                    continue  # tiny synthetic patterns (chessboards, phantoms) teach nothing
                with Image.open(path) as im:
                    # re-encoded as plain RGB PNG: some bundled files carry ICC profiles that libpng warns about
                    # on every decode
                    im.convert("RGB").save(Path(tmp) / f"{path.stem}.png", icc_profile=None)
            existing = pack_shards(tmp, str(out / "demo-%06d.tar"), per_shard=1000, max_side=max_side)
        log.info("packed the bundled demo images into %d shard(s) under %s", len(existing), out)
    return str(existing[0]) if len(existing) == 1 else f"{out}/demo-*.tar"

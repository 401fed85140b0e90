"""pack.py: folder -> shards -> samples round trip, labels and classes.json, determinism, atomic writes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import streamssl.stream.pack as pack_module
from streamssl.errors import RuntimeFailure, UsageError
from streamssl.stream.pack import pack_shards
from streamssl.stream.shards import read_shard


def save(path: Path, colour: tuple[int, int, int], fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", (20, 20), colour)
    if mode != "RGB":
        im = im.convert(mode)
    im.save(path, fmt)
    return path.read_bytes()


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    save(src / "dog" / "b.jpg", (10, 200, 10))
    save(src / "cat" / "a.jpg", (200, 10, 10))
    save(src / "cat" / "nested" / "c.png", (10, 10, 200), fmt="PNG")
    save(src / "cat" / "with.dots.jpeg", (50, 50, 50))
    save(src / "dog" / "cmyk.jpg", (120, 60, 30), mode="CMYK")
    (src / "dog" / "notes.txt").write_text("not an image")
    (src / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut")
    return src


def read_all(paths: list[Path]) -> list[tuple[str, str, int | None, bytes]]:
    bad: list[str] = []
    out = [(s.key, s.ext, s.label, s.data) for p in paths for _, s in read_shard(str(p), on_bad=bad.append)
           if s is not None]
    assert bad == []  # packed shards are clean: every sample passes the stream's checks
    return out


def test_round_trip_with_labels(image_folder: Path, tmp_path: Path) -> None:
    skipped: list[tuple[Path, str]] = []
    out = tmp_path / "out" / "shard-%06d.tar"
    paths = pack_shards(image_folder, str(out), per_shard=2, labels=True,
                        on_skip=lambda p, r: skipped.append((p, r)))
    assert [p.name for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert skipped == [(image_folder / "dog" / "broken.jpg", "truncated")]
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == ["cat", "dog"]
    samples = read_all(paths)
    # sorted paths, cat = 0, dog = 1; the dotted name gets a key without dots; CMYK became RGB PNG
    assert [(k, e, lab) for k, e, lab, _ in samples] == [
        ("cat/a", "jpg", 0), ("cat/nested/c", "png", 0), ("cat/with_dots_000000002", "jpeg", 0),
        ("dog/b", "jpg", 1), ("dog/cmyk", "png", 1),
    ]
    assert samples[0][3] == (image_folder / "cat" / "a.jpg").read_bytes()
    with Image.open(io.BytesIO(samples[4][3])) as im:
        assert im.mode == "RGB"
        assert np.abs(np.asarray(im)[10, 10].astype(int) - (120, 60, 30)).max() <= 8
    assert not list((tmp_path / "out").glob(".*"))  # no temporary file left behind


def test_without_labels_and_determinism(image_folder: Path, tmp_path: Path) -> None:
    first = pack_shards(image_folder, str(tmp_path / "a" / "s-%03d.tar"), per_shard=10)
    second = pack_shards(image_folder, str(tmp_path / "b" / "s-%03d.tar"), per_shard=10)
    assert len(first) == 1
    assert first[0].read_bytes() == second[0].read_bytes()
    assert all(label is None for _, _, label, _ in read_all(first))
    assert not (tmp_path / "a" / "classes.json").exists()


def test_bad_arguments(image_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="printf-style"):
        pack_shards(image_folder, str(tmp_path / "shard.tar"))
    with pytest.raises(UsageError, match="same file for every shard"):
        pack_shards(image_folder, str(tmp_path / "shard%.0s.tar"))
    with pytest.raises(UsageError, match="no such folder"):
        pack_shards(tmp_path / "missing", str(tmp_path / "s-%d.tar"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(UsageError, match="no images to pack"):  # packing nothing is an error, not a quiet []
        pack_shards(empty, str(tmp_path / "o" / "s-%d.tar"))
    (empty / "fake.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(RuntimeFailure, match="none of the 1 images could be packed"):
        pack_shards(empty, str(tmp_path / "o" / "s-%d.tar"))
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.tar"))


def test_pack_cli_errors_are_one_line(image_folder: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from streamssl.cli import app

    for args, code, says in (([str(tmp_path / "missing"), str(tmp_path / "s-%d.tar")], 2, "no such folder"),
                             ([str(image_folder), str(tmp_path / "s.tar")], 2, "printf-style")):
        result = CliRunner().invoke(app, ["shards", "pack", *args])
        assert result.exit_code == code and says in result.stderr and result.stderr.startswith("error: ")
        assert result.stderr.count("\n") == 1, result.stderr


def test_shards_appear_only_complete(image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    final = out / "s-0.tar"
    seen_during_write: list[tuple[bool, list[str]]] = []

    class CheckingWriter(pack_module.TarWriter):  # type: ignore[misc,name-defined]
        def write(self, obj: dict) -> int:
            seen_during_write.append((final.exists(), sorted(p.name for p in out.iterdir())))
            if len(seen_during_write) == 3:
                raise OSError("disk full")
            return super().write(obj)

    monkeypatch.setattr(pack_module, "TarWriter", CheckingWriter)
    with pytest.raises(OSError, match="disk full"):
        pack_shards(image_folder, str(out / "s-%d.tar"), per_shard=10)
    exists, names = seen_during_write[0]  # written under a hidden temporary name beside the final one
    assert not exists and len(names) == 1 and names[0].startswith(".s-0.tar.") and names[0].endswith(".tmp")
    assert not final.exists()
    assert list(out.iterdir()) == []  # the partial temporary file was removed


def test_max_side_scales_large_images_down_and_keeps_small_ones(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (300, 600, 3), dtype=np.uint8))  # 600 wide, 300 high
    photo.save(src / "wide.jpg", "JPEG", quality=90)
    Image.fromarray(rng.integers(0, 255, (400, 200), dtype=np.uint8), "L").save(src / "tall.png", "PNG")
    small = save(src / "small.jpg", (1, 2, 3))  # 20 x 20: left as it is

    paths = pack_shards(src, str(tmp_path / "out" / "s-%06d.tar"), max_side=128)
    samples = {key: (ext, data) for key, ext, _, data in read_all(paths)}
    sizes = {key: Image.open(io.BytesIO(data)).size for key, (_, data) in samples.items()}
    modes = {key: Image.open(io.BytesIO(data)).mode for key, (_, data) in samples.items()}
    assert sizes == {"wide": (128, 64), "tall": (64, 128), "small": (20, 20)}  # aspect kept
    assert samples["wide"][0] == "jpg" and samples["tall"][0] == "png"  # JPEG stays JPEG, PNG stays PNG
    assert modes["tall"] == "L"
    assert samples["small"] == ("jpg", small)  # byte for byte
    # the scaled image is the original seen smaller, not something else: its mean colour is close
    scaled = np.asarray(Image.open(io.BytesIO(samples["wide"][1])), dtype=np.float32)
    assert np.abs(scaled.mean((0, 1)) - np.asarray(photo, dtype=np.float32).mean((0, 1))).max() < 3

    with pytest.raises(UsageError, match="max_side"):
        pack_shards(src, str(tmp_path / "bad" / "s-%06d.tar"), max_side=-1)

"""samples.py: image checks on real bytes, tar reading with real broken shards, the shuffle buffer, acks and
mid-shard resume."""

from __future__ import annotations

import functools
import io
import json
import random
import shutil
import struct
import tarfile
import threading
import time
import tracemalloc
import zlib
from collections import Counter
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from streamssl.config import SourceConfig
from streamssl.stream.images import check_image
from streamssl.stream.reasons import BAD_REASONS
from streamssl.stream.samples import SampleStream, shuffled
from streamssl.stream.shards import Sample, read_shard
from streamssl.stream.source import PatternSource

# --------------------------------------------------------------------------------------------- helpers


def encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **kw)
    return out.getvalue()


def jpeg(colour: tuple[int, int, int] = (200, 30, 90), size: int = 32) -> bytes:
    return encode(Image.new("RGB", (size, size), colour), "JPEG", quality=95)


def gradient(size: int = 16) -> np.ndarray:
    """An (S, S, 3) uint8 image with distinct values per pixel."""
    y, x = np.mgrid[:size, :size]
    return np.stack([x * 15, y * 15, (x + y) * 7], axis=-1).astype(np.uint8)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_by_hand(width: int, height: int, bit_depth: int, colour_type: int, raw: bytes) -> bytes:
    """A PNG from filtered scanlines, built with struct and zlib (no PIL on the writing side)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(raw))
            + png_chunk(b"IEND", b""))


def decode_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def good_shard(path: Path, n: int, prefix: str = "s") -> Path:
    members = []
    for i in range(n):
        members.append((f"{prefix}{i:04d}.jpg", jpeg((i * 20 % 256, 100, 50))))
        members.append((f"{prefix}{i:04d}.cls", str(i % 3).encode()))
    return write_tar(path, members)


class ListSource:
    """A ShardSource over a fixed list, recording acks: stages are generators, fed with lists."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.acked: list[str] = []
        self.next = 0

    def __iter__(self) -> Iterator[str]:
        while self.next < len(self.urls):
            self.next += 1
            yield self.urls[self.next - 1]

    def mark_done(self, url: str) -> None:
        self.acked.append(url)

    def state_dict(self) -> dict[str, int]:
        return {"next": self.next}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.next = state["next"]

    def close(self) -> None:
        self.next = len(self.urls)


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, fmt: str, *args: object) -> None:  # keep test output clean
        pass


def cfg(**kw: object) -> SourceConfig:
    base: dict[str, object] = {"shuffle_buffer": 0, "cycle": False}
    base.update(kw)
    return SourceConfig(**base)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- check_image


def test_good_images_pass_unchanged() -> None:
    rgb = jpeg()
    assert check_image(rgb, "jpg", max_pixels=10_000) == (rgb, None)
    webp = encode(Image.fromarray(gradient()), "WEBP", lossless=True)
    assert check_image(webp, "webp", max_pixels=10_000) == (webp, None)
    with_trailer = rgb + b"camera maker's trailer"  # bytes after EOI are allowed
    assert check_image(with_trailer, "jpg", max_pixels=10_000) == (with_trailer, None)


def test_truncation_is_not_fooled_by_an_embedded_thumbnail() -> None:
    thumb = jpeg((0, 0, 255), size=8)  # a complete JPEG, ending in its own EOI, inside an APP15 segment
    main = jpeg((255, 0, 0), size=64)
    app15 = b"\xff\xef" + struct.pack(">H", len(thumb) + 2) + thumb
    data = main[:2] + app15 + main[2:]
    assert check_image(data, "jpg", max_pixels=10_000) == (data, None)
    cut_after_thumb = data[: 2 + len(app15)]
    assert cut_after_thumb.endswith(b"\xff\xd9")
    assert check_image(cut_after_thumb, "jpg", max_pixels=10_000)[1] in ("truncated", "corrupt")
    assert check_image(data[: len(data) - 300], "jpg", max_pixels=10_000) == (None, "truncated")


def test_bad_images_are_named() -> None:
    rgb = jpeg(size=64)
    assert check_image(b"", "jpg", max_pixels=10_000) == (None, "empty")
    assert check_image(b"hello, I am text\n" * 20, "jpg", max_pixels=10_000) == (None, "not_image")
    gif = encode(Image.new("P", (8, 8)), "GIF")
    assert check_image(gif, "jpg", max_pixels=10_000) == (None, "unsupported")
    assert check_image(rgb, "tiff", max_pixels=10_000) == (None, "unsupported")
    assert check_image(rgb[: len(rgb) // 2], "jpg", max_pixels=10_000) == (None, "truncated")
    assert check_image(rgb[:40], "jpg", max_pixels=10_000)[1] in ("truncated", "corrupt")
    assert check_image(rgb, "jpg", max_pixels=64 * 64 - 1) == (None, "too_large")
    png = encode(Image.fromarray(gradient()), "PNG")
    assert check_image(png[:-20], "png", max_pixels=10_000) == (None, "truncated")
    idat = png.index(b"IDAT")
    broken = bytearray(png)
    broken[idat + 8] ^= 0xFF  # a flipped byte inside the compressed data: the chunk CRC no longer matches
    assert check_image(bytes(broken), "png", max_pixels=10_000) == (None, "corrupt")
    webp = encode(Image.fromarray(gradient()), "WEBP")
    assert check_image(webp[: len(webp) - 10], "webp", max_pixels=10_000)[1] in ("truncated", "corrupt")


def test_every_reason_is_declared() -> None:
    assert len(set(BAD_REASONS)) == len(BAD_REASONS)
    assert {"empty", "not_image", "truncated", "corrupt", "too_large", "unsupported", "decode_error",
            "shard_error", "refused_url"} <= set(BAD_REASONS)


def test_decompression_bomb_is_rejected_from_its_header_without_allocating() -> None:
    # 100000 x 100000 RGB declared (30 GB decoded), one tiny IDAT: built by hand with struct and zlib.
    bomb = png_by_hand(100_000, 100_000, 8, 2, b"\x00" * 64)
    tracemalloc.start()
    t = time.perf_counter()
    result = check_image(bomb, "png", max_pixels=40_000_000)
    elapsed = time.perf_counter() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert result == (None, "too_large")
    assert elapsed < 0.5
    assert peak < 5 << 20


def test_16bit_grey_png_is_scaled_to_8bit() -> None:
    values = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 257 + 100).astype(np.uint16)
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in values)
    data = png_by_hand(16, 16, 16, 0, raw)
    out, reason = check_image(data, "png", max_pixels=10_000)
    assert reason is None and out is not None and out != data
    rgb = decode_rgb(out)
    expected = (values >> 8).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], expected)


def test_16bit_rgb_png_is_scaled_to_8bit() -> None:
    rng = np.random.default_rng(0)
    values = rng.integers(0, 65536, size=(8, 8, 3), dtype=np.uint16)
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in values)
    data = png_by_hand(8, 8, 16, 2, raw)
    out, reason = check_image(data, "png", max_pixels=10_000)
    assert reason is None and out is not None and out != data
    with Image.open(io.BytesIO(out)) as im:
        assert im.mode == "RGB"
    np.testing.assert_array_equal(decode_rgb(out), (values >> 8).astype(np.uint8))


def test_cmyk_jpeg_becomes_correct_rgb() -> None:
    # PIL writes CMYK JPEGs with an Adobe marker and inverted values, as Photoshop does.
    src = np.zeros((32, 32, 3), np.uint8)
    src[:, :16] = (220, 40, 60)
    src[:, 16:] = (30, 160, 230)
    data = encode(Image.fromarray(src).convert("CMYK"), "JPEG", quality=100)
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "CMYK" and "adobe" in im.info
        reference = np.asarray(im.convert("RGB"))
    out, reason = check_image(data, "jpg", max_pixels=10_000)
    assert reason is None and out is not None and out[:8] == b"\x89PNG\r\n\x1a\n"
    rgb = decode_rgb(out)
    np.testing.assert_array_equal(rgb, reference)
    # and the colours are the original ones, not inverted (JPEG loss aside)
    assert np.abs(rgb[8, 4].astype(int) - (220, 40, 60)).max() <= 8
    assert np.abs(rgb[8, 28].astype(int) - (30, 160, 230)).max() <= 8


def test_grey_and_rgba_pass_and_decode_to_rgb() -> None:
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    data = encode(Image.fromarray(grey, "L"), "PNG")
    assert check_image(data, "png", max_pixels=10_000) == (data, None)
    np.testing.assert_array_equal(decode_rgb(data), np.repeat(grey[..., None], 3, axis=-1))
    grey_jpeg = encode(Image.fromarray(grey, "L"), "JPEG")
    assert check_image(grey_jpeg, "jpg", max_pixels=10_000) == (grey_jpeg, None)

    rgba = np.concatenate([gradient(), np.full((16, 16, 1), 77, np.uint8)], axis=-1)
    data = encode(Image.fromarray(rgba, "RGBA"), "PNG")
    assert check_image(data, "png", max_pixels=10_000) == (data, None)
    np.testing.assert_array_equal(decode_rgb(data), rgba[..., :3])


@pytest.mark.parametrize("mode", ["LA", "P", "1"])
def test_other_modes_are_transcoded_to_rgb(mode: str) -> None:
    src = Image.fromarray(gradient()).convert(mode)
    data = encode(src, "PNG")
    out, reason = check_image(data, "png", max_pixels=10_000)
    assert reason is None and out is not None and out != data
    with Image.open(io.BytesIO(out)) as im:
        assert im.mode == "RGB"
    np.testing.assert_array_equal(decode_rgb(out), np.asarray(src.convert("RGBA").convert("RGB")))


# --------------------------------------------------------------------------------------------- shards


def test_bad_members_are_skipped_and_counted(tmp_path: Path) -> None:
    good = jpeg()
    png = encode(Image.fromarray(gradient()), "PNG")
    corrupt = bytearray(png)
    corrupt[png.index(b"IDAT") + 8] ^= 0xFF
    bomb = png_by_hand(100_000, 100_000, 8, 2, b"\x00" * 64)
    shard = write_tar(tmp_path / "bad.tar", [
        ("a.jpg", good), ("a.cls", b"2"), ("a.json", b"{}"),
        ("b.jpg", good[: len(good) // 2]),
        ("c.png", bytes(corrupt)),
        ("d.jpg", b""),
        ("e.jpg", b"just some text, not an image"),
        ("f.json", b"{}"), ("f.txt", b"no image here"),
        ("g.png", bomb),
        ("h.webp", encode(Image.fromarray(gradient()), "WEBP")),
        ("i.jpg", good + b"\0" * 5000),
    ])
    bad: Counter[str] = Counter()
    out = list(read_shard(str(shard), on_bad=lambda r: bad.update([r]), max_member_bytes=4000))
    assert [i for i, s in out] == list(range(9))
    good_samples = [s for _, s in out if s is not None]
    assert [(s.key, s.ext, s.index, s.label) for s in good_samples] == [("a", "jpg", 0, 2), ("h", "webp", 7, None)]
    assert good_samples[0].data == good and good_samples[0].url == str(shard)
    assert bad == Counter({"truncated": 1, "corrupt": 1, "empty": 1, "not_image": 1, "unsupported": 1,
                           "too_large": 2})
    assert set(bad) <= set(BAD_REASONS)


def _stream_keys(urls: list[str], **kw: object) -> tuple[list[str], Counter[str], ListSource]:
    bad: Counter[str] = Counter()
    source = ListSource(urls)
    stream = SampleStream(source, cfg(**kw), on_bad=lambda r: bad.update([r]))
    return [f"{Path(s.url).stem}/{s.key}" for s in stream], bad, source


def test_tar_cut_mid_member_counts_shard_error_and_moves_on(tmp_path: Path) -> None:
    full = good_shard(tmp_path / "full.tar", 4).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(full[:2600])  # inside the second sample's jpg
    nxt = good_shard(tmp_path / "next.tar", 2, prefix="n")
    keys, bad, source = _stream_keys([str(cut), str(nxt)])
    assert keys == ["cut/s0000", "next/n0000", "next/n0001"]
    assert bad == Counter({"shard_error": 1})
    assert source.acked == [str(cut), str(nxt)]


def test_garbage_inside_a_tar_keeps_what_precedes_it(tmp_path: Path) -> None:
    members = []
    for i in range(4):
        members += [(f"s{i}.jpg", jpeg((i * 50, 0, 0))), (f"s{i}.cls", b"1")]
    with_garbage = tmp_path / "garbage.tar"
    raw = write_tar(tmp_path / "clean.tar", members).read_bytes()
    # Members are 512-byte aligned: cut after the first sample's two members and insert random bytes.
    first = 512 + -(-len(members[0][1]) // 512) * 512 + 1024
    with_garbage.write_bytes(raw[:first] + random.Random(0).randbytes(3000) + raw[first:])
    nxt = good_shard(tmp_path / "next.tar", 1, prefix="n")
    keys, bad, _ = _stream_keys([str(with_garbage), str(nxt)])
    assert keys[0] == "garbage/s0" and keys[-1] == "next/n0000"
    assert "garbage/s3" not in keys  # after the garbage: unrecoverable, skipped
    assert bad["shard_error"] == 1


def test_vanished_and_non_tar_urls_count_shard_error(tmp_path: Path) -> None:
    nxt = good_shard(tmp_path / "next.tar", 1, prefix="n")
    not_tar = tmp_path / "page.tar"
    not_tar.write_text("<html>404 not found</html>")
    keys, bad, source = _stream_keys([str(tmp_path / "gone.tar"), str(not_tar), str(nxt)])
    assert keys == ["next/n0000"]
    assert bad == Counter({"shard_error": 2})
    assert source.acked == [str(tmp_path / "gone.tar"), str(not_tar), str(nxt)]


def test_refused_urls_are_counted_acked_and_skipped(tmp_path: Path) -> None:
    nxt = good_shard(tmp_path / "next.tar", 1, prefix="n")
    evil = f"pipe:cat {nxt}"
    keys, bad, source = _stream_keys([evil, "ftp://example.invalid/a.tar", str(nxt)])
    assert keys == ["next/n0000"]
    assert bad == Counter({"refused_url": 2})
    assert source.acked == [evil, "ftp://example.invalid/a.tar", str(nxt)]
    keys, bad, _ = _stream_keys([evil], allow_pipe=True)
    assert keys == ["next/n0000"] and not bad


def test_shard_is_acked_exactly_when_its_last_sample_leaves(tmp_path: Path) -> None:
    a = str(good_shard(tmp_path / "a.tar", 3))
    b = str(good_shard(tmp_path / "b.tar", 2))
    source = ListSource([a, b])
    it = iter(SampleStream(source, cfg()))
    taken = [next(it), next(it)]
    assert source.acked == []
    taken.append(next(it))
    assert [s.index for s in taken] == [0, 1, 2] and source.acked == [a]
    next(it)
    assert source.acked == [a]
    next(it)
    assert source.acked == [a, b]


def test_shuffle_buffer_mixes_shards_and_acks_only_when_drained(tmp_path: Path) -> None:
    urls = [str(good_shard(tmp_path / f"{k}.tar", 10, prefix=f"{k}_")) for k in range(4)]
    source = ListSource(urls)
    stream = SampleStream(source, cfg(shuffle_buffer=15, seed=3))
    seen: list[Sample] = []
    for sample in stream:
        seen.append(sample)
        for url in source.acked:  # whenever a shard is acked, all its samples have been handed out
            assert sum(s.url == url for s in seen) == 10
    assert sorted((s.url, s.index) for s in seen) == [(u, i) for u in urls for i in range(10)]
    assert [(s.url, s.index) for s in seen] != [(u, i) for u in urls for i in range(10)]
    assert sorted(source.acked) == sorted(urls)
    again = [(s.url, s.index) for s in SampleStream(ListSource(urls), cfg(shuffle_buffer=15, seed=3))]
    assert again == [(s.url, s.index) for s in seen]  # seeded


def test_shuffle_buffer_drains_when_the_source_is_idle() -> None:
    out = list(shuffled([1, 2, 3, None, 4, 5, None, None, 6], 100, random.Random(0)))
    assert sorted(out[:3]) == [1, 2, 3] and sorted(out[3:5]) == [4, 5] and out[5:] == [6]
    assert list(shuffled(range(5), 0, random.Random(0))) == [0, 1, 2, 3, 4]
    mixed = list(shuffled(range(100), 10, random.Random(0)))
    assert sorted(mixed) == list(range(100)) and mixed != list(range(100))
    assert all(v <= k + 9 for k, v in enumerate(mixed))  # never reads more than the buffer ahead


def test_mid_shard_resume_rereads_only_what_did_not_leave(tmp_path: Path) -> None:
    urls = [str(good_shard(tmp_path / f"{k}.tar", 5, prefix=f"{k}_")) for k in range(3)]
    conf = cfg(shuffle_buffer=4, seed=1)
    bad: Counter[str] = Counter()
    first = SampleStream(PatternSource(urls, cycle=False), conf, on_bad=lambda r: bad.update([r]))
    it = iter(first)
    before = [(s.url, s.index) for s in (next(it) for _ in range(7))]
    state = json.loads(json.dumps(first.state_dict()))
    assert state["open"], "the checkpoint falls mid-shard"
    del it, first

    second = SampleStream(PatternSource(urls, cycle=False), conf)
    second.load_state_dict(state)
    after = [(s.url, s.index) for s in second]
    everything = {(u, i) for u in urls for i in range(5)}
    assert set(before) | set(after) == everything  # nothing lost, buffered samples re-read
    assert not set(before) & set(after)  # handed-out samples are not delivered again
    assert len(after) == len(set(after))
    assert second.state_dict()["open"] == []


def test_resume_skips_bad_samples_already_counted(tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "a.tar", [("a.jpg", jpeg()), ("b.jpg", b""), ("c.jpg", jpeg()), ("d.jpg", jpeg())])
    bad: Counter[str] = Counter()
    stream = SampleStream(ListSource([str(shard)]), cfg(), on_bad=lambda r: bad.update([r]))
    it = iter(stream)
    assert next(it).key == "a"
    assert next(it).key == "c"
    state = stream.state_dict()
    assert state["open"] == [{"url": str(shard), "settled": [[0, 3]]}]
    again: Counter[str] = Counter()
    resumed = SampleStream(ListSource([str(shard)]), cfg(), on_bad=lambda r: again.update([r]))
    resumed.load_state_dict({**state, "source": {"next": 1}})
    assert [s.key for s in resumed] == ["d"]
    assert bad == Counter({"empty": 1}) and not again


def test_deferred_acks_wait_for_commit(tmp_path: Path) -> None:
    a = str(good_shard(tmp_path / "a.tar", 2))
    source = ListSource([a])
    stream = SampleStream(source, cfg(), defer_ack=True)
    assert len(list(stream)) == 2
    assert source.acked == []
    state = stream.state_dict()
    assert state["unacked"] == [a]
    stream.commit()
    assert source.acked == [a]
    # a restart from that checkpoint acks what the checkpoint recorded as done
    restarted_source = ListSource([a])
    restarted = SampleStream(restarted_source, cfg(), defer_ack=True)
    restarted.load_state_dict({**state, "source": {"next": 1}})
    assert list(restarted) == []
    assert restarted_source.acked == [a]


def test_commit_of_an_older_state_acks_only_what_it_covers(tmp_path: Path) -> None:
    # a prefetching consumer checkpoints the state of the batch it trained on, while the reader is ahead
    a, b = str(good_shard(tmp_path / "a.tar", 2, prefix="a")), str(good_shard(tmp_path / "b.tar", 2, prefix="b"))
    source = ListSource([a, b])
    stream = SampleStream(source, cfg(), defer_ack=True)
    it = iter(stream)
    next(it), next(it)
    trained = stream.state_dict()  # a is done here
    next(it), next(it)
    stream.state_dict()  # the reader's newer state: b is done too
    stream.commit(trained)
    assert source.acked == [a]
    stream.commit(trained)  # idempotent
    assert source.acked == [a]
    stream.commit(stream.state_dict())
    assert source.acked == [a, b]


class PollingSource(ListSource):
    """Hands out its shards, then polls for more like the Redis source: each poll blocks, then an idle tick.
    Counts the polls that start while ``waiting`` is set."""

    def __init__(self, urls: list[str], poll_s: float) -> None:
        super().__init__(urls)
        self.poll_s = poll_s
        self.closed = threading.Event()
        self.waiting = False
        self.polls_while_waiting = 0

    def __iter__(self) -> Iterator[str | None]:  # type: ignore[override]
        yield from super().__iter__()
        while not self.closed.is_set():
            self.polls_while_waiting += self.waiting
            time.sleep(self.poll_s)  # a blocking XREADGROUP that found nothing
            yield None

    def close(self) -> None:
        self.closed.set()


def test_commit_is_not_starved_by_a_source_polling_in_another_thread(tmp_path: Path) -> None:
    # The daemon's feeder thread iterates the stream while the training thread commits after each checkpoint.
    # A source that polls back to back (an idle Redis stream) re-took the lock as soon as it let go and kept
    # commit() waiting for minutes (a checkpoint stalled). Now commit() waits for at most the poll in flight
    # (and one that started just before it asked).
    a = str(good_shard(tmp_path / "a.tar", 2))
    source = PollingSource([a], poll_s=0.02)
    stream = SampleStream(source, cfg(), defer_ack=True)
    handed: list[str] = []
    feeder = threading.Thread(target=lambda: handed.extend(s.key for s in stream), daemon=True)
    feeder.start()
    try:
        deadline = time.monotonic() + 30
        while len(handed) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(handed) == 2  # a is done; the feeder now polls for more
        state = stream.state_dict()
        assert state["unacked"] == [a]
        most = 0
        for _ in range(30):
            time.sleep(0.005)  # land anywhere in a poll
            source.polls_while_waiting, source.waiting = 0, True
            stream.commit(state)
            source.waiting = False
            most = max(most, source.polls_while_waiting)
        assert most <= 2, f"commit() waited through {most} polls"
        assert source.acked == [a]
    finally:
        stream.close()
        feeder.join(timeout=10)
    assert not feeder.is_alive()


@pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset opens http(s) URLs with curl")
def test_http_shards_through_webdatasets_opener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("no_proxy", "NO_PROXY"):  # curl must not send loopback requests to a configured proxy
        monkeypatch.setenv(var, "127.0.0.1")
    good_shard(tmp_path / "a.tar", 3)
    handler = functools.partial(QuietHandler, directory=str(tmp_path))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        keys, bad, _ = _stream_keys([f"{base}/a.tar", f"{base}/missing.tar"])
    finally:
        server.shutdown()
        server.server_close()
    assert keys == ["a/s0000", "a/s0001", "a/s0002"]
    assert bad == Counter({"shard_error": 1})

"""The one atomic-write helper (streamssl/atomic.py) that shards, checkpoints and the local store use."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamssl.atomic import write_atomic


def test_the_final_name_appears_whole_and_only_at_the_end(tmp_path: Path) -> None:
    final = tmp_path / "deep" / "file.bin"
    seen: list[list[str]] = []

    def write(stream) -> None:
        stream.write(b"half")
        seen.append(sorted(p.name for p in final.parent.iterdir()))
        stream.write(b" and the rest")

    assert write_atomic(final, write, sync_folder=True) == final
    assert final.read_bytes() == b"half and the rest"
    (name,) = seen[0]  # during the write: one hidden temporary file, not the final name
    assert name.startswith(".file.bin.") and name.endswith(".tmp")
    assert [p.name for p in final.parent.iterdir()] == ["file.bin"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    final = tmp_path / "file.bin"
    final.write_bytes(b"old")

    def fail(stream) -> None:
        stream.write(b"new, partly")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(final, fail)
    assert final.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]
    write_atomic(final, lambda s: s.write(b"new"), durable=False)
    assert final.read_bytes() == b"new"

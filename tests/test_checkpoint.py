"""Checkpoints: atomic writes, pruning, safe loading, fallback past a damaged file, RNG round trip."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import pytest
import torch

from streamssl.service.checkpoint import CheckpointError, CheckpointManager, rng_state, set_rng_state


def state(step: int) -> dict:
    return {"learner": {"w": torch.full((3,), float(step))}, "stream": {"url": "a.tar", "index": step},
            "rng": rng_state()}


def test_save_load_and_keep_the_newest(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep=2)
    for step in (10, 20, 30):
        manager.save(state(step), step)
    assert [p.name for p in manager.paths()] == ["ckpt-000000000020.pt", "ckpt-000000000030.pt"]
    loaded = manager.load()
    assert loaded["step"] == 30 and loaded["stream"] == {"url": "a.tar", "index": 30}
    assert torch.equal(loaded["learner"]["w"], torch.full((3,), 30.0))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_empty_folder_loads_nothing(tmp_path: Path) -> None:
    assert CheckpointManager(tmp_path / "new").load() is None


def test_damaged_newest_falls_back_to_older(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep=3)
    manager.save(state(1), 1)
    newest = manager.save(state(2), 2)
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as a disk fault would leave it
    assert manager.load()["step"] == 1
    with pytest.raises(CheckpointError):
        manager.load(newest)


class Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_code_in_a_checkpoint_is_never_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "ckpt-000000000005.pt"
    torch.save({"format": 1, "x": Boom()}, evil, pickle_module=pickle)
    manager = CheckpointManager(tmp_path)
    with pytest.raises(CheckpointError):
        manager.load(evil)
    assert manager.load() is None
    assert not (tmp_path / "pwned.txt").exists()


def test_rng_round_trip() -> None:
    saved = rng_state()
    expected = (random.random(), torch.rand(3))
    random.random(), torch.rand(3)
    set_rng_state(saved)
    again = (random.random(), torch.rand(3))
    assert again[0] == expected[0] and torch.equal(again[1], expected[1])


def test_rng_state_survives_a_safe_load(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save(state(3), 3)  # captures the RNG here
    expected = (random.random(), torch.rand(2))
    random.random(), torch.rand(2)
    set_rng_state(manager.load()["rng"])
    assert random.random() == expected[0] and torch.equal(torch.rand(2), expected[1])


def test_interrupted_write_leaves_previous_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save(state(1), 1)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError):
        manager.save(state(2), 2)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-000000000001.pt"]
    assert manager.load()["step"] == 1



def test_a_full_disk_is_the_disks_error_not_torchs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save turns the OSError of a failed write into a RuntimeError ('unexpected pos'), which the
    daemon would take for a crash; the checkpoint manager raises the disk's own error, a write error, and
    the previous checkpoint stays. /dev/full answers every write with ENOSPC."""
    import errno

    from streamssl.service import checkpoint as module

    with open("/dev/full", "wb", buffering=0) as full, pytest.raises(OSError) as raised:
        module._save({"x": torch.zeros(100_000)}, full)
    assert raised.value.errno == errno.ENOSPC

    manager = CheckpointManager(tmp_path, keep=2)
    manager.save({"x": torch.zeros(4)}, step=1)

    def onto_a_full_disk(path, write, **_):
        with open("/dev/full", "wb", buffering=0) as f:
            write(f)

    monkeypatch.setattr(module, "write_atomic", onto_a_full_disk)
    with pytest.raises(module.CheckpointWriteError, match="No space left on device"):
        manager.save({"x": torch.zeros(100_000)}, step=2)
    assert [module.load_checkpoint(p)["step"] for p in manager.paths()] == [1]

"""FeatureQueue: ring-buffer wrap-around, use only when full and after its start step, state round trip."""

from __future__ import annotations

import pytest
import torch

from streamssl.learner.methods.swav_queue import FeatureQueue


def batch(first: int, n: int, n_assign: int = 2, dim: int = 3) -> torch.Tensor:
    """(n_assign, n, dim) rows whose every entry is the row's sample id (first..first+n-1), view a adds 1000*a."""
    ids = torch.arange(first, first + n, dtype=torch.float32)
    return torch.stack([(ids + 1000 * a).view(-1, 1).expand(n, dim) for a in range(n_assign)])


def ids_in(queue: FeatureQueue, assign: int = 0) -> set[int]:
    return {int(v) for v in queue.embeddings(assign)[:, 0]}


def test_wraps_around_when_length_is_not_a_multiple_of_batch() -> None:
    queue = FeatureQueue(2, length=10, dim=3)
    for start in range(0, 40, 4):  # 10 pushes of 4: the ring wraps at 10, 20, 30, 40
        queue.push(batch(start, 4))
        newest = set(range(max(0, start + 4 - 10), start + 4))
        if start + 4 >= 10:
            assert ids_in(queue) == newest
        assert ids_in(queue, 1) >= {i + 1000 for i in newest}
    assert queue.full and queue.fill == 1.0


def test_used_only_when_full_and_after_start_step() -> None:
    queue = FeatureQueue(1, length=10, dim=3, start_step=5)
    queue.push(batch(0, 4, n_assign=1))
    queue.push(batch(4, 4, n_assign=1))
    assert not queue.full and queue.fill == pytest.approx(0.8)
    assert not queue.active(step=100)
    queue.push(batch(8, 4, n_assign=1))
    assert queue.full
    assert not queue.active(step=4) and queue.active(step=5)


def test_batch_larger_than_queue_keeps_the_newest_rows() -> None:
    queue = FeatureQueue(1, length=5, dim=3)
    queue.push(batch(0, 3, n_assign=1))
    queue.push(batch(3, 12, n_assign=1))
    assert ids_in(queue) == set(range(10, 15))


def test_state_round_trip() -> None:
    queue = FeatureQueue(2, length=7, dim=3, start_step=2)
    for start in (0, 3, 6):
        queue.push(batch(start, 3))
    other = FeatureQueue(2, length=7, dim=3)
    other.load_state_dict(queue.state_dict())
    assert torch.equal(other.rows, queue.rows)
    assert (other.ptr, other.filled, other.start_step) == (queue.ptr, queue.filled, queue.start_step)
    queue.push(batch(9, 3))
    other.push(batch(9, 3))
    assert torch.equal(other.rows, queue.rows)


def test_rejects_wrong_shapes() -> None:
    queue = FeatureQueue(2, length=7, dim=3)
    with pytest.raises(ValueError):
        queue.push(torch.zeros(1, 4, 3))
    with pytest.raises(ValueError):
        FeatureQueue(2, length=8, dim=3).load_state_dict(queue.state_dict())

"""Two gloo processes on the CPU against one: for every method, three distributed steps on two halves of a batch
give the single-process steps on the whole batch (job-wide batch norm on; SwAV's queue split per rank and its
Sinkhorn sums reduced; SimCLR's negatives gathered with their gradients; MoCo's queue, NPID's bank and
DeepCluster's memory fed with every rank's rows). And the collectives of streamssl/distributed.py."""

from __future__ import annotations

import os
import socket
import traceback
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from streamssl import distributed
from streamssl.config import DeepClusterConfig, LearnerConfig, MoCoConfig, ModelConfig, NPIDConfig
from streamssl.learner.engine import Learner
from streamssl.learner.methods import METHODS

MODEL = ModelConfig(arch="resnet18", hidden_dim=32, out_dim=16, n_prototypes=16)
BATCH = 8  # the whole batch; each of the two ranks takes half
STEPS = 3
SETTINGS: dict[str, Any] = {
    "moco": MoCoConfig(queue_length=32, bn_splits=1),  # one BN group: the same statistics either way
    "npid": NPIDConfig(memory_length=64, negatives=8),
    # the job's 16 rows per step (2 assignment views of 8) fill the memory in the first step: k-means, and the
    # labeller taken then, label the second and third steps
    "deepcluster": DeepClusterConfig(memory_length=16),
}


def learner_cfg(method: str) -> LearnerConfig:
    # SwAV's queue (16 rows, 8 per rank) fills in two steps and takes part in the third. A small rate: at 0.5,
    # NPID's proximal term (weight 30) amplifies float rounding between the two ways of summing to 1e-2 in 3 steps.
    return LearnerConfig(method=method, batch_size=BATCH, bf16=False, optimizer="sgd", base_lr=0.05,
                         warmup_steps=0, queue_length=16 if method == "swav" else 0, seed=3)


def batch(step: int) -> tuple[list[torch.Tensor], list[str]]:
    g = torch.Generator().manual_seed(100 + step)
    views = [torch.randn(BATCH, 3, 32, 32, generator=g), torch.randn(BATCH, 3, 32, 32, generator=g),
             torch.randn(BATCH, 3, 16, 16, generator=g)]
    ids = [f"shard-{(step * 5 + i) % 12}/key" for i in range(BATCH)]  # later steps meet earlier images again
    return views, ids


def run(method: str, rank: int = 0, world: int = 1) -> tuple[list[float], np.ndarray]:
    learner = Learner.build(MODEL, learner_cfg(method), settings=SETTINGS.get(method))
    losses = []
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    for step in range(STEPS):
        views, ids = batch(step)
        stats = learner.step([v[rows] for v in views], ids=ids[rows])
        assert not stats.skipped
        losses.append(stats.loss)
    trained = [*learner.method.trunk.parameters(), *learner.method.head.parameters()]
    return losses, torch.cat([p.detach().flatten() for p in trained]).numpy()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, target: Any, args: tuple, out: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        distributed.init(distributed.world_from_env(), torch.device("cpu"), timeout_s=120)
        out.put((rank, target(rank, world, *args), None))
    except BaseException:
        out.put((rank, None, traceback.format_exc()))
    finally:
        distributed.shutdown()


def spawn(target: Any, *args: Any, world: int = 2, timeout_s: float = 240) -> dict[int, Any]:
    """``target(rank, world, *args)`` in ``world`` gloo processes; their results by rank."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, target, args, out)) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, []
    for _ in procs:
        rank, value, error = out.get(timeout=timeout_s)
        results[rank] = value
        if error:
            errors.append(f"rank {rank}:\n{error}")
    for p in procs:
        p.join(timeout=60)
    assert not errors, "\n".join(errors)
    return results


def _every_method(rank: int, world: int) -> dict[str, tuple[list[float], np.ndarray]]:
    return {m: run(m, rank, world) for m in METHODS}


@pytest.mark.dist
@pytest.mark.slow
def test_two_ranks_step_as_one_process_on_the_whole_batch() -> None:
    torch.set_num_threads(1)
    ranks = spawn(_every_method)
    for method in METHODS:
        single_losses, single_params = run(method)
        for rank in (0, 1):
            losses, params = ranks[rank][method]
            np.testing.assert_allclose(losses, single_losses, rtol=2e-4, atol=1e-5, err_msg=method)
            assert_equal_but_for_summation_order(params, single_params, method)
        moved = np.abs(single_params - run_untrained(method)).max()
        assert moved > 1e-2, f"{method}: the steps barely moved the weights ({moved}): the test would not see a gap"


def assert_equal_but_for_summation_order(params: np.ndarray, single: np.ndarray, method: str) -> None:
    """Equal within float32 sums taken in another order: every weight within 5e-4 and all but one in 10^5
    within 1e-4 (the few beyond are the largest sums, the first convolution's: on an AMD EPYC 39 of 11.2M
    weights of SimCLR differed by up to 2.0e-4, on an Intel Xeon none). A wrong gradient moves them all."""
    gap = np.abs(params - single)
    assert gap.max() <= 5e-4, f"{method}: a weight differs by {gap.max():.2e}"
    assert (gap > 1e-4).mean() <= 1e-5, f"{method}: {(gap > 1e-4).sum()} of {gap.size} weights differ by > 1e-4"


def run_untrained(method: str) -> np.ndarray:
    learner = Learner.build(MODEL, learner_cfg(method), settings=SETTINGS.get(method))
    return torch.cat([p.detach().flatten() for p in [*learner.method.trunk.parameters(),
                                                       *learner.method.head.parameters()]]).numpy()


def _without_sync_bn(rank: int, world: int) -> np.ndarray:
    learner = Learner.build(MODEL, learner_cfg("simclr"), sync_bn=False)
    views, ids = batch(0)
    learner.step([v[rank * 4:(rank + 1) * 4] for v in views], ids=ids[rank * 4:(rank + 1) * 4])
    return torch.cat([p.detach().flatten() for p in learner.method.trunk.parameters()]).numpy()


@pytest.mark.dist
def test_without_job_wide_batch_norm_the_step_differs() -> None:
    """The equality above is not an accident of small models: per-rank batch norm changes the step."""
    torch.set_num_threads(1)
    ranks = spawn(_without_sync_bn)
    learner = Learner.build(MODEL, learner_cfg("simclr"))
    views, ids = batch(0)
    learner.step(views, ids=ids)
    single = torch.cat([p.detach().flatten() for p in learner.method.trunk.parameters()]).numpy()
    np.testing.assert_allclose(ranks[0], ranks[1], rtol=0, atol=1e-6)  # DDP still keeps the ranks identical
    with pytest.raises(AssertionError):  # the check of the test above fails on it
        assert_equal_but_for_summation_order(ranks[0], single, "simclr without SyncBN")


def _collectives(rank: int, world: int) -> dict[str, Any]:
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    gathered = distributed.gather_with_grad(x)
    (gathered * torch.arange(gathered.shape[0], dtype=torch.float32)[:, None]).sum().backward()
    return {"gathered": distributed.gather(torch.tensor([rank])).tolist(), "grad": x.grad.tolist(),
            "sum": distributed.all_reduce_(torch.tensor([rank + 1.0])).item(),
            "max": distributed.all_reduce_(torch.tensor([float(rank)]), "max").item(),
            "objects": distributed.gather_objects({"rank": rank}),
            "broadcast": distributed.broadcast_object(f"from {rank}"), "offset": distributed.rank_offset(2),
            "initialized": distributed.initialized(), "size": dist.get_world_size()}


@pytest.mark.dist
def test_collectives() -> None:
    ranks = spawn(_collectives)
    for rank, got in ranks.items():
        assert got["gathered"] == [0, 1] and got["sum"] == 3 and got["max"] == 1 and got["initialized"]
        assert got["broadcast"] == "from 0" and got["offset"] == 2 * rank
        # d/dx of sum_i i * row_i, summed over both ranks' losses: 2 * (row index in the gather)
        assert got["grad"] == [[2.0 * (2 * rank + i)] * 3 for i in range(2)]
    assert ranks[0]["objects"] == [{"rank": 0}, {"rank": 1}] and ranks[1]["objects"] is None


def test_one_process_needs_no_group() -> None:
    x = torch.ones(2, 2)
    assert distributed.gather(x) is x and distributed.gather_with_grad(x) is x
    assert distributed.gather_objects(5) == [5] and distributed.broadcast_object(5) == 5
    assert not distributed.initialized() and distributed.rank_offset(4) == 0


def test_world_from_torchrun_environment() -> None:
    world = distributed.world_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (world.rank, world.size, world.local_rank, world.distributed, world.is_main) == (3, 4, 1, True, False)
    assert distributed.world_from_env({}) == distributed.World()
    with pytest.raises(ValueError, match="out of range"):
        distributed.world_from_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="integers"):
        distributed.world_from_env({"RANK": "x"})

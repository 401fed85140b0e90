"""The engine with SwAV: learns clustered images without collapse; freezing, the NaN guard, the queue, state round
trip, bf16, the reads of the device a step."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

import streamssl.learner.engine as engine_module
import streamssl.learner.methods.swav as swav_module
from streamssl.config import LearnerConfig, ModelConfig
from streamssl.devices import native_bf16
from streamssl.learner.engine import Learner
from tests.synthetic import view_stream

MODEL = ModelConfig(arch="resnet18", hidden_dim=128, out_dim=32, n_prototypes=32)
LEARNER = LearnerConfig(batch_size=32, optimizer="adamw", base_lr=1e-3, warmup_steps=5, weight_decay=1e-4)


def stream(batch: int = 32, seed: int = 0):
    return view_stream(batch, (32, 16), (2, 2), n_clusters=4, image_size=48, seed=seed)


def params(learner: Learner) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in learner.model.state_dict().items()}


def test_loss_drops_well_below_log_k_without_collapse() -> None:
    learner = Learner.build(MODEL, LEARNER)
    views = stream()
    stats = [learner.step(next(views)) for _ in range(60)]
    log_k = math.log(MODEL.n_prototypes)
    late = sum(s.loss for s in stats[-10:]) / 10
    assert late < 0.8 * log_k, (late, log_k)
    # collapse would put every image on one prototype (entropy 0); 4 true clusters need at least ln 4
    assert min(s.diagnostics["code_entropy"] for s in stats) > math.log(4)
    assert min(s.diagnostics["prototypes_in_use"] for s in stats) >= 4
    assert not any(s.skipped for s in stats) and stats[-1].step == 60
    # the timed parts are the step: none of its work escapes the split an operator reads
    parts = [sum(s.times.values()) for s in stats[5:]]
    assert sum(parts) >= 0.7 * sum(s.total_s for s in stats[5:])


def test_frozen_prototypes_do_not_move_then_do() -> None:
    learner = Learner.build(MODEL, LearnerConfig(batch_size=8, optimizer="sgd", base_lr=0.5, warmup_steps=0,
                                              freeze_prototypes_steps=3))
    views = stream(8)
    learner.model.normalize_prototypes()
    before = learner.model.prototypes.weight.detach().clone()
    head_before = learner.model.head[0].weight.detach().clone()
    for _ in range(3):
        learner.step(next(views))
    assert torch.equal(learner.model.prototypes.weight, before)
    assert not torch.equal(learner.model.head[0].weight, head_before)
    learner.step(next(views))
    assert not torch.equal(learner.model.prototypes.weight, before)


def test_nan_guard_skips_and_leaves_state_untouched() -> None:
    learner = Learner.build(MODEL, LearnerConfig(batch_size=8, optimizer="lars", base_lr=0.3, warmup_steps=0,
                                              queue_length=16))
    views = stream(8)
    learner.step(next(views))
    learner.step(next(views))
    state = copy.deepcopy(learner.state_dict())
    bad = next(views)
    bad[1][0, 0, 0, 0] = float("nan")
    stats = learner.step(bad)
    assert stats.skipped and math.isnan(stats.loss) and learner.n_skipped == 1 and learner.step_count == 2
    after = learner.state_dict()
    for k, v in state["model"].items():
        assert torch.equal(after["model"][k], v), k
    for pid, s in state["optimizer"]["state"].items():
        assert torch.equal(after["optimizer"]["state"][pid]["momentum_buffer"], s["momentum_buffer"])
    assert torch.equal(after["extra"]["queue"]["rows"], state["extra"]["queue"]["rows"])
    assert after["extra"]["queue"]["ptr"] == 0
    inf = next(views)
    inf[0][:] = float("inf")
    assert learner.step(inf).skipped and learner.n_skipped == 2
    good = learner.step(next(views))
    assert not good.skipped and math.isfinite(good.loss) and learner.step_count == 3


def test_queue_joins_once_full() -> None:
    learner = Learner.build(MODEL, LearnerConfig(batch_size=8, optimizer="sgd", base_lr=0.1, queue_length=20,
                                              queue_start_step=0))
    views = stream(8)
    used = []
    for _ in range(5):
        used.append(learner.method.queue.active(learner.step_count))
        learner.step(next(views))
    # 8 + 8 < 20 rows after two steps; full after the third push, so the fourth step uses it
    assert used == [False, False, False, True, True]


def test_state_round_trip_continues_identically() -> None:
    cfg = LearnerConfig(batch_size=8, optimizer="lars", base_lr=0.3, warmup_steps=4, queue_length=16)
    a = Learner.build(MODEL, cfg)
    views = list(zip(range(6), stream(8), strict=False))
    for _, v in views[:3]:
        a.step(v)
    b = Learner.build(MODEL, LearnerConfig(**{**cfg.__dict__, "seed": 7}))  # different init, overwritten
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for _, v in views[3:]:
        sa, sb = a.step(v), b.step(v)
        assert sa.loss == sb.loss and sa.lr == sb.lr and sa.step == sb.step
    for k, v in a.model.state_dict().items():
        torch.testing.assert_close(b.model.state_dict()[k], v)


def test_bf16_and_channels_last_step() -> None:
    model = ModelConfig(arch="resnet18", hidden_dim=64, out_dim=16, n_prototypes=16, channels_last=True)
    learner = Learner.build(model, LearnerConfig(batch_size=8, optimizer="sgd", base_lr=0.1, bf16=True))
    learner.use_bf16 = True  # exercise autocast even on a CPU that only emulates bfloat16
    seen: list[torch.dtype] = []
    hook = learner.model.trunk.conv1.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    batch = next(stream(8))
    stats = learner.step(batch)
    assert not stats.skipped and math.isfinite(stats.loss)
    assert set(seen) == {torch.bfloat16}  # the convolutions ran in bfloat16
    assert learner.model.trunk.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    learner.use_bf16, seen[:] = False, []
    learner.step(batch)
    assert set(seen) == {torch.float32}  # and the switch is what decides it
    hook.remove()


@pytest.mark.parametrize("native", [False, True])
def test_bf16_only_where_the_device_has_it(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                                           native: bool) -> None:
    monkeypatch.setattr(engine_module, "native_bf16", lambda device: native)
    monkeypatch.setattr(engine_module, "_warned", set())
    model = ModelConfig(arch="resnet18", hidden_dim=0, out_dim=8, n_prototypes=4)
    with caplog.at_level("WARNING", logger="streamssl.learner.engine"):
        on = Learner.build(model, LearnerConfig(batch_size=4, bf16=True))
    assert on.use_bf16 is native
    assert ("no native bfloat16" in caplog.text) is not native
    assert Learner.build(model, LearnerConfig(batch_size=4, bf16=False)).use_bf16 is False


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads the Linux CPU flags")
def test_native_bf16_matches_the_cpu_flags() -> None:
    flags = Path("/proc/cpuinfo").read_text().split()
    assert native_bf16("cpu") is ("avx512_bf16" in flags or "amx_bf16" in flags)


class _Readbacks:
    """Counts the reads of a tensor's value into Python: each is a wait for the device on a GPU."""

    NAMES = ("__bool__", "__float__", "__int__", "item", "tolist")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, **kwargs):
                self.count += 1
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("optimizer", ["lars", "sgd"])
def test_a_step_reads_the_device_twice_whatever_its_parts(monkeypatch: pytest.MonkeyPatch, optimizer: str) -> None:
    """One wait before the update (may it be applied?) and one for the step's numbers: no per-part
    synchronisation, none in Sinkhorn, the code statistics or the optimizer."""
    learner = Learner.build(MODEL, LearnerConfig(batch_size=8, optimizer=optimizer, queue_length=16,
                                              queue_start_step=0, crops_for_assign=(0, 1)))
    views = stream(8)
    for _ in range(3):  # the queue fills and joins Sinkhorn
        learner.step(next(views))
    batch = next(views)
    assert learner.method.queue.active(learner.step_count)
    readbacks = _Readbacks(monkeypatch)
    stats = learner.step(batch)
    assert not stats.skipped
    assert readbacks.count == 2


def test_under_bf16_the_codes_come_from_float32_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    """Autocast's prototype scores are bfloat16; Sinkhorn gets float32 scores of the same embeddings."""
    learner = Learner.build(MODEL, LearnerConfig(batch_size=8, optimizer="sgd", bf16=True))
    learner.use_bf16 = True  # autocast even on a CPU that only emulates bfloat16
    seen: list[torch.Tensor] = []
    real = swav_module.sinkhorn
    monkeypatch.setattr(swav_module, "sinkhorn", lambda scores, **kw: seen.append(scores) or real(scores, **kw))
    embeddings: list[torch.Tensor] = []
    hook = learner.model.prototypes.register_forward_hook(lambda m, inputs, out: embeddings.append(inputs[0]))
    protos = learner.model.prototypes.weight.detach().float().clone()  # before the step moves them
    learner.step(next(stream(8)))
    hook.remove()
    emb = embeddings[0].detach()
    assert emb.dtype == torch.bfloat16 and len(seen) == 2
    for i, scores in zip(learner.cfg.crops_for_assign, seen, strict=True):
        assert scores.dtype == torch.float32
        torch.testing.assert_close(scores, emb[i * 8:(i + 1) * 8].float() @ protos.T)
        assert not torch.equal(scores, scores.bfloat16().float())  # not bfloat16 values widened

"""SwAV network: shapes, normalisation, small stem, and the multi-resolution forward."""

from __future__ import annotations

import re

import pytest
import torch

from streamssl.config import LearnerConfig, ModelConfig
from streamssl.learner.methods.swav import SwAV
from streamssl.learner.model import make_trunk


def swav(cfg: ModelConfig) -> SwAV:
    """SwAV's network (trunk, head, prototypes) on the CPU."""
    return SwAV(cfg, LearnerConfig(), device=torch.device("cpu"))


def views(batch: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, 3, 32, 32, generator=g) for _ in range(2)] + \
        [torch.randn(batch, 3, 16, 16, generator=g) for _ in range(3)]


@pytest.mark.parametrize("hidden,out,dim", [(64, 16, 16), (0, 16, 16), (64, 0, 512)])
def test_shapes_and_unit_embeddings(hidden: int, out: int, dim: int) -> None:
    model = swav(ModelConfig(arch="resnet18", hidden_dim=hidden, out_dim=out, n_prototypes=7))
    emb, scores = model(views())
    assert emb.shape == (15, dim) and scores.shape == (15, 7)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(15))


def test_prototypes_are_renormalised() -> None:
    model = swav(ModelConfig(arch="resnet18", hidden_dim=0, out_dim=8, n_prototypes=5))
    with torch.no_grad():
        model.prototypes.weight.mul_(3.0)
    model.normalize_prototypes()
    torch.testing.assert_close(model.prototypes.weight.norm(dim=1), torch.ones(5))


def test_views_of_equal_size_share_one_trunk_call() -> None:
    model = swav(ModelConfig(arch="resnet18", hidden_dim=0, out_dim=8, n_prototypes=5)).eval()
    calls: list[tuple[int, ...]] = []
    model.trunk.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    vs = views()
    with torch.no_grad():
        emb, _ = model(vs)
        assert calls == [(6, 3, 32, 32), (9, 3, 16, 16)]
        # in eval mode grouping changes nothing: equal to one view at a time
        one_by_one = torch.cat([model([v])[0] for v in vs])
    torch.testing.assert_close(emb, one_by_one, atol=1e-5, rtol=1e-4)


def test_small_stem_keeps_resolution() -> None:
    small = swav(ModelConfig(arch="resnet18", small_stem=True, hidden_dim=0, out_dim=8, n_prototypes=5))
    plain = swav(ModelConfig(arch="resnet18", small_stem=False, hidden_dim=0, out_dim=8, n_prototypes=5))
    shapes: dict[str, tuple[int, ...]] = {}
    small.trunk.layer1.register_forward_hook(lambda m, i, o: shapes.__setitem__("small", tuple(o.shape)))
    plain.trunk.layer1.register_forward_hook(lambda m, i, o: shapes.__setitem__("plain", tuple(o.shape)))
    x = [torch.randn(2, 3, 32, 32)]
    small(x), plain(x)
    assert shapes["small"][-1] == 32 and shapes["plain"][-1] == 8


def test_stem_stride_halves_resolution() -> None:
    model = swav(ModelConfig(arch="resnet18", small_stem=True, stem_stride=2, hidden_dim=0, out_dim=8,
                                  n_prototypes=5))
    shapes: list[tuple[int, ...]] = []
    model.trunk.layer1.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    model([torch.randn(2, 3, 28, 28)])
    assert shapes == [(2, 64, 14, 14)]
    with pytest.raises(ValueError, match="small stem"):
        make_trunk("resnet18", small_stem=False, stem_stride=2)


def test_stem_pool_keeps_the_max_pool_after_a_full_resolution_conv() -> None:
    trunk = make_trunk("resnet18", small_stem=True, stem_stride=1, stem_pool=True)
    shapes: dict[str, tuple[int, ...]] = {}
    trunk.conv1.register_forward_hook(lambda m, i, o: shapes.__setitem__("conv1", tuple(o.shape)))
    trunk.layer1.register_forward_hook(lambda m, i, o: shapes.__setitem__("layer1", tuple(o.shape)))
    trunk(torch.randn(2, 3, 28, 28))
    assert shapes == {"conv1": (2, 64, 28, 28), "layer1": (2, 64, 14, 14)}
    assert isinstance(trunk.maxpool, torch.nn.MaxPool2d) and trunk.conv1.kernel_size == (3, 3)
    with pytest.raises(ValueError, match="small stem"):
        make_trunk("resnet18", small_stem=False, stem_pool=True)


def test_resnet10_is_resnet18_with_one_block_per_stage() -> None:
    r10, r18 = make_trunk("resnet10", small_stem=True), make_trunk("resnet18", small_stem=True)
    for name in ("layer1", "layer2", "layer3", "layer4"):
        assert (len(getattr(r10, name)), len(getattr(r18, name))) == (1, 2)
    # the same stem, stage widths and first block of every stage: resnet18's state minus its second blocks
    first_blocks = {k: v.shape for k, v in r18.state_dict().items() if not re.match(r"layer\d\.1\.", k)}
    assert first_blocks == {k: v.shape for k, v in r10.state_dict().items()}


@pytest.mark.parametrize("arch,dim", [("resnet10", 512), ("resnet34", 512), ("resnet50", 2048)])
def test_other_trunks(arch: str, dim: int) -> None:
    model = swav(ModelConfig(arch=arch, hidden_dim=0, out_dim=0, n_prototypes=4))
    assert model.embed_dim == dim
    emb, scores = model([torch.randn(2, 3, 32, 32)] * 2)
    assert emb.shape == (4, dim) and scores.shape == (4, 4)

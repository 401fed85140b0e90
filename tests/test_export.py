"""Export: the torchvision state dict loads strictly into plain torchvision and gives streamssl's features;
TorchScript and ONNX give them too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from streamssl.config import resolve
from streamssl.errors import UsageError
from streamssl.learner.engine import Learner
from streamssl.service.checkpoint import CheckpointManager, load_trunk, rng_state
from streamssl.tools.export import export, torchvision_model
from tests.synthetic import view_stream


def make_checkpoint(folder: Path, small_stem: bool, stem_stride: int = 1, stem_pool: bool = False,
                    arch: str = "resnet18") -> Path:
    cfg = resolve(None, environ={}, overrides=[
        f"model.arch={arch}", f"model.small_stem={str(small_stem).lower()}", f"model.stem_stride={stem_stride}",
        f"model.stem_pool={str(stem_pool).lower()}",
        "augment.sizes=[32,16]",
        "model.n_prototypes=16", "model.hidden_dim=32", "model.out_dim=16", "learner.batch_size=8",
        "learner.optimizer=sgd", "learner.base_lr=0.1", "learner.warmup_steps=0"])
    learner = Learner.build(cfg.model, cfg.learner)
    views = view_stream(8, (32, 16), (2, 6))
    for _ in range(2):  # trained a little, so BN statistics are not the defaults
        learner.step(next(views))
    return CheckpointManager(folder).save({"learner": learner.state_dict(), "config": cfg.to_dict(),
                                           "rng": rng_state()}, learner.step_count)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def assert_same_features(model: nn.Module, ckpt: Path, images: torch.Tensor) -> None:
    """A plain torchvision model loaded from an export, classifier removed, gives the checkpoint's features."""
    model.fc = nn.Identity()
    trunk, _ = load_trunk(ckpt)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), trunk(images), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("small_stem,stem_stride,stem_pool",
                         [(False, 1, False), (True, 1, False), (True, 2, False), (True, 1, True)])
def test_torchvision_export_loads_strictly_and_matches(tmp_path: Path, small_stem: bool, stem_stride: int,
                                                       stem_pool: bool, images: torch.Tensor) -> None:
    # stride and pool leave every weight shape alone: only the features tell a wrongly rebuilt stem
    ckpt = make_checkpoint(tmp_path, small_stem, stem_stride, stem_pool)
    out = tmp_path / "resnet18.pth"
    meta = export(ckpt, "torchvision", out)
    assert json.loads(Path(f"{out}.json").read_text()) == meta
    state = torch.load(out, weights_only=True)
    model = torchvision.models.resnet18() if not small_stem else torchvision_model(meta)
    model.load_state_dict(state, strict=True)
    assert torch.count_nonzero(model.fc.weight) == 0  # SwAV trains no classifier
    assert_same_features(model, ckpt, images)


def test_resnet10_export_loads_into_torchvisions_resnet_class(tmp_path: Path, images: torch.Tensor) -> None:
    # torchvision has no resnet10 builder: the export names the class and block layout that load it
    ckpt = make_checkpoint(tmp_path, small_stem=False, arch="resnet10")
    meta = export(ckpt, "torchvision", tmp_path / "resnet10.pth")
    assert meta["arch"] == "resnet10" and meta["feature_dim"] == 512
    model = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])
    model.load_state_dict(torch.load(tmp_path / "resnet10.pth", weights_only=True), strict=True)
    assert_same_features(model, ckpt, images)


def test_torchscript_export_matches(tmp_path: Path, images: torch.Tensor) -> None:
    ckpt = make_checkpoint(tmp_path, small_stem=True)
    export(ckpt, "torchscript", tmp_path / "trunk.pt")
    scripted = torch.jit.load(str(tmp_path / "trunk.pt"))
    trunk, _ = load_trunk(ckpt)
    with torch.no_grad():
        torch.testing.assert_close(scripted(images), trunk(images), atol=1e-5, rtol=1e-4)


def test_onnx_export_matches(tmp_path: Path, images: torch.Tensor) -> None:
    ort = pytest.importorskip("onnxruntime")
    ckpt = make_checkpoint(tmp_path, small_stem=False)
    export(ckpt, "onnx", tmp_path / "trunk.onnx")
    session = ort.InferenceSession(str(tmp_path / "trunk.onnx"), providers=["CPUExecutionProvider"])
    (features,) = session.run(None, {"images": images.numpy()})
    trunk, _ = load_trunk(ckpt)
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(features), trunk(images), atol=1e-4, rtol=1e-3)


def test_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="'tflite': unknown"):
        export(tmp_path / "x.pt", "tflite", tmp_path / "out")

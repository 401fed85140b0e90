"""Export a trained trunk for use outside streamssl: torchvision state dict, TorchScript or ONNX.

torchvision: a plain ``state_dict`` (tensors only; loads with ``torch.load(weights_only=True)``) that loads
into ``torchvision.models.<arch>()`` with ``load_state_dict(strict=True)``; resnet10, which torchvision has no
builder for, into ``torchvision.models.resnet.ResNet(BasicBlock, [1, 1, 1, 1])``. SwAV trains no classifier, so
the ``fc`` layer is written as zeros of torchvision's default shape (1000 classes): replace it (``model.fc =
nn.Linear(F, n)``) to fine-tune, or set ``model.fc = nn.Identity()`` to get exactly streamssl's features.
A small-stem trunk (3x3 first conv, no max-pool unless ``stem_pool``) has a different ``conv1``: build the model
with ``streamssl.tools.export.torchvision_model(meta)``, which applies the same change, before loading. A JSON file
beside the export records arch, stem, feature dimension and input normalisation.

TorchScript and ONNX exports map (B, 3, H, W) normalised images to (B, F) trunk features.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from streamssl.errors import UsageError
from streamssl.learner.model import TRUNK_DIMS, make_trunk, stem_of
from streamssl.service.checkpoint import load_trunk

FORMATS = ("torchvision", "torchscript", "onnx")


def torchvision_model(meta: dict[str, Any]) -> nn.Module:
    """A torchvision ResNet shaped like the exported trunk (default 1000-class fc), ready for load_state_dict.

    The stem is built by ``make_trunk`` itself, so the export cannot drift from the trained trunk.
    """
    model = make_trunk(meta["arch"], **stem_of(meta))
    model.fc = nn.Linear(TRUNK_DIMS[meta["arch"]], 1000)  # torchvision's default classifier shape
    return model


def export(checkpoint: str | Path, fmt: str, out: str | Path) -> dict[str, Any]:
    """Write the trunk of ``checkpoint`` to ``out`` in ``fmt``; returns the metadata also written beside it."""
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: unknown; one of {', '.join(FORMATS)}")
    trunk, config = load_trunk(checkpoint)
    model_cfg, augment_cfg = config["model"], config["augment"]
    size = int(augment_cfg["sizes"][0])
    meta = {"format": fmt, "arch": model_cfg["arch"], **stem_of(model_cfg),
            "feature_dim": TRUNK_DIMS[model_cfg["arch"]], "input_size": size,
            "mean": list(augment_cfg["mean"]), "std": list(augment_cfg["std"]), "source": str(checkpoint)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randn(2, 3, size, size)
    if fmt == "torchvision":
        state = {k: v.detach().clone() for k, v in trunk.state_dict().items()}
        state["fc.weight"] = torch.zeros(1000, meta["feature_dim"])
        state["fc.bias"] = torch.zeros(1000)
        torch.save(state, out)
    elif fmt == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream but still asked for
            torch.jit.save(torch.jit.trace(trunk, example), str(out))
    else:
        # the legacy exporter: the torch.export-based one needs onnxscript and gains nothing for a ResNet
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        torch.onnx.export(trunk, (example,), str(out), input_names=["images"], output_names=["features"],
                          dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}}, dynamo=False)
    Path(f"{out}.json").write_text(json.dumps(meta, indent=2))
    return meta

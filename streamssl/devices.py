"""Where the learner computes: the device a run names, and what that device can do.

Kept apart from the learner so that every stage that touches a device (the learner, the feeder thread that
runs DALI or copies the twin's views, the probe, the benchmarks) asks the same questions the same way.
"""

from __future__ import annotations

from pathlib import Path

import torch


def pick_device(name: str) -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU; anything else as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def native_bf16(device: str | torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively, so that autocast to it speeds training up.

    Without native support (CPUs with AVX2 but neither AVX512_BF16 nor AMX) torch emulates bfloat16 and an
    autocast step of a ResNet runs 10x slower than float32 (measured: `streamssl bench learner --config
    cpu-small --set learner.bf16=true`, 0.7 vs 9.1 img/s on a 2-core AVX2 EPYC).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return True  # other accelerators: trust the user's setting
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(callable(probe) for probe in probes):
        return any(probe() for probe in probes)  # type: ignore[misc]
    try:  # older torch: read the CPU flags (Linux)
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


__all__ = ["native_bf16", "pick_device"]

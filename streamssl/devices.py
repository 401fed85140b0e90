"""Where the learner computes: the device a run names, and what that device can do.

Kept apart from the learner so that every stage that touches a device (the learner, the feeder thread that
runs DALI or copies the twin's views, the probe, the benchmarks) asks the same questions the same way.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch


def pick_device(name: str) -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU; anything else as torch spells it.

    A CUDA device always comes back with its index (``cuda`` is the current device, ``cuda:0`` by default):
    DALI, the feeder thread and the learner must all name the same GPU.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return device


def use_device(device: torch.device) -> None:
    """Make ``device`` the current CUDA device of the calling thread; nothing on other devices.

    torch's current device is per thread: every thread that launches CUDA work (the learner's, the feeder's
    that runs DALI or copies views) calls this first, or its kernels and allocations land on GPU 0. Also
    lets cuDNN pick the fastest convolution algorithms: the view shapes never change during a run, so the
    search is paid once per shape.
    """
    if device.type != "cuda":
        return
    torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = True


class StepTimer:
    """Split of one step into named parts, with at most one wait for the device.

    On the CPU each ``mark`` reads the clock. On CUDA each ``mark`` records an event on the current stream
    and ``read`` waits for the last one only (an event, not ``torch.cuda.synchronize``, which would wait for
    every stream of the device, DALI's too), then returns the GPU time between the marks. The events are
    made once and reused: ``read`` runs before the next step records them again.
    """

    def __init__(self, device: torch.device, names: tuple[str, ...]) -> None:
        self.names = names
        self.cuda = device.type == "cuda"
        self._events = [torch.cuda.Event(enable_timing=True) for _ in range(len(names) + 1)] if self.cuda else []
        self._times: list[float] = []
        self._n = 0

    def start(self) -> None:
        self._times, self._n = [], 0
        self._record()

    def mark(self, name: str) -> None:
        """The part ``name`` (the next in ``names``) ends here."""
        if self._n > len(self.names) or self.names[self._n - 1] != name:
            raise ValueError(f"timer: {name!r} is not the next part of {self.names}")
        self._record()

    def _record(self) -> None:
        if self.cuda:
            self._events[self._n].record()
        else:
            self._times.append(time.perf_counter())
        self._n += 1

    def read(self) -> dict[str, float]:
        """Seconds per part since ``start``."""
        if self.cuda:
            self._events[-1].synchronize()
            return {name: self._events[i].elapsed_time(self._events[i + 1]) / 1000
                    for i, name in enumerate(self.names)}
        return {name: self._times[i + 1] - self._times[i] for i, name in enumerate(self.names)}


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


__all__ = ["StepTimer", "native_bf16", "pick_device", "use_device"]

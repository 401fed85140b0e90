"""devices.py: the device a run names, per-thread CUDA binding and the step timer."""

from __future__ import annotations

import time

import pytest
import torch

import streamssl.devices as devices
from streamssl.devices import StepTimer, pick_device, use_device
from tests.synthetic import ListStream


def test_a_cuda_device_always_carries_its_index() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("cuda:3") == torch.device("cuda", 3)
    expected = torch.cuda.current_device() if torch.cuda.is_available() else 0
    assert pick_device("cuda") == torch.device("cuda", expected)  # what DALI's device_id and the feeder need
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_use_device_binds_the_thread_and_turns_on_cudnn_benchmark(monkeypatch: pytest.MonkeyPatch) -> None:
    bound: list[torch.device] = []
    monkeypatch.setattr(devices.torch.cuda, "set_device", bound.append)
    monkeypatch.setattr(devices.torch.backends.cudnn, "benchmark", False)
    use_device(torch.device("cpu"))
    assert bound == [] and torch.backends.cudnn.benchmark is False  # nothing to do off CUDA
    use_device(torch.device("cuda", 1))
    assert bound == [torch.device("cuda", 1)] and torch.backends.cudnn.benchmark is True


def test_step_timer_splits_a_step_into_its_parts_in_order() -> None:
    timer = StepTimer(torch.device("cpu"), ("a", "b"))
    for _ in range(2):  # reusable step after step
        timer.start()
        time.sleep(0.02)
        timer.mark("a")
        time.sleep(0.04)
        timer.mark("b")
        parts = timer.read()
        assert list(parts) == ["a", "b"]
        assert 0.015 < parts["a"] < parts["b"] and parts["b"] > 0.035
    timer.start()
    with pytest.raises(ValueError, match="not the next part"):
        timer.mark("b")


@pytest.mark.gpu
def test_step_timer_on_cuda_times_the_gpu_work() -> None:
    device = torch.device("cuda", 0)
    timer = StepTimer(device, ("small", "big"))
    x = torch.randn(4096, 4096, device=device)
    timer.start()
    x @ x
    timer.mark("small")
    for _ in range(20):
        x @ x
    timer.mark("big")
    parts = timer.read()
    assert 0 < parts["small"] < parts["big"]


class _MultiCrop:
    def __init__(self) -> None:
        self.closed_in: str | None = None

    def __call__(self, batch):
        return [torch.zeros(len(batch), 3, 4, 4)], list(range(len(batch)))

    def close(self) -> None:
        import threading

        self.closed_in = threading.current_thread().name


def test_the_feeder_thread_binds_the_run_device_then_releases_the_multicrop(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    import streamssl.service.feeder as feeder_module
    from streamssl.service.feeder import END, Feeder

    bound: list[tuple[str, torch.device]] = []
    monkeypatch.setattr(feeder_module, "use_device", lambda d: bound.append((threading.current_thread().name, d)))
    multicrop = _MultiCrop()
    samples = [type("S", (), {"data": b"x%d" % i, "id": f"s#{i}"})() for i in range(3)]
    feeder = Feeder(ListStream(samples), multicrop, 2, 4, device=torch.device("cuda", 1))  # type: ignore[arg-type]
    feeder.start()
    feeder.join(timeout=10)
    items = []
    while not feeder.out.empty():
        items.append(feeder.out.get())
    assert bound == [("streamssl-feeder", torch.device("cuda", 1))]  # in the feeder's own thread
    assert [item.views[0].shape[0] for item in items[:-1]] == [2] and items[-1] is END  # 3 samples: 2 + 1 < 2
    assert items[0].ids == ["s#0", "s#1"]  # each image's stable id travels with its views
    assert multicrop.closed_in == "streamssl-feeder"


def test_the_daemon_gives_dali_and_the_feeder_the_device_with_its_index(tmp_path, monkeypatch: pytest.MonkeyPatch
                                                                        ) -> None:
    import streamssl.service.daemon as daemon_module
    import streamssl.service.feeder as feeder_module  # where the daemon's data path is built
    from tests.test_daemon import config, make_shards

    shards = make_shards(tmp_path, 1)
    daemon = daemon_module.Daemon(config(tmp_path, f"source.urls=[{shards[0]!r}]".replace("'", '"')))
    daemon.device = torch.device("cuda", 1)  # as pick_device("cuda:1") gives it; no GPU needed to check
    seen: dict[str, object] = {}
    monkeypatch.setattr(feeder_module, "make_multicrop",
                        lambda cfg, batch, device, on_bad: seen.setdefault("multicrop", device) and _MultiCrop())
    monkeypatch.setattr(feeder_module, "Feeder", lambda *args, device, replay, full_batches:
                        seen.setdefault("feeder", device) and type("F", (), {"start": lambda self: None,
                                                                               "replay": replay})())
    daemon._data(start=0.0)
    assert daemon.stream is not None
    daemon.stream.close()
    assert seen == {"multicrop": "cuda:1", "feeder": torch.device("cuda", 1)}

"""benchmarks/gpu_check.py: every check runs on a CPU too (gloo for NCCL), so the one run a GPU machine gets
is not spent on a typo; on a machine without CUDA, asking for CUDA is one clear FAIL line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from streamssl.augment import dali_import_error

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_every_check_passes_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    results = json.loads(out.read_text())
    assert list(results) == ["environment", "learner", "sinkhorn", "resume", "twin", "dali", "group", "daemon"]
    may_skip = {"dali": dali_import_error() is not None}
    for name, result in results.items():
        assert result["status"] == ("SKIP" if may_skip.get(name) else "PASS"), (name, result)
        assert f"{result['status']} {name}: " in run.stdout
    assert results["learner"]["images_per_s"] > 0 and results["group"]["backend"] == "gloo"
    assert results["daemon"]["steps"] == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_asking_for_cuda_without_it_is_one_clear_failure() -> None:
    run = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert run.stdout.startswith("FAIL environment: cuda:0 asked for, but torch") and "sees no CUDA" in run.stdout

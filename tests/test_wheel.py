"""A real wheel in a fresh virtual environment, run from another folder: the profiles ship inside it."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_runs_from_another_folder(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(ROOT)], check=True, timeout=300)
    (wheel,) = wheels.glob("streamssl-*.whl")
    env_dir = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, timeout=300)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   timeout=300)
    # the dependencies (torch, ...) come from this environment: a plain path in a .pth file, so the editable
    # install of the checkout is not activated there
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    exe = str(env_dir / "bin" / "streamssl")
    where = subprocess.run([str(py), "-c", "import streamssl; print(streamssl.__file__)"], cwd=elsewhere,
                           capture_output=True, text=True, check=True).stdout
    assert str(env_dir) in where and str(ROOT) not in where, where
    shown = subprocess.run([exe, "config", "show", "cpu-small", "--json"], cwd=elsewhere, capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert '"arch": "resnet18"' in shown.stdout
    tiny = ["model.hidden_dim=32", "model.out_dim=16", "model.n_prototypes=16", "learner.batch_size=8",
            "augment.sizes=[24,12]", "learner.queue_length=0", "run.max_steps=2", "metrics.port=-1",
            f"checkpoint.dir={tmp_path / 'run'}"]
    ran = subprocess.run([exe, "run", "--config", "cpu-small", *[x for k in tiny for x in ("--set", k)]],
                         cwd=elsewhere, capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert "stopped after 2 steps" in ran.stdout
    missing = subprocess.run([exe, "config", "show", "no-such-profile"], cwd=elsewhere, capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode == 2 and "cpu-small" in missing.stderr and "Traceback" not in missing.stderr

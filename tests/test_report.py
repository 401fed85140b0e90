"""streamssl report: PNGs from the run's history, tolerant of a torn last line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from streamssl.cli import app
from streamssl.errors import UsageError
from streamssl.tools.report import draw, read_history


def write_history(path: Path) -> None:
    lines = [json.dumps({"time": 1000 + 10 * i, "step": i, "loss": 5 - 0.1 * i, "lr": 0.1, "code_entropy": 3.0,
                         "prototypes_in_use": 20, "queue_fill": 1.0, "images": 8 * i, "images_per_s": 50.0,
                         "data_wait": 0.05}) for i in range(1, 20)]
    lines.insert(5, json.dumps({"time": 1055, "event": "probe", "step": 5, "probe_top1": 0.7}))
    lines.insert(9, json.dumps({"time": 1090, "event": "collapse", "step": 9, "rolled_back_to": 6}))
    path.write_text("\n".join(lines) + '\n{"time": 12')  # a crash mid-write leaves a torn line


def test_draws_every_panel(tmp_path: Path) -> None:
    write_history(tmp_path / "history.jsonl")
    assert len(read_history(tmp_path / "history.jsonl")) == 21
    written = draw(tmp_path)
    assert sorted(p.name for p in written) == ["codes.png", "loss.png", "probe.png", "throughput.png"]
    for path in written:
        with Image.open(path) as im:
            assert im.size == (800, 360)
            assert len(im.convert("L").getcolors(maxcolors=256 * 256) or []) > 10  # something was drawn


def test_cli_report_and_empty_history(tmp_path: Path) -> None:
    write_history(tmp_path / "history.jsonl")
    result = CliRunner().invoke(app, ["report", str(tmp_path), "--out", str(tmp_path / "pics")])
    assert result.exit_code == 0 and len(result.stdout.split()) == 4
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "history.jsonl").write_text("")
    with pytest.raises(UsageError, match="no records"):
        draw(tmp_path / "empty")
    for folder, says in ((tmp_path / "missing", "no such folder"), (tmp_path / "pics", "no history.jsonl"),
                         (tmp_path / "empty", "no records")):
        result = CliRunner().invoke(app, ["report", str(folder)])
        assert result.exit_code == 2 and says in result.stderr and "Traceback" not in result.stderr, result.stderr

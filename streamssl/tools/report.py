"""Pictures of a run for people who would rather look than read: PNG plots drawn from the run's own history.

The daemon appends one JSON line per progress line to ``<checkpoint.dir>/history.jsonl`` (step, loss, lr, code
entropy, prototypes in use, queue fill, images/s, data wait) plus event lines (probe accuracy, collapse and
recovery). ``streamssl report RUN_DIR`` reads it and draws, against wall-clock time since the first record:
loss, code entropy and prototypes in use, probe accuracy, throughput and data wait; collapse events are marked
on every panel. A resumed run appends to the same file, so its plots show every restart.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from streamssl.errors import UsageError

log = logging.getLogger("streamssl.tools.report")

PANELS = (
    ("loss", "swapped-prediction loss", [("loss", "loss")]),
    ("codes", "code entropy (nats) / prototypes in use", [("code_entropy", "code entropy"),
                                                          ("prototypes_in_use", "prototypes in use")]),
    ("probe", "online probe kNN top-1", [("probe_top1", "top-1")]),
    ("throughput", "images/s and data-wait share", [("images_per_s", "images/s"), ("data_wait", "data wait")]),
)


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """The records of a history file; a torn last line (a crash mid-write) is skipped."""
    records = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s:%d: not JSON, skipped", path, n)
    return records


def draw(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Draw the run's PNGs into ``out_dir`` (default: RUN_DIR/report). Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise UsageError(f"{run_dir}: no such folder or file; give the run's checkpoint.dir")
    history = run_dir / "history.jsonl" if run_dir.is_dir() else run_dir
    if not history.is_file():
        raise UsageError(f"{run_dir}: no history.jsonl in it; `streamssl run` writes one into its checkpoint.dir "
                         "with every progress line: is this the run's checkpoint.dir?")
    records = read_history(history)
    if not records:
        raise UsageError(f"{history}: no records yet; the daemon writes one every run.log_every_steps steps")
    out = Path(out_dir) if out_dir is not None else history.parent / "report"
    out.mkdir(parents=True, exist_ok=True)
    t0 = min(r["time"] for r in records)
    collapses = [(r["time"] - t0) / 60 for r in records if r.get("event") == "collapse"]
    written = []
    for name, title, series in PANELS:
        fig, ax = plt.subplots(figsize=(8, 3.6), dpi=100)
        drawn = False
        for i, (key, label) in enumerate(series):
            points = [((r["time"] - t0) / 60, r[key]) for r in records if isinstance(r.get(key), int | float)]
            if not points:
                continue
            target = ax if i == 0 else ax.twinx()
            xs, ys = zip(*points, strict=True)
            target.plot(xs, ys, color=f"C{i}", marker="o" if len(points) < 30 else None, ms=3, label=label)
            target.set_ylabel(label, color=f"C{i}")
            drawn = True
        for x in collapses:
            ax.axvline(x, color="red", ls="--", lw=1)
        ax.set_xlabel("minutes since the first record")
        ax.set_title(title + ("" if drawn else " (no data yet)"))
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written

"""The quality benchmark's report: machine facts, the table and the accuracy-against-time curve.

Separate from ``quality.py`` (which trains and evaluates) so that a finished ``results.json`` can be
re-rendered on its own: ``python benchmarks/quality_report.py runs/quality/results.json``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from streamssl import __version__

LIGHTLY_NAMES = {"swav": "SwaV", "simclr": "SimCLR", "moco": "MoCo", "byol": "BYOL"}
METHOD_NAMES = {"swav": "SwAV", "simclr": "SimCLR", "moco": "MoCo v2", "byol": "BYOL",
                "deepcluster": "DeepCluster-v2", "npid": "NPID"}


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == (platform.processor() or platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = [f for f in line.split(":", 1)[1].split() if f in ("avx2", "avx512_bf16", "amx_bf16")]
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cpu_flags": flags, "cpus": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                            "python": platform.python_version(), "torch": torch.__version__,
                            "streamssl": __version__,
                            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    try:
        import lightly

        info["lightly"] = lightly.__version__
    except ImportError:
        info["lightly"] = None
    return info


def label(results: dict[str, Any], run: str) -> str:
    """``streamssl SwAV`` or ``lightly 1.6.0 SwaV`` for the run named ``streamssl-swav`` / ``lightly-swav``."""
    side, method = run.split("-", 1)
    if side == "streamssl":
        return f"streamssl {METHOD_NAMES.get(method, method)}"
    release = results.get("machine", {}).get("lightly")
    return f"lightly {release} {LIGHTLY_NAMES.get(method, method)}" if release else f"lightly {method}"


def _pct(value: float | None) -> str:
    return f"{100 * value:.2f}" if value is not None else "-"


def table(results: dict[str, Any]) -> str:
    """One line per snapshot of every run, then the baselines: minutes, images, kNN and linear top-1."""
    lines = [f"{'run':<28}{'minutes':>9}{'images':>10}{'kNN %':>9}{'linear %':>10}"]
    for run, info in (results.get("runs") or {}).items():
        for r in info.get("snapshots") or []:
            lines.append(f"{label(results, run):<28}{r['elapsed_s'] / 60:>9.2f}{r['images']:>10}"
                         f"{_pct(r.get('knn')):>9}{_pct(r.get('linear')):>10}")
    for name, r in (results.get("baselines") or {}).items():
        lines.append(f"{name:<28}{'':>9}{'':>10}{_pct(r.get('knn')):>9}{_pct(r.get('linear')):>10}")
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    """The README table: the last snapshot of each method, streamssl beside lightly, then the baselines."""
    runs = results.get("runs") or {}
    methods = list(dict.fromkeys(run.split("-", 1)[1] for run in runs))
    lines = ["| method | streamssl images | streamssl kNN | streamssl linear | lightly images | lightly kNN | "
             "lightly linear |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for method in methods:
        cells = [METHOD_NAMES.get(method, method)]
        for side in ("streamssl", "lightly"):
            snaps = (runs.get(f"{side}-{method}") or {}).get("snapshots") or []
            last = snaps[-1] if snaps else None
            cells += ([f"{last['images']:,}", _pct(last.get("knn")), _pct(last.get("linear"))] if last
                      else ["-", "-", "-"])
        lines.append("| " + " | ".join(cells) + " |")
    for name, r in (results.get("baselines") or {}).items():
        lines.append(f"| {name} | | {_pct(r.get('knn'))} | {_pct(r.get('linear'))} | | | |")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> bool:
    """kNN top-1 against training minutes, one curve per run, the baselines as horizontal lines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no curve drawn", flush=True)
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for run, info in (results.get("runs") or {}).items():
        rows = info.get("snapshots") or []
        if rows:
            style = "o-" if run.startswith("streamssl") else "s--"
            ax.plot([r["elapsed_s"] / 60 for r in rows], [100 * r["knn"] for r in rows], style,
                    label=label(results, run))
    for (name, r), ls in zip((results.get("baselines") or {}).items(), ("--", ":", "-."), strict=False):
        if r.get("knn") is not None:
            ax.axhline(100 * r["knn"], color="grey", ls=ls, label=name)
    ax.set_xlabel("training wall-clock time (minutes)")
    ax.set_ylabel(f"kNN top-1 (%), k={results['eval']['k']}, T={results['eval']['temperature']}")
    machine = results["machine"]
    ax.set_title(f"Fashion-MNIST, {machine['cpus']} CPU cores, budget {results['budget_s'] / 60:g} min")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: quality_report.py RESULTS.json", file=sys.stderr)
        return 2
    results = json.loads(Path(argv[0]).read_text())
    print(table(results))
    print()
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

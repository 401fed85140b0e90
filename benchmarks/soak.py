"""Soak test of the daemon (issue 21): ``streamssl run --config cpu-small`` at full speed for ``--minutes``,
its prototype store on a redis-server this command starts, the store written every 10 steps and a checkpoint
every 50 (about every 100 s on 2 cores) so that both write paths run many times::

    python benchmarks/soak.py --minutes 60 --json runs/soak.json --png runs/soak.png

Every ``--interval-s`` it samples the daemon's process tree (the daemon and any children): resident memory
(VmRSS), open file descriptors and threads, from /proc; Redis's ``used_memory``; and the daemon's steps and
images from its /metrics. The criterion: after ``--warmup-min`` (10 of 60 minutes; min(10, minutes / 6) by
default), the median of the last ``--window-min`` minutes (5) must stay within 5% of the median of the first
window after the warm-up, for each of the four resources. A leak (memory, descriptors, threads or Redis keys
that pile up with steps, store writes or checkpoints) shows as a rising median; allocator spikes and a
descriptor open during a checkpoint write do not move a median. The store keeps ``store.history`` (20) old
versions: Redis grows until 20 writes (200 steps, ~7 minutes) have filled it, inside a 10-minute warm-up.
Prints PASS/FAIL per series and exits 1 on any FAIL, or when the daemon dies or does not exit 0 on the
SIGTERM that ends the run (it checkpoints first). Ctrl-C stops the daemon and the redis-server and keeps
what was sampled (exit 130). Needs redis-server on PATH.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import deque
from pathlib import Path
from statistics import median
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from quality_report import machine_info  # noqa: E402

from tests.conftest import RedisServer  # noqa: E402

SERIES = {"rss_mb": "resident memory, MB", "fds": "open file descriptors", "threads": "threads",
          "redis_mb": "Redis used_memory, MB"}
METRICS = ("learner_steps_total", "learner_images_total", "store_writes_total", "store_write_failures_total",
           "checkpoint_last_write_timestamp_seconds", "checkpoint_write_failures_total")
MAX_GROWTH = 0.05
Sample = dict[str, Any]


def tree_resources(root: int) -> dict[str, float]:
    """Resident MB, open descriptors and threads of ``root`` and its descendants, found by the parent pids
    in /proc/*/stat (every kernel has them); a process that exits meanwhile is skipped."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, ValueError, IndexError):  # the comm field may hold spaces and ")"
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    totals, todo = {"rss_mb": 0.0, "fds": 0, "threads": 0}, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
            status = dict(line.split(":", 1) for line in lines if ":" in line)
            totals["fds"] += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue
        totals["rss_mb"] += int(status.get("VmRSS", "0 kB").split()[0]) / 1024  # no VmRSS: a zombie
        totals["threads"] += int(status["Threads"])
    return totals


def scrape(url: str) -> dict[str, float]:
    """The counters of METRICS from the daemon's /metrics (names without the ``streamssl_`` prefix)."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    found = {name: re.search(rf"^streamssl_{name} (\S+)$", text, re.M) for name in METRICS}
    return {name: float(m.group(1)) for name, m in found.items() if m}


def windows(samples: list[Sample], warmup_min: float, window_min: float) -> tuple[list[Sample], list[Sample]]:
    """The samples of the first window after the warm-up and of the last one (none if the two would overlap)."""
    end = samples[-1]["minutes"] if samples else 0.0
    if end - window_min < warmup_min:
        return [], []
    return ([s for s in samples if warmup_min <= s["minutes"] <= warmup_min + window_min],
            [s for s in samples if s["minutes"] >= end - window_min])


def growth(first: list[Sample], last: list[Sample], key: str) -> dict[str, Any]:
    """Medians of ``key`` over the two windows and the relative change; FAIL on too few samples."""
    if len(first) < 2 or len(last) < 2:
        return {"first": None, "last": None, "growth": None, "pass": False}
    a, b = median(s[key] for s in first), median(s[key] for s in last)  # none of the four is 0 while it runs
    return {"first": a, "last": b, "growth": (b - a) / a, "pass": (b - a) / a < MAX_GROWTH}


def rate(window: list[Sample]) -> float | None:
    """Images a second across a window: a daemon that slows down shows here."""
    if len(window) < 2 or window[-1]["minutes"] <= window[0]["minutes"]:
        return None
    return round((window[-1]["images"] - window[0]["images"]) / 60 / (window[-1]["minutes"] - window[0]["minutes"]), 1)


def plot(samples: list[Sample], figures: dict[str, Any], warmup_min: float, window_min: float, path: Path) -> None:
    """The four series against minutes, the warm-up shaded, the two window medians in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [s["minutes"] for s in samples]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for ax, (key, title) in zip(axes.flat, SERIES.items(), strict=True):
        ax.plot(minutes, [s[key] for s in samples], lw=1.2)
        ax.axvspan(0, warmup_min, color="0.85", label="warm-up")
        f = figures[key]
        if f["growth"] is not None:
            ax.hlines(f["first"], warmup_min, warmup_min + window_min, colors="tab:red", lw=2)
            ax.hlines(f["last"], minutes[-1] - window_min, minutes[-1], colors="tab:red", lw=2)
            title += f": {100 * f['growth']:+.1f}% {'PASS' if f['pass'] else 'FAIL'}"
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("minutes since the daemon started")
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"streamssl soak, cpu-small: {samples[-1]['steps']:.0f} steps, {samples[-1]['images']:.0f} images "
                 "(red: the window medians)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


class Daemon:
    """``streamssl run --config cpu-small`` unbounded, in its own session: a Ctrl-C at the terminal reaches
    this script only, which sends one SIGTERM (a second would make the daemon exit without its checkpoint)."""

    def __init__(self, workdir: Path, redis_url: str, args: argparse.Namespace) -> None:
        overrides = [f"checkpoint.dir={workdir / 'run'}", f"store.url={redis_url}", "metrics.port=0",
                     f"store.every_steps={args.store_every_steps}", f"run.threads={args.threads}",
                     "run.max_steps=0", "run.max_images=0", "run.max_seconds=0"]
        if args.checkpoint_every_steps:
            overrides.append(f"checkpoint.every_steps={args.checkpoint_every_steps}")
        command = [sys.executable, "-m", "streamssl.cli", "run", "--config", "cpu-small"]
        for item in [*overrides, *args.set]:
            command += ["--set", item]
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSSL_")}
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env, cwd=ROOT, start_new_session=True)
        self.tail: deque[str] = deque(maxlen=40)
        self.metrics_url: str | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.tail.append(line.rstrip("\n"))
            found = re.search(r"metrics on (http://\S+/metrics)", line)
            self.metrics_url = self.metrics_url or (found.group(1) if found else None)

    def stop(self, timeout_s: float = 300) -> tuple[int | None, float]:
        """SIGTERM, then wait for the last step and checkpoint: (exit code, seconds); killed (None) past timeout_s."""
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s), time.monotonic() - started
        except subprocess.TimeoutExpired:
            return None, time.monotonic() - started
        finally:  # also on a second Ctrl-C while it checkpoints
            if self.proc.poll() is None:
                self.proc.kill()


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt  # SIGTERM to this script: stop both, as on Ctrl-C


def soak(args: argparse.Namespace, binary: str) -> tuple[list[Sample], dict[str, Any]]:
    """Run the daemon beside its redis-server for ``args.minutes``, sampling every ``args.interval_s``."""
    samples: list[Sample] = []
    outcome: dict[str, Any] = {"interrupted": False, "daemon_died": False}
    with tempfile.TemporaryDirectory(prefix="streamssl-soak-") as folder:
        (Path(folder) / "redis").mkdir()
        server, daemon = RedisServer(binary, Path(folder) / "redis"), None
        try:
            server.start()
            client = redis.Redis.from_url(server.url)
            daemon = Daemon(Path(folder), server.url, args)
            started = time.monotonic()
            print(f"{'minutes':>8} {'rss MB':>8} {'fds':>5} {'threads':>7} {'redis MB':>9} {'steps':>7} {'images':>8}")
            for k in range(int(args.minutes * 60 / args.interval_s) + 1):
                time.sleep(max(0.0, started + k * args.interval_s - time.monotonic()))
                if daemon.proc.poll() is not None:
                    outcome["daemon_died"] = True
                    print(f"the daemon exited early with {daemon.proc.returncode}; its last lines:", *daemon.tail,
                          sep="\n")
                    break
                # /proc before /metrics: a scrape briefly adds a socket and a server thread to the daemon
                s = {"minutes": (time.monotonic() - started) / 60, **tree_resources(daemon.proc.pid),
                     "redis_mb": client.info("memory")["used_memory"] / 2**20}
                scraped = samples[-1]["metrics"] if samples else {}  # kept when a scrape fails
                if daemon.metrics_url is not None:
                    with contextlib.suppress(OSError):
                        scraped = scrape(daemon.metrics_url)
                s.update(metrics=scraped, steps=scraped.get("learner_steps_total", 0),
                         images=scraped.get("learner_images_total", 0))
                samples.append(s)
                print(f"{s['minutes']:>8.2f} {s['rss_mb']:>8.1f} {s['fds']:>5} {s['threads']:>7} {s['redis_mb']:>9.2f} "
                      f"{s['steps']:>7.0f} {s['images']:>8.0f}", flush=True)
        except KeyboardInterrupt:
            outcome["interrupted"] = True
            print("interrupted: stopping the daemon (it checkpoints first) and the redis-server", flush=True)
        finally:  # a Ctrl-C at the terminal reaches the redis-server too: the last store write may then fail
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            try:
                if daemon is not None:
                    outcome["daemon_exit_code"], outcome["daemon_stop_s"] = daemon.stop()
            finally:
                server.stop()
    return samples, outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=60.0, help="length of the run")
    parser.add_argument("--interval-s", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--warmup-min", type=float, help="minutes left out of the criterion (min(10, minutes/6))")
    parser.add_argument("--window-min", type=float, help="minutes of each median window (min(5, after warm-up / 4))")
    parser.add_argument("--threads", type=int, default=1, help="the daemon's run.threads (torch intra-op threads)")
    parser.add_argument("--store-every-steps", type=int, default=10, help="the daemon's store.every_steps")
    parser.add_argument("--checkpoint-every-steps", type=int, default=50,
                        help="checkpoint.every_steps (0: the profile's, 500 steps or 300 s)")
    parser.add_argument("--set", action="append", default=[], help="extra daemon override section.key=value")
    parser.add_argument("--json", type=Path, help="write the samples and the figures here")
    parser.add_argument("--png", type=Path, help="draw the four series here")
    args = parser.parse_args(argv)
    warmup_min = min(10.0, args.minutes / 6) if args.warmup_min is None else args.warmup_min
    window_min = min(5.0, (args.minutes - warmup_min) / 4) if args.window_min is None else args.window_min
    binary = shutil.which("redis-server")
    if binary is None:
        parser.error("no redis-server on PATH")
    machine = machine_info()
    print(f"# {machine['cpu']} ({', '.join(machine['cpu_flags']) or 'no avx2'}), {machine['cpus']} CPUs, load "
          f"{machine['load_average']}; {args.minutes:g} min, warm-up {warmup_min:g}, windows {window_min:g}",
          flush=True)
    signal.signal(signal.SIGTERM, _interrupt)
    samples, outcome = soak(args, binary)
    first, last = windows(samples, warmup_min, window_min)
    figures = {key: growth(first, last, key) for key in SERIES}
    final = samples[-1] if samples else {"metrics": {}, "steps": 0, "images": 0}
    outcome.update({name: final["metrics"].get(name) for name in
                    ("store_writes_total", "store_write_failures_total", "checkpoint_write_failures_total")})
    outcome.update(steps=final["steps"], images=final["images"], images_per_s=[rate(first), rate(last)],
                   checkpoints_seen=len({s["metrics"].get("checkpoint_last_write_timestamp_seconds")
                                         for s in samples} - {None, 0.0}))
    print(f"\n{'series':<24}{'first window':>13}{'last window':>13}{'growth':>9}  result")
    for key, title in SERIES.items():
        f = figures[key]
        if f["growth"] is None:
            print(f"{title:<24}{'':>13}{'':>13}{'':>9}  FAIL (too few samples after the warm-up)")
        else:
            print(f"{title:<24}{f['first']:>13.2f}{f['last']:>13.2f}{100 * f['growth']:>+8.1f}%  "
                  f"{'PASS' if f['pass'] else 'FAIL'}")
    print(f"steps {outcome['steps']:.0f}, images {outcome['images']:.0f} (images/s in the first and last window: "
          f"{outcome['images_per_s']}), store writes {outcome.get('store_writes_total')} (failures "
          f"{outcome.get('store_write_failures_total')}), checkpoints seen {outcome['checkpoints_seen']} (failures "
          f"{outcome.get('checkpoint_write_failures_total')}); the daemon's exit code on SIGTERM "
          f"{outcome.get('daemon_exit_code')}, after {outcome.get('daemon_stop_s', 0):.1f} s")
    machine["load_average_end"] = list(os.getloadavg())
    results = {"machine": machine, "args": vars(args), "warmup_min": warmup_min, "window_min": window_min,
               "max_growth": MAX_GROWTH, "figures": figures, "outcome": outcome, "samples": samples}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str))
    if args.png and samples:
        plot(samples, figures, warmup_min, window_min, args.png)
    if outcome["interrupted"]:
        return 130
    ok = all(f["pass"] for f in figures.values()) and not outcome["daemon_died"]
    return 0 if ok and outcome.get("daemon_exit_code") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

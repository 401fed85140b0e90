"""Fuzzing at scale (issue 21): ``--n`` inputs (100,000) spread over the readers of outside bytes, with the
contracts the suite's fuzz tests check (tests/fuzz_bytes.py, tests/fuzz_text.py): image checks and decoding,
the tar reader, URLs, Redis stream entries (a redis-server this command starts), configuration.

``--n`` is split over the targets by ``SHARES`` (Redis inputs are the slowest: 5%). Reports per target the
inputs run, the crashes (an exception or a broken contract: must be 0) with the first crashing input, and
the slowest input with its time (must stay under 1 s); prints a table, writes JSON with ``--json``, and
exits 1 on any crash or an input over ``--max-s``::

    nice -n 5 python benchmarks/fuzz.py --n 100000 --json runs/fuzz.json

Inputs come from hypothesis (generation only: no shrinking, no example database), seeded by ``--seed``;
the time of an input is that of its check alone, not of its generation. Needs the dev extra (hypothesis).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the targets live beside the tests that use them

from quality_report import machine_info  # noqa: E402

from tests import fuzz_bytes, fuzz_text  # noqa: E402
from tests.conftest import RedisServer  # noqa: E402

SHARES = {"image": 25, "tar": 25, "url": 20, "redis": 5, "config": 25}
"""How ``--n`` is split (percent): a Redis input costs ~100 ms (a source, its blocking reads, its acks), the
others a few ms."""


@dataclass
class Tally:
    """What one target's inputs did."""

    n: int = 0
    crashes: int = 0
    first_crash: str = ""
    slowest_s: float = 0.0
    slowest_input: str = ""
    total_s: float = 0.0
    crash_kinds: dict[str, int] = field(default_factory=dict)

    def add(self, inp: Any, seconds: float, error: BaseException | None) -> None:
        self.n += 1
        self.total_s += seconds
        if seconds > self.slowest_s:
            self.slowest_s, self.slowest_input = seconds, _short(inp)
        if error is not None:
            self.crashes += 1
            kind = f"{type(error).__name__}: {str(error)[:120]}"
            self.crash_kinds[kind] = self.crash_kinds.get(kind, 0) + 1
            if not self.first_crash:
                self.first_crash = f"{kind} <- {_short(inp, 400)}"


def _short(inp: Any, limit: int = 160) -> str:
    text = repr(inp)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def run_target(strategy: st.SearchStrategy[Any], check: Callable[[Any], None], n: int, at_seed: int) -> Tally:
    """``n`` inputs of ``strategy`` through ``check``; every exception is caught and counted, none stops it."""
    tally = Tally()

    @seed(at_seed)
    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def one(inp: Any) -> None:
        start = time.perf_counter()
        error: BaseException | None = None
        try:
            check(inp)
        except Exception as exc:  # a crash or a broken contract: counted, the run goes on
            error = exc
        tally.add(inp, time.perf_counter() - start, error)

    one()
    return tally


def targets(workdir: Path, redis_url: str | None) -> dict[str, tuple[st.SearchStrategy[Any], Callable[[Any], None]]]:
    counter = iter(range(1 << 62))
    found: dict[str, tuple[st.SearchStrategy[Any], Callable[[Any], None]]] = {
        "image": (fuzz_bytes.image_inputs(), fuzz_bytes.check_image_input),
        "tar": (fuzz_bytes.tar_inputs(), lambda inp: fuzz_bytes.check_tar_input(inp, workdir)),
        "url": (fuzz_text.url_inputs(), fuzz_text.check_url_input),
        "config": (fuzz_text.config_inputs(), lambda inp: fuzz_text.check_config_input(inp, workdir)),
    }
    if redis_url is not None:
        found["redis"] = (fuzz_text.redis_entries(),
                          lambda inp: fuzz_text.check_redis_entries(inp, redis_url, workdir, f"fuzz:{next(counter)}"))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="inputs in all, spread evenly over the targets")
    parser.add_argument("--targets", default="image,tar,url,redis,config", help="comma-separated subset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-s", type=float, default=1.0, help="the slowest input must stay under this")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the redis-server it started on the way out
    chosen = [t.strip() for t in args.targets.split(",") if t.strip()]
    machine = machine_info()
    print(f"# {machine['cpu']} ({', '.join(machine['cpu_flags']) or 'no avx2'}), {machine['cpus']} CPUs, "
          f"load {machine['load_average']}", flush=True)
    results: dict[str, Any] = {"machine": machine, "n": args.n, "seed": args.seed, "targets": {}}
    server = None
    with tempfile.TemporaryDirectory(prefix="streamssl-fuzz-") as folder:
        workdir = Path(folder)
        try:
            redis_url = None
            if "redis" in chosen:
                binary = shutil.which("redis-server")
                if binary is None:
                    print("# redis: skipped, no redis-server on PATH")
                    chosen.remove("redis")
                else:
                    (workdir / "redis").mkdir()
                    server = RedisServer(binary, workdir / "redis")
                    server.start()
                    redis_url = server.url
            available = targets(workdir, redis_url)
            unknown = [t for t in chosen if t not in available]
            if unknown:
                parser.error(f"unknown targets {unknown}; known: {', '.join(available)}")
            weight = sum(SHARES[t] for t in chosen)
            print(f"{'target':<8} {'inputs':>8} {'crashes':>8} {'mean ms':>8} {'slowest s':>10}  slowest input")
            for name in chosen:
                strategy, check = available[name]
                started = time.monotonic()
                tally = run_target(strategy, check, max(1, args.n * SHARES[name] // weight), args.seed)
                print(f"{name:<8} {tally.n:>8,} {tally.crashes:>8} {1000 * tally.total_s / max(tally.n, 1):>8.2f} "
                      f"{tally.slowest_s:>10.3f}  {tally.slowest_input}", flush=True)
                if tally.first_crash:
                    print(f"         first crash: {tally.first_crash}")
                results["targets"][name] = {**tally.__dict__, "wall_s": time.monotonic() - started}
        finally:
            if server is not None:
                server.stop()
    total = sum(t["n"] for t in results["targets"].values())
    crashes = sum(t["crashes"] for t in results["targets"].values())
    slowest = max((t["slowest_s"] for t in results["targets"].values()), default=0.0)
    print(f"{'all':<8} {total:>8,} {crashes:>8} {'':>8} {slowest:>10.3f}")
    results.update(total=total, crashes=crashes, slowest_s=slowest)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return 1 if crashes or slowest >= args.max_s else 0


if __name__ == "__main__":
    sys.exit(main())

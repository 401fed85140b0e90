"""Fuzzing everything that reads outside bytes, a bounded number of examples each (the targets and their
contracts: tests/fuzz_bytes.py, tests/fuzz_text.py; 100,000 inputs: benchmarks/fuzz.py). The examples
pinned with ``@example`` are the inputs that once crashed, kept as regression tests.
"""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tests import fuzz_bytes, fuzz_text
from tests.fuzz_text import ConfigInput, UrlInput

BOUNDED = {"deadline": 2000, "database": None, "suppress_health_check": [HealthCheck.too_slow]}
"""2 s a single example at most (benchmarks/fuzz.py holds the line at 1 s, on a quiet machine)."""

_counter = itertools.count()


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="streamssl-fuzz-") as folder:
        yield Path(folder)


@settings(max_examples=150, **BOUNDED)
@given(fuzz_bytes.image_inputs())
def test_image_check_and_decode(inp: tuple[bytes, str]) -> None:
    fuzz_bytes.check_image_input(inp)


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
          deadline=2000, database=None)
@given(fuzz_bytes.tar_inputs())
def test_tar_reader(workdir: Path, inp: fuzz_bytes.TarInput) -> None:
    fuzz_bytes.check_tar_input(inp, workdir)


@settings(max_examples=300, **BOUNDED)
@given(fuzz_text.url_inputs())
@example(UrlInput("http://[", False))  # urllib's ValueError escaped every URL check
@example(UrlInput("redis://:SECRET@[::1/0", True))
@example(UrlInput("s3://u:SECRET@h/x.tar", True))  # a refused scheme's message showed the password
@example(UrlInput("x{a", False))  # braceexpand's UnbalancedBracesError escaped source.urls
@example(UrlInput("shards/{1..1000000000}.tar", False))  # expanded in full: memory exhausted
def test_urls(inp: UrlInput) -> None:
    fuzz_text.check_url_input(inp)


@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
          deadline=5000, database=None)
@given(fuzz_text.redis_entries())
@example([{b"url": b"\xff\xfe/x.tar"}, {b"\xff": b"x"}])  # non-UTF-8 bytes raised out of the source
def test_redis_stream_entries(redis_server, workdir: Path, entries: list[dict[bytes, bytes]]) -> None:
    fuzz_text.check_redis_entries(entries, redis_server.url, workdir, f"fuzz:{next(_counter)}")


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
          deadline=2000, database=None)
@given(fuzz_text.config_inputs())
@example(ConfigInput(overrides=("learner.base_lr=" + "9" * 400,)))  # OverflowError from float()
@example(ConfigInput(overrides=("run.max_steps=1\nx = 2",)))  # the second line was dropped in silence
@example(ConfigInput(profile=b"[run]\nmax_steps = 1\n\xff"))  # UnicodeDecodeError from read_text
@example(ConfigInput(environ=(("STREAMSSL_METRICS_HOST", "\U00024f44c"),)))  # config show's TOML did not read back
def test_configuration(workdir: Path, inp: ConfigInput) -> None:
    fuzz_text.check_config_input(inp, workdir)


@settings(max_examples=25, **BOUNDED)
@given(st.lists(fuzz_text.override_texts(), min_size=1, max_size=3))
def test_set_values_on_the_command_line(overrides: list[str]) -> None:
    """``streamssl config show --set ...``: the configuration, or one ``error:`` line and exit 2; never a
    traceback."""
    from streamssl.cli import app

    args = ["config", "show", "--json", *itertools.chain.from_iterable(("--set", item) for item in overrides)]
    result = CliRunner().invoke(app, args, env={"STREAMSSL_DEBUG": ""})
    assert result.exit_code in (0, 2), (result.exit_code, result.output)
    if result.exit_code == 2 and result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    if result.exit_code == 2:
        assert "Traceback" not in result.output


def test_a_set_value_of_two_toml_lines_is_refused_not_cut() -> None:
    from streamssl.config import ConfigError, resolve

    with pytest.raises(ConfigError, match=r"run\.max_steps: expected an integer"):
        resolve(None, environ={}, overrides=["run.max_steps=1\nx = 2"])
    assert resolve(None, environ={}, overrides=["store.prefix=a\nb = 1"]).store.prefix == "a\nb = 1"
    with pytest.raises(ConfigError, match="not valid Unicode"):  # argv bytes of another encoding
        resolve(None, environ={}, overrides=["store.prefix=\udcff"])


def test_the_brace_scan_agrees_with_braceexpand() -> None:
    """``check_pattern`` refuses a pattern by a bound and a balance computed without expanding it: the bound
    must never be below the real count (or a pattern could still fill the memory), the balance must be
    braceexpand's."""
    import braceexpand

    from streamssl.urls import _brace_scan

    @settings(max_examples=300, **BOUNDED)
    @given(st.lists(st.sampled_from(("{a,b}", "{1..3}", "{01..12..5}", "{3..1}", "{a..e..2}", "{a..Z}", "{", "}",
                                     ",", "\\", "x", "{,}", "{a,{b,c}}", "{1..3..0}", "{-2..2}")), max_size=6))
    def bound_holds(parts: list[str]) -> None:
        pattern = "".join(parts)
        bound, balanced = _brace_scan(pattern)
        try:
            n = sum(1 for _ in braceexpand.braceexpand(pattern))
        except ValueError:
            assert not balanced, pattern
            return
        assert balanced and n <= bound, pattern

    bound_holds()


def test_dali_decodes_or_counts_what_the_checks_pass() -> None:
    """DALI's decoder behind ``check_image``: every checked image becomes views or one ``decode_error``."""
    pytest.importorskip("nvidia.dali")
    import torch

    from streamssl.augment.dali import DaliMultiCrop
    from streamssl.stream.images import check_image

    bad: list[str] = []
    crop = DaliMultiCrop(fuzz_bytes.SPEC, 4, n_threads=1, on_bad=bad.append)

    @settings(max_examples=15, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(fuzz_bytes.image_inputs(), min_size=1, max_size=4))
    def decodes_or_counts(inputs: list[tuple[bytes, str]]) -> None:
        checked = [check_image(d, e, max_pixels=fuzz_bytes.MAX_PIXELS)[0] for d, e in inputs]
        batch = [c for c in checked if c is not None]
        if not batch:
            return
        bad.clear()
        views, kept = crop(batch)
        assert len(kept) + len(bad) == len(batch) and set(bad) <= {"decode_error", "augment_error"}
        for view, size in zip(views, fuzz_bytes.SPEC.view_sizes, strict=True):
            assert view.shape == (len(kept), 3, size, size) and bool(torch.isfinite(view).all())

    decodes_or_counts()

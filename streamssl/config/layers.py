"""Resolving a configuration in layers: defaults < TOML profile < STREAMSSL_* environment < --set overrides,
each checked against the sections' field metadata (``sections.py``), and the shipped profiles found."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib

from streamssl.config.sections import DEBUG_ENV, DEFAULT_PROFILE, ENV_PREFIX, SECTIONS, Config, ConfigError


def _types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _short(value: Any, limit: int = 60) -> Any:
    """A value as an error message may quote it: huge numbers and strings cut to ``limit`` characters."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _check_value(key: str, value: Any, hint: Any, meta: Mapping[str, Any], origin: str) -> Any:
    """Coerce ``value`` to the field's type and check its range; raise ConfigError naming ``key``."""

    def fail(why: str) -> ConfigError:
        return ConfigError(f"{key}: {why} (from {origin})")

    def scalar(v: Any, t: type) -> Any:
        if t is bool:
            if isinstance(v, bool):
                return v
            if isinstance(v, str) and v.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                return v.lower() in ("true", "1", "yes", "on")
            raise fail(f"expected true or false, got {v!r}")
        if t is int:
            if isinstance(v, bool) or not isinstance(v, int | str):
                raise fail(f"expected an integer, got {v!r}")
            try:
                out = int(v)
            except ValueError:
                raise fail(f"expected an integer, got {_short(v)!r}") from None
            if not -(2**63) <= out < 2**63:  # torch, numpy and JSON readers take 64 bits
                raise fail(f"{_short(v)}: out of range")
            return out
        if t is float:
            if isinstance(v, bool) or not isinstance(v, int | float | str):
                raise fail(f"expected a number, got {v!r}")
            try:
                out = float(v)
            except (ValueError, OverflowError):  # OverflowError: an integer too large for a float
                raise fail(f"expected a number, got {_short(v)!r}") from None
            if not math.isfinite(out):
                raise fail(f"expected a finite number, got {v!r}")
            return out
        if t is str:
            if not isinstance(v, str):
                raise fail(f"expected a string, got {v!r}")
            if any(0xD800 <= ord(ch) < 0xE000 for ch in v):  # bytes of another encoding in argv or a variable
                raise fail(f"{v!r} is not valid Unicode text (a lone surrogate: check the encoding)")
            return v
        raise TypeError(t)  # pragma: no cover - config fields use only these types

    if typing.get_origin(hint) is tuple:
        item_t = typing.get_args(hint)[0]
        if isinstance(value, str):
            value = [p.strip() for p in value.split(",") if p.strip()] if value.strip() else []
        elif isinstance(value, int | float) and not isinstance(value, bool):
            value = [value]  # a bare number is a list of one (augment.blur_p = 0.5: every size group)
        if not isinstance(value, list | tuple):
            raise fail(f"expected a list, got {value!r}")
        out: Any = tuple(scalar(v, item_t) for v in value)
        items = out
    else:
        out = scalar(value, hint)
        items = (out,)
    for v in items:
        if meta.get("choices") and v not in meta["choices"]:
            raise fail(f"must be one of {', '.join(map(str, meta['choices']))}; got {v!r}")
        if isinstance(v, int | float) and not isinstance(v, bool):
            if meta.get("ge") is not None and v < meta["ge"]:
                raise fail(f"must be >= {meta['ge']}, got {v}")
            if meta.get("gt") is not None and v <= meta["gt"]:
                raise fail(f"must be > {meta['gt']}, got {v}")
            if meta.get("le") is not None and v > meta["le"]:
                raise fail(f"must be <= {meta['le']}, got {v}")
    return out


def _parse_text(text: str, name: str = "value") -> Any:
    """An override or environment value: a TOML value when it parses as one, else the plain string.

    Text that starts like a TOML list, table or quoted string (``[``, ``{``, ``"``, ``'``) must parse: a
    list cut short is an error, never a string that happens to begin with ``[``.
    """
    try:
        doc = tomllib.loads(f"v = {text}")
        problem = "" if len(doc) == 1 else "more than one value"  # "1\nx = 2": take none of it as TOML
    except tomllib.TOMLDecodeError as exc:
        problem = str(exc)
    if not problem:
        return doc["v"]
    if text.lstrip().startswith(("[", "{", '"', "'")):
        raise ConfigError(f"{name}: {_short(text)!r} does not parse as a TOML value ({problem}); lists look like "
                          "[\"a\", \"b\"] or a,b") from None
    return text


def _merge_layer(merged: dict[str, dict[str, Any]], layer: Mapping[str, Any], origin: str) -> None:
    for section, values in layer.items():
        if section not in SECTIONS:
            raise ConfigError(f"{section}: unknown section (from {origin}); known: {', '.join(SECTIONS)}")
        if not isinstance(values, Mapping):
            raise ConfigError(f"{section}: expected a table of keys (from {origin})")
        cls = SECTIONS[section]
        hints = _types(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in values.items():
            name = f"{section}.{key}"
            if key not in fields:
                raise ConfigError(f"{name}: unknown key (from {origin}); {section} has: {', '.join(fields)}")
            merged[section][key] = _check_value(name, value, hints[key], fields[key].metadata, origin)


def find_profile(profile: str | os.PathLike[str]) -> Path:
    """A profile path, or a name looked up in ./pipelines, then among the profiles streamssl ships: inside the
    installed package (streamssl/pipelines/, from a wheel) or beside it (pipelines/ of a source checkout)."""
    path = Path(profile)
    if path.is_file():
        return path
    name = path.name if path.suffix == ".toml" else f"{path.name}.toml"
    package = Path(__file__).resolve().parent.parent  # streamssl/
    folders = (Path.cwd() / "pipelines", package / "pipelines", package.parent / "pipelines")
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    shipped = sorted({p.stem for folder in folders[1:] if folder.is_dir() for p in folder.glob("*.toml")})
    raise ConfigError(f"profile {str(profile)!r}: no such file, and no pipelines/{name}; the shipped profiles: "
                      f"{', '.join(shipped) or 'none found'}")


def env_layer(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """STREAMSSL_<SECTION>_<KEY>=value pairs as a layer. Unknown sections are an error, not ignored."""
    layer: dict[str, dict[str, Any]] = {}
    for var, text in environ.items():
        if not var.startswith(ENV_PREFIX) or var == DEBUG_ENV:
            continue
        rest = var[len(ENV_PREFIX):].lower()
        section, _, key = rest.partition("_")
        if section not in SECTIONS or not key:
            raise ConfigError(f"environment variable {var}: expected STREAMSSL_<SECTION>_<KEY> with a section "
                              f"among {', '.join(SECTIONS)}")
        layer.setdefault(section, {})[key] = _parse_text(text, f"environment variable {var}")
    return layer


def overrides_layer(overrides: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``section.key=value`` strings as a layer."""
    layer: dict[str, dict[str, Any]] = {}
    for item in overrides:
        dotted, sep, text = item.partition("=")
        section, dot, key = dotted.strip().partition(".")
        if not sep or not dot or not key:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        layer.setdefault(section, {})[key] = _parse_text(text.strip(), f"--set {dotted.strip()}")
    return layer


def resolve(profile: str | os.PathLike[str] | None = DEFAULT_PROFILE, *,
            environ: Mapping[str, str] | None = None, overrides: Sequence[str] = ()) -> Config:
    """Resolve the configuration: defaults < profile < environment < overrides.

    Args:
        profile: a TOML file or a profile name in pipelines/; None for the dataclass defaults alone.
        environ: the environment to read STREAMSSL_* variables from (os.environ by default).
        overrides: ``section.key=value`` strings, applied last.
    """
    merged: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    if profile is not None:
        path = find_profile(profile)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:  # TOML is UTF-8 text
            raise ConfigError(f"profile {path}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"profile {path}: cannot be read: {exc}") from None
        _merge_layer(merged, data, f"profile {path.name}")
    _merge_layer(merged, env_layer(os.environ if environ is None else environ), "environment")
    _merge_layer(merged, overrides_layer(overrides), "--set")
    try:
        return Config(**{s: SECTIONS[s](**values) for s, values in merged.items()})
    except TypeError as exc:  # pragma: no cover - all keys were checked above
        raise ConfigError(str(exc)) from None


def describe(cls: type) -> list[tuple[str, Any, str]]:
    """(key, default, help) for every field of a section: for docs and CLI help."""
    return [(f.name, f.default, f.metadata.get("help", "")) for f in dataclasses.fields(cls)]

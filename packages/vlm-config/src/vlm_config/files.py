"""Config files (TOML, YAML, JSON), dotted command-line overrides and TOML dumps."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w
import yaml

from vlm_config.job import JobConfig

SUFFIXES = {".toml": "toml", ".yaml": "yaml", ".yml": "yaml", ".json": "json"}


class ConfigFileError(ValueError):
    """A config file that cannot be read or parsed, or a malformed override.

    The message names the file (or override) and what went wrong.  It is the
    only error besides pydantic's ``ValidationError`` that the loaders raise.
    """


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a TOML, YAML or JSON file into a dict (format chosen by suffix); an empty
    document (0 bytes, only blanks or comments, YAML ``null``) gives ``{}``.

    Raises:
        ConfigFileError: missing/unreadable file, unknown suffix, parse error, or a
            document whose top level is not a mapping.
    """
    path = Path(path)
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ConfigFileError(
            f"{path}: unknown config format {path.suffix!r}; use one of {', '.join(SUFFIXES)}"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"{path}: cannot read: {exc}") from exc
    if fmt == "json" and not text.strip():
        return {}
    try:
        if fmt == "toml":
            data: Any = tomllib.loads(text)
        elif fmt == "yaml":
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigFileError(f"{path}: invalid {fmt.upper()}: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def _parse_value(raw: str) -> Any:
    """Keep scalars as strings (pydantic coerces them to the field type); parse
    ``[...]`` / ``{...}`` as TOML inline values so lists and tables can be overridden."""
    stripped = raw.strip()
    if stripped[:1] in "[{":
        try:
            return tomllib.loads(f"v = {stripped}")["v"]
        except tomllib.TOMLDecodeError as exc:
            raise ConfigFileError(
                f"override value {raw!r} is not a valid TOML list/table: {exc}"
            ) from None
    return raw


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with ``dotted.key=value`` overrides applied.

    Raises:
        ConfigFileError: an override without ``=`` or with an empty key segment, or one
            that descends into a value that is not a table.
    """
    result: dict[str, Any] = json.loads(json.dumps(data, default=str)) if data else {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or any(not p for p in parts):
            raise ConfigFileError(
                f"override {item!r} must look like section.key=value (e.g. model.dim=512)"
            )
        node = result
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigFileError(f"override {item!r}: {where} is not a table")
            node = child
        node[parts[-1]] = _parse_value(raw)
    return result


def load_job_config(
    source: str | Path | Mapping[str, Any], overrides: Sequence[str] = ()
) -> JobConfig:
    """Load a job config from a file path or a mapping, apply overrides and validate.

    Raises:
        ConfigFileError: see :func:`read_config_file` and :func:`apply_overrides`; also
            a file that holds no settings (0 bytes, only comments, or an empty mapping),
            which would otherwise silently train a default model.
        pydantic.ValidationError: the content is not a valid job config.
    """
    if isinstance(source, (str, Path)):
        data = read_config_file(source)
        if not data:
            raise ConfigFileError(
                f"{source}: the config file is empty (no settings, only blanks or comments); "
                "a job needs at least its [encoder], [adapter] and [arch] sections, e.g. "
                "copy examples/digits/joint_decoder.toml"
            )
    else:
        data = dict(source)
    return JobConfig.model_validate(apply_overrides(data, overrides))


def dump_toml(config: JobConfig) -> str:
    """TOML text that :func:`load_job_config` turns back into an equal config."""
    return tomli_w.dumps(config.model_dump(mode="json", exclude_none=True))


def write_toml(config: JobConfig, path: str | Path) -> None:
    """Write :func:`dump_toml` to ``path`` atomically (temp file then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(dump_toml(config), encoding="utf-8")
    tmp.replace(path)

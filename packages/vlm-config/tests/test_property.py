"""Property: arbitrary input to the job-config loader raises only ValidationError
(or ConfigFileError for files / overrides it cannot read)."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

from config_helpers import TEST_CLASSES, base_job
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from vlm_config import ConfigFileError, load_job_config

KEYS = st.sampled_from(
    [
        "model",
        "encoder",
        "adapter",
        "arch",
        "train",
        "parallel",
        "type",
        "arch",
        "dim",
        "n_heads",
        "n_kv_heads",
        "max_seq_len",
        "max_text_len",
        "grid",
        "stride",
        "freeze",
        "freeze_schedule",
        "step",
        "module",
        "frozen",
        "frames_per_clip",
        "name",
        "lr",
    ]
) | st.text(string.ascii_lowercase + "_.", max_size=8)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=12)
    | st.sampled_from(["test_grid", "test_stride", "test_prefix", "test_side"])
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=5),
    max_leaves=25,
)


def mutate(data: dict[str, Any], path: list[str], value: Any) -> dict[str, Any]:
    node: Any = data
    for key in path[:-1]:
        if not isinstance(node, dict):
            return data
        node = node.setdefault(key, {})
    if isinstance(node, dict) and path:
        node[path[-1]] = value
    return data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.dictionaries(KEYS, VALUES, max_size=6))
def test_arbitrary_dicts_only_raise_validation_error(data: dict[str, Any]) -> None:
    _register()
    try:
        load_job_config(data)
    except ValidationError:
        pass


@settings(max_examples=300, deadline=None)
@given(path=st.lists(KEYS, min_size=1, max_size=3), value=VALUES)
def test_mutated_valid_config_only_raises_validation_error(path: list[str], value: Any) -> None:
    _register()
    try:
        load_job_config(mutate(base_job(), path, value))
    except ValidationError:
        pass


@settings(max_examples=200, deadline=None)
@given(overrides=st.lists(st.text(max_size=20), max_size=4))
def test_arbitrary_overrides(overrides: list[str]) -> None:
    _register()
    try:
        load_job_config(base_job(), overrides)
    except (ValidationError, ConfigFileError):
        pass


@settings(max_examples=100, deadline=None)
@given(text=st.binary(max_size=200), suffix=st.sampled_from([".toml", ".json", ".yaml"]))
def test_arbitrary_files(tmp_path_factory: Any, text: bytes, suffix: str) -> None:
    _register()
    path = Path(tmp_path_factory.mktemp("f")) / f"job{suffix}"
    path.write_bytes(text)
    try:
        load_job_config(path)
    except (ValidationError, ConfigFileError):
        pass


def _register() -> None:
    from vlm_config import get_registry

    reg = get_registry()
    for group, cls in TEST_CLASSES:
        if cls.plugin_name() not in reg.names(group):
            reg.register(group, cls)

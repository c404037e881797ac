from __future__ import annotations

import json
from pathlib import Path

import pytest
from config_helpers import base_job
from pydantic import ValidationError

from vlm_config import ConfigFileError, apply_overrides, dump_toml, load_job_config


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


TOML = """
[model]
dim = 64
n_layers = 2
n_heads = 4
max_seq_len = 64

[encoder]
type = "test_grid"
grid = 4

[adapter]
type = "test_stride"
stride = 2

[arch]
arch = "test_prefix"
max_text_len = 16
"""


def test_three_formats_agree(tmp_path: Path, registered: object) -> None:
    import yaml

    a = load_job_config(write(tmp_path / "a.toml", TOML))
    b = load_job_config(write(tmp_path / "b.json", json.dumps(base_job())))
    c = load_job_config(write(tmp_path / "c.yaml", yaml.safe_dump(base_job())))
    assert a == b == c


def test_overrides_coerce_through_pydantic(tmp_path: Path, registered: object) -> None:
    job = load_job_config(
        write(tmp_path / "a.toml", TOML),
        [
            "model.dim=128",
            "adapter.stride=4",
            "train.lr=3e-4",
            "model.tie_embeddings=true",
            "train.betas=[0.9, 0.99]",
            "name=exp-1",
        ],
    )
    assert job.model.dim == 128 and job.adapter.stride == 4  # type: ignore[attr-defined]
    assert job.train.lr == pytest.approx(3e-4) and job.model.tie_embeddings is True
    assert job.train.betas == (0.9, 0.99) and job.name == "exp-1"
    with pytest.raises(ValidationError) as info:
        load_job_config(write(tmp_path / "a.toml", TOML), ["model.dim=abc"])
    assert "model.dim" in str(info.value)


def test_override_switches_plugin(tmp_path: Path, registered: object) -> None:
    job = load_job_config(write(tmp_path / "a.toml", TOML), ["arch.arch=test_side", "arch.every=3"])
    assert job.arch.arch == "test_side" and job.arch.every == 3  # type: ignore[attr-defined]


@pytest.mark.parametrize("bad", ["nodot", "model..dim=3", "=3", "model.dim.x=3"])
def test_bad_overrides(bad: str, registered: object) -> None:
    with pytest.raises(ConfigFileError):
        apply_overrides(base_job(), [bad])


def test_toml_round_trip_is_lossless(tmp_path: Path, registered: object) -> None:
    job = load_job_config(
        write(tmp_path / "a.toml", TOML),
        ["train.aux_loss_weights={balance = 0.01}", "arch.freeze=[{module = 'adapter'}]"],
    )
    again = load_job_config(write(tmp_path / "b.toml", dump_toml(job)))
    assert again == job
    assert dump_toml(again) == dump_toml(job)


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        ("x.ini", "", "unknown config format"),
        ("x.toml", "[model\n", "invalid TOML"),
        ("x.json", "{", "invalid JSON"),
        ("x.yaml", "a: [", "invalid YAML"),
        ("x.json", "[1, 2]", "top level must be a mapping"),
    ],
)
def test_file_errors(tmp_path: Path, name: str, text: str, needle: str) -> None:
    with pytest.raises(ConfigFileError, match=needle):
        load_job_config(write(tmp_path / name, text))


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("empty.toml", ""),
        ("comments.toml", "# a job config\n\n   # nothing yet\n"),
        ("empty.yaml", "# only a comment\n"),
        ("empty.json", ""),
        ("braces.json", "{}"),
    ],
)
def test_empty_file_is_an_error(tmp_path: Path, name: str, text: str) -> None:
    path = write(tmp_path / name, text)
    with pytest.raises(ConfigFileError) as info:
        load_job_config(path, ["train.steps=5"])  # overrides do not make it a config
    message = str(info.value)
    assert message.startswith(f"{path}: the config file is empty")
    assert "[encoder], [adapter] and [arch]" in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match="cannot read"):
        load_job_config(tmp_path / "missing.toml")

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_files import TOML

import vlm_config
from vlm_config.cli import main


def test_validate_prints_resolved_config(
    tmp_path: Path, registered: object, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "job.toml"
    path.write_text(TOML)
    assert main(["validate", str(path), "model.dim=128"]) == 0
    out = capsys.readouterr().out
    assert "dim = 128" in out and 'type = "test_stride"' in out
    assert "16 per frame from the encoder -> 8 after the adapter" in out
    assert "total 24 of max_seq_len 64" in out


def test_validate_reports_every_error(
    tmp_path: Path, registered: object, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "job.toml"
    path.write_text(TOML)
    assert main(["validate", str(path), "model.dim=abc", "adapter.stride=0", "model.zzz=1"]) == 1
    err = capsys.readouterr().err
    assert "model.dim: Input should be a valid integer" in err
    assert "adapter.test_stride.stride: Input should be greater than or equal to 1" in err
    assert "model.zzz: Extra inputs are not permitted" in err


def test_validate_file_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(tmp_path / "nope.toml")]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_schema(registered: object, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "encoder" in schema["properties"] and "test_grid" in json.dumps(schema)


def test_plugins_table_runs(registered: object, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "test_stride" in out and "<in-process>" in out
    assert out.splitlines()[0].split() == [
        "group", "name", "distribution", "version", "requires", "status", "error"
    ]  # fmt: skip


def test_plugins_table_marks_incompatible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from test_registry import make_dist

    from vlm_config import get_registry

    for dist, spec in (("cli-future", "vlm-config<0.3,>=0.2"), ("cli-now", "vlm-config>=0.1")):
        module = dist.replace("-", "_") + "_mod"
        name = dist.replace("-", "_")
        make_dist(
            tmp_path,
            dist,
            "1.0.0",
            f"[vlm.adapters]\n{name} = {module}:Config\n",
            {
                module: "from typing import Literal\nfrom vlm_config import AdapterConfig\n"
                f"class Config(AdapterConfig):\n    type: Literal['{name}'] = '{name}'\n"
            },
            requires=(spec,),
        )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = get_registry()
    registry.refresh()
    try:
        assert main(["plugins"]) == 0  # listed, not an error
        rows = {line.split()[1]: line for line in capsys.readouterr().out.splitlines()[2:]}
        installed = vlm_config.__version__
        assert (
            f"vlm-config>=0.2,<0.3  incompatible: needs vlm-config>=0.2,<0.3, installed {installed}"
            in rows["cli_future"]
        )
        assert "vlm-config>=0.1" in rows["cli_now"] and rows["cli_now"].rstrip().endswith("loaded")
        assert main(["plugins", "--check"]) == 1
        assert main(["plugins", "--strict"]) == 1
        assert "cli_future" in capsys.readouterr().err
    finally:
        registry.strict = False
        monkeypatch.undo()
        registry.refresh()


NO_TORCH = """
import sys
import vlm_config
from vlm_config import get_registry, load_job_config
sys.path.insert(0, {tests!r})
from config_helpers import TEST_CLASSES, base_job
reg = get_registry()
for entry in reg.entries():
    reg._ensure_loaded(entry)
for group, cls in TEST_CLASSES:
    reg.register(group, cls, replace=True)
job = load_job_config(base_job(), ["model.dim=128"])
assert job.model.dim == 128
import vlm_config
from vlm_config.cli import main
main(["schema"])
print("torch imported:", "torch" in sys.modules)
"""


def test_torch_never_imported() -> None:
    code = NO_TORCH.format(tests=str(Path(__file__).parent))
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": ""},
    ).stdout
    assert out.strip().endswith("torch imported: False")

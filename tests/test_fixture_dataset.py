"""A third-party dataset plugin (tests/fixture_plugins/vlm-fixture-dataset, installed by
the integration session) trains through `vlm train` with no core edit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY = """
name = "shapes"
[model]
dim = 32
n_layers = 1
n_heads = 2
vocab_size = 32
max_seq_len = 16
[encoder]
type = "siglip"
[encoder.tower]
hidden_size = 16
num_hidden_layers = 1
num_attention_heads = 1
intermediate_size = 32
image_size = 16
patch_size = 8
[arch]
max_text_len = 4
[data]
type = "fixture_shapes"
train_size = 60
num_workers = 1
eval_batch_size = 12
[train]
steps = 80
batch_size = 12
lr = 3e-3
warmup_steps = 2
progress = false
num_threads = 1
output_dir = "{out}"
"""


def vlm(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "vlm_config.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def test_builtin_and_third_party_datasets_are_listed() -> None:
    table = vlm("plugins").stdout
    rows = {tuple(line.split()[:3]) for line in table.splitlines()[2:]}
    for name in ("digits", "digits_video", "jsonl", "hf", "webdataset"):
        assert ("vlm.datasets", name, "vlm-data") in rows, table
    if ("vlm.datasets", "fixture_shapes", "vlm-fixture-dataset") not in rows:
        pytest.skip("the fixture plugins are not installed (nox -s integration installs them)")


def test_fixture_dataset_trains_with_vlm_train(tmp_path: Path) -> None:
    if "fixture_shapes" not in vlm("plugins").stdout:
        pytest.skip("the fixture plugins are not installed (nox -s integration installs them)")
    run = tmp_path / "run"
    cfg = tmp_path / "shapes.toml"
    cfg.write_text(TINY.format(out=run.as_posix()))
    result = vlm("train", str(cfg))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "training shapes:" in result.stdout and "train=60 test=24" in result.stdout
    evaluation = json.loads((run / "eval.json").read_text())
    assert evaluation["total"] == 24
    assert evaluation["accuracy"] >= 0.9, evaluation  # a colour is easy to name
    schema = vlm("schema").stdout
    assert "ShapesDatasetConfig" in schema and "train_size" in schema

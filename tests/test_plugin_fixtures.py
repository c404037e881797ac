"""The fixture plugin distributions (really installed) through the `vlm` CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def vlm(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vlm_config.cli", *args], capture_output=True, text=True, cwd=cwd
    )


def rows(table: str) -> dict[tuple[str, str], str]:
    out = {}
    for line in table.splitlines()[2:]:
        parts = line.split()
        out[(parts[0], parts[1])] = line
    return out


def test_plugins_table_reports_good_broken_and_duplicate() -> None:
    result = vlm("plugins")
    assert result.returncode == 0, result.stderr
    table = rows(result.stdout)
    good = table[("vlm.adapters", "fixture_pool")]
    assert "vlm-fixture-good" in good and "0.0.1" in good and "loaded" in good
    broken = table[("vlm.adapters", "fixture_broken")]
    assert "vlm-fixture-broken" in broken and "broken" in broken
    assert "RuntimeError: vlm-fixture-broken is deliberately broken" in broken
    dup = table[("vlm.encoders", "fixture_grid")]
    assert "duplicate" in dup and "vlm-fixture-duplicate" in dup and "vlm-fixture-good" in dup
    assert vlm("plugins", "--check").returncode == 1


def test_good_plugin_fields_validate(tmp_path: Path) -> None:
    cfg = tmp_path / "job.toml"
    cfg.write_text('[adapter]\ntype = "fixture_pool"\nstride = 4\n[arch]\nmax_text_len = 16\n')
    ok = vlm("validate", str(cfg), "encoder.type=random")
    if "joint_decoder" not in vlm("plugins").stdout:
        pytest.skip("needs the vlm-strategies joint_decoder arch installed")
    assert ok.returncode == 0, ok.stderr
    assert "stride = 4" in ok.stdout
    bad = vlm("validate", str(cfg), "encoder.type=random", "adapter.stride=99")
    assert bad.returncode == 1
    assert "adapter.fixture_pool.stride: Input should be less than or equal to 16" in bad.stderr


def test_duplicate_name_errors_naming_both(tmp_path: Path) -> None:
    cfg = tmp_path / "job.json"
    cfg.write_text('{"encoder": {"type": "fixture_grid"}}')
    result = vlm("validate", str(cfg))
    assert result.returncode == 1
    assert "encoder: Value error, vlm.encoders plugin name 'fixture_grid' is claimed by more" in (
        result.stderr
    )
    assert "vlm-fixture-good 0.0.1 and vlm-fixture-duplicate 0.0.3" in result.stderr


def test_broken_plugin_strict_mode() -> None:
    result = vlm("plugins", "--strict")
    assert result.returncode == 1
    assert "failed to load" in result.stderr


def test_plugin_built_for_another_core_is_marked_not_fatal(tmp_path: Path) -> None:
    """vlm-fixture-future requires vlm-config>=0.2,<0.3 (installed with --no-deps)."""
    import vlm_config

    result = vlm("plugins")
    assert result.returncode == 0, result.stderr
    table = rows(result.stdout)
    future = table[("vlm.adapters", "fixture_future")]
    assert "vlm-fixture-future" in future and "vlm-config>=0.2,<0.3" in future
    assert f"incompatible: needs vlm-config>=0.2,<0.3, installed {vlm_config.__version__}" in future
    assert "ImportError" not in future  # judged from metadata: its module is never imported
    good = table[("vlm.adapters", "fixture_pool")]
    assert "vlm-config>=0.1,<0.2" in good and "loaded" in good
    cfg = tmp_path / "job.json"
    cfg.write_text('{"adapter": {"type": "fixture_future"}}')
    bad = vlm("validate", str(cfg))
    assert bad.returncode == 1
    assert "from vlm-fixture-future 0.0.4 is incompatible: it needs vlm-config>=0.2" in bad.stderr

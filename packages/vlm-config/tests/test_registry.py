"""Registry behaviour against real ``.dist-info`` metadata written to a temp sys.path entry."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from config_helpers import StrideAdapterConfig

import vlm_config
from vlm_config import AdapterConfig, PluginError, PluginRegistry
from vlm_config.registry import core_requirement


def make_dist(
    root: Path,
    dist: str,
    version: str,
    entry_points: str,
    modules: dict[str, str],
    requires: tuple[str, ...] = (),
) -> None:
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    lines = ["Metadata-Version: 2.1", f"Name: {dist}", f"Version: {version}"]
    lines += [f"Requires-Dist: {req}" for req in requires]
    (info / "METADATA").write_text("\n".join(lines) + "\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    for name, code in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(code))


GOOD = """
from typing import Literal
from vlm_config import AdapterConfig
class TripleConfig(AdapterConfig):
    type: Literal["triple"] = "triple"
    factor: int = 3
class MisnamedConfig(AdapterConfig):
    type: Literal["something_else"] = "something_else"
class NotAConfig:
    pass
"""


@pytest.fixture
def plugin_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    make_dist(
        tmp_path,
        "reg-good",
        "1.2.0",
        """
        [vlm.adapters]
        triple = reg_good_mod:TripleConfig
        misnamed = reg_good_mod:MisnamedConfig
        notaconfig = reg_good_mod:NotAConfig
        shared = reg_good_mod:TripleConfig
        """,
        {"reg_good_mod": GOOD},
    )
    make_dist(
        tmp_path,
        "reg-broken",
        "0.3.0",
        """
        [vlm.adapters]
        kaput = reg_broken_mod:KaputConfig
        """,
        {"reg_broken_mod": "raise RuntimeError('boom at import')\n"},
    )
    make_dist(
        tmp_path,
        "reg-dup",
        "2.0.0",
        """
        [vlm.adapters]
        shared = reg_good_mod:TripleConfig
        """,
        {},
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_listing_reads_metadata_only(plugin_path: Path) -> None:
    import sys

    registry = PluginRegistry()
    names = registry.names("adapters")
    assert {"triple", "kaput", "shared", "misnamed"} <= set(names)
    assert "reg_broken_mod" not in sys.modules and "reg_good_mod" not in sys.modules
    entry = next(e for e in registry.entries("vlm.adapters") if e.name == "triple")
    assert (entry.distribution, entry.version, entry.status) == ("reg-good", "1.2.0", "not loaded")


def test_load_and_broken_plugin_isolated(plugin_path: Path) -> None:
    registry = PluginRegistry()
    cls = registry.load("adapters", "triple")
    assert issubclass(cls, AdapterConfig) and cls.plugin_name() == "triple"
    with pytest.raises(PluginError, match=r"kaput.*reg-broken 0.3.0.*boom at import"):
        registry.load("adapters", "kaput")
    usable = registry.load_all("adapters")
    assert "triple" in usable and "kaput" not in usable
    kaput = next(e for e in registry.entries("adapters") if e.name == "kaput")
    assert kaput.status == "broken" and "RuntimeError: boom at import" in (kaput.error or "")


def test_strict_mode_raises(plugin_path: Path) -> None:
    with pytest.raises(PluginError, match="failed to load"):
        PluginRegistry(strict=True).load_all("adapters")


def test_duplicate_names_both(plugin_path: Path) -> None:
    registry = PluginRegistry()
    with pytest.raises(PluginError, match=r"'shared'.*reg-good 1.2.0.*reg-dup 2.0.0"):
        registry.load("adapters", "shared")
    assert "shared" not in registry.load_all("adapters")


def test_class_checks(plugin_path: Path) -> None:
    registry = PluginRegistry()
    with pytest.raises(PluginError, match="defaults to 'something_else'.*named 'misnamed'"):
        registry.load("adapters", "misnamed")
    with pytest.raises(PluginError, match="subclass of AdapterConfig"):
        registry.load("adapters", "notaconfig")


def test_unknown_name_lists_installed(plugin_path: Path) -> None:
    with pytest.raises(
        PluginError, match=r"no vlm.adapters plugin named 'zzz'; installed: .*triple"
    ):
        PluginRegistry().load("adapters", "zzz")
    with pytest.raises(PluginError, match="unknown plugin group"):
        PluginRegistry().names("widgets")


def test_refresh_sees_new_installs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = PluginRegistry()
    assert "late" not in registry.names("archs")
    make_dist(
        tmp_path,
        "reg-late",
        "0.1.0",
        "[vlm.archs]\nlate = reg_late_mod:LateConfig\n",
        {
            "reg_late_mod": "from typing import Literal\nfrom vlm_config import ArchConfig\n"
            "class LateConfig(ArchConfig):\n    arch: Literal['late'] = 'late'\n"
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "late" not in registry.names("archs")  # cached until refresh
    registry.refresh()
    assert "late" in registry.names("archs")
    assert registry.load("archs", "late").plugin_name() == "late"


def test_in_process_registration() -> None:
    registry = PluginRegistry()
    registry.register("adapters", StrideAdapterConfig)
    assert registry.load("adapters", "test_stride") is StrideAdapterConfig
    entry = next(e for e in registry.entries("adapters") if e.name == "test_stride")
    assert entry.distribution == "<in-process>"
    with pytest.raises(PluginError, match="already provided"):
        registry.register("adapters", StrideAdapterConfig)
    with pytest.raises(PluginError, match="subclass of EncoderConfig"):
        registry.register("encoders", StrideAdapterConfig)
    registry.unregister("adapters", "test_stride")
    assert "test_stride" not in registry.names("adapters")


def test_core_requirement_from_metadata() -> None:
    installed = vlm_config.__version__
    assert core_requirement(None) == ("", None)
    assert core_requirement(["pydantic>=2"]) == ("", None)
    assert core_requirement(["vlm-config"]) == ("any", None)
    assert core_requirement([f"VLM_Config=={installed}"]) == (f"=={installed}", None)
    # lower bound first whatever order the metadata has; only the default requirement counts
    assert core_requirement(["vlm-config<0.2,>=0.1"]) == (">=0.1,<0.2", None)
    assert core_requirement(['vlm-config>=9; extra == "dev"']) == ("", None)
    spec, problem = core_requirement(["vlm-config<0.3,>=0.2"])
    assert spec == ">=0.2,<0.3"
    assert problem == f"needs vlm-config>=0.2,<0.3, installed {installed}"


def test_incompatible_plugin_reported_not_imported(plugin_path: Path) -> None:
    import importlib
    import sys

    make_dist(
        plugin_path,
        "reg-future",
        "0.9.0",
        """
        [vlm.adapters]
        future = reg_future_mod:FutureConfig
        """,
        {"reg_future_mod": "raise RuntimeError('imported although incompatible')\n"},
        requires=("vlm-config<0.3,>=0.2", "pydantic>=2"),
    )
    importlib.invalidate_caches()
    registry = PluginRegistry()
    future = next(e for e in registry.entries("adapters") if e.name == "future")
    good = next(e for e in registry.entries("adapters") if e.name == "triple")
    assert future.core_range == ">=0.2,<0.3" and good.core_range == ""
    expected = f"incompatible: needs vlm-config>=0.2,<0.3, installed {vlm_config.__version__}"
    assert future.status == expected
    with pytest.raises(PluginError, match=r"'future' from reg-future 0.9.0 is incompatible"):
        registry.load("adapters", "future")
    usable = registry.load_all("adapters")  # the others keep working
    assert "future" not in usable and "triple" in usable
    assert "reg_future_mod" not in sys.modules  # never imported
    assert future.status == expected and future.error is None
    with pytest.raises(PluginError, match=r"future.*incompatible: it needs vlm-config>=0.2"):
        PluginRegistry(strict=True).load("adapters", "future")

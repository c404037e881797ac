"""The release tooling: public-API check, version bump, tag check, lowest-version pins.

Everything runs on copies of the packages in a temp folder; nothing here edits the
checkout.  Run by ``nox -s api`` (and with everything else by ``nox -s integration``).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
griffe = pytest.importorskip("griffe")


def _tool(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_tools_{name}", ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


api_check = _tool("api_check")
release = _tool("release")


def copy_packages(tmp_path: Path, *names: str) -> Path:
    dest = tmp_path / "packages"
    for name in names:
        shutil.copytree(
            ROOT / "packages" / name, dest / name, ignore=shutil.ignore_patterns("__pycache__")
        )
    return dest


def check(packages: Path, baselines: Path, *args: str) -> tuple[int, str]:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "api_check.py"),
            "--packages-dir",
            str(packages),
            "--baselines",
            str(baselines),
            *args,
        ],
        capture_output=True,
        text=True,
    )
    return out.returncode, out.stdout + out.stderr


# ------------------------------------------------------------------------ api check
def test_committed_baselines_match_main() -> None:
    """What ``nox -s api`` checks: the checkout against ``api/*.json``."""
    code, out = check(ROOT / "packages", ROOT / "api")
    assert code == 0, out
    assert out.count("public API compatible") == len(list((ROOT / "packages").glob("*/src")))


def test_api_check_reports_a_removed_and_a_changed_name(tmp_path: Path) -> None:
    packages = copy_packages(tmp_path, "vlm-config")
    baselines = tmp_path / "api"
    code, out = check(packages, baselines, "--update")
    assert code == 0, out
    assert check(packages, baselines) == (
        0,
        "vlm-config: public API compatible with vlm-config.json\n",
    )

    init = packages / "vlm-config" / "src" / "vlm_config" / "__init__.py"
    text = init.read_text()
    assert "    EncoderConfig,\n" in text and '"EncoderConfig",' in text
    init.write_text(text.replace("    EncoderConfig,\n", "").replace('"EncoderConfig",', ""))
    files = packages / "vlm-config" / "src" / "vlm_config" / "files.py"
    text = files.read_text()
    old = "overrides: Sequence[str] = ()\n) -> JobConfig:"
    assert old in text
    files.write_text(
        text.replace(old, "overrides: Sequence[str], *, strict: bool\n) -> JobConfig:")
    )

    code, out = check(packages, baselines)
    assert code == 1
    assert "vlm-config: 3 breaking change(s) against vlm-config.json:" in out
    assert "EncoderConfig: Public object was removed" in out
    assert "load_job_config(overrides): Parameter is now required" in out
    assert "load_job_config(strict): Parameter was added as required" in out
    assert "nox -s api -- --update" in out

    # recording the break needs a "Breaking" line in the CHANGELOG's Unreleased section
    code, out = check(packages, baselines, "--update")
    assert code == 1 and "refusing to record 3 breaking change(s)" in out
    changelog = packages / "vlm-config" / "CHANGELOG.md"
    changelog.write_text(
        release.add_unreleased_entry(changelog.read_text(), "- Breaking: `EncoderConfig` moved.")
    )
    code, out = check(packages, baselines, "--update")
    assert code == 0 and "records 3 announced breaking change(s)" in out
    assert check(packages, baselines)[0] == 0


def test_api_check_lazy_exports_and_class_members(tmp_path: Path) -> None:
    """Packages exporting names lazily (``_LAZY``) are checked through their targets."""
    packages = copy_packages(tmp_path, "vlm-strategies")
    baselines = tmp_path / "api"
    assert check(packages, baselines, "--update")[0] == 0
    baseline = json.loads((baselines / "vlm-strategies.json").read_text())
    assert baseline["exports"]["VLMWrapper"] == "vlm_strategies.wrapper.VLMWrapper"
    assert "docstring" not in json.dumps(baseline)  # docstrings are not API

    src = packages / "vlm-strategies" / "src" / "vlm_strategies"
    init = src / "__init__.py"
    text = init.read_text()
    assert '    "fold_frames": "vlm_strategies.video",\n' in text
    init.write_text(text.replace('    "fold_frames": "vlm_strategies.video",\n', ""))
    wrapper = src / "wrapper.py"
    text = wrapper.read_text()
    assert "    def generate(" in text
    wrapper.write_text(text.replace("    def generate(", "    def generate_text(", 1))
    code, out = check(packages, baselines)
    assert code == 1, out
    assert "fold_frames: Public object was removed" in out
    assert "VLMWrapper.generate: Public object was removed" in out


def test_api_check_additions_are_not_breaks(tmp_path: Path) -> None:
    packages = copy_packages(tmp_path, "vlm-config")
    baselines = tmp_path / "api"
    assert check(packages, baselines, "--update")[0] == 0
    init = packages / "vlm-config" / "src" / "vlm_config" / "__init__.py"
    init.write_text(init.read_text().replace("__all__ = [", '__all__ = [\n    "shiny",', 1))
    init.write_text(init.read_text() + "\n\ndef shiny() -> int:\n    return 1\n")
    code, out = check(packages, baselines)
    assert code == 0, out
    assert "new since the baseline: shiny" in out


def test_api_check_missing_baseline(tmp_path: Path) -> None:
    packages = copy_packages(tmp_path, "vlm-config")
    code, out = check(packages, tmp_path / "nowhere")
    assert code == 1 and "no API baseline" in out and "--update" in out


# ---------------------------------------------------------------------- changelogs
CHANGELOG = textwrap.dedent(
    """\
    # Changelog: vlm-x

    ## 0.1.0 (unreleased)
    - First thing.
    - Second thing,
      continued.

    ## 0.0.9 - 2024-01-01
    - Old.
    """
)


def test_release_changelog_moves_unreleased_entries() -> None:
    out = release.release_changelog(CHANGELOG, release.Version("0.1.0"), "2026-02-03")
    assert out == textwrap.dedent(
        """\
        # Changelog: vlm-x

        ## Unreleased

        ## 0.1.0 - 2026-02-03
        - First thing.
        - Second thing,
          continued.

        ## 0.0.9 - 2024-01-01
        - Old.
        """
    )
    # the next release starts from the empty Unreleased section
    again = release.add_unreleased_entry(out, "- Fix.")
    assert "## Unreleased\n- Fix.\n\n## 0.1.0 - 2026-02-03" in again
    with pytest.raises(release.ReleaseError, match="Unreleased section is empty"):
        release.release_changelog(out, release.Version("0.1.1"), "2026-02-04")
    with pytest.raises(release.ReleaseError, match="no '## Unreleased' section"):
        release.release_changelog("# Changelog\n", release.Version("0.1.1"), "2026-02-04")


def test_next_version() -> None:
    v = release.Version
    assert release.next_version(v("0.1.0"), "patch") == v("0.1.1")
    assert release.next_version(v("0.1.3"), "minor") == v("0.2.0")
    assert release.next_version(v("0.9.1"), "major") == v("1.0.0")
    assert release.next_version(v("0.1.0"), "0.1.0") == v("0.1.0")  # first release
    with pytest.raises(release.ReleaseError, match="lower than the current"):
        release.next_version(v("0.2.0"), "0.1.5")
    with pytest.raises(release.ReleaseError, match="neither major, minor, patch"):
        release.next_version(v("0.2.0"), "huge")


def test_widened_ranges() -> None:
    v = release.Version
    assert release.widened("vlm-config>=0.1,<0.2", v("0.2.0")) == "vlm-config>=0.1,<0.3"
    assert release.widened("vlm-encoders[hf]>=0.1,<0.2", v("0.2.1")) == (
        "vlm-encoders[hf]>=0.1,<0.3"
    )
    assert release.widened("vlm-config>=0.1,<=0.1.9", v("0.2.0")) == "vlm-config>=0.1,<0.3"
    assert release.widened("vlm-config>=0.9,<1", v("1.0.0")) == "vlm-config>=0.9,<2"
    assert release.widened("vlm-config==0.1.0", v("0.2.0")) is None  # not an upper bound
    assert release.widened("vlm-config~=0.1.0", v("0.2.0")) is None


def make_repo(tmp_path: Path) -> Path:
    """A miniature monorepo: vlm-core 0.1.0 and two packages requiring it."""
    root = tmp_path / "repo"

    def package(name: str, deps: list[str], extra: list[str]) -> None:
        path = root / "packages" / name
        module = name.replace("-", "_")
        (path / "src" / module).mkdir(parents=True)
        (path / "src" / module / "__about__.py").write_text('__version__ = "0.1.0"\n')
        (path / "src" / module / "__init__.py").write_text("")
        (path / "CHANGELOG.md").write_text(
            f"# Changelog: {name}\n\n## 0.1.0 (unreleased)\n- First release of {name}.\n"
        )
        (path / "pyproject.toml").write_text(
            textwrap.dedent(
                f"""\
                [build-system]
                requires = ["hatchling>=1.25"]
                build-backend = "hatchling.build"

                [project]
                name = "{name}"
                dynamic = ["version"]
                requires-python = ">=3.11"
                dependencies = {json.dumps(deps)}

                [project.optional-dependencies]
                extra = {json.dumps(extra)}

                [tool.hatch.version]
                path = "src/{module}/__about__.py"
                """
            )
        )

    package("vlm-core", ["pydantic>=2.7,<3"], [])
    package("vlm-left", ["vlm-core>=0.1,<0.2", "numpy>=1.24"], ["vlm-core>=0.1,<=0.1.9"])
    package("vlm-right", ["vlm-left[extra]>=0.1,<0.2", "vlm-core>=0.1", "numpy>=1.26"], [])
    return root


def test_range_check_only_reports_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_repo(tmp_path)
    dirs = (root / "packages",)
    before = {p: p.read_text() for p in root.rglob("*") if p.is_file()}
    assert release.bump("vlm-core", "patch", check_only=True, sibling_dirs=dirs) == 0
    assert "every sibling requirement on vlm-core accepts 0.1.1" in capsys.readouterr().out
    assert release.bump("vlm-core", "minor", check_only=True, sibling_dirs=dirs) == 1
    out = capsys.readouterr().out
    assert "out of range: vlm-left requires 'vlm-core>=0.1,<0.2'" in out
    assert "out of range: vlm-left requires 'vlm-core>=0.1,<=0.1.9'" in out  # its extra
    assert "vlm-right" not in out  # vlm-core>=0.1 accepts 0.2
    assert "2 sibling requirement(s) exclude vlm-core 0.2.0" in out
    assert {p: p.read_text() for p in root.rglob("*") if p.is_file()} == before  # untouched


@pytest.mark.skipif(shutil.which("hatch") is None, reason="needs the hatch CLI (nox -s bump)")
def test_bump_end_to_end_with_hatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_repo(tmp_path)
    dirs = (root / "packages",)
    core = root / "packages" / "vlm-core"
    assert release.bump("vlm-core", "minor", date="2026-02-03", sibling_dirs=dirs) == 0
    out = capsys.readouterr().out
    assert "vlm-core: 0.1.0 -> 0.2.0" in out
    assert "widened vlm-left: 'vlm-core>=0.1,<0.2' -> 'vlm-core>=0.1,<0.3'" in out
    about = (core / "src" / "vlm_core" / "__about__.py").read_text()
    assert re.search(r"""__version__ = ["']0\.2\.0["']""", about), about  # written by hatch
    changelog = (core / "CHANGELOG.md").read_text()
    assert "## Unreleased\n\n## 0.2.0 - 2026-02-03\n- First release of vlm-core." in changelog
    left = (root / "packages" / "vlm-left" / "pyproject.toml").read_text()
    assert '["vlm-core>=0.1,<0.3", "numpy>=1.24"]' in left
    assert 'extra = ["vlm-core>=0.1,<0.3"]' in left
    assert "Accepts vlm-core 0.2.0" in (root / "packages" / "vlm-left" / "CHANGELOG.md").read_text()
    right = (root / "packages" / "vlm-right" / "pyproject.toml").read_text()
    assert '"vlm-core>=0.1"' in right  # already open-ended: left alone


def test_lowest_constraints_take_the_tightest_bound(tmp_path: Path) -> None:
    root = make_repo(tmp_path)
    known = release.projects((root / "packages",))
    pins = release.lowest_constraints("vlm-right", known)
    assert pins == ["numpy==1.26  # vlm-right", "pydantic==2.7  # vlm-core"]  # 1.26 > 1.24
    # the real packages: torch stays at constraints.txt's pin, test runners float
    real = [pin.split("==")[0] for pin in release.lowest_constraints("vlm-encoders")]
    assert "pydantic" in real and "transformers" in real  # vlm-config's and its own
    assert not {"torch", "pytest", "hypothesis", "vlm-config"} & set(real)


def test_lowest_pins_are_raised_to_what_other_pins_need() -> None:
    from packaging.requirements import Requirement
    from packaging.version import Version

    metadata = {  # what each pinned distribution itself requires (read by pip in real runs)
        ("transformers", "5.18"): ["safetensors>=0.8.0", "tokenizers<0.24,>=0.23.1"],
        ("transformers", "4.45"): ["safetensors>=0.4.1", "tokenizers<0.21,>=0.20"],
        ("safetensors", "0.4.1"): [],
        ("safetensors", "0.8.0"): [],
        ("tokenizers", "0.23.1"): ['huggingface-hub>=0.16; extra == "hub"'],
    }
    seen: list[dict[str, Version]] = []

    def requires(pins: dict[str, Version]) -> dict[str, list[Requirement]]:
        seen.append(dict(pins))
        return {k: [Requirement(r) for r in metadata[(k, str(v))]] for k, v in pins.items()}

    pins = [
        "safetensors==0.4.1  # vlm-transformer",
        "tokenizers==0.23.1  # vlm-data",
        "transformers==5.18  # vlm-encoders",
    ]
    lines, notes = release.consistent_lowest(pins, requires)
    assert lines[0].startswith("safetensors==0.8.0  # vlm-transformer; raised")
    assert lines[1:] == pins[1:]
    assert notes == ["safetensors: 0.4.1 -> 0.8.0 (transformers==5.18 needs safetensors>=0.8.0)"]
    assert len(seen) == 2  # a second pass finds nothing left to raise
    # a floor above another pin's upper bound is a wrong range: named, not papered over
    old = [pins[1], "transformers==4.45  # vlm-data"]
    with pytest.raises(
        release.ReleaseError,
        match=r"tokenizers==0.23.1 \(the floor of vlm-data\) "
        r"is outside what transformers==4.45 .* requires: tokenizers<0.21,>=0.20",
    ):
        release.consistent_lowest(old, requires)


def test_tag_names_a_package_at_its_version() -> None:
    project = release.package("vlm-config")
    version = project.version()
    assert release.check_tag(f"vlm-config-v{version}").name == "vlm-config"
    assert release.check_tag(f"refs/tags/vlm-config-v{version}").name == "vlm-config"
    with pytest.raises(release.ReleaseError, match="run `nox -s bump -- vlm-config 9.9.9` first"):
        release.check_tag("vlm-config-v9.9.9")
    with pytest.raises(release.ReleaseError, match="unknown distribution 'vlm-nope'"):
        release.check_tag("vlm-nope-v0.1.0")
    with pytest.raises(release.ReleaseError, match="is not <distribution>-v<version>"):
        release.check_tag("v0.1.0")

"""Every code snippet in the docs and the READMEs is executed here, so docs cannot drift.

- ``python`` fences run in order, one namespace per page (like a notebook), in a
  temporary working directory.
- ``toml`` fences must parse; a complete job config (one with an ``[arch]`` section and
  an encoder) must also validate.
- ``bash`` fences run line by line in the page's working directory: ``vlm ...`` commands
  for real (``vlm train`` with smoke overrides that shorten training; ``examples/`` paths
  resolve against the repository), ``pip install`` and ``nox`` lines are checked for the
  local paths and session names they name (installing is what the nox sessions
  themselves do), ``torchrun`` lines are covered by the distributed tests.
- ``text`` fences are diagrams and are not run.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md"]
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
SMOKE = [
    "train.steps=3",
    "train.warmup_steps=1",
    "train.log_every=1",
    "train.progress=false",
    "data.max_eval_samples=16",
]
#: added for configs whose dataset has clips (a field only ``digits_video`` has)
SMOKE_CLIPS = ["data.train_clips=64", "data.test_clips=16"]
RUN_LANGS = {"python", "toml", "bash"}


def snippets(page: Path) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(page.read_text())]


def _nox_sessions() -> set[str]:
    text = (ROOT / "noxfile.py").read_text()
    names = set(re.findall(r"def (\w+)\(session", text))
    names |= set(re.findall(r'name="([\w-]+)"', text))
    names |= {f"tests-{p.name}" for p in (ROOT / "packages").iterdir()}
    return names


def _repo_path(arg: str) -> str:
    """Example and package paths in the docs are relative to the repository root."""
    return str(ROOT / arg) if arg.startswith(("examples/", "packages/")) else arg


def bash_commands(code: str) -> list[str]:
    """Lines of a bash fence with backslash continuations joined."""
    return code.replace("\\\n", " ").splitlines()


def run_bash_line(line: str, tmp: Path) -> None:
    words = shlex.split(line, comments=True)
    if not words:
        return
    for part in " ".join(words).split("&&"):
        argv = shlex.split(part)
        if not argv:
            continue
        if argv[:3] == ["python", "-m", "pip"] or argv[0] == "pip":
            for arg in argv:
                if arg.startswith(("./", "examples/", "packages/")) or arg == "constraints.txt":
                    path = arg.split("[", 1)[0].strip("\"'")
                    assert (ROOT / path).exists(), f"docs install a missing path: {path}"
            continue
        if argv[0] == "nox" or argv[:3] == ["python", "-m", "nox"]:
            if "-s" in argv:
                name = argv[argv.index("-s") + 1]
                assert name in _nox_sessions(), f"docs name a missing nox session: {name}"
            continue
        if argv[0] == "vlm":
            cmd = [sys.executable, "-m", "vlm_config.cli", *map(_repo_path, argv[1:])]
            if argv[1] == "train":
                cmd += SMOKE
                config = Path(_repo_path(argv[2]))
                if config.is_file() and 'type = "digits_video"' in config.read_text():
                    cmd += SMOKE_CLIPS
            result = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, f"{line}\n{result.stdout}\n{result.stderr}"
            continue
        if argv[0] == "torchrun":
            continue  # covered by vlm-parallel / vlm-train's distributed tests
        raise AssertionError(f"docs show a command this test cannot check: {part!r}")


RUNNABLE = [p for p in PAGES if any(lang in RUN_LANGS for lang, _ in snippets(p))]


@pytest.mark.parametrize("page", RUNNABLE, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_snippets(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = [(lang, code) for lang, code in snippets(page) if lang in RUN_LANGS]
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem}"}
    for lang, code in blocks:
        if lang == "python":
            exec(compile(code, str(page), "exec"), namespace)
        elif lang == "toml":
            tomllib.loads(code)
        else:
            for line in bash_commands(code):
                run_bash_line(line, tmp_path)


def test_every_snippet_has_a_known_language() -> None:
    langs = {lang for page in PAGES for lang, _ in snippets(page)}
    assert langs <= RUN_LANGS | {"text"}, f"fences this test would not run: {langs - RUN_LANGS}"
    assert (ROOT / "docs" / "concepts.md") in RUNNABLE

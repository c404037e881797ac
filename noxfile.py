"""Sessions for the monorepo (pip everywhere: uv cannot see the local torch build).

Default run (what CI runs): lint, types, one ``tests-<package>`` session per
package (a fresh venv with only that package, its declared dependencies and its
``test`` extra), ``integration`` (everything + fixture plugins, runs ``tests/``)
and ``build`` (wheel + sdist per package, each wheel installed alone).

Under ``CI`` (set by ``.ci/run``'s caller) every session deletes its venv when it ends:
each venv holds its own torch, and thirteen of them at once fill a small disk.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import tomllib
from collections.abc import Callable
from pathlib import Path

import nox

ROOT = Path(__file__).parent
CONSTRAINTS = ("-c", str(ROOT / "constraints.txt"))
PACKAGES_DIR = ROOT / "packages"
FIXTURE_PLUGINS = sorted((ROOT / "tests" / "fixture_plugins").glob("*/pyproject.toml"))

nox.options.default_venv_backend = "venv"
nox.options.error_on_missing_interpreters = True


def _project(path: Path) -> dict:
    return tomllib.loads((path / "pyproject.toml").read_text())["project"]


PACKAGES: dict[str, Path] = {
    _project(p.parent)["name"]: p.parent for p in sorted(PACKAGES_DIR.glob("*/pyproject.toml"))
}


def ci_session(
    *args: object, **kwargs: object
) -> Callable[[Callable[[nox.Session], None]], object]:
    """``nox.session`` whose temp files stay inside the session's folder: nox's
    ``create_tmp()`` points ``TMPDIR`` there (pip's builds, pytest's folders, Inductor's
    cache).  When the ``CI`` variable is set, the session's venv, that folder included,
    is deleted after the session body, whether it passed or failed."""

    def register(body: Callable[[nox.Session], None]) -> object:
        @functools.wraps(body)
        def run(session: nox.Session) -> None:
            session.create_tmp()
            try:
                body(session)
            finally:
                if os.environ.get("CI"):
                    shutil.rmtree(session.virtualenv.location, ignore_errors=True)

        return nox.session(*args, **kwargs)(run)  # type: ignore[call-overload]

    return register


TEST_ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # one thread per process, no hub


def _req_name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0].lower()


def local_closure(name: str) -> list[str]:
    """The package and every local package it depends on, dependencies first."""
    order: list[str] = []

    def visit(pkg: str) -> None:
        if pkg in order:
            return
        for req in _project(PACKAGES[pkg]).get("dependencies", []):
            dep = _req_name(req)
            if dep in PACKAGES:
                visit(dep)
        order.append(pkg)

    visit(name)
    return order


def install(session: nox.Session, *args: str) -> None:
    session.run("python", "-m", "pip", "install", "--quiet", *CONSTRAINTS, *args)


def install_packages(session: nox.Session, names: list[str], extra: str | None = None) -> None:
    """Install local packages (with their ``test`` extra and ``extra``), dependencies
    listed first: the pip bundled with Python 3.11 resolves a local requirement only
    when its path comes before the packages requiring it."""
    ordered: list[str] = []
    for name in names:
        ordered += [dep for dep in local_closure(name) if dep in names and dep not in ordered]
    specs = []
    for pkg in ordered:
        path = str(PACKAGES[pkg])
        optional = _project(PACKAGES[pkg]).get("optional-dependencies", {})
        extras = [e for e in ("test", extra) if e and e in optional]
        specs.append(f"{path}[{','.join(extras)}]" if extras else path)
    install(session, *specs)


@ci_session()
def lint(session: nox.Session) -> None:
    """ruff check + ruff format --check over the whole tree."""
    install(session, "ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@ci_session()
def types(session: nox.Session) -> None:
    """mypy over every package's src/."""
    install_packages(session, list(PACKAGES), extra="hf")
    install(session, "mypy>=1.10", "types-PyYAML")
    session.run("mypy", *[str(p / "src") for p in PACKAGES.values()])


def _package_tests(session: nox.Session, name: str) -> None:
    install_packages(session, local_closure(name))
    session.run("python", "-m", "pip", "check")
    session.run(
        "python",
        "-m",
        "pytest",
        str(PACKAGES[name] / "tests"),
        "-p",
        "no:cacheprovider",
        *session.posargs,
        env=TEST_ENV,
    )


for _name in PACKAGES:

    @ci_session(name=f"tests-{_name}")
    def _tests(session: nox.Session, _pkg: str = _name) -> None:
        """This package alone, with only its declared dependencies."""
        _package_tests(session, _pkg)


@ci_session()
def integration(session: nox.Session) -> None:
    """Every package (with extras) plus the fixture plugins; runs tests/."""
    install_packages(session, list(PACKAGES), extra="hf")
    if FIXTURE_PLUGINS:
        install(session, *[str(p.parent) for p in FIXTURE_PLUGINS])
    session.run(
        "python",
        "-m",
        "pytest",
        str(ROOT / "tests"),
        "-p",
        "no:cacheprovider",
        *session.posargs,
        env=TEST_ENV,
    )


@ci_session()
def build(session: nox.Session) -> None:
    """Build a wheel and an sdist per package; install each wheel alone and import it."""
    install(session, "build>=1.2")
    dist = Path(session.create_tmp()) / "dist"
    for path in PACKAGES.values():
        session.run("python", "-m", "build", "--outdir", str(dist), str(path), silent=True)
    for name in PACKAGES:
        module = name.replace("-", "_")
        wheels = sorted(dist.glob(f"{module}-*.whl"))
        sdists = sorted(dist.glob(f"{module}-*.tar.gz"))
        if len(wheels) != 1 or len(sdists) != 1:
            session.error(f"{name}: expected one wheel and one sdist, got {wheels + sdists}")
        install(session, "--find-links", str(dist), str(wheels[0]))
        session.run(
            "python", "-c", f"import {module}; print({module}.__name__, {module}.__version__)"
        )
        session.run("python", "-m", "pip", "check")
        session.run("python", "-m", "pip", "uninstall", "--quiet", "-y", *PACKAGES)


DOCS_REQUIREMENTS = ("mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings-python>=1.10")
PLUGIN = ROOT / "examples" / "plugins" / "vlm-plugin-resampler"


@ci_session()
def docs(session: nox.Session) -> None:
    """Build the documentation site strictly (any warning fails).

    The API pages are read statically (griffe) and the configuration reference comes from
    the JSON Schema, so the packages are installed without their torch dependencies.
    """
    install(session, *DOCS_REQUIREMENTS, "pydantic>=2.7", "tomli-w", "pyyaml")
    install(session, "--no-deps", *[str(p) for p in PACKAGES.values()], str(PLUGIN))
    session.run("mkdocs", "build", "--strict", "--site-dir", str(ROOT / "build" / "site"))


@ci_session()
def plugin(session: nox.Session) -> None:
    """The example third-party plugin in a fresh venv, as an outside researcher uses it."""
    install_packages(session, list(PACKAGES))
    install(session, f"{PLUGIN}[test]")
    session.run("python", "-m", "pytest", str(PLUGIN / "tests"), "-p", "no:cacheprovider")
    table = session.run("vlm", "plugins", silent=True)
    print(table)
    for name in ("perceiver_resampler", "gated_cross_attention"):
        row = next((line for line in str(table).splitlines() if f" {name} " in line), "")
        if "vlm-plugin-resampler" not in row or "loaded" not in row:
            session.error(f"`vlm plugins` does not list {name} from vlm-plugin-resampler")
    # the adapter table is replaced whole (the digits config's avgpool `window` would be
    # an unknown field of the resampler); the arch keeps its max_text_len
    overrides = [
        "adapter={type = 'perceiver_resampler', num_latents = 16, num_heads = 4}",
        "arch.arch=gated_cross_attention",
    ]
    config = str(ROOT / "examples" / "digits" / "joint_decoder.toml")
    session.run("vlm", "validate", config, *overrides)
    out = Path(session.create_tmp()) / "plugin-run"
    session.run(
        "vlm",
        "train",
        config,
        *overrides,
        "train.steps=300",
        "train.log_every=50",
        f"train.output_dir={out}",
        env={"OMP_NUM_THREADS": "2"},
    )
    session.run("python", str(ROOT / "examples" / "plugins" / "generate_digit.py"), str(out))


@ci_session()
def bench(session: nox.Session) -> None:
    """Training-step benchmark of every arch vs its Hugging Face peer (not run by default).

    Writes ``build/bench/bench_vlm.json``, ``bench_vlm.png`` and prints the table; extra
    arguments go to ``benchmarks/bench_vlm.py`` (e.g. ``nox -s bench -- --steps 20``).
    """
    install_packages(session, list(PACKAGES), extra="hf")
    install(session, "matplotlib")
    out = ROOT / "build" / "bench"
    session.run(
        "python",
        str(ROOT / "benchmarks" / "bench_vlm.py"),
        "--out",
        str(out),
        "--threads",
        "2",
        *session.posargs,
        env={"OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"},
    )


nox.options.sessions = [
    "lint",
    "types",
    *[f"tests-{n}" for n in PACKAGES],
    "integration",
    "build",
    "docs",
    "plugin",
]

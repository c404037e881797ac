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
import sys
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

    def register(body: Callable[..., None]) -> object:
        @functools.wraps(body)
        def run(session: nox.Session, **params: object) -> None:
            session.create_tmp()
            try:
                body(session, **params)
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


def install_packages(
    session: nox.Session, names: list[str], extra: str | None = None, *pip_args: str
) -> None:
    """Install local packages (with their ``test`` extra and ``extra``), dependencies
    listed first: the pip bundled with Python 3.11 resolves a local requirement only
    when its path comes before the packages requiring it.  ``pip_args`` go to pip."""
    ordered: list[str] = []
    for name in names:
        ordered += [dep for dep in local_closure(name) if dep in names and dep not in ordered]
    specs = []
    for pkg in ordered:
        path = str(PACKAGES[pkg])
        optional = _project(PACKAGES[pkg]).get("optional-dependencies", {})
        extras = [e for e in ("test", extra) if e and e in optional]
        specs.append(f"{path}[{','.join(extras)}]" if extras else path)
    install(session, *pip_args, *specs)


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
    install(session, GRIFFE, "hatch>=1.12")  # tests/test_release_tools.py
    if FIXTURE_PLUGINS:
        # --no-deps: vlm-fixture-future requires a vlm-config that is not installed (that
        # is what it is for); the others need nothing beyond vlm-config
        install(session, "--no-deps", *[str(p.parent) for p in FIXTURE_PLUGINS])
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


GRIFFE = "griffe>=1.14"
SHOW_VERSIONS = """
import sys, importlib.metadata as md
for name in sys.argv[1:]:
    try:
        print(f"  {name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name}: not installed")
"""
TOOLS = ROOT / "tools"


@ci_session()
def api(session: nox.Session) -> None:
    """Each package's public API against its committed baseline ``api/<dist>.json``.

    Static (griffe reads the source, no package is installed, no torch).  Fails on a
    break the baseline does not record.  ``nox -s api -- --update`` rewrites the
    baselines (refusing a break that the package's CHANGELOG does not announce under
    Unreleased with a "Breaking" line); ``nox -s api -- vlm-config`` checks one package.
    """
    install(session, GRIFFE, "packaging>=23", "pytest>=8")
    session.run("python", str(TOOLS / "api_check.py"), *session.posargs)
    if "--update" not in session.posargs:
        session.run(
            "python",
            "-m",
            "pytest",
            str(ROOT / "tests" / "test_release_tools.py"),
            "-p",
            "no:cacheprovider",
            "-q",
        )


@nox.session(default=False)
def bump(session: nox.Session) -> None:
    """Bump one package: ``nox -s bump -- <distribution> <major|minor|patch|X.Y.Z>``.

    Writes the version with ``hatch version``, moves the CHANGELOG's Unreleased entries
    under ``## X.Y.Z - <date>``, widens siblings' upper bounds that would exclude it (and
    says so) and records the released API as the package's baseline.  ``--check-only``
    changes nothing and fails if a sibling's range excludes the new version.
    """
    args = list(session.posargs)
    # the positional arguments: everything but the options (``--date D`` takes a value)
    positional = [
        a
        for i, a in enumerate(args)
        if not a.startswith("--") and (i == 0 or args[i - 1] != "--date")
    ]
    if len(positional) != 2:
        session.error(
            "usage: nox -s bump -- <distribution> <major|minor|patch|X.Y.Z> [--check-only] "
            "[--date YYYY-MM-DD]"
        )
    install(session, "hatch>=1.12", "packaging>=23", GRIFFE)
    session.run("python", str(TOOLS / "release.py"), "bump", *args)
    if "--check-only" not in args:
        session.run("python", str(TOOLS / "api_check.py"), "--update", positional[0])


@ci_session(default=False)
@nox.parametrize("package", list(PACKAGES))
def lowest(session: nox.Session, package: str) -> None:
    """A package's tests with the lowest third-party versions its ranges allow.

    pip has no lowest-version resolution, so ``tools/release.py lowest-constraints`` pins
    each third-party requirement of the package and of its local dependencies (extras
    used included) to ``==<lower bound>``; torch stays at constraints.txt's pin and the
    test runners (pytest, hypothesis) float.  Not in the default run (a torch venv per
    package): ``nox -s "lowest(package='vlm-config')"``.
    """
    pins = Path(session.create_tmp()) / "lowest-constraints.txt"
    session.run(
        sys.executable,
        str(TOOLS / "release.py"),
        "lowest-constraints",
        package,
        "--output",
        str(pins),
        external=True,
    )
    install_packages(session, local_closure(package), None, "-c", str(pins))
    session.run("python", "-m", "pip", "check")
    names = [line.split("==")[0] for line in pins.read_text().splitlines() if "==" in line]
    session.run("python", "-c", SHOW_VERSIONS, "torch", *names)  # what the tests run against
    session.run(
        "python",
        "-m",
        "pytest",
        str(PACKAGES[package] / "tests"),
        "-p",
        "no:cacheprovider",
        *session.posargs,
        env=TEST_ENV,
    )


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
    # an unknown field of the resampler); the arch keeps its max_text_len.  Trained from
    # scratch, tanh gates starting at 0 never open in a few hundred steps (the image path's
    # gradients are scaled by tanh(gate) ~ 0): 10% held-out accuracy at 300 steps, while
    # gate_init=1 with 600 steps reached 85%.  The rest was the resampler: fresh, it was a
    # global average pool (attention entropy 0.99 of max, near-identical tokens); its
    # learned 2-D spatial prior (default on) starts each latent as a local pool: 26.7% ->
    # 91.7% at 300 steps; 600 steps: 96.3% +- 0.3 over seeds 0-2, 101-118 s per run on
    # 2 shared cores (load ~3); see the plugin's README
    overrides = [
        "adapter={type = 'perceiver_resampler', num_latents = 16, num_heads = 4}",
        "arch.arch=gated_cross_attention",
        "arch.gate_init=1.0",
    ]
    config = str(ROOT / "examples" / "digits" / "joint_decoder.toml")
    session.run("vlm", "validate", config, *overrides)
    out = Path(session.create_tmp()) / "plugin-run"
    session.run(
        "vlm",
        "train",
        config,
        *overrides,
        "train.steps=600",
        "train.log_every=50",
        f"train.output_dir={out}",
        env={"OMP_NUM_THREADS": "2"},
    )
    session.run("python", str(ROOT / "examples" / "plugins" / "generate_digit.py"), str(out))


@ci_session()
def bench(session: nox.Session) -> None:
    """Training-step benchmark of every arch vs its Hugging Face peer (not run by default).

    Our rows time ``vlm_train.Trainer.step()`` (the step ``vlm train`` runs), so every
    package is installed, vlm-train included.  Writes ``build/bench/bench_vlm.json``,
    ``bench_vlm.png`` and prints the table; extra arguments go to
    ``benchmarks/bench_vlm.py`` (e.g. ``nox -s bench -- --steps 20``).  Then
    ``benchmarks/bench_data.py`` times the input pipeline (``bench_data.json``) and
    ``benchmarks/bench_generate.py`` batched generation (``bench_generate_<size>.json``).
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
    # the input pipeline: Trainer.step() fed by DataLoader workers vs in-memory batches
    session.run(
        "python",
        str(ROOT / "benchmarks" / "bench_data.py"),
        "--out",
        str(out),
        "--cache",
        str(out / "data_cache"),
        env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    # a frozen SigLIP tower: Trainer.step() live vs from the feature cache
    session.run(
        "python",
        str(ROOT / "benchmarks" / "bench_feature_cache.py"),
        "--out",
        str(out / "bench_feature_cache.json"),
        env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    # batched greedy generation vs Llava's generate and our previous per-token path
    for size in ("small", "medium"):
        session.run(
            "python",
            str(ROOT / "benchmarks" / "bench_generate.py"),
            "--size",
            size,
            "--ragged",
            "--out",
            str(out / f"bench_generate_{size}.json"),
            env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        )
    # packed vs padded rows: useful tokens/s of Trainer.step() (bench_packing.json)
    session.run(
        "python",
        str(ROOT / "benchmarks" / "bench_packing.py"),
        "--out",
        str(out),
        env={"OMP_NUM_THREADS": "1"},
    )


nox.options.sessions = [
    "lint",
    "types",
    *[f"tests-{n}" for n in PACKAGES],
    "integration",
    "build",
    "docs",
    "plugin",
    "api",
]

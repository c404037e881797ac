"""Release helpers for the monorepo's separately versioned packages.

Subcommands (run by the nox sessions ``bump`` and ``lowest`` and by the release workflow)::

    python tools/release.py bump DIST major|minor|patch|X.Y.Z [--check-only] [--date D]
    python tools/release.py tag DIST-vX.Y.Z          # check a release tag, print DIST
    python tools/release.py lowest-constraints DIST  # `name==lower bound` per third-party dep
                                                     # (raised where another pin needs more)

``bump`` writes the version with ``hatch version`` (the file named in the package's
``[tool.hatch.version]``), moves the CHANGELOG's Unreleased entries under
``## X.Y.Z - DATE`` and widens the upper bound of every sibling's requirement on the
package when the new version falls outside it (``--check-only``: change nothing, report
and fail if a range excludes the new version).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parents[1]
PACKAGES_DIR = ROOT / "packages"
# other distributions of this repository that pin the packages (kept in range on a bump)
SIBLING_DIRS = (PACKAGES_DIR, ROOT / "examples" / "plugins")
# installed from constraints.txt, never at a lower bound
NOT_LOWERED = frozenset({"torch"})
# test runners: not what a user gets, their lowest versions prove nothing about the package
TEST_TOOLS = frozenset({"pytest", "hypothesis"})


class ReleaseError(RuntimeError):
    """A release step that cannot go on; the message says what to fix."""


# --------------------------------------------------------------------- packages
@dataclass(frozen=True)
class Project:
    """A distribution of the repository: its ``[project]`` table and folder."""

    path: Path
    table: dict

    @property
    def name(self) -> str:
        return str(self.table["name"])

    @property
    def version_file(self) -> Path:
        pyproject = tomllib.loads((self.path / "pyproject.toml").read_text())
        try:
            return self.path / pyproject["tool"]["hatch"]["version"]["path"]
        except KeyError as exc:
            raise ReleaseError(f"{self.path}: no [tool.hatch.version] path") from exc

    def version(self) -> Version:
        """The version in the hatch version file (read statically, nothing imported)."""
        text = self.version_file.read_text()
        match = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", text, re.MULTILINE)
        if not match:
            raise ReleaseError(f"{self.version_file}: no __version__ = '...' line")
        return Version(match.group(1))

    def requirements(self, extras: Iterable[str] = ()) -> list[tuple[str, Requirement]]:
        """``(raw string, parsed)`` for the dependencies and the named extras."""
        raw = list(self.table.get("dependencies", []))
        optional = self.table.get("optional-dependencies", {})
        for extra in extras:
            raw += optional.get(extra, [])
        out = []
        for item in raw:
            try:
                out.append((item, Requirement(item)))
            except InvalidRequirement as exc:
                raise ReleaseError(f"{self.path}/pyproject.toml: {item!r}: {exc}") from exc
        return out

    def all_requirement_strings(self) -> list[str]:
        raw = list(self.table.get("dependencies", []))
        for items in self.table.get("optional-dependencies", {}).values():
            raw += items
        return raw


def load_project(path: Path) -> Project:
    return Project(path, tomllib.loads((path / "pyproject.toml").read_text())["project"])


def projects(dirs: Iterable[Path] = (PACKAGES_DIR,)) -> dict[str, Project]:
    """Every distribution directly under ``dirs``, keyed by canonical name."""
    found: dict[str, Project] = {}
    for folder in dirs:
        for pyproject in sorted(folder.glob("*/pyproject.toml")):
            project = load_project(pyproject.parent)
            found[canonicalize_name(project.name)] = project
    return found


def package(name: str, dirs: Iterable[Path] = (PACKAGES_DIR,)) -> Project:
    found = projects(dirs)
    try:
        return found[canonicalize_name(name)]
    except KeyError:
        raise ReleaseError(f"unknown distribution {name!r}; known: {', '.join(found)}") from None


# ---------------------------------------------------------------------- versions
def next_version(current: Version, part: str) -> Version:
    """``major`` / ``minor`` / ``patch`` increments (hatch's semantics) or an explicit version.

    An explicit version equal to the current one is allowed: it releases the version the
    package already carries (the first release of a package is its 0.1.0)."""
    if part in ("major", "minor", "patch"):
        major, minor, micro = (*current.release, 0, 0, 0)[:3]
        if part == "major":
            return Version(f"{major + 1}.0.0")
        if part == "minor":
            return Version(f"{major}.{minor + 1}.0")
        return Version(f"{major}.{minor}.{micro + 1}")
    try:
        target = Version(part)
    except InvalidVersion as exc:
        raise ReleaseError(f"{part!r} is neither major, minor, patch nor a version") from exc
    if target < current:
        raise ReleaseError(f"{target} is lower than the current version {current}")
    return target


def write_version(project: Project, version: Version) -> None:
    """Write the version with hatch's own tooling (``hatch version X.Y.Z`` in the package)."""
    if project.version() == version:
        return
    subprocess.run(["hatch", "version", str(version)], cwd=project.path, check=True)
    if project.version() != version:
        raise ReleaseError(f"hatch wrote {project.version()}, expected {version}")


# --------------------------------------------------------------------- changelog
UNRELEASED = re.compile(r"^##\s+(?:unreleased\b.*|\S+\s+\(unreleased\)\s*)$", re.IGNORECASE)


def release_changelog(text: str, version: Version, date: str) -> str:
    """Move the Unreleased section's entries under ``## VERSION - DATE``.

    The Unreleased heading is ``## Unreleased`` or ``## X.Y.Z (unreleased)``; an empty
    ``## Unreleased`` section stays on top for the next changes.

    Raises:
        ReleaseError: no Unreleased section, or nothing in it.
    """
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if UNRELEASED.match(line)), None)
    if start is None:
        raise ReleaseError("the CHANGELOG has no '## Unreleased' section")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    body = lines[start + 1 : end]
    while body and not body[-1].strip():
        body.pop()
    while body and not body[0].strip():
        body.pop(0)
    if not body:
        raise ReleaseError(
            "the CHANGELOG's Unreleased section is empty: say what this release changes"
        )
    released = ["## Unreleased", "", f"## {version} - {date}", *body]
    rest = lines[end:]
    out = lines[:start] + released + (["", *rest] if rest else [])
    return "\n".join(out) + "\n"


def add_unreleased_entry(text: str, entry: str) -> str:
    """Append ``entry`` (one Markdown list line) to the Unreleased section, creating it."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if UNRELEASED.match(line)), None)
    if start is None:
        first = next((i for i, line in enumerate(lines) if line.startswith("## ")), len(lines))
        lines[first:first] = ["## Unreleased", entry, ""]
        return "\n".join(lines) + "\n"
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    insert = end
    while insert > start + 1 and not lines[insert - 1].strip():
        insert -= 1
    lines[insert:insert] = [entry]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------ ranges
@dataclass(frozen=True)
class RangeChange:
    """A sibling's requirement on the released package that excludes the new version."""

    sibling: Project
    old: str
    new: str | None  # None: cannot be widened automatically

    def describe(self) -> str:
        where = self.sibling.name
        if self.new is None:
            return f"{where}: {self.old!r} excludes the new version; widen it by hand"
        return f"{where}: {self.old!r} -> {self.new!r}"


def upper_bound_after(version: Version) -> Version:
    """The exclusive upper bound of the semver-compatible series of ``version``:
    ``<0.3`` for 0.2.x (in 0.x a minor release may break), ``<2`` for 1.x."""
    major, minor = (*version.release, 0, 0)[:2]
    return Version(f"0.{minor + 1}") if major == 0 else Version(str(major + 1))


def widened(raw: str, version: Version) -> str | None:
    """``raw`` with its upper bound raised so ``version`` is inside, or None if that is
    not a matter of an upper bound (``==``, ``~=``, ``!=`` or a lower bound excludes it)."""
    req = Requirement(raw)
    new_upper = upper_bound_after(version)
    out = raw
    for spec in req.specifier:
        if spec.contains(version, prereleases=True):
            continue
        if spec.operator not in ("<", "<="):
            return None
        pattern = re.compile(re.escape(spec.operator) + r"\s*" + re.escape(spec.version) + r"\b")
        out = pattern.sub(f"<{new_upper}", out, count=1)
    return out if Requirement(out).specifier.contains(version, prereleases=True) else None


def range_changes(
    released: Project, version: Version, siblings: Iterable[Project]
) -> list[RangeChange]:
    """Every requirement on ``released`` (any sibling, any extra) excluding ``version``."""
    target = canonicalize_name(released.name)
    changes = []
    for sibling in siblings:
        for raw in dict.fromkeys(sibling.all_requirement_strings()):  # one change per string
            req = Requirement(raw)
            if canonicalize_name(req.name) != target:
                continue
            if not req.specifier.contains(version, prereleases=True):
                changes.append(RangeChange(sibling, raw, widened(raw, version)))
    return changes


def apply_range_change(change: RangeChange, released: str, version: Version) -> None:
    """Rewrite the requirement in the sibling's pyproject.toml and note it in its CHANGELOG."""
    assert change.new is not None
    pyproject = change.sibling.path / "pyproject.toml"
    text = pyproject.read_text()
    quoted = re.compile(r"""(["'])""" + re.escape(change.old) + r"\1")
    if not quoted.search(text):
        raise ReleaseError(f"{pyproject}: cannot find the string {change.old!r}")
    pyproject.write_text(quoted.sub(lambda m: f"{m.group(1)}{change.new}{m.group(1)}", text))
    changelog = change.sibling.path / "CHANGELOG.md"
    if changelog.exists():
        entry = f"- Accepts {released} {version}: requirement widened to `{change.new}`."
        changelog.write_text(add_unreleased_entry(changelog.read_text(), entry))


# -------------------------------------------------------------------------- bump
def bump(
    name: str,
    part: str,
    *,
    check_only: bool = False,
    date: str | None = None,
    sibling_dirs: Sequence[Path] = SIBLING_DIRS,
) -> int:
    project = package(name, sibling_dirs[:1])
    current = project.version()
    version = next_version(current, part)
    siblings = [p for p in projects(sibling_dirs).values() if p.path != project.path]
    changes = range_changes(project, version, siblings)
    print(f"{project.name}: {current} -> {version}")
    if check_only:
        for change in changes:
            print(f"  out of range: {change.sibling.name} requires {change.old!r}")
        if changes:
            print(f"{len(changes)} sibling requirement(s) exclude {project.name} {version}")
            return 1
        print(f"every sibling requirement on {project.name} accepts {version}")
        return 0
    stuck = [c for c in changes if c.new is None]
    if stuck:
        raise ReleaseError("; ".join(c.describe() for c in stuck))
    changelog = project.path / "CHANGELOG.md"
    released_text = release_changelog(
        changelog.read_text(), version, date or dt.date.today().isoformat()
    )
    write_version(project, version)
    changelog.write_text(released_text)
    print(
        f"  {changelog.relative_to(ROOT) if changelog.is_relative_to(ROOT) else changelog}: "
        f"Unreleased -> {version}"
    )
    for change in changes:
        apply_range_change(change, project.name, version)
        print(f"  widened {change.describe()} (release {change.sibling.name} too)")
    return 0


# --------------------------------------------------------------------------- tag
TAG = re.compile(r"^(?P<dist>[a-z0-9][a-z0-9-]*?)-v(?P<version>\d[^\s]*)$")


def check_tag(tag: str) -> Project:
    """The package a ``<distribution>-v<version>`` tag releases, its version checked."""
    match = TAG.match(tag.removeprefix("refs/tags/"))
    if not match:
        raise ReleaseError(f"tag {tag!r} is not <distribution>-v<version>")
    project = package(match["dist"])
    tagged = Version(match["version"])
    if project.version() != tagged:
        raise ReleaseError(
            f"tag {tag!r} says {tagged} but {project.version_file.relative_to(ROOT)} "
            f"says {project.version()}; run `nox -s bump -- {project.name} {tagged}` first"
        )
    return project


# ------------------------------------------------------------------------ lowest
def local_closure(name: str, known: dict[str, Project]) -> list[tuple[Project, set[str]]]:
    """The package and the local packages it needs, each with the extras it is used with."""
    extras_of: dict[str, set[str]] = {}
    order: list[str] = []

    def visit(dist: str, extras: set[str]) -> None:
        key = canonicalize_name(dist)
        seen = extras_of.get(key)
        if seen is not None and extras <= seen:
            return
        extras_of[key] = (seen or set()) | extras
        for _, req in known[key].requirements(extras_of[key]):
            if canonicalize_name(req.name) in known:
                visit(req.name, set(req.extras) | {"test"})
        if key not in order:
            order.append(key)

    visit(name, {"test"})
    return [(known[k], extras_of[k]) for k in order]


def lower_bound(req: Requirement) -> Version | None:
    """The lowest version ``req`` allows by its ``>=`` / ``~=`` / ``==`` specifiers."""
    bounds = [
        Version(s.version)
        for s in req.specifier
        if s.operator in (">=", "~=", "==") and "*" not in s.version
    ]
    return max(bounds) if bounds else None


def lowest_constraints(name: str, known: dict[str, Project] | None = None) -> list[str]:
    """``name==lower`` for each third-party requirement of ``name`` and its local
    dependencies (the extras they are installed with included): the tightest lower bound
    wins when several packages declare one; torch and the test runners are left out."""
    known = projects() if known is None else known
    lows: dict[str, tuple[Version, str]] = {}
    unbounded = []
    for project, extras in local_closure(name, known):
        for raw, req in project.requirements(extras):
            key = canonicalize_name(req.name)
            if key in known or key in NOT_LOWERED or key in TEST_TOOLS:
                continue
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            low = lower_bound(req)
            if low is None:
                unbounded.append(f"{project.name}: {raw}")
                continue
            if key not in lows or low > lows[key][0]:
                lows[key] = (low, project.name)
    if unbounded:
        raise ReleaseError("no lower bound declared: " + "; ".join(unbounded))
    return [f"{k}=={v}  # {origin}" for k, (v, origin) in sorted(lows.items())]


def pinned_requirements(pins: dict[str, Version]) -> dict[str, list[Requirement]]:
    """What each pinned distribution requires (its own metadata, extras left out), read
    by pip's resolver without installing anything (``pip install --dry-run --report``)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [
            sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--no-deps",
            "--ignore-installed", "--report", str(report),
            *[f"{name}=={version}" for name, version in pins.items()],
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ReleaseError(f"pip cannot find the pinned versions:\n{done.stderr.strip()}")
        items = json.loads(report.read_text())["install"]
    out: dict[str, list[Requirement]] = {}
    for item in items:
        meta = item["metadata"]
        reqs = []
        for raw in meta.get("requires_dist", []) or []:
            req = Requirement(raw)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                reqs.append(req)
        out[canonicalize_name(meta["name"])] = reqs
    return out


def consistent_lowest(
    pins: list[str],
    requires: Callable[[dict[str, Version]], dict[str, list[Requirement]]] = pinned_requirements,
) -> tuple[list[str], list[str]]:
    """Raise each lower-bound pin that another pin's own requirements exclude.

    ``pins`` are :func:`lowest_constraints` lines.  A pinned distribution may need a
    newer version of another pinned one (transformers 5.18 needs safetensors >= 0.8,
    above vlm-transformer's own floor): that pin is raised to the floor required, and the
    raise is reported (pip's ``--resolution lowest-direct`` behaves the same way).  A pin
    *above* what another pin allows (its upper bound) cannot be resolved by raising: it
    means a declared floor is wrong, and a :class:`ReleaseError` names the two ranges.
    ``requires`` reads the pins' own requirements (:func:`pinned_requirements`).
    Returns ``(lines, notes)``.
    """
    parsed: dict[str, tuple[Version, str]] = {}
    for line in pins:
        spec, _, origin = line.partition("#")
        name, _, version = spec.strip().partition("==")
        parsed[name] = (Version(version), origin.strip())
    notes: list[str] = []
    for _ in range(len(parsed) + 1):  # each pass raises at least one pin, or ends
        needs = requires({k: v for k, (v, _) in parsed.items()})
        raised = False
        for owner, reqs in needs.items():
            for req in reqs:
                key = canonicalize_name(req.name)
                if key not in parsed or req.specifier.contains(parsed[key][0], prereleases=True):
                    continue
                version, origin = parsed[key]
                floor = lower_bound(req)
                if floor is None or floor <= version or not req.specifier.contains(floor):
                    raise ReleaseError(
                        f"{key}=={version} (the floor of {origin}) is outside what "
                        f"{owner}=={parsed[owner][0]} (the floor of {parsed[owner][1]}) "
                        f"requires: {req}; raise the floor of {owner} to a version that "
                        f"allows {key}=={version}, or the floor of {key}"
                    )
                why = f"{owner}=={parsed[owner][0]} needs {req}"
                parsed[key] = (floor, f"{origin}; raised: {why}")
                notes.append(f"{key}: {version} -> {floor} ({why})")
                raised = True
        if not raised:
            break
    lines = [f"{k}=={v}  # {origin}" for k, (v, origin) in sorted(parsed.items())]
    return lines, notes


# -------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Release helpers (see tools/release.py)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("bump", help="bump one package's version")
    p.add_argument("distribution")
    p.add_argument("part", help="major, minor, patch or an explicit X.Y.Z")
    p.add_argument(
        "--check-only", action="store_true", help="report sibling ranges, change nothing"
    )
    p.add_argument("--date", help="release date for the CHANGELOG (default: today)")
    p = sub.add_parser("tag", help="check a <distribution>-v<version> tag; print the distribution")
    p.add_argument("tag")
    p = sub.add_parser("lowest-constraints", help="pins of every third-party lower bound")
    p.add_argument("distribution")
    p.add_argument("--output", type=Path, help="write here instead of stdout")
    args = parser.parse_args(argv)
    try:
        if args.command == "bump":
            return bump(args.distribution, args.part, check_only=args.check_only, date=args.date)
        if args.command == "tag":
            print(check_tag(args.tag).name)
            return 0
        pins, notes = consistent_lowest(lowest_constraints(args.distribution))
        for note in notes:
            print(f"raised {note}", file=sys.stderr)
        text = "\n".join(pins) + "\n"
        if args.output:
            args.output.write_text(text)
        print(text, end="")
        return 0
    except ReleaseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

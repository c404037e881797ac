"""Public API check: each package's exported names against a committed baseline.

A package's public API is the names its top-level ``__init__.py`` lists in ``__all__``
(a literal list, optionally extended by ``*sorted(_LAZY)`` / ``*_LAZY`` over a literal
``{name: module}`` dict of lazy exports), together with everything griffe sees on them:
function signatures, class bases and public members, recursively.

The check is static (griffe reads the source; nothing is imported, so no torch).  The
baseline ``api/<distribution>.json`` holds the exported names, where each one is defined
and a griffe dump of the package (docstrings stripped).  Usage::

    python tools/api_check.py                    # check every package, exit 1 on a break
    python tools/api_check.py vlm-config         # check some packages
    python tools/api_check.py --update [--force] # rewrite the baselines

``--update`` refuses to record a breaking change unless the package's CHANGELOG has a
"Breaking" line in its Unreleased section (``--force`` skips that check).
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import griffe

ROOT = Path(__file__).resolve().parents[1]
BASELINE_FORMAT = 1
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ApiCheckError(RuntimeError):
    """A package whose exports cannot be determined or whose baseline is unreadable."""


@dataclass(frozen=True)
class Package:
    """One distribution of the monorepo: its name, folder and top-level module."""

    name: str
    path: Path
    module: str

    @property
    def src(self) -> Path:
        return self.path / "src"


def discover_packages(packages_dir: Path) -> dict[str, Package]:
    """Every ``packages/*/pyproject.toml``, keyed by distribution name."""
    found: dict[str, Package] = {}
    for pyproject in sorted(packages_dir.glob("*/pyproject.toml")):
        name = tomllib.loads(pyproject.read_text())["project"]["name"]
        found[name] = Package(name, pyproject.parent, name.replace("-", "_"))
    return found


# ------------------------------------------------------------------------ exports
def _literal_strings(node: ast.expr, names: dict[str, ast.expr]) -> list[str]:
    """The strings a static ``__all__`` expression evaluates to."""
    if isinstance(node, ast.List | ast.Tuple):
        out: list[str] = []
        for elt in node.elts:
            if isinstance(elt, ast.Constant) and isinstance(elt.value, str):
                out.append(elt.value)
            elif isinstance(elt, ast.Starred):
                out += _literal_strings(elt.value, names)
            else:
                raise ApiCheckError(f"unsupported __all__ element: {ast.unparse(elt)}")
        return out
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("sorted", "list", "tuple")
        and len(node.args) == 1
    ):
        values = _literal_strings(node.args[0], names)
        return sorted(values) if node.func.id == "sorted" else values
    if isinstance(node, ast.Name) and node.id in names:
        return _literal_strings(names[node.id], names)
    if isinstance(node, ast.Dict):
        keys = []
        for key in node.keys:
            if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
                raise ApiCheckError("a lazy-export dict must have literal string keys")
            keys.append(key.value)
        return keys
    raise ApiCheckError(f"__all__ must be static; cannot evaluate {ast.unparse(node)}")


def _lazy_map(tree: ast.Module) -> dict[str, str]:
    """``{name: module}`` from a literal dict passed to ``lazy_exports(...)``."""
    literals = {
        t.id: node.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
        for t in node.targets
        if isinstance(t, ast.Name)
    }
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "lazy_exports"
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Name)
            and node.args[1].id in literals
        ):
            mapping = literals[node.args[1].id]
            assert isinstance(mapping, ast.Dict)
            return {
                k.value: v.value
                for k, v in zip(mapping.keys, mapping.values)
                if isinstance(k, ast.Constant)
                and isinstance(v, ast.Constant)
                and isinstance(k.value, str)
                and isinstance(v.value, str)
            }
    return {}


def exported_targets(package: Package, module: griffe.Module) -> dict[str, str]:
    """``{exported name: path of the object griffe should compare}`` for a package."""
    init = package.src / package.module / "__init__.py"
    tree = ast.parse(init.read_text(), str(init))
    names: dict[str, ast.expr] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    names[target.id] = node.value
    if "__all__" not in names:
        raise ApiCheckError(f"{init}: no __all__; the public API must be listed there")
    exports = _literal_strings(names["__all__"], names)
    lazy = _lazy_map(tree)
    targets: dict[str, str] = {}
    for name in exports:
        if name in lazy:
            targets[name] = f"{lazy[name]}.{name}"
        elif name in module.members:
            member = module.members[name]
            targets[name] = member.target_path if isinstance(member, griffe.Alias) else member.path
        else:
            raise ApiCheckError(f"{init}: {name!r} is in __all__ but neither defined nor imported")
    return targets


# ---------------------------------------------------------------------- snapshots
def load_package(package: Package) -> griffe.Module:
    loader = griffe.GriffeLoader(search_paths=[str(package.src)])
    module = loader.load(package.module)
    assert isinstance(module, griffe.Module)
    loader.resolve_aliases(implicit=False, external=False)
    return module


def _strip(node: Any, src: Path) -> Any:
    """Drop docstrings, make file paths relative (a baseline must not depend on a checkout)."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "docstring":
                continue
            if key == "filepath" and isinstance(value, str):
                value = Path(value).relative_to(src).as_posix()
            out[key] = _strip(value, src)
        return out
    if isinstance(node, list):
        return [_strip(v, src) for v in node]
    return node


def snapshot(package: Package) -> dict[str, Any]:
    """What a baseline file holds for ``package`` today."""
    module = load_package(package)
    dump = json.loads(module.as_json(full=False))
    return {
        "format": BASELINE_FORMAT,
        "distribution": package.name,
        "exports": exported_targets(package, module),
        "package": _strip(dump, package.src.resolve()),
    }


def _absolute(node: Any, src: Path) -> Any:
    if isinstance(node, dict):
        return {
            k: str(src / v) if k == "filepath" and isinstance(v, str) else _absolute(v, src)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_absolute(v, src) for v in node]
    return node


def _collection(data: dict[str, Any], src: Path) -> griffe.Module:
    """Rebuild the griffe tree of a baseline, aliases resolvable inside the package."""
    text = json.dumps(_absolute(data["package"], src))
    module = json.loads(text, object_hook=griffe.json_decoder)
    assert isinstance(module, griffe.Module)
    collection = griffe.ModulesCollection()
    collection.set_member(module.name, module)
    module._modules_collection = collection  # griffe has no public setter
    return module


def _api_view(module: griffe.Module, targets: dict[str, str]) -> griffe.Module:
    """A module whose members are exactly the exported names, each an alias to its object."""
    collection = module.modules_collection
    name = module.name
    view = griffe.Module(name, filepath=module.filepath)
    view.exports = list(targets)
    for export, path in targets.items():
        try:
            target: Any = collection.get_member(path)
        except (KeyError, griffe.AliasResolutionError) as exc:
            raise ApiCheckError(f"{name}: cannot find {path} (exported as {export!r})") from exc
        alias = griffe.Alias(export, target, parent=view)
        alias.public = True
        view.set_member(export, alias)
    return view


def find_breaks(old: dict[str, Any], package: Package) -> tuple[list[str], list[str]]:
    """(breaking changes as one line each, names added since the baseline)."""
    new_module = load_package(package)
    new_targets = exported_targets(package, new_module)
    old_module = _collection(old, package.src.resolve())
    old_view = _api_view(old_module, old["exports"])
    new_view = _api_view(new_module, new_targets)
    lines = []
    base = f"{package.src.resolve()}/"
    for breakage in griffe.find_breaking_changes(old_view, new_view):
        text = ANSI.sub("", breakage.explain(style=griffe.ExplanationStyle.ONE_LINE)).strip()
        lines.append(text.replace(base, ""))
    added = sorted(set(new_targets) - set(old["exports"]))
    return lines, added


# ----------------------------------------------------------------------- baseline
def baseline_path(baselines: Path, package: Package) -> Path:
    return baselines / f"{package.name}.json"


def read_baseline(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ApiCheckError(
            f"no API baseline {path}; create it with `nox -s api -- --update`"
        ) from exc
    if data.get("format") != BASELINE_FORMAT:
        raise ApiCheckError(f"{path}: baseline format {data.get('format')!r}, expected 1")
    return data


def write_baseline(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


UNRELEASED = re.compile(r"^##\s+(?:unreleased\b|\S+\s+\(unreleased\))", re.IGNORECASE)


def announces_break(changelog: Path) -> bool:
    """Whether the Unreleased section of a CHANGELOG has a line mentioning "Breaking"."""
    if not changelog.exists():
        return False
    inside = False
    for line in changelog.read_text().splitlines():
        if line.startswith("## "):
            inside = bool(UNRELEASED.match(line))
            continue
        if inside and "breaking" in line.lower():
            return True
    return False


# ---------------------------------------------------------------------------- main
def run(packages: Iterable[Package], baselines: Path, *, update: bool, force: bool = False) -> int:
    failed = False
    for package in packages:
        path = baseline_path(baselines, package)
        try:
            if update:
                breaks: list[str] = []
                if path.exists():
                    breaks, _ = find_breaks(read_baseline(path), package)
                if breaks and not force and not announces_break(package.path / "CHANGELOG.md"):
                    print(f"{package.name}: refusing to record {len(breaks)} breaking change(s)")
                    for line in breaks:
                        print(f"  {line}")
                    print(
                        f"  announce them: a 'Breaking' line under Unreleased in "
                        f"{package.path / 'CHANGELOG.md'} (or pass --force)"
                    )
                    failed = True
                    continue
                write_baseline(path, snapshot(package))
                note = f" (records {len(breaks)} announced breaking change(s))" if breaks else ""
                print(f"{package.name}: wrote {path}{note}")
                continue
            breaks, added = find_breaks(read_baseline(path), package)
        except ApiCheckError as exc:
            print(f"{package.name}: error: {exc}")
            failed = True
            continue
        if breaks:
            failed = True
            print(f"{package.name}: {len(breaks)} breaking change(s) against {path.name}:")
            for line in breaks:
                print(f"  {line}")
        else:
            extra = f"; new since the baseline: {', '.join(added)}" if added else ""
            print(f"{package.name}: public API compatible with {path.name}{extra}")
    if failed and not update:
        print(
            "\nA break that is intended: add a 'Breaking' line to the package's CHANGELOG "
            "(Unreleased) and record it with `nox -s api -- --update`."
        )
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("distributions", nargs="*", help="default: every package")
    parser.add_argument("--update", action="store_true", help="rewrite the baselines")
    parser.add_argument("--force", action="store_true", help="with --update: no CHANGELOG check")
    parser.add_argument("--packages-dir", type=Path, default=ROOT / "packages")
    parser.add_argument("--baselines", type=Path, default=ROOT / "api")
    args = parser.parse_args(argv)
    known = discover_packages(args.packages_dir)
    unknown = [d for d in args.distributions if d not in known]
    if unknown:
        parser.error(f"unknown distribution(s) {', '.join(unknown)}; known: {', '.join(known)}")
    chosen = [known[d] for d in args.distributions] if args.distributions else known.values()
    return run(chosen, args.baselines, update=args.update, force=args.force)


if __name__ == "__main__":
    sys.exit(main())

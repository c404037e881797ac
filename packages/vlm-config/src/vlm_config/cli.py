"""The ``vlm`` command line.

Built-in subcommands (torch-free): ``plugins``, ``validate``, ``schema``.  Other
packages add subcommands through the ``vlm.commands`` entry-point group: each
target is ``register(subparsers)`` adding one parser whose ``func`` default takes
the parsed ``argparse.Namespace`` and returns an exit code.  Register functions
must not import torch; import it inside ``func``.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from vlm_config.files import ConfigFileError, dump_toml, load_job_config
from vlm_config.job import JobConfig
from vlm_config.registry import (
    CORE_DISTRIBUTION,
    IN_PROCESS,
    PluginEntry,
    PluginError,
    PluginRegistry,
    get_registry,
)


def format_validation_error(exc: ValidationError) -> list[str]:
    """One line per error: ``field.path: message``."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(job)"
        lines.append(f"{loc}: {err['msg']}")
    return lines


def _requires(entry: PluginEntry) -> str:
    if entry.distribution == IN_PROCESS:
        return ""
    if not entry.core_range:
        return "-"  # the distribution does not declare vlm-config
    if entry.core_range == "any":
        return CORE_DISTRIBUTION
    return f"{CORE_DISTRIBUTION}{entry.core_range}"


def plugins_table(registry: PluginRegistry) -> list[list[str]]:
    """One row per plugin: where it comes from, the vlm-config range its distribution
    declares, and its status (``loaded``, ``broken``, ``duplicate`` or
    ``incompatible: needs ...``); an incompatible plugin is not imported."""
    rows = [["group", "name", "distribution", "version", "requires", "status", "error"]]
    for entry in registry.entries():
        registry._ensure_loaded(entry)
        error = entry.error or ""
        if entry.duplicates:
            error = f"also claimed by {', '.join(entry.duplicates)}"
        rows.append(
            [
                entry.group,
                entry.name,
                entry.distribution,
                entry.version,
                _requires(entry),
                entry.status,
                error,
            ]
        )
    return rows


def render_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for n, row in enumerate(rows):
        out.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _cmd_plugins(args: argparse.Namespace) -> int:
    registry = get_registry()
    registry.strict = args.strict
    try:
        rows = plugins_table(registry)
    except PluginError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(render_table(rows))
    status = rows[0].index("status")
    bad = [r for r in rows[1:] if r[status].startswith(("broken", "duplicate", "incompatible"))]
    return 1 if (args.check and bad) else 0


def _cmd_validate(args: argparse.Namespace) -> int:
    try:
        config = load_job_config(args.config, args.overrides)
    except ConfigFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ValidationError as exc:
        print(f"error: {args.config} is not a valid job config:", file=sys.stderr)
        for line in format_validation_error(exc):
            print(f"  {line}", file=sys.stderr)
        return 1
    print(dump_toml(config), end="")
    print(f"# {config.sequence_budget().describe()}")
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(JobConfig.model_json_schema(), indent=args.indent))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm", description="Compose, train and run VLMs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("plugins", help="list installed encoders, adapters, archs and datasets")
    p.add_argument("--strict", action="store_true", help="fail on the first broken plugin")
    p.add_argument(
        "--check",
        action="store_true",
        help="exit 1 if any plugin is broken, duplicated or incompatible with this vlm-config",
    )
    p.set_defaults(func=_cmd_plugins)

    p = sub.add_parser("validate", help="validate a job config and print it resolved")
    p.add_argument("config", help="TOML, YAML or JSON job config")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.dim=512")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("schema", help="print the JSON Schema of the job config")
    p.add_argument("--indent", type=int, default=2)
    p.set_defaults(func=_cmd_schema)

    for ep in md.entry_points(group="vlm.commands"):
        try:
            ep.load()(sub)
        except Exception as exc:  # one broken command plugin must not break the CLI
            print(f"warning: vlm command plugin {ep.name!r} failed to load: {exc}", file=sys.stderr)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())

"""MkDocs hook: render the job config's JSON Schema (installed plugins included) into
``configuration.md`` where the page holds the ``<!-- config-reference -->`` marker."""

from __future__ import annotations

from typing import Any

MARKER = "<!-- config-reference -->"


def _type_of(prop: dict[str, Any]) -> str:
    if "$ref" in prop:
        return prop["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in prop:
        return " | ".join(_type_of(p) for p in prop["anyOf"])
    if "oneOf" in prop:
        return " | ".join(_type_of(p) for p in prop["oneOf"])
    if "const" in prop:
        return repr(prop["const"])
    if "enum" in prop:
        return " | ".join(repr(v) for v in prop["enum"])
    kind = prop.get("type", "any")
    if kind == "array" and "items" in prop:
        items = prop["items"]
        if isinstance(items, dict):
            return f"list[{_type_of(items)}]"
    return str(kind)


def _constraints(prop: dict[str, Any]) -> str:
    keys = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength")
    return ", ".join(f"{k}={prop[k]}" for k in keys if k in prop)


def _table(name: str, model: dict[str, Any]) -> list[str]:
    lines = [f"### `{name}`", ""]
    if model.get("description"):
        lines += [model["description"].strip().split("\n\n")[0].replace("\n", " "), ""]
    lines += ["| field | type | default | constraints | description |", "|---|---|---|---|---|"]
    for field, prop in model.get("properties", {}).items():
        default = prop.get("default", "*required*" if field in model.get("required", []) else "")
        desc = (prop.get("description") or "").replace("\n", " ").replace("|", "\\|")
        kind = _type_of(prop).replace("|", "\\|")
        lines.append(
            f"| `{field}` | {kind} | `{default}` | {_constraints(prop)} | {desc} |".replace(
                "``", ""
            )
        )
    return [*lines, ""]


def render() -> str:
    from vlm_config import JobConfig

    schema = JobConfig.model_json_schema()
    defs = schema.get("$defs", {})
    out = ["## `JobConfig` (top level)", "", *_table("JobConfig", schema)[2:]]
    out += ["## Sections and plugin configs", ""]
    for name in sorted(defs):
        out += _table(name, defs[name])
    return "\n".join(out)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, render())
    return markdown

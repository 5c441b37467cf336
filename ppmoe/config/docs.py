"""Field docstrings of the config dataclasses, read from the source (the string under each field)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing

from .schema import ExperimentConfig


def field_docs(cls: type) -> dict[str, str]:
    """{field name: docstring} for one dataclass."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def element_class(hint) -> type | None:
    """The dataclass of a nested section (growth.ops) or of a list of sections (growth.stages), else None."""
    if dataclasses.is_dataclass(hint):
        return hint
    args = typing.get_args(hint)
    if typing.get_origin(hint) is list and args and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def field_rows(cls: type, prefix: str, defaults) -> list[str]:
    """Table rows of `cls`'s fields under `prefix`; nested sections follow their own row, their keys
    spelled as on the command line (growth.ops.noise, growth.stages.N.share)."""
    rows = []
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = getattr(defaults, f.name) if defaults is not None else f.default
        nested = element_class(hints[f.name])
        shown = "" if nested else default
        text = docs.get(f.name, "").replace("\n", " ").replace("|", "\\|")
        rows.append(f"| `{prefix}{f.name}` | `{shown}` | {text} |" if not nested else
                    f"| `{prefix}{f.name}` | {'`[]`' if nested is not hints[f.name] else ''} | {text} |")
        if nested:
            sub = f"{prefix}{f.name}." + ("N." if nested is not hints[f.name] else "")
            rows += field_rows(nested, sub, default if nested is hints[f.name] else nested())
    return rows


def reference_markdown() -> str:
    """The config reference as markdown: one table per section."""
    out = []
    defaults = ExperimentConfig()
    for section in dataclasses.fields(ExperimentConfig):
        cls = typing.get_type_hints(ExperimentConfig)[section.name]
        if not dataclasses.is_dataclass(cls):
            out.append(f"`{section.name}` (default `{getattr(defaults, section.name)}`): "
                       f"{field_docs(ExperimentConfig)[section.name]}\n")
            continue
        out.append(f"### `{section.name}` — {inspect.cleandoc(cls.__doc__)}\n")
        out.append("| key | default | meaning |\n|---|---|---|")
        out += field_rows(cls, f"{section.name}.", getattr(defaults, section.name))
        out.append("")
    return "\n".join(out)

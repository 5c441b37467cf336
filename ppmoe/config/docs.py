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
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            default = getattr(getattr(defaults, section.name), f.name)
            text = docs.get(f.name, "").replace("\n", " ").replace("|", "\\|")
            out.append(f"| `{section.name}.{f.name}` | `{default}` | {text} |")
        out.append("")
    return "\n".join(out)

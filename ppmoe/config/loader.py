"""YAML file + dotted command-line overrides -> a typed, checked ExperimentConfig.

Unknown keys and wrong types are errors that name the key and what is allowed: a typo must never
silently run with the default.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
import warnings
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError  # defined with the other user-facing errors; still importable from here
from .schema import RENAMED_VALUES, ExperimentConfig


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Build the config from defaults, then the YAML file at `path`, then `overrides` in order
    (strings like 'train.lr=3e-4'; values are parsed as YAML; see apply_override for mappings and null)."""
    raw = read_yaml(Path(path)) if path is not None else {}
    for item in overrides or []:
        key, value = parse_override(item)
        apply_override(raw, key, value)
    return from_dict(ExperimentConfig, raw, prefix="")


def read_yaml(path: Path) -> dict[str, Any]:
    """The top-level mapping of the YAML file at `path` (an empty file is an empty mapping)."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (configs/ has the shipped examples)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def parse_override(item: str) -> tuple[str, Any]:
    """'a.b=v' -> ('a.b', yaml-parsed v)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value (for example train.lr=3e-4)")
    key, text = item.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({e})") from None


def apply_override(raw: dict, key: str, value: Any) -> None:
    """Apply one parsed override to the raw mapping (the YAML file's, or empty).

    A mapping given for a section (model, growth.ops, growth.stages.N) is merged into what the section
    already holds, key by key and nested sections too, so `--set model={n_layers: 2}` changes n_layers
    and keeps the YAML's other model keys. A mapping for a key whose value is a mapping (the partial
    overrides growth.stages.N.model, .moe, .train, .parallel) is merged into the mapping already there.
    null for a section is refused: it would silently reset the whole section (YAML values included) to
    the defaults. Anything else replaces the value and is type-checked later by from_dict.
    """
    merged = merged_value(schema_hint(key), get_dotted(raw, key), value, key)
    set_dotted(raw, key, merged)


def merged_value(hint: Any, existing: Any, value: Any, key: str) -> Any:
    """What `key` (annotated `hint`, None where the schema does not say) holds after assigning `value`
    over `existing` (the raw value there so far, None if absent)."""
    if dataclasses.is_dataclass(hint):
        if value is None:
            raise ConfigError(
                f"{key} is a section: null would reset all of it to the defaults, the YAML file's values "
                f"included; set its keys one by one instead (--set {key}.KEY=VALUE), or give a mapping to "
                f"merge into it (--set '{key}={{KEY: VALUE}}')"
            )
        if not isinstance(value, dict):
            return value  # from_dict says that a section must be a mapping
        base = existing if isinstance(existing, dict) else {}
        fields = typing.get_type_hints(hint)
        merged = dict(base)
        for name, item in value.items():  # an unknown name keeps hint None; from_dict reports it
            merged[name] = merged_value(fields.get(name), base.get(name), item, f"{key}.{name}")
        return merged
    if is_mapping_hint(hint) and isinstance(value, dict) and isinstance(existing, dict):
        return {**existing, **value}
    return value


def is_mapping_hint(hint: Any) -> bool:
    """Whether `hint` annotates a plain mapping (dict[str, Any]), as opposed to a section or a scalar."""
    return hint is dict or typing.get_origin(hint) is dict


def schema_hint(key: str) -> Any:
    """The type annotation of dotted `key` in ExperimentConfig ('growth.stages.0' is a StageConfig);
    None for a key the schema does not know (a typo, or a key inside a plain mapping)."""
    hint: Any = ExperimentConfig
    for part in key.split("."):
        hint = without_none(hint)
        if dataclasses.is_dataclass(hint):
            hint = typing.get_type_hints(hint).get(part)
        elif typing.get_origin(hint) is list and part.isdigit():
            hint = typing.get_args(hint)[0] if typing.get_args(hint) else None
        else:
            return None
        if hint is None:
            return None
    return hint


def without_none(hint: Any) -> Any:
    """Optional[X] -> X (a list or section that may also be null); other hints unchanged."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def get_dotted(raw: dict, key: str) -> Any:
    """The raw value at dotted `key` (numbers index lists), or None where nothing is set yet."""
    node: Any = raw
    for part in key.split("."):
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def set_dotted(raw: dict, key: str, value: Any) -> None:
    """Set `key` ('a.b.c'; a number indexes a list, as in growth.stages.0.share) in the raw mapping.
    An index one past the end of a list appends a new element. A null on the way (an empty YAML
    section such as `growth:`) is treated as an empty section or list."""
    parts = key.split(".")
    node: Any = raw
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[:depth]) or "the config"
        if isinstance(node, list):
            if not part.isdigit() or int(part) > len(node):
                raise ConfigError(f"override {key}: {where} is a list of {len(node)} elements; "
                                  f"index it with 0..{len(node)} (the last appends a new one)")
            index = int(part)
            if index == len(node):
                node.append({})
            if last:
                node[index] = value
                return
            if node[index] is None:
                node[index] = {}
            node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
                return
            if node.get(part) is None:
                node[part] = [] if parts[depth + 1].isdigit() else {}
            node = node[part]
        else:
            raise ConfigError(f"override {key}: {where} is not a section")


def from_dict(cls: type, raw: dict, prefix: str):
    """Recursively turn a mapping into dataclass `cls`, checking keys, types and the section's own rules
    (its check(), called with `prefix`, so a stage's key reads growth.stages.N.model.n_heads)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown config key '{prefix}{key}'.{hint} Allowed keys here: {', '.join(sorted(fields))}"
            )
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        value = renamed_value(fields[name], value, f"{prefix}{name}")
        if dataclasses.is_dataclass(hint):
            values[name] = from_dict(hint, {} if value is None else value, prefix=f"{prefix}{name}.")
        else:
            values[name] = coerce(value, hint, f"{prefix}{name}")
    section = cls(**values)
    if hasattr(section, "check"):  # the section's own rules (schema.py), its keys spelled as the user wrote them
        section.check(prefix)
    return section


def renamed_value(field: dataclasses.Field, value: Any, key: str) -> Any:
    """The current name of a choice an older release called `value` (schema RENAMED_VALUES), with a
    deprecation message; any other value unchanged."""
    renamed = field.metadata.get(RENAMED_VALUES, {})
    if isinstance(value, str) and value in renamed:
        warnings.warn(f"{key}: {value!r} is now called {renamed[value]!r}; the old name still works but will "
                      f"be removed: write {key}: {renamed[value]}", FutureWarning, stacklevel=2)
        return renamed[value]
    return value


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against the type annotation `hint`; ints are accepted where floats are wanted."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {hint}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, args))}; got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if dataclasses.is_dataclass(hint):  # an element of a list of sections (growth.stages)
        return from_dict(hint, {} if value is None else value, prefix=f"{key.replace('[', '.').rstrip(']')}.")
    if origin is dict or hint is dict:  # a partial override, checked against its section when applied
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of keys to override, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads '3e-4' (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint in (int, str, bool, float):
        if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
            return value
        raise ConfigError(f"{key} must be {hint.__name__}, got {value!r} ({type(value).__name__})")
    raise ConfigError(f"{key}: unsupported type {hint}")


def to_dict(cfg) -> dict:
    """The resolved config as plain data (for saving to the run directory)."""
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

"""YAML recipes -> nested dataclasses, with dotted command-line overrides.

    cfg = load_config(RunConfig, "examples/tiny/pretrain.yaml", ["train.lr=3e-4", "parallel.tensor_parallel=2"])

Unknown keys are errors that name the full dotted path; override values are parsed as YAML scalars
(``3e-4`` -> float, ``true`` -> bool, ``[1,2]`` -> list).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Dict, Optional, Sequence, Type, TypeVar

import yaml

from megatron_conan.config.model import ConfigError

T = TypeVar("T")


def _field_types(cls) -> Dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _dataclass_in(annotation) -> Optional[type]:
    if dataclasses.is_dataclass(annotation):
        return annotation
    for arg in typing.get_args(annotation):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def from_dict(cls: Type[T], values: Dict[str, Any], path: str = "") -> T:
    """Build dataclass `cls` from a nested dict; unknown keys raise ConfigError naming the path."""
    if not isinstance(values, dict):
        raise ConfigError(f"{path or cls.__name__} must be a mapping, got {type(values).__name__}")
    types = _field_types(cls)
    unknown = sorted(set(values) - set(types))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown config keys: {', '.join(where + k for k in unknown)}")
    kwargs = {}
    for name, value in values.items():
        nested = _dataclass_in(types[name])
        if nested is not None and isinstance(value, dict):
            value = from_dict(nested, value, f"{path}.{name}" if path else name)
        elif isinstance(value, str) and float in (types[name], *typing.get_args(types[name])):
            # PyYAML reads `3e12` (no exponent sign, YAML 1.1) as a string.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{path + '.' if path else ''}{name} must be a number, got {value!r}") from None
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise ConfigError(f"{path or cls.__name__}: {error}") from None


def to_dict(obj) -> Any:
    """Dataclasses -> plain dicts (for writing the resolved config)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(values: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Apply ``a.b.c=value`` strings to a nested dict (in place, also returned)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = values
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw)
    return values


def load_config(cls: Type[T], path: Optional[str], overrides: Sequence[str] = ()) -> T:
    """Read a YAML recipe (or start empty), apply overrides, build `cls`."""
    values: Dict[str, Any] = {}
    if path:
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
    apply_overrides(values, list(overrides))
    return from_dict(cls, values)


def dump_config(cfg, path: str) -> None:
    """Write the resolved config as YAML."""
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(to_dict(cfg), handle, sort_keys=False)


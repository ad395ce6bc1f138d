"""YAML recipes -> nested dataclasses, with dotted command-line overrides.

    cfg = load_config(RunConfig, "examples/tiny/pretrain.yaml", ["optimizer.lr=3e-4", "parallel.tensor_parallel=2"])

Values (from YAML or overrides, both parsed as YAML) are converted to the declared field types:
int (``1e6`` is accepted when integral, ``abc`` and ``1.5`` are refused), float, bool (what YAML
reads as a bool, ``0``/``1``, or the same words quoted; ``maybe`` is refused), str, ``Optional``,
``Union`` (first member that accepts the value), ``List``, ``Dict`` (keys and values) and nested
dataclass sections. Unknown keys are refused with the closest valid key of the whole config
suggested. Every error is a :class:`ConfigError` naming the dotted field; value checks stay in each
dataclass's ``__post_init__``.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, TypeVar

import yaml

from megatron_conan.errors import ConfigError

T = TypeVar("T")

_TRUE_WORDS = frozenset({"true", "yes", "on", "y", "1"})
_FALSE_WORDS = frozenset({"false", "no", "off", "n", "0"})


def _field_types(cls) -> Dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def config_keys(cls, path: str = "") -> List[str]:
    """Every dotted key of dataclass `cls`, sections included (``train``, ``train.lr``, …)."""
    keys = []
    for name, annotation in _field_types(cls).items():
        key = _join(path, name)
        keys.append(key)
        nested = _dataclass_in(annotation)
        if nested is not None:
            keys.extend(config_keys(nested, key))
    return keys


def _dataclass_in(annotation) -> Optional[type]:
    if dataclasses.is_dataclass(annotation):
        return annotation
    for arg in typing.get_args(annotation):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def suggest_key(key: str, valid: Sequence[str], siblings: Sequence[str] = ()) -> Optional[str]:
    """The valid dotted key closest to `key`: the same leaf in another section (``train.lr`` ->
    ``optimizer.lr``), else a close key of the same section (`siblings`), else the closest path,
    else the closest leaf anywhere."""
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [candidate for candidate in valid if candidate.rsplit(".", 1)[-1] == leaf]
    if same_leaf:
        return same_leaf[0]
    by_leaf = {candidate.rsplit(".", 1)[-1]: candidate for candidate in siblings}
    close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
    if close:
        return by_leaf[close[0]]
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return close[0]
    by_leaf = {candidate.rsplit(".", 1)[-1]: candidate for candidate in reversed(valid)}
    close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.7)
    return by_leaf[close[0]] if close else None


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})" if not isinstance(value, str) else repr(value)


def _to_int(value: Any, path: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{path} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    number = value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            try:
                number = float(value)
            except ValueError:
                raise ConfigError(f"{path} must be an integer, got {value!r}") from None
    if isinstance(number, float) and math.isfinite(number) and number.is_integer():
        return int(number)
    raise ConfigError(f"{path} must be an integer, got {_describe(value)}")


def _to_float(value: Any, path: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{path} must be a number, got {value!r}")
    number = None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        # PyYAML (YAML 1.1) reads `3e12` and `1e-4` without a dot as strings
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None or math.isnan(number):  # NaN passes every range check in __post_init__
        raise ConfigError(f"{path} must be a number, got {_describe(value)}")
    return number


def _to_bool(value: Any, path: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS | _FALSE_WORDS:
        return value.strip().lower() in _TRUE_WORDS
    raise ConfigError(f"{path} must be true or false, got {_describe(value)}")


def _to_str(value: Any, path: str) -> str:
    if isinstance(value, str):
        return value
    # a number where a name or path is expected (`run_dir: 2024`) is taken as written; a bool is
    # YAML having read `no` / `off`, which is almost never meant as text
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{path} must be a string, got {_describe(value)}")


def convert(value: Any, annotation: Any, path: str, scope: Optional[Tuple[type, str]] = None) -> Any:
    """`value` as the declared type `annotation`; ConfigError naming `path` when it cannot be."""
    if annotation is Any or annotation is object:
        return value
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{path} must be one of {list(args)}, got {_describe(value)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{path} must be set, got null")
        errors = []
        members = [arg for arg in args if arg is not type(None)]
        # a value already of a member's type takes that member (an int stays an int in Union[int, float])
        exact = [arg for arg in members if isinstance(arg, type) and type(value) is arg]
        for member in exact + [arg for arg in members if arg not in exact]:
            try:
                return convert(value, member, path, scope)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path} does not fit any of its types: "
                          + "; ".join(errors))
    if value is None:
        raise ConfigError(f"{path} must be set, got null")
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        return from_dict(annotation, value, path, scope)
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list, got {_describe(value)}")
        if origin is tuple and args and args[-1] is not Ellipsis:  # Tuple[int, str]: one type per place
            if len(value) != len(args):
                raise ConfigError(f"{path} must have {len(args)} items, got {len(value)}")
            item_types = list(args)
        else:
            item_types = [args[0] if args else Any] * len(value)
        items = [convert(item, item_type, f"{path}[{index}]", scope)
                 for index, (item, item_type) in enumerate(zip(value, item_types))]
        return tuple(items) if origin is tuple else items
    if origin in (dict, collections.abc.Mapping):
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {_describe(value)}")
        key_type, value_type = args if args else (Any, Any)
        return {convert(key, key_type, f"{path} key {key!r}"): convert(item, value_type, _join(path, str(key)), scope)
                for key, item in value.items()}
    if annotation is bool:
        return _to_bool(value, path)
    if annotation is int:
        return _to_int(value, path)
    if annotation is float:
        return _to_float(value, path)
    if annotation is str:
        return _to_str(value, path)
    return value


def from_dict(cls: Type[T], values: Dict[str, Any], path: str = "",
              scope: Optional[Tuple[type, str]] = None) -> T:
    """Build dataclass `cls` from a nested dict, converting each value to its field's type.

    Unknown keys raise ConfigError naming the dotted path and the closest valid key of the whole
    config: `scope` is (outermost config class, its path), `(cls, path)` by default.
    """
    scope = scope or (cls, path)
    if not isinstance(values, dict):
        raise ConfigError(f"{path or cls.__name__} must be a mapping, got {_describe(values)}")
    types = _field_types(cls)
    for name in values:
        if name not in types:
            key = _join(path, str(name))
            root, root_path = scope
            suggestion = suggest_key(key, [_join(root_path, k) for k in config_keys(root)],
                                     [_join(path, k) for k in types])
            raise ConfigError(f"unknown config key {key}" + (f"; did you mean {suggestion}?" if suggestion else ""))
    for field in dataclasses.fields(cls):
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if required and field.init and field.name not in values:
            raise ConfigError(f"{_join(path, field.name)} is required")
    kwargs = {name: convert(value, types[name], _join(path, name), scope) for name, value in values.items()}
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
        if not all(parts):
            raise ConfigError(f"override {item!r}: {key.strip()!r} is not a dotted key")
        node = values
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"override {key.strip()}: the value {raw!r} is not valid YAML") from None
    return values


def load_config(cls: Type[T], path: Optional[str], overrides: Sequence[str] = ()) -> T:
    """Read a YAML recipe (or start empty), apply overrides, build `cls`."""
    values: Dict[str, Any] = {}
    if path:
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle)
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: a recipe is a YAML mapping of sections, got {_describe(values)}")
    apply_overrides(values, list(overrides))
    return from_dict(cls, values)


def dump_config(cfg, path: str) -> None:
    """Write the resolved config as YAML."""
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(to_dict(cfg), handle, sort_keys=False)

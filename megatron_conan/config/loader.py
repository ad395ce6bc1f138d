"""YAML recipes -> nested config dataclasses, typed and checked by pydantic, with dotted overrides.

    cfg = load_config(RunConfig, "examples/tiny/pretrain.yaml", ["optimizer.lr=3e-4", "parallel.tensor_parallel=2"])

The config sections are pydantic dataclasses (:func:`config_dataclass`): their fields carry the
docs and declare the constraints (``Annotated[int, Field(ge=1)]``, ``Literal[...]``), their model
validators the rules across fields, whose messages name fields as the section does
(``min_lr must be in [0, lr]``; the line names them in full). Plain dataclasses load too. pydantic
v2 validates a nested mapping against them in lax mode: ``1e6`` or ``3.0``
for an int (not ``1.5``), ints for floats, ``yes`` / ``off`` / ``0`` / ``1`` for bools, numbers
for strings (``run_dir: 2024``), ``Optional``, ``Literal``, ``List``, ``Tuple``, ``Dict`` (keys too)
and nested sections. On top of pydantic's rules: unknown keys are refused (with the closest valid key
of the whole config suggested), NaN and infinity are refused for floats, and a YAML bool is not taken
as a number (nor a float as a bool). Every error is one :class:`ConfigError` line, the dotted field
then the reason, made by :func:`error_line`: ``train.train_steps must be an integer, got 'abc'``.

YAML is read as YAML 1.2 reads numbers: ``3e12`` and ``1e-4`` are floats (PyYAML's YAML 1.1 reads
them as strings).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import typing
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, TypeVar

import pydantic
import yaml

from megatron_conan.errors import ConfigError

T = TypeVar("T")

# extra keys are refused by the dataclasses' own __init__ (pydantic reports unexpected_keyword_argument);
# the config reaches nested sections through the one-item tuple the adapter wraps the class in
_PYDANTIC_CONFIG = pydantic.ConfigDict(extra="forbid", allow_inf_nan=False, coerce_numbers_to_str=True)


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads ``1e6``, ``3e12`` and ``-1E-4`` as floats (YAML 1.2's float rule)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def read_yaml(source) -> Any:
    """One YAML document (an open recipe file, whose name errors then give, or an override's text)
    as this loader reads it."""
    return yaml.load(source, Loader=_YamlLoader)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _dataclasses_in(annotation) -> List[type]:
    """The dataclasses a field holds, directly or inside Optional / Union / List / Dict (a data
    section's variants are several)."""
    if dataclasses.is_dataclass(annotation):
        return [annotation]
    found: List[type] = []
    for arg in typing.get_args(annotation):
        found.extend(cls for cls in _dataclasses_in(arg) if cls not in found)
    return found


def _field_names(cls) -> List[str]:
    return [f.name for f in dataclasses.fields(cls)]


def config_keys(cls, path: str = "") -> List[str]:
    """Every dotted key of dataclass `cls`, sections included (``train``, ``train.lr``, …)."""
    keys: List[str] = []
    hints = typing.get_type_hints(cls)
    for name in _field_names(cls):
        key = _join(path, name)
        keys.append(key)
        for nested in _dataclasses_in(hints[name]):
            keys.extend(k for k in config_keys(nested, key) if k not in keys)
    return keys


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


# pydantic's error types -> the reason after the dotted field: {got} is the value and its type, {value}
# the value alone, the other names are
# pydantic's `ctx` of the error; a reason starting with "." names a key below the field
_REASONS = {
    **dict.fromkeys(("int_parsing", "int_type", "int_from_float"), "must be an integer, got {got}"),
    **dict.fromkeys(("float_parsing", "float_type"), "must be a number, got {got}"),
    "finite_number": "must be a finite number, got {got}",
    **dict.fromkeys(("bool_parsing", "bool_type"), "must be true or false, got {got}"),
    "string_type": "must be a string, got {got}", "string_too_short": "must not be empty",
    **dict.fromkeys(("list_type", "tuple_type", "iterable_type"), "must be a list, got {got}"),
    **dict.fromkeys(("dict_type", "dataclass_type", "dataclass_args_type"), "must be a mapping, got {got}"),
    **dict.fromkeys(("missing_argument", "missing"), "is required"),
    "literal_error": "must be one of {expected}, got {got}",
    "union_tag_invalid": ".kind must be one of {expected_tags}, got {tag!r}",
    "too_long": "must have {max_length} items, got {actual_length}",
    "too_short": "must have at least {min_length} items, got {actual_length}",
    **dict.fromkeys(("greater_than", "greater_than_equal", "less_than", "less_than_equal"), "must be {range}, got {value}"),
}
_BOUNDS = {"gt": ("(", "> {}"), "ge": ("[", ">= {}"), "lt": (")", "< {}"), "le": ("]", "<= {}")}


def _range(owner, name, ctx: Dict[str, Any]) -> str:
    """A number field's allowed range as the field declares it (``in [0, 1)``, ``> 0``); the bound the
    error names when the field's declaration is out of reach (a list item, a dict value)."""
    declared = getattr(owner, "__pydantic_fields__", {}).get(name)
    bounds = {key: getattr(item, key) for item in (declared.metadata if declared else ()) for key in _BOUNDS
              if hasattr(item, key)} or {key: ctx[key] for key in _BOUNDS if key in ctx}
    if len(bounds) == 2:
        (low, low_value), (high, high_value) = sorted(bounds.items(), key=lambda item: item[0] in ("lt", "le"))
        return f"in {_BOUNDS[low][0]}{low_value:g}, {high_value:g}{_BOUNDS[high][0]}"
    (key, value), = bounds.items()
    return _BOUNDS[key][1].format(f"{value:g}")


def _walk(cls, loc: Tuple) -> Tuple[Tuple, Optional[type], Optional[type]]:
    """pydantic's location without the variant tags of a discriminated union (``("data", "blended",
    "x")`` -> ``("data", "x")``), the dataclass that holds its last part, and the dataclass it names
    (a section's validator errors are placed there; None when unknown)."""
    variants, clean, owner = ([cls] if cls is not None else []), [], None
    for part in loc:
        if len(variants) > 1 and isinstance(part, str):
            tagged = [variant for variant in variants if getattr(variant, "kind", None) == part]
            if tagged:
                variants = tagged
                continue
        clean.append(part)
        owner = variants[0] if len(variants) == 1 else None
        if owner is not None and part in _field_names(owner):  # past a list index or dict key: the same class
            variants = _dataclasses_in(typing.get_type_hints(owner)[part]) or variants
    return tuple(clean), owner, (variants[0] if len(variants) == 1 else None)


def _dotted(path: str, loc: Tuple) -> str:
    """A clean location -> ``section.field[0].key``; a dict key's own error -> the dict's field."""
    if "[key]" in loc:  # (..., field, the key, "[key]"): the error is the key's
        loc = loc[:loc.index("[key]") - 1]
    for part in loc:
        path = f"{path}[{part}]" if isinstance(part, int) else _join(path, str(part))
    return path


def _union_members(errors: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The errors that are the first error's value failing each member of a Union (same input,
    same place, the member's name last in the location); [] when the first error is no such one."""
    first = errors[0]
    members = [error for error in errors if error.get("input") is first.get("input")
               and len(error["loc"]) == len(first["loc"]) and error["loc"][:-1] == first["loc"][:-1]]
    return members if len(members) > 1 else []


def error_line(errors: List[Dict[str, Any]], cls, path: str) -> str:
    """pydantic's errors (locations relative to dataclass `cls`, which sits at `path`) as the one line
    users see: the first error, or every member of a Union the value fits none of."""
    members = _union_members(errors)
    if not members:
        return _error_line(errors[0], cls, path)
    lines = [_error_line({**error, "loc": error["loc"][:-1]}, cls, path) for error in members]
    return f"{_dotted(path, _walk(cls, members[0]['loc'][:-1])[0])} does not fit any of its types: " + "; ".join(lines)


def _name_fields(message: str, section, where: str) -> str:
    """A validator's message, which names fields as its section does (``hidden_size``), with every
    field of the section named in full (``model.overrides.hidden_size``)."""
    names = _field_names(section) if section is not None and where else []
    if not names:
        return f"{where}: {message}" if where else message
    pattern = r"(?<![\w.])(" + "|".join(map(re.escape, names)) + r")\b"
    named = re.sub(pattern, lambda found: _join(where, found.group(1)), message)
    return named if named != message else f"{where}: {message}"


def _error_line(error: Dict[str, Any], cls, path: str) -> str:
    """One pydantic error as one line: the dotted field, then the reason."""
    loc, owner, here = _walk(cls, error["loc"])
    kind, value, where = error["type"], error.get("input"), _dotted(path, loc)
    if kind in ("value_error", "assertion_error"):  # a validator's own message
        raised = error["ctx"]["error"]  # a nested build's ConfigError is a whole line already
        return str(raised) if isinstance(raised, ConfigError) else _name_fields(str(raised), here, where)
    if kind == "unexpected_keyword_argument":
        return _unknown_key(where, owner, cls, path)
    if "[key]" in loc:
        where = f"{where} key {loc[loc.index('[key]') - 1]!r}"
    if value is None and kind not in ("missing", "missing_argument"):
        return f"{where} must be set, got null"
    reason = _REASONS.get(kind, "{msg}")
    if "{range}" in reason:
        reason = reason.replace("{range}", _range(owner, loc[-1] if loc else None, error.get("ctx", {})))
    reason = reason.format(**error.get("ctx", {}), got=_describe(value), value=value, msg=error["msg"])
    return f"{where}{reason}" if reason.startswith(".") else f"{where} {reason}"


def _unknown_key(where: str, owner, cls, path: str) -> str:
    """An unknown key's line, with the closest valid key of the whole config."""
    parent = where.rsplit(".", 1)[0] if "." in where else ""
    siblings = [_join(parent, name) for name in _field_names(owner)] if owner is not None else []
    suggestion = suggest_key(where, config_keys(cls, path), siblings)
    if suggestion == where and owner is not None and hasattr(owner, "kind"):  # a key of another variant
        return f"unknown config key {where} for {parent}.kind={owner.kind}"
    return f"unknown config key {where}" + (f"; did you mean {suggestion}?" if suggestion else "")


@functools.lru_cache(maxsize=None)
def _adapter(annotation) -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(Tuple[annotation], config=_PYDANTIC_CONFIG)


def config_dataclass(section: str = ""):
    """Decorator of a config section: a pydantic dataclass, so that its declared constraints
    (``Annotated[int, Field(ge=1)]``, ``Literal``) and its ``model_validator`` checks run whenever it
    is built, from a recipe or in code. Built in code, a bad value is the same one ConfigError line,
    its fields named under `section` (``parallel``, ``embedding.dhnm``)."""
    def decorate(cls: Type[T]) -> Type[T]:
        built = pydantic.dataclasses.dataclass(cls, config=_PYDANTIC_CONFIG)
        validate = built.__init__  # a recipe's sections are built by pydantic's validator, not by __init__

        @functools.wraps(validate)
        def __init__(self, *args, **kwargs):
            try:
                validate(self, *args, **kwargs)
            except pydantic.ValidationError as error:
                raise ConfigError(error_line(error.errors(), built, section)) from None

        built.__init__ = __init__
        return built

    return decorate


def _bool_number_problem(raw: Any, built: Any, where: str) -> Optional[str]:
    """pydantic's lax mode takes ``true`` as 1 and ``1.0`` as true: why `raw` (the input, walked beside
    what it became) is refused, or None."""
    if isinstance(raw, bool) and isinstance(built, (int, float)) and not isinstance(built, bool):
        return f"{where} must be {'an integer' if isinstance(built, int) else 'a number'}, got {raw!r}"
    if isinstance(raw, float) and isinstance(built, bool):
        return f"{where} must be true or false, got {_describe(raw)}"
    pairs: List[Tuple[Any, Any, str]] = []
    if isinstance(raw, dict):
        for key, item in raw.items():
            if dataclasses.is_dataclass(built) and hasattr(built, str(key)):
                pairs.append((item, getattr(built, str(key)), _join(where, str(key))))
            elif isinstance(built, dict) and key in built:
                pairs.append((item, built[key], _join(where, str(key))))
    elif isinstance(raw, (list, tuple)) and isinstance(built, (list, tuple)) and len(raw) == len(built):
        pairs = [(item, made, f"{where}[{index}]") for index, (item, made) in enumerate(zip(raw, built))]
    return next((problem for problem in (_bool_number_problem(*pair) for pair in pairs) if problem), None)


def convert(value: Any, annotation: Any, path: str) -> Any:
    """`value` as the declared type `annotation` (a dataclass, or any field type); ConfigError
    naming `path` when it cannot be."""
    try:
        built = _adapter(annotation).validate_python((value,))[0]
    except pydantic.ValidationError as error:
        cls = annotation if dataclasses.is_dataclass(annotation) else None
        errors = [{**item, "loc": item["loc"][1:]} for item in error.errors()]  # past the adapter's tuple
        raise ConfigError(error_line(errors, cls, path)) from None
    problem = _bool_number_problem(value, built, path)
    if problem:
        raise ConfigError(problem)
    return built


def from_dict(cls: Type[T], values: Dict[str, Any], path: str = "") -> T:
    """Build dataclass `cls` from a nested mapping; errors name keys under `path`."""
    if not isinstance(values, dict):
        raise ConfigError(f"{path or cls.__name__} must be a mapping, got {_describe(values)}")
    return convert(values, cls, path)


def to_dict(obj) -> Any:
    """Dataclasses -> plain dicts and lists (for writing the resolved config)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(values: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Apply ``a.b.c=value`` strings (each value read as YAML) to a nested dict (in place, also returned)."""
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
            node[parts[-1]] = read_yaml(raw)
        except yaml.YAMLError:
            raise ConfigError(f"override {key.strip()}: the value {raw!r} is not valid YAML") from None
    return values


def read_recipe(path: Optional[str]) -> Dict[str, Any]:
    """A YAML recipe's mapping of sections ({} without a path)."""
    if not path:
        return {}
    with open(path, encoding="utf-8") as handle:
        values = read_yaml(handle)
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a recipe is a YAML mapping of sections, got {_describe(values)}")
    return values


def load_config(cls: Type[T], path: Optional[str], overrides: Sequence[str] = ()) -> T:
    """Read a YAML recipe (or start empty), apply overrides, build `cls`."""
    return from_dict(cls, apply_overrides(read_recipe(path), list(overrides)))


def dump_config(cfg, path: str) -> None:
    """Write the resolved config as YAML (atomically: a crash leaves the old file or the new one)."""
    from megatron_conan import atomic_write

    atomic_write.text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))

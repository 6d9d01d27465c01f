"""The one strict loader behind every config: experiment, evaluation, SLURM settings, model.

Precedence is defaults <- sparse YAML <- dotted overrides (`--train.max_steps=20` arrives from Fire's
`**overrides` as `{"train.max_steps": 20}`). Loading is strict because a typo that silently falls back
to a default wastes a cluster allocation: an unknown key, a duplicate YAML key, a wrong type, a
non-finite number or a failed range check raises one `ConfigError` whose `key` is the dotted path of
the field at fault, before any work starts.

Field types understood: bool, int, float, str, Literal[...], Optional/unions, list[...] and
tuple[...] of those, nested dataclasses (also inside lists), dict[str, Any] (a map of another
program's flags: the rest of a dotted override stays one key, `pretrain.overrides.train.max_steps=5`
-> `overrides["train.max_steps"] = 5`) and Any. A numeric part of a dotted key indexes a list
(`prep.sources.0.inputs=...`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from pipeline.config.paths import bundled_configs, resolve_config_file

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad config value; `key` is the dotted path of the field at fault."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config key '{key}': {message}")
        self.key = key


def check(condition: bool, key: str, message: str) -> None:
    """Raise ConfigError(key, message) unless `condition` holds."""
    if not condition:
        raise ConfigError(key, message)


# --------------------------------------------------------------------------------------------------
# YAML
# --------------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (plain YAML lets the last one silently win)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def read_yaml(path: str | Path, key: str = "config") -> dict[str, Any]:
    """A YAML file holding a mapping (empty file = {}); any problem is a ConfigError naming `key` and the file."""
    file = resolve_config_file(path)
    if file is None:
        raise ConfigError(key, f"file not found: {path} (bundled configs: {', '.join(bundled_configs())})")
    try:
        loaded = yaml.load(file.read_text(encoding="utf-8"), Loader=_StrictLoader)  # noqa: S506 - a SafeLoader
    except UnicodeDecodeError as err:
        raise ConfigError(key, f"{file} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        raise ConfigError(key, f"{file}: {' '.join(str(err).split())}") from None
    if loaded is None:
        return {}
    check(isinstance(loaded, dict), key, f"{file} must hold a mapping at the top level, got {type(loaded).__name__}")
    return loaded


# --------------------------------------------------------------------------------------------------
# Building a dataclass
# --------------------------------------------------------------------------------------------------


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: Mapping[str, Any] | None = None, key: str = "config"
) -> T:
    """Build and validate `cls` from its defaults, a sparse YAML file and dotted overrides.

    Raises ConfigError naming the key for an unknown key, a wrong type or a failed check.
    """
    data = read_yaml(path, key) if path is not None else {}
    cfg = from_dict(cls, apply_overrides(cls, data, overrides or {}))
    own = getattr(cfg, "validate", None)
    if callable(own):
        own()  # the top-level config runs its sections' checks and its cross-section ones
    else:
        validate_sections(cfg)
    return cfg


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Strictly build dataclass `cls` from a (sparse) nested mapping; missing fields keep defaults.

    A ValueError raised by the dataclass itself (range checks in `__post_init__`, e.g. the model's
    configs) becomes a ConfigError; one carrying a `field` attribute is reported under that field.
    """
    check(isinstance(data, Mapping), prefix or "config", f"must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{_join(prefix, close[0])}'?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(_join(prefix, str(key)), f"unknown key{hint}")
    kwargs = {name: coerce(data[name], hints[name], _join(prefix, name)) for name in names if name in data}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        field_name = getattr(err, "field", None)
        raise ConfigError(_join(prefix, field_name) if field_name else prefix or cls.__name__, str(err)) from None


def coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` as type `tp`, accepting the spellings YAML and Fire produce; ConfigError otherwise.

    YAML 1.1 reads `1e-4` as a string and Fire hands `[a,b]` over as a string, so numeric and list
    fields accept those strings; bools accept only true/false, never 0/1; floats must be finite.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, key)  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        for arm in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arm, key)
            except ConfigError:
                continue
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        check(value in args, key, f"must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        check(isinstance(value, bool), key, f"expected a bool (true/false), got {value!r}")
        return value
    if tp in (int, float):
        return _coerce_number(value, tp, key)
    if tp is str:
        # YAML reads `time: 60` or `partition: 123` as numbers; a bool is never a string by accident.
        ok = isinstance(value, (str, int, float)) and not isinstance(value, bool)
        check(ok, key, f"expected a string, got {value!r} ({type(value).__name__})")
        return str(value)
    if origin is dict or tp is dict:
        check(isinstance(value, Mapping), key, f"expected a mapping, got {value!r}")
        return dict(value)
    if origin in (list, tuple):
        return _coerce_sequence(value, origin, args, key)
    raise ConfigError(key, f"unsupported field type {tp!r}")  # a programming error in the dataclass


def _coerce_number(value: Any, kind: type, key: str) -> Any:
    if isinstance(value, bool):
        raise ConfigError(key, f"expected {kind.__name__}, got bool {value!r}")
    if isinstance(value, str):
        try:
            value = kind(value.strip())
        except ValueError:
            raise ConfigError(key, f"expected {kind.__name__}, got {value!r}") from None
    if kind is int:
        check(isinstance(value, int), key, f"expected int, got {value!r} ({type(value).__name__})")
        return value
    check(isinstance(value, (int, float)), key, f"expected float, got {value!r} ({type(value).__name__})")
    check(math.isfinite(value), key, f"must be a finite number, got {value!r}")
    return float(value)


def _coerce_sequence(value: Any, origin: Any, args: tuple, key: str) -> Any:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError:
                raise ConfigError(key, f"cannot parse list {value!r}") from None
        else:
            value = [v.strip() for v in text.split(",") if v.strip()]
    check(isinstance(value, (list, tuple)), key, f"expected a list, got {value!r} ({type(value).__name__})")
    if origin is list:
        return [coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    check(len(value) == len(args), key, f"expected {len(args)} values, got {len(value)}: {value!r}")
    return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))


# --------------------------------------------------------------------------------------------------
# Dotted overrides
# --------------------------------------------------------------------------------------------------


def apply_overrides(cls: type, data: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Merge `{"a.b": v}` overrides into a copy of the nested dict `data` for dataclass `cls`.

    Dashes in field names become underscores. The dataclass types guide the walk: a numeric part
    indexes a list field, and under a dict field the remaining parts stay one key.
    """
    merged = json.loads(json.dumps(data, default=str)) if data else {}
    for dotted, value in overrides.items():
        _set(cls, merged, str(dotted).split("."), value, str(dotted), [])
    return merged


def _set(tp: Any, node: Any, parts: list[str], value: Any, dotted: str, done: list[str]) -> None:
    tp = _strip_optional(tp)
    head, rest = parts[0], parts[1:]
    where = ".".join(done) or "config"
    if isinstance(node, list):
        index_ok = head.isdigit() and int(head) < len(node)
        check(index_ok, dotted, f"{head!r} is not an index of the {len(node)} entries of {where}")
        child_tp = typing.get_args(tp)[0] if typing.get_args(tp) else Any
        if rest:
            _set(child_tp, node[int(head)], rest, value, dotted, [*done, head])
        else:
            node[int(head)] = value
        return
    check(isinstance(node, dict), where, f"is a value, cannot set {dotted}")
    if dataclasses.is_dataclass(tp):
        head = head.replace("-", "_")
        child_tp = typing.get_type_hints(tp).get(head, Any)
    else:
        child_tp = Any
    key = [*done, head]
    if not rest:
        node[head] = value
        return
    child_tp = _strip_optional(child_tp)
    if typing.get_origin(child_tp) is dict or child_tp is dict:
        target = node.setdefault(head, {})
        check(isinstance(target, dict), ".".join(key), f"is not a mapping, cannot set {dotted}")
        target[".".join(rest)] = value
        return
    if typing.get_origin(child_tp) is list:
        child = node.get(head)
        check(isinstance(child, list), ".".join(key), f"is not a list here, cannot set {dotted}")
    else:
        child = node.setdefault(head, {})
    _set(child_tp, child, rest, value, dotted, key)


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(arms) == 1:
            return arms[0]
    return tp


# --------------------------------------------------------------------------------------------------
# Validation and output
# --------------------------------------------------------------------------------------------------


def validate_sections(cfg: Any, prefix: str = "") -> None:
    """Run `validate(prefix)` of every nested section of `cfg` (depth first)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        validate = getattr(value, "validate", None)
        if dataclasses.is_dataclass(value) and callable(validate):
            validate(_join(prefix, f.name))


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML / checkpoints / TensorBoard text."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name

"""Settings as dataclasses, each living beside what it configures (ModelConfig in model.py, TrainConfig in
train/trainer.py, each stage's section in its stage module; stages/base.py gathers them into RunConfig).
This module is the generic part: dict <-> dataclass with every field checked, presets (YAML data in
gptstack/configs/), and the resolution order preset (following `base:`) -> YAML files -> key=value overrides.

Every field is checked the same way, so no hand-written list can miss one: an unknown key, a wrong type, or a
choice outside its `Literal[...]` is a one-line error naming the key (and the allowed values). A dataclass may
add checks that span its fields with `problems()`, yielding (field, message) pairs.
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import yaml

from .errors import GptstackError

PRESET_DIR = Path(__file__).parent / "configs"


# ---------------------------------------------------------------- dict <-> dataclass

def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass `cls` from a dict, rejecting unknown keys, wrong types and choices outside a Literal;
    then the dataclass's own cross-field `problems()`, if it has them."""
    if not isinstance(data, dict):
        raise GptstackError(f"config {where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise GptstackError(f"unknown config key '{path}' (known: {', '.join(sorted(fields))})")
        f = fields[key]
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict) and f.default_factory is not dataclasses.MISSING:
            value = deep_merge(to_dict(f.default_factory()), value)  # keep this field's own defaults under partial settings
        kwargs[key] = _coerce(hints[key], value, path)
    obj = cls(**kwargs)
    check(obj, where)
    return obj


def check(obj, where: str = "") -> None:
    """The cross-field checks of a config dataclass (`problems()`), as one-line errors naming the key."""
    for key, message in getattr(obj, "problems", lambda: ())():
        raise GptstackError(f"config '{where + '.' if where else ''}{key}' {message}")


def at_least(obj, minimum, *names):
    """(field, message) for each named numeric field of `obj` below `minimum` (NaN included): for `problems()`."""
    for name in names:
        value = getattr(obj, name)
        if not value >= minimum:
            yield name, f"must be >= {minimum}, got {value}"


def choices(hint) -> tuple | None:
    """The allowed values of a Literal[...] field, or None for any other type."""
    return typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else None


def _coerce(hint, value, path):
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value or {}, path)
    allowed = choices(hint)
    if allowed is not None:
        if any(value == a and type(value) is type(a) for a in allowed):  # True is not 1 here
            return value
        raise GptstackError(f"config '{path}': {value!r} is not one of {', '.join(map(str, allowed))}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise GptstackError(f"config '{path}': expected a list, got {value!r}")
        return [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_type, item = typing.get_args(hint)
        if not isinstance(value, dict):
            raise GptstackError(f"config '{path}': expected a mapping, got {value!r}")
        return {_coerce(key_type, k, f"{path}"): _coerce(item, v, f"{path}.{k}") for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise GptstackError(f"config '{path}': expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise GptstackError(f"config '{path}': expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _looks_numeric(value):  # YAML 1.1 reads 6e-05 as a string
            return float(value)
        raise GptstackError(f"config '{path}': expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise GptstackError(f"config '{path}': expected a string, got {value!r}")
    return value


# ---------------------------------------------------------------- presets and overrides

def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise GptstackError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    except OSError as e:
        raise GptstackError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise GptstackError(f"{path}: expected a mapping at the top level")
    return data


def preset_dict(name: str) -> dict:
    """The preset's raw dict, with its `base:` chain merged in."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise GptstackError(f"unknown preset '{name}' (known: {', '.join(list_presets())})")
    data = load_yaml(path)
    base = data.pop("base", None)
    merged = deep_merge(preset_dict(base), data) if base else data
    merged["preset"] = name
    return merged


def deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict:
    """'pretrain.lr=3e-4' -> {'pretrain': {'lr': 0.0003}} (values parsed as YAML)."""
    if "=" not in text:
        raise GptstackError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def merged(preset: str | None = None, files: list[str] = (), overrides: list[str] = ()) -> dict:
    """The settings as one dict: the preset, then each YAML file, then each key=value override."""
    data: dict = {}
    if preset:
        data = deep_merge(data, preset_dict(preset))
    for f in files:
        data = deep_merge(data, load_yaml(Path(f)))
    for o in overrides:
        data = deep_merge(data, parse_override(o))
    data.pop("base", None)
    return data

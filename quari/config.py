"""Loading and validating experiment configurations against a JSON schema.

Errors name the offending key by its dotted path and, for a misspelt key, suggest the closest
allowed one, so ``quari.train.lr_shedule`` fails with a message a user can act on. Numbers
written in exponent notation without a dot (``1e-3``, a string to YAML 1.1) are read as numbers.
Settings that a schema leaves open (method entries, ``quari.train``) are checked against the
parameters of the code that receives them (:func:`check_parameters`).
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path

import jsonschema
import yaml


class ConfigError(ValueError):
    """The configuration does not match its schema."""


def _path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<top level>"


def _describe(error: jsonschema.ValidationError) -> str:
    where = _path(error)
    if error.validator == "additionalProperties":
        allowed = list(error.schema.get("properties", {}))
        extra = [k for k in error.instance if k not in allowed
                 and not any(re.match(p, k)
                             for p in error.schema.get("patternProperties", {}))]
        parts = []
        for key in extra:
            near = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            full = key if where == "<top level>" else f"{where}.{key}"
            parts.append(f"unknown key {full!r}{hint}; allowed here: {', '.join(allowed)}")
        return "; ".join(parts)
    if error.validator == "required":
        return f"{where}: {error.message}"
    return f"{where}: {error.message}"


def _apply_defaults(instance, schema):
    """Fill in ``default`` values of the schema's object properties (recursively)."""
    if not isinstance(instance, dict) or schema.get("type") != "object":
        return instance
    for key, sub in schema.get("properties", {}).items():
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if key in instance:
            _apply_defaults(instance[key], sub)
    return instance


def validate_config(config: dict, schema: dict | str | Path) -> dict:
    """Validate ``config`` (after filling defaults) and return it; raise ConfigError listing every problem."""
    if not isinstance(schema, dict):
        schema = yaml.safe_load(Path(schema).read_text())
    config = coerce_numbers(_apply_defaults(copy.deepcopy(config), schema), schema)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(_describe(e) for e in errors))
    return config


def deep_merge(base: dict, override: dict) -> dict:
    """``override`` merged into a copy of ``base``, recursively for nested mappings."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_config(path: str | Path, schema: dict | str | Path) -> dict:
    """Read a YAML config and validate it."""
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    return validate_config(config, schema)


# --------------------------------------------------------------------------------------------
# Settings passed to code (method constructors, dataclasses such as TrainConfig): checked
# against the parameters and annotations of what receives them, before any job runs.

#: a number in exponent notation without a dot (``1e-3``), which YAML 1.1 reads as a string
EXPONENT_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)[eE][+-]?\d+")


def as_number(value):
    """``value`` as a float when it is a string in exponent notation (``"1e-3"``), else as is."""
    if isinstance(value, str) and EXPONENT_NUMBER.fullmatch(value.strip()):
        return float(value)
    return value


def _allows_number(schema: dict) -> bool:
    kinds = schema.get("type", [])
    kinds = [kinds] if isinstance(kinds, str) else kinds
    return bool({"number", "integer"} & set(kinds)) or any(
        _allows_number(s) for key in ("oneOf", "anyOf") for s in schema.get(key, []))


def coerce_numbers(instance, schema: dict | None):
    """Strings in exponent notation become numbers where the schema allows a number, and
    anywhere inside a free-form mapping (whose values are checked by the code that takes them,
    see :func:`check_parameters`); a string a schema asks for stays a string."""
    if schema is None or not isinstance(schema, dict):
        return instance
    if isinstance(instance, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, value in instance.items():
            if key in props:
                instance[key] = coerce_numbers(value, props[key])
            elif isinstance(extra, dict):
                instance[key] = coerce_numbers(value, extra)
            elif extra is not False:  # free-form: checked by the code that takes it
                instance[key] = _coerce_free(value)
        return instance
    if isinstance(instance, list) and isinstance(schema.get("items"), dict):
        return [coerce_numbers(v, schema["items"]) for v in instance]
    if isinstance(instance, str) and _allows_number(schema):
        number = as_number(instance)
        if isinstance(number, float) and "integer" in str(schema.get("type")) and number.is_integer():
            return int(number)
        return number
    return instance


def _coerce_free(value):
    if isinstance(value, dict):
        return {k: _coerce_free(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_coerce_free(v) for v in value]
    return as_number(value)


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def value_matches(value, hint) -> bool:
    """Whether ``value`` (from YAML) fits the annotation ``hint``: int (not bool), float (int or
    float), bool, str, dict / Mapping, list / Sequence / tuple, None, unions of these; any other
    annotation is not checked here (the receiving code checks it)."""
    import collections.abc
    import types
    import typing
    if hint is typing.Any or hint is inspect_empty():
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(value_matches(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin is not None:
        hint = origin
    if hint is type(None) or hint is None:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    if hint in (list, tuple, collections.abc.Sequence):
        return isinstance(value, (list, tuple))
    return True


def inspect_empty():
    import inspect
    return inspect.Parameter.empty


def check_parameters(target, params: dict, where: str, ignore: tuple[str, ...] = ("self", "device"),
                     nested: dict | None = None) -> list[str]:
    """Problems of ``params`` given to ``target`` (a function, a class whose ``__init__`` takes
    them, or a dataclass): unknown keys (with the closest allowed name) and values of the
    wrong type, each with its dotted key ``where.key``. ``nested`` maps a key whose value is a
    mapping to the target that receives that mapping (checked the same way). A target taking
    ``**kwargs`` accepts any key. Numbers in exponent notation (``1e-3``) count as numbers."""
    import dataclasses
    import inspect
    import typing
    if dataclasses.is_dataclass(target):
        hints = typing.get_type_hints(target)
        fields = {f.name: hints.get(f.name, typing.Any) for f in dataclasses.fields(target)}
        open_ended = False
    else:
        function = target.__init__ if inspect.isclass(target) else target
        signature = inspect.signature(function)
        try:
            hints = typing.get_type_hints(function)
        except Exception:  # an annotation that cannot be resolved is not checked
            hints = {}
        fields = {name: hints.get(name, typing.Any) for name, p in signature.parameters.items()
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        open_ended = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    allowed = [k for k in fields if k not in ignore]
    problems = []
    if not isinstance(params, dict):
        return [f"{where}: expected a mapping of settings, got {params!r}"]
    for key, value in params.items():
        full = f"{where}.{key}"
        if key not in fields or key in ignore:
            if open_ended and key not in ignore:
                continue
            near = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            problems.append(f"unknown key {full!r}{hint}; allowed here: "
                            f"{', '.join(allowed) or 'none'}")
            continue
        value = as_number(value)
        if nested and key in nested and isinstance(value, dict):
            problems += check_parameters(nested[key], value, full, ignore=ignore)
        elif not value_matches(value, fields[key]):
            problems.append(f"{full}: {value!r} is not of type {_type_name(fields[key])}")
    return problems

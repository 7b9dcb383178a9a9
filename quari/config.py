"""Loading and validating experiment configurations against a JSON schema.

Errors name the offending key by its dotted path and, for a misspelt key, suggest the closest
allowed one, so ``quari.train.lr_shedule`` fails with a message a user can act on.
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
    config = _apply_defaults(copy.deepcopy(config), schema)
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

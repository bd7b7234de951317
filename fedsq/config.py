"""Run configs: load a YAML file or dict, apply overrides, fill defaults, validate.

The schema (``run_config.schema.yaml`` beside this module) is the single source of every
key, default and description. Validation errors are one line naming the dotted key and
what is allowed.
"""

from __future__ import annotations

import copy
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import jsonschema
import yaml

from fedsq import strategies


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` as a string; learning rates are written that way, so read floats as YAML 1.2 does."""


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _parse_yaml(text: str, source: str):
    """``text`` parsed; a syntax error is one line naming ``source``, line and column (1-based)."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark else source
        raise ValueError(f"{where}: not valid YAML: {getattr(err, 'problem', None) or err}") from None


SCHEMA: dict = yaml.safe_load(resources.files("fedsq").joinpath("run_config.schema.yaml").read_text())


def _extend_with_defaults(validator_class):
    """A validator that also fills `default`s in while descending (the jsonschema FAQ recipe)."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub:
                    instance.setdefault(key, copy.deepcopy(sub["default"]))
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_Validator = _extend_with_defaults(jsonschema.Draft202012Validator)


def _describe(error: jsonschema.ValidationError) -> str:
    key = ".".join(str(p) for p in error.absolute_path) or "<root>"
    if error.validator == "additionalProperties":
        allowed = ", ".join(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        prefix = "" if key == "<root>" else key + "."
        return f"unknown key {', '.join(prefix + u for u in unknown)} (allowed: {allowed})"
    if error.validator in ("oneOf", "anyOf"):  # optimizer.lr: a number or "calibrated"; dataset, backbone
        return f"{key}: {error.instance!r} is not valid ({error.schema['description']})"
    return f"{key}: {error.message}"


def apply_override(cfg: dict, override: str) -> None:
    """Set ``a.b=VALUE`` in place; VALUE is parsed as YAML (``0.1``, ``null``, ``[0.6, 0.7]``)."""
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise ValueError(f"override {override!r}: expected KEY=VALUE, e.g. split.alpha=0.1")
    *parents, leaf = key.split(".")
    node = cfg
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {override!r}: {part} is not a mapping")
    node[leaf] = _parse_yaml(value, f"override {override!r}")


def load(path_or_dict: str | Path | dict, overrides: Iterable[str] = ()) -> dict:
    """The resolved run config: overrides applied, defaults filled, validated."""
    if isinstance(path_or_dict, dict):
        cfg = copy.deepcopy(path_or_dict)
    else:
        cfg = _parse_yaml(Path(path_or_dict).read_text(), str(path_or_dict)) or {}
        if not isinstance(cfg, dict):
            raise ValueError(f"{path_or_dict}: a run config must be a mapping of keys to values")
    for override in overrides:
        apply_override(cfg, override)

    errors = sorted(_Validator(SCHEMA).iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        error = jsonschema.exceptions.best_match(errors)
        while error.parent is not None:  # best_match descends into anyOf's alternatives: name them all
            error = error.parent
        raise ValueError(_describe(error))

    method = cfg["method"]
    for key, default in strategies.defaults(method["name"]).items():
        if method[key] is None:  # the schema's null: the method's own default
            method[key] = default
    if cfg["tags"]["lr_mode"] is None:
        cfg["tags"]["lr_mode"] = "calibrated" if cfg["optimizer"]["lr"] == "calibrated" else "equal"
    _check_consistency(cfg)
    return cfg


def _check_consistency(cfg: dict) -> None:
    if cfg["optimizer"]["lr"] == "calibrated" and not cfg["calibration"]:
        raise ValueError("optimizer.lr: 'calibrated' needs calibration: <path of a `fedsq calibrate` JSON>")
    cpr, n = cfg["clients_per_round"], cfg["split"]["num_clients"]
    if cpr is not None and cpr > n:
        raise ValueError(f"clients_per_round: {cpr} is more than split.num_clients ({n})")


def resolve_lr(cfg: dict) -> tuple[float, str]:
    """(learning rate, where it came from): the config's number, or the calibration JSON's pick."""
    lr = cfg["optimizer"]["lr"]
    if lr != "calibrated":
        return float(lr), "config"
    path = Path(cfg["calibration"])
    result = json.loads(path.read_text())
    if result.get("method") != cfg["method"]["name"]:
        # Each method is calibrated in its own model form; borrowing another's lr is unfair.
        raise ValueError(
            f"calibration: {path} was calibrated for method {result.get('method')!r}, not {cfg['method']['name']!r}"
        )
    return float(result["lr"]), f"calibrated ({result['mode']}, {path})"


def flatten(cfg: dict, prefix: str = "") -> dict[str, Any]:
    """Dotted keys (``split.alpha``) for MLflow params; lists stay whole."""
    flat: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat

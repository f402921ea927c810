"""Configuration as plain trees: ``section.key=value`` overrides, flattening, sweep grids, error messages.

The pieces of :mod:`vggflow.config` that work on YAML-shaped dicts rather than on the models.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import yaml
from pydantic import ValidationError

from vggflow.errors import ConfigError


def sweep_grid(specs: list[str]) -> list[dict[str, Any]]:
    """``--sweep KEY=[V1, V2, …]`` options → every combination of their values (one configuration each).

    Values are YAML; a value that is not a list is the only choice for its key.

    Raises:
        ConfigError: a spec is not ``key=value``.
    """
    axes = []
    for spec in specs:
        path, values = parse_override(spec, f"--sweep {spec}")
        axes.append([(".".join(path), value) for value in (values if isinstance(values, list) else [values])])
    return [dict(combination) for combination in itertools.product(*axes)] if axes else []


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(tree, list):
        out = {}
        for index, value in enumerate(tree):
            out.update(flatten(value, f"{prefix}{index}."))
        return out
    return {prefix[:-1]: tree}


def parse_override(text: str, origin: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{origin}: expected section.key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"{origin}: cannot parse the value of {key!r}: {err}") from None
    return key.strip().split("."), value


def apply_override(tree: dict[str, Any], path: list[str], value: Any, origin: str, defaults: dict[str, Any]) -> None:
    """Set ``path`` in ``tree``; a part the tree lacks is filled from ``defaults`` first.

    So ``finetune.stages.0.learning_rate=…`` works without a config file: the default stage
    list is copied in and only that value changes.
    """
    node: Any = tree
    default: Any = defaults
    for depth, part in enumerate(path[:-1]):
        where = ".".join(path[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{origin}: {where} is not an item of that list")
            node, default = node[int(part)], None
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{origin}: {'.'.join(path[:depth])} is a value, not a section")
        default = default.get(part) if isinstance(default, dict) else None
        if part not in node:
            node[part] = copy.deepcopy(default) if isinstance(default, (dict, list)) else {}
        node = node[part]
    last = path[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"{origin}: {'.'.join(path)} is not an item of that list")
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"{origin}: {'.'.join(path[:-1])} is a value, not a section")


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for problem in err.errors():
        where = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        message = problem["msg"]
        if problem["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; `vggflow config` prints every valid key)"
        given = problem.get("input")
        shown = f" (got {given!r})" if given is not None and not isinstance(given, dict) else ""
        lines.append(f"  - {where}: {message}{shown}")
    return "\n".join(lines)

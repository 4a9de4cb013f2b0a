"""Recipes: a run's options in a YAML file, as axolotl, LLaMA-Factory and torchtune users keep them.

A recipe holds `controlllm train` options by their field names (`TrainConfig`; dashes or
underscores), optionally with the Control options in a `control:` section::

    # recipe.yaml
    model: models/SmolLM2-135M-Instruct
    data: faq_train.jsonl
    eval_data: faq_val.jsonl
    task: sft
    max_steps: 200
    lr: 1.0e-4
    mix_data: keep.txt
    mix_ratio: 0.1
    control:
      preset: recommended
      num_expanded_layers: 8
      alignment_loss: nmse

`controlllm train --config recipe.yaml --lr 3e-4` takes every value from the file and lets the
flags given on the command line override it. Paths are used as written (relative ones from the
current directory, as flags are). Numbers may be written `1e-4`: YAML 1.1 reads that as a string,
so fields that hold numbers convert such strings.

Unknown keys are refused with the allowed names, and each value is checked against its field's
type, so a typo fails before anything loads.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable

from ..errors import UserError

#: The section of a recipe that may hold the Control options (`CONTROL_SECTION_FIELDS`).
CONTROL_SECTION = "control"


class RecipeError(UserError, ValueError):
    """A recipe file cannot be read or holds a value that is not allowed."""


def _options():
    try:  # the options without the training stack (no torch import)
        from . import options
    except ImportError:
        from . import train as options
    return options


def _train_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(_options().TrainConfig)}


def _control_section_fields() -> tuple[str, ...]:
    return ("preset", *_options().CONTROL_FIELDS)


def _kind(field: dataclasses.Field) -> str:
    """The field's value kind from its annotation (a string under `from __future__ import annotations`)."""
    annotation = str(field.type).replace("typing.", "").replace(" ", "")
    for kind in ("list[int]", "bool", "int", "float", "str"):
        if annotation.startswith(kind) or f"|{kind}" in annotation or annotation.startswith(f"Optional[{kind}"):
            return kind
    return "any"


def _optional(field: dataclasses.Field) -> bool:
    return "None" in str(field.type) or "Optional" in str(field.type)


def _convert(value: Any, field: dataclasses.Field, where: str) -> Any:
    """`value` as the field's type holds it, or a RecipeError naming the key, the value and what is allowed."""
    kind = _kind(field)
    if value is None:
        if _optional(field):
            return None
        raise RecipeError(f"{where}: {field.name} cannot be empty (null); allowed: a {kind} value")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{where}: {field.name} must be true or false, got {value!r}")
    if kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise RecipeError(f"{where}: {field.name} must be an integer, got {value!r}")
    if kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise RecipeError(f"{where}: {field.name} must be a number, got {value!r}")
    if kind == "list[int]":
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return list(value)
        raise RecipeError(f"{where}: {field.name} must be a list of integers (e.g. [2, 5, 8]), got {value!r}")
    if kind == "str":
        if isinstance(value, str):
            return value
        raise RecipeError(f"{where}: {field.name} must be a string, got {value!r}")
    return value


def _names(keys: Iterable[str]) -> str:
    return ", ".join(sorted(keys))


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML recipe and return `{TrainConfig field: value}` for every key it sets.

    Keys are `TrainConfig` field names (`max_steps` or `max-steps`); a `control:` mapping may hold
    `preset` and the Control options (`controlllm.training.options.CONTROL_FIELDS`), which are merged
    in. Values are checked against their field's type (numbers given as strings such as `1e-4` are
    converted). The result feeds `TrainConfig(**values)` or a parser's defaults, so flags given on the
    command line override the file.

    Raises:
        RecipeError: the file is missing or is not YAML, its top level is not a mapping, a key is
            unknown (the message lists the allowed names), a key is given twice, or a value has the
            wrong type.
    """
    import yaml

    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise RecipeError(f"recipe file {path} does not exist") from None
    except OSError as err:
        raise RecipeError(f"cannot read recipe file {path}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"recipe file {path} is not valid UTF-8; save it as UTF-8") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError(f"recipe file {path} is not valid YAML{line}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe file {path} must hold a mapping of option names to values (e.g. 'lr: 1.0e-4'), "
                          f"got a {type(data).__name__}")
    fields = _train_fields()
    control_fields = _control_section_fields()
    values: dict[str, Any] = {}

    def take(key: Any, value: Any, allowed: Iterable[str], where: str) -> None:
        name = str(key).replace("-", "_")
        allowed = tuple(allowed)
        if name not in allowed:
            raise RecipeError(f"{where}: unknown key {str(key)!r}; allowed: {_names(allowed)}")
        if name in values:
            raise RecipeError(f"{where}: {name} is given twice (at the top level and under '{CONTROL_SECTION}:', "
                              "or with both dashes and underscores); keep one")
        values[name] = _convert(value, fields[name], where)

    top_allowed = (*fields, CONTROL_SECTION, *COMMAND_SECTIONS)
    for key, value in data.items():
        if str(key) in COMMAND_SECTIONS:
            continue  # the options of `controlllm dial` / `compare` (`command_section`)
        if str(key) == CONTROL_SECTION:
            if not isinstance(value, dict):
                raise RecipeError(f"{path}: '{CONTROL_SECTION}:' must be a mapping of Control options, got "
                                  f"{type(value).__name__}; allowed keys: {_names(control_fields)}")
            for sub_key, sub_value in value.items():
                take(sub_key, sub_value, control_fields, f"{path}: {CONTROL_SECTION}")
        else:
            take(key, value, top_allowed, path)
    return values


# Sections of a recipe for the other commands that read it: `controlllm dial --config` and
# `controlllm compare --config` take their options from these (flags override them).
COMMAND_SECTIONS = ("dial", "compare")


def command_section(path: str | os.PathLike, command: str, allowed: Iterable[str]) -> dict[str, Any]:
    """The options of `command` ('dial' or 'compare') in a recipe file: its section (`dial:` ...),
    keys as the command's flags (dashes or underscores), values as YAML gives them; an unknown key
    is refused with the allowed names. {} when the file has no such section."""
    import yaml

    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise RecipeError(f"recipe file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise RecipeError(f"cannot read recipe file {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe file {path} must hold a mapping, got a {type(data).__name__}")
    section = data.get(command) or {}
    if not isinstance(section, dict):
        raise RecipeError(f"{path}: '{command}:' must be a mapping of its options, got {type(section).__name__}")
    allowed = tuple(allowed)
    values = {}
    for key, value in section.items():
        name = str(key).replace("-", "_")
        if name not in allowed:
            raise RecipeError(f"{path}: {command}: unknown key {str(key)!r}; allowed: {_names(allowed)}")
        values[name] = value
    return values


__all__ = ["COMMAND_SECTIONS", "CONTROL_SECTION", "RecipeError", "command_section", "load_recipe"]

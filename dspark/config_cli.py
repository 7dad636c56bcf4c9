"""Command-line flags generated from the pydantic config models, so a config field and its flag cannot drift.

Every field of a command's config becomes a flag named after its path (`engine.verification.policy` becomes
`--verification-policy` when `engine` is flattened), typed, with the field's description and default as
help. A command reads `--config FILE.yaml` first, then applies the flags given, then validates the result
with the model: one merge, one validation, whatever the command.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

_DEST = "config:"  # namespace attributes holding config overrides are named config:<dotted path>
M = TypeVar("M", bound=BaseModel)


def add_config_flags(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    *,
    flatten: Collection[str] = (),
    skip: Collection[str] = (),
    config_file: bool = True,
) -> None:
    """Add a flag for every (nested) field of `model`; nested models named in `flatten` contribute their
    fields without a prefix. Fields in `skip` (dotted paths) get no flag."""
    if config_file:
        parser.add_argument("--config", default=None, help=f"YAML file validated as {model.__name__} "
                            "(flags override it)")  # fmt: skip
    seen: dict[str, str] = {}
    _add_fields(parser, model, _default_instance(model), [], set(flatten), set(skip), seen)


def config_from_args(model: type[M], args: argparse.Namespace, **required: Any) -> M:
    """The model's defaults, overlaid with the YAML file (if any), then the flags given; validated.

    Overlaying keeps nested defaults: `--proposer ngram` on a command whose default engine has 8 slots
    changes the proposer, not the slots. `required` fills required fields that are not flags (a prompt)."""
    base = _default_instance(model, required)
    values = base.model_dump() if base is not None else dict(required)
    path = getattr(args, "config", None)
    if path:
        _merge(values, yaml.safe_load(Path(path).read_text()) or {})
    for dest, value in vars(args).items():
        if dest.startswith(_DEST):
            _set_path(values, dest[len(_DEST) :].split("."), value)
    return model.model_validate(values)


def _default_instance(model: type[BaseModel], required: dict | None = None) -> BaseModel | None:
    try:
        return model(**(required or {}))
    except Exception:  # required fields: defaults then come from each field's own default
        return None


def _merge(values: dict, overlay: dict) -> None:
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            _merge(values[key], value)
        else:
            values[key] = value


def _add_fields(parser, model, defaults, prefix, flatten, skip, seen) -> None:
    for name, field in model.model_fields.items():
        path = [*prefix, name]
        dotted = ".".join(path)
        if dotted in skip:
            continue
        default = getattr(defaults, name) if defaults is not None else _field_default(field)
        annotation = _unwrap(field.annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            _add_fields(parser, annotation, default, path, flatten, skip, seen)
            continue
        flag = "--" + "-".join(p for p in path if p not in flatten).replace("_", "-")
        if flag in seen:
            raise ValueError(f"{flag} would stand for both {seen[flag]} and {dotted}")
        seen[flag] = dotted
        kwargs = _argument(annotation)
        if kwargs is None:
            continue  # a type no flag can express (a mapping): set it in the YAML file
        if "choices" not in kwargs and "action" not in kwargs:
            kwargs["metavar"] = name.upper()
        description = field.description or ""
        shown = _show(default) if field.repr else "hidden"  # repr=False marks a secret (an API key)
        kwargs["help"] = f"{description} (default: {shown})".strip()
        parser.add_argument(flag, dest=_DEST + dotted, default=argparse.SUPPRESS, **kwargs)


def _field_default(field: FieldInfo) -> Any:
    return None if field.is_required() else field.get_default(call_default_factory=True)


def _unwrap(annotation: Any) -> Any:
    """X | None -> X; Annotated[X, ...] -> X."""
    if get_origin(annotation) is typing.Annotated:
        return _unwrap(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return _unwrap(members[0])
    return annotation


def _argument(annotation: Any) -> dict | None:
    origin = get_origin(annotation)
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is list:
        item = _argument(_unwrap(get_args(annotation)[0]))
        if item is None or "action" in item:
            return None
        return {**item, "nargs": "*"}
    if origin is Literal:
        choices = list(get_args(annotation))
        return {"choices": choices, "type": type(choices[0])}
    if annotation in (int, float, str):
        return {"type": annotation}
    if annotation is Path:
        return {"type": str}
    return None


def _show(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(map(str, value)) or "none"
    return str(value)


def _set_path(values: dict, path: list[str], value: Any) -> None:
    for key in path[:-1]:
        if values.get(key) is None:  # an optional section that is off by default (grpc_tls) comes on
            values[key] = {}
        values = values[key]
    values[path[-1]] = value

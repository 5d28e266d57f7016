"""Typed parameters rendered as command-line flags, defined once on a pydantic model.

The fields of a model (a stage's request, ``PreprocessParams``, the pipeline's run form), with their
types, defaults and descriptions, are the parameters; ``add_arguments`` makes one argparse flag per
field, ``from_args`` reads them back into the model, and ``to_args`` renders a model as the flags that
give it back (for a launcher that runs a stage in another process). A field renders as
``--<name>``; ``Annotated[..., Cli(...)]`` changes the flag, adds aliases or makes it positional.
``bool`` fields take ``--flag`` or ``--flag true|false``; ``list`` fields repeat the flag; ``Literal``
fields offer their choices; ``dict`` fields take ``KEY.PATH=VALUE`` (the value read as YAML, as
``gpt2core.config.parse_override`` does); fields of a nested model are flattened into flags of their
own names.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_core import PydanticUndefined

from gpt2core.config import parse_override
from gpt2core.errors import ConfigError

ModelT = TypeVar("ModelT", bound=BaseModel)


@dataclass(frozen=True)
class Cli:
    """How a field appears on the command line when not simply as ``--<field name>``."""

    flags: tuple[str, ...] = ()  # the flag first, then aliases
    positional: bool = False
    metavar: str | None = None
    json: bool = False  # a dict or list field given as one JSON value (not repeated KEY=VALUE flags)


class Parameters(BaseModel):
    """Base of the models whose fields are parameters (stage requests, ``PreprocessParams``, the run
    form): immutable, unknown fields refused, and a bad value is one ConfigError line,
    ``<prefix><field>=<value>: <what was expected>``, not pydantic's multi-line report."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    error_prefix: ClassVar[str] = ""  # e.g. "parameter " for the run form

    @model_validator(mode="wrap")
    @classmethod
    def _one_line_errors(cls, data: Any, handler: Any) -> Any:
        try:
            return handler(data)
        except ValidationError as exc:
            raise ConfigError(cls.error_prefix + validation_message(exc)) from None


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, model: type[BaseModel]) -> None:
    """One flag per field of ``model`` (nested models flattened); unset flags keep the defaults."""
    for name, field in model.model_fields.items():
        nested = _nested_model(field.annotation)
        if nested is not None:
            add_arguments(parser, nested)
            continue
        cli = _cli(field)
        kwargs: dict[str, Any] = {"help": _help(field), "default": argparse.SUPPRESS}
        base, choices = _base_type(field.annotation)
        if cli.json:
            kwargs.update(type=_json_of(base, (cli.flags or (f"--{name}",))[0]), metavar="JSON")
        elif base is dict:
            kwargs.update(action="append", metavar=cli.metavar or "KEY.PATH=VALUE", type=_override)
        elif base is list:
            kwargs.update(action="append", metavar=cli.metavar)
        elif base is bool:
            kwargs.update(type=_bool, nargs="?", const=True, metavar="true|false")
        else:
            kwargs.update(type=base, choices=choices, metavar=cli.metavar)
        if cli.positional:
            kwargs.pop("metavar", None)
            parser.add_argument(name, nargs=None if field.is_required() else "?", **kwargs)
        else:
            parser.add_argument(*(cli.flags or (f"--{name}",)), dest=name, required=field.is_required(), **kwargs)


def from_args(model: type[ModelT], args: argparse.Namespace) -> ModelT:
    """The ``model`` the parsed flags describe (see ``add_arguments``)."""
    return model(**_values(model, args))


def to_args(instance: BaseModel) -> list[str]:
    """The flags that give back an equal model through ``from_args``: the explicitly set fields only,
    so the reader applies the same defaults."""
    args: list[str] = []
    for name, field in type(instance).model_fields.items():
        if name not in instance.model_fields_set:
            continue
        value = getattr(instance, name)
        if isinstance(value, BaseModel):
            args += to_args(value)
            continue
        if value is None:
            continue
        cli = _cli(field)
        flag = _flag(name, field)
        if cli.json:
            args += [flag, json.dumps(value)]
        elif isinstance(value, dict):
            for key, item in value.items():
                args += [flag, f"{key}={yaml_value(item)}"]
        elif isinstance(value, (list, tuple)):
            for item in value:
                args += [flag, str(item)]
        elif cli.positional:
            args.append(str(value))
        else:
            args += [flag, str(value).lower() if isinstance(value, bool) else str(value)]
    return args


def flag_for(model: type[BaseModel], name: str) -> str:
    """The flag that sets field ``name`` of ``model`` (its first one, e.g. ``--include`` for the run
    form's ``source_include``)."""
    return _flag(name, model.model_fields[name])


def validation_message(exc: ValidationError) -> str:
    """pydantic's first error as one line: ``<dotted field>=<value>: <what was expected>``."""
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"]) or exc.title
    if error["type"] == "missing":
        return f"{where}: missing (a required parameter)"
    got = repr(error.get("input"))
    return f"{where}={got if len(got) <= 80 else got[:77] + '...'}: {error['msg']}"


def yaml_value(value: Any) -> str:
    """``value`` as YAML that ``parse_override`` reads back equal (a string that looks like a number
    or a boolean stays a string)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def _values(model: type[BaseModel], args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        nested = _nested_model(field.annotation)
        if nested is not None:
            values[name] = nested(**_values(nested, args))
        elif hasattr(args, name):
            value = getattr(args, name)
            repeated_pairs = _base_type(field.annotation)[0] is dict and not _cli(field).json
            values[name] = dict(value) if repeated_pairs else value
    return values


def _flag(name: str, field) -> str:  # noqa: ANN001 - pydantic FieldInfo
    return (_cli(field).flags or (f"--{name}",))[0]


def _cli(field) -> Cli:  # noqa: ANN001 - pydantic FieldInfo
    return next((m for m in field.metadata if isinstance(m, Cli)), Cli())


def _help(field) -> str:  # noqa: ANN001 - pydantic FieldInfo
    text = (field.description or "").replace("%", "%%")
    if field.default not in (None, PydanticUndefined) and not isinstance(field.default, (dict, list)):
        text += f" (default: {field.default})"
    return text


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _base_type(annotation: Any) -> tuple[Any, tuple[Any, ...] | None]:
    """(the type argparse converts to, the choices) of a field annotation: Optional and Annotated
    unwrapped; Literal -> (the values' type, the values); list/tuple -> list; dict -> dict."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _base_type(args[0])
    if origin in (Union, types.UnionType):
        return _base_type(next(a for a in args if a is not type(None)))
    if origin is Literal:
        return type(args[0]), args
    if origin in (list, tuple):
        return list, None
    if origin is dict:
        return dict, None
    return annotation, None


def _json_of(expected: type, flag: str):  # noqa: ANN202 - an argparse type function
    def parse(text: str) -> Any:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"{flag}: not valid JSON ({exc})") from None
        if not isinstance(value, expected):
            raise argparse.ArgumentTypeError(f"{flag}: expected a JSON {'object' if expected is dict else 'list'}")
        return value
    return parse


def _override(text: str) -> tuple[str, Any]:
    """``parse_override`` as an argparse type: a bad override is argparse's one-line error."""
    try:
        return parse_override(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _bool(value: str) -> bool:
    lowered = str(value).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")

"""A KFP pipeline function whose parameters are the fields of a pydantic model.

KFP reads a pipeline's parameters from its function's signature (name, type annotation, default) and
their descriptions from the docstring's Args section, then calls it with one placeholder per
parameter, in order. ``kfp_signature(body, Model)`` gives ``body(*values)`` that signature and
docstring, so the run form is defined once (``gpt2core.pipeline_parameters.PipelineParameters``).
"""

from __future__ import annotations

import functools
import inspect
import textwrap
import typing
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel


def kfp_type(annotation: Any) -> type:
    """The KFP parameter type of a field annotation: str, int, float, bool, dict or list."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return type(args[0])
    if origin in (dict, list):
        return origin
    if annotation in (str, int, float, bool, dict, list):
        return annotation
    raise TypeError(f"no KFP parameter type for {annotation!r}")


def kfp_signature(body: Callable[..., Any], model: type[BaseModel]) -> Callable[..., Any]:
    """``body`` (taking one positional value per field of ``model``) as a function with the
    signature and docstring KFP reads: ``<field>: <type> = <default>``, described in Args."""
    parameters = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                    annotation=kfp_type(field.annotation), default=field.get_default(
                                        call_default_factory=True))
                  for name, field in model.model_fields.items()]

    @functools.wraps(body)
    def pipeline(*values: Any) -> Any:
        return body(*values)

    pipeline.__signature__ = inspect.Signature(parameters)
    pipeline.__annotations__ = {p.name: p.annotation for p in parameters}
    summary = inspect.getdoc(body).split("\n\n")[0]
    args = "\n".join(textwrap.fill(f"{name}: {field.description}", width=96, initial_indent="    ",
                                   subsequent_indent="        ")
                     for name, field in model.model_fields.items())
    pipeline.__doc__ = f"{summary}\n\nArgs:\n{args}\n"
    del pipeline.__wrapped__  # inspect.signature would follow it back to body's
    return pipeline

"""Offline schema check of Argo objects: Hera's generated models of Argo's API (hera.workflows.models)."""

from __future__ import annotations

import json

from hera.workflows import models as m

MODELS = {"WorkflowTemplate": m.WorkflowTemplate, "CronWorkflow": m.CronWorkflow, "Workflow": m.Workflow}


def validate_argo_object(obj: dict) -> None:
    """``obj`` survives a round trip through Hera's model of its kind unchanged: no unknown or
    misspelt field, every value of the right type (AssertionError or pydantic's ValidationError)."""
    assert obj["apiVersion"] == "argoproj.io/v1alpha1", obj["apiVersion"]
    model = MODELS[obj["kind"]]
    round_trip = json.loads(model.model_validate(obj).model_dump_json(by_alias=True, exclude_none=True))
    assert round_trip == json.loads(json.dumps(obj)), (
        f"{obj['kind']} {obj['metadata']['name']} changed in a round trip through Hera's Argo models: a field "
        "is misspelt, unknown or of the wrong type")

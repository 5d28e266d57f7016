"""`gpt2ops argo render | submit | schedule` against a local HTTP server that speaks the Argo
server's REST API (the few endpoints the commands call), recording each request; no Argo server can
run here. The error cases: unreachable server, rejected token, forbidden namespace, missing template,
bad parameter or schedule, an existing CronWorkflow: one line naming it, exit 2.
"""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler
from urllib.parse import urlparse

import pytest
import yaml
from hera.workflows import models as m
from argo_schema import validate_argo_object

from gpt2core.cli import main
from pipelines import argo_workflow

TOKEN = "v2:secret-token"
NAMESPACE = "ml-team"


class FakeArgoServer(BaseHTTPRequestHandler):
    """GET /api/v1/workflow-templates/{ns}/{name}, POST /api/v1/workflows/{ns}/submit,
    POST /api/v1/cron-workflows/{ns}; bearer-token auth; errors as the Argo server sends them
    (grpc-gateway JSON: code and message)."""

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        path = urlparse(self.path).path
        self.server.requests.append({"method": self.command, "path": path, "json": body,
                                     "authorization": self.headers.get("Authorization")})
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._reply(401, {"code": 16, "message": "token not valid. see https://argo-workflows."
                                                            "readthedocs.io/en/latest/faq/"})
        parts = path.strip("/").split("/")
        if parts[:3] == ["api", "v1", "workflow-templates"] and self.command == "GET":
            namespace, name = parts[3], parts[4]
            if namespace in self.server.forbidden:
                return self._reply(403, {"code": 7, "message": f'workflowtemplates.argoproj.io "{name}" is '
                                                               f'forbidden: User cannot get resource'})
            if (namespace, name) not in self.server.templates:
                return self._reply(404, {"code": 5, "message": f'workflowtemplates.argoproj.io "{name}" not found'})
            return self._reply(200, self.server.templates[namespace, name])
        if parts[:3] == ["api", "v1", "workflows"] and parts[-1] == "submit" and self.command == "POST":
            options = body.get("submitOptions", {})
            for parameter in options.get("parameters", []):
                name, _, value = parameter.partition("=")
                if name == "target" and value not in ("cpu", "gpu", "cerebras"):
                    return self._reply(400, {"code": 3, "message": f"{value} is not one of the enum values"})
            return self._reply(200, {"metadata": {"name": options.get("generateName", "wf-") + "x7k2p",
                                                  "namespace": parts[3]}, "spec": {}})
        if parts[:3] == ["api", "v1", "cron-workflows"] and self.command == "POST":
            cron = body["cronWorkflow"]
            if cron["metadata"]["name"] in self.server.crons:
                return self._reply(409, {"code": 6, "message": f'cronworkflows.argoproj.io '
                                                               f'"{cron["metadata"]["name"]}" already exists'})
            self.server.crons.add(cron["metadata"]["name"])
            return self._reply(200, {**cron, "metadata": {**cron["metadata"], "namespace": parts[3]}})
        return self._reply(404, {"code": 5, "message": "Not Found"})

    do_GET = do_POST = _handle  # noqa: N815 - http.server naming

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def argo_api(http_server):
    server = http_server(FakeArgoServer)
    server.requests, server.forbidden, server.crons = [], set(), set()
    installed = argo_workflow.manifest(argo_workflow.workflow_template())
    installed["metadata"]["namespace"] = NAMESPACE
    server.templates = {(NAMESPACE, argo_workflow.TEMPLATE_NAME): installed}
    return server


@pytest.fixture
def argo_env(argo_api, monkeypatch) -> str:
    """The server as Argo's CLI is pointed at it: ARGO_SERVER (host:port), plain HTTP, token, namespace."""
    for name in ("ARGO_BASE_HREF", "ARGO_INSECURE_SKIP_VERIFY", "ARGO_HTTP1"):
        monkeypatch.delenv(name, raising=False)
    host = f"127.0.0.1:{argo_api.server_address[1]}"
    monkeypatch.setenv("ARGO_SERVER", host)
    monkeypatch.setenv("ARGO_SECURE", "false")
    monkeypatch.setenv("ARGO_TOKEN", TOKEN)
    monkeypatch.setenv("ARGO_NAMESPACE", NAMESPACE)
    return host


def sent(argo_api, method: str, prefix: str) -> list[dict]:
    return [r for r in argo_api.requests if r["method"] == method and r["path"].startswith(prefix)]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_render_writes_the_template_and_the_cron_workflow(tmp_path, capsys):
    assert main(["argo", "render", "--output", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / name) for name in argo_workflow.RENDERED]
    for name in argo_workflow.RENDERED:
        validate_argo_object(yaml.safe_load((tmp_path / name).read_text()))


def test_submit_runs_the_template_with_only_the_given_parameters(argo_api, argo_env, capsys):
    code = main(["argo", "submit", "--params", "gpt2_small", "--target", "gpu", "--num_gpus", "8",
                 "--node_selector", '{"pool": "h100"}', "--max_steps", "1000"])
    assert code == 0
    (check,) = sent(argo_api, "GET", "/api/v1/workflow-templates/")
    assert check["path"] == f"/api/v1/workflow-templates/{NAMESPACE}/{argo_workflow.TEMPLATE_NAME}"
    (submit,) = sent(argo_api, "POST", "/api/v1/workflows/")
    assert submit["path"] == f"/api/v1/workflows/{NAMESPACE}/submit"
    assert submit["authorization"] == f"Bearer {TOKEN}"  # "Bearer " added to a bare ARGO_TOKEN
    request = m.WorkflowSubmitRequest.model_validate(submit["json"])
    assert request.resource_kind == "WorkflowTemplate" and request.resource_name == argo_workflow.TEMPLATE_NAME
    assert request.submit_options.parameters == [
        "params=gpt2_small", "target=gpu", "num_gpus=8", 'node_selector={"pool": "h100"}', "max_steps=1000"]
    assert (f"submitted workflow {argo_workflow.TEMPLATE_NAME}-x7k2p (namespace {NAMESPACE}): "
            f"http://{argo_env}/workflows/{NAMESPACE}/{argo_workflow.TEMPLATE_NAME}-x7k2p") in capsys.readouterr().out


def test_submit_from_flags_and_without_the_cache(argo_api, argo_env, monkeypatch):
    for name in ("ARGO_SERVER", "ARGO_TOKEN", "ARGO_NAMESPACE", "ARGO_SECURE"):
        monkeypatch.delenv(name)
    code = main(["argo", "submit", "--host", f"http://{argo_env}", "--token", f"Bearer {TOKEN}",
                 "--namespace", NAMESPACE, "--no_cache", "--source", "s3://b/new.jsonl"])
    assert code == 0
    (submit,) = sent(argo_api, "POST", "/api/v1/workflows/")
    # a new source drops the default source's file selection and checksum, as `pipeline submit` does
    assert submit["json"]["submitOptions"]["parameters"] == [
        "source=s3://b/new.jsonl", "source_include=", "source_sha256=", "memoize=false"]


def test_schedule_creates_a_cron_workflow_from_the_template(argo_api, argo_env, capsys):
    code = main(["argo", "schedule", "--cron", "15 2 * * 1", "--timezone", "Europe/Berlin",
                 "--source", "https://example.org/fresh.jsonl", "--name", "weekly"])
    assert code == 0
    (create,) = sent(argo_api, "POST", "/api/v1/cron-workflows/")
    assert create["path"] == f"/api/v1/cron-workflows/{NAMESPACE}"
    cron = create["json"]["cronWorkflow"]
    validate_argo_object({"apiVersion": "argoproj.io/v1alpha1", "kind": "CronWorkflow", **cron})
    assert cron["metadata"]["name"] == "weekly"
    spec = cron["spec"]
    assert spec["schedules"] == ["15 2 * * 1"] and spec["timezone"] == "Europe/Berlin"
    assert spec["concurrencyPolicy"] == "Forbid" and spec["startingDeadlineSeconds"] > 0
    assert spec["workflowSpec"]["workflowTemplateRef"] == {"name": argo_workflow.TEMPLATE_NAME}
    assert spec["workflowSpec"]["arguments"]["parameters"] == [
        {"name": "source", "value": "https://example.org/fresh.jsonl"}, {"name": "source_include", "value": ""},
        {"name": "source_sha256", "value": ""}, {"name": "memoize", "value": "false"}]
    assert "created CronWorkflow weekly (15 2 * * 1, Europe/Berlin" in capsys.readouterr().out


def test_an_unreachable_server_is_one_line(argo_env, monkeypatch, capsys):
    monkeypatch.setenv("ARGO_SERVER", "127.0.0.1:9")  # nothing listens on the discard port
    assert main(["argo", "submit"]) == 2
    err = one_error_line(capsys)
    assert "cannot reach the Argo server at http://127.0.0.1:9/" in err and "Connection refused" in err


def test_https_by_default_as_argos_cli(argo_env, monkeypatch, capsys):
    monkeypatch.delenv("ARGO_SECURE")
    assert main(["argo", "submit"]) == 2  # the fake server speaks plain HTTP only
    assert f"https://{argo_env}/" in one_error_line(capsys)


def test_a_rejected_token_is_one_line(argo_api, argo_env, monkeypatch, capsys):
    monkeypatch.setenv("ARGO_TOKEN", "expired")
    assert main(["argo", "submit"]) == 2
    err = one_error_line(capsys)
    assert "rejected the token (401: token not valid" in err and "ARGO_TOKEN" in err
    assert sent(argo_api, "POST", "/api/v1/workflows/") == []


def test_a_forbidden_namespace_is_one_line(argo_api, argo_env, capsys):
    argo_api.forbidden.add("other")
    assert main(["argo", "schedule", "--namespace", "other"]) == 2
    assert "does not let this token read WorkflowTemplate 'gpt2ops-pretrain' in namespace 'other' (403" in (
        one_error_line(capsys))


@pytest.mark.parametrize("action", ["submit", "schedule"])
def test_a_missing_template_is_one_line(argo_api, argo_env, capsys, action):
    assert main(["argo", action, "--template", "gpt2ops-nope"]) == 2
    err = one_error_line(capsys)
    assert f"no WorkflowTemplate 'gpt2ops-nope' in namespace '{NAMESPACE}'" in err
    assert "kubectl apply -k k8s/overlays/argo" in err
    assert sent(argo_api, "POST", "/api/") == []


@pytest.mark.parametrize("argv, message", [
    (["argo", "schedule", "--cron", "daily"], "--cron: expected 5 space-separated fields"),
    (["argo", "schedule", "--timezone", "Mars/Olympus"], "--timezone: 'Mars/Olympus' is not a time zone"),
])
def test_a_bad_schedule_is_one_line_before_anything_is_sent(argo_api, argo_env, capsys, argv, message):
    assert main(argv) == 2
    assert message in one_error_line(capsys)
    assert argo_api.requests == []


def test_a_bad_parameter_is_refused_before_anything_is_sent(argo_api, argo_env, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["argo", "submit", "--target", "tpu"])
    assert exited.value.code == 2
    assert "argument --target: invalid choice: 'tpu'" in capsys.readouterr().err
    assert argo_api.requests == []


def test_a_parameter_the_server_refuses_is_one_line(argo_api, argo_env, monkeypatch, capsys):
    from pipelines import argo_cli

    # a value the server's own checks refuse (here: its enum check), as sent past the client's
    monkeypatch.setattr(argo_cli, "pipeline_arguments", lambda args, **_: {"target": "tpu"})
    assert main(["argo", "submit"]) == 2
    assert "refused to submit a workflow from WorkflowTemplate 'gpt2ops-pretrain': 400: tpu is not one of" in (
        one_error_line(capsys))


def test_an_existing_cron_workflow_is_one_line(argo_api, argo_env, capsys):
    assert main(["argo", "schedule"]) == 0
    capsys.readouterr()
    assert main(["argo", "schedule"]) == 2
    err = one_error_line(capsys)
    assert "already exists" in err and "argo cron delete" in err


def test_no_server_given_is_one_line(monkeypatch, capsys):
    monkeypatch.delenv("ARGO_SERVER", raising=False)
    assert main(["argo", "submit"]) == 2
    assert "--host: no Argo server given" in one_error_line(capsys)


def test_server_url_follows_argos_environment(monkeypatch):
    from pipelines.argo_cli import server_url

    monkeypatch.delenv("ARGO_SECURE", raising=False)
    monkeypatch.delenv("ARGO_BASE_HREF", raising=False)
    assert server_url("argo.example.com:2746") == "https://argo.example.com:2746/"
    monkeypatch.setenv("ARGO_SECURE", "false")
    assert server_url("localhost:2746") == "http://localhost:2746/"
    monkeypatch.setenv("ARGO_BASE_HREF", "/argo/")
    assert server_url("https://proxy.example.com") == "https://proxy.example.com/argo/"
    monkeypatch.setenv("ARGO_SECURE", "maybe")
    from gpt2core.errors import ConfigError

    with pytest.raises(ConfigError, match="ARGO_SECURE: expected true or false"):
        server_url("localhost:2746")

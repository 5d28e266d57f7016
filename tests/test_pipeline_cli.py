"""`gpt2ops pipeline compile|upload|submit|schedule` and the flags of `gpt2ops run`.

No Kubernetes cluster here, so the KFP API server is the one thing faked: a tiny local HTTP server
answering the few v2beta1 REST endpoints the real `kfp.Client` calls, recording each request.
"""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from gpt2core.cli import main
from pipelines.cli import PACKAGE_PATH, kfp_cron


class FakeKfpApi(BaseHTTPRequestHandler):
    requests: list[dict]  # set per server

    def _reply(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self) -> dict:
        url = urlparse(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        entry = {"method": self.command, "path": url.path, "query": parse_qs(url.query), "raw": raw}
        if self.headers.get("Content-Type", "").startswith("application/json") and raw:
            entry["json"] = json.loads(raw)
        self.server.requests.append(entry)
        return entry

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        entry = self._record()
        if entry["path"] == "/apis/v2beta1/experiments":
            made = [r for r in self.server.requests if r["method"] == "POST"
                    and r["path"] == "/apis/v2beta1/experiments"]
            self._reply({"experiments": [{"experiment_id": "exp-1", **made[0]["json"]}]} if made
                        else {})
        elif entry["path"] == "/apis/v2beta1/pipelines":
            self._reply({"pipelines": [{"pipeline_id": "pl-1", "display_name": "gpt2ops-pretrain"}],
                         "total_size": 1})
        elif entry["path"] == "/apis/v2beta1/healthz":
            self._reply({"multi_user": False})
        else:
            self.send_error(404)

    def do_POST(self) -> None:  # noqa: N802
        entry = self._record()
        replies = {
            "/apis/v2beta1/experiments": lambda: {"experiment_id": "exp-1", **entry["json"]},
            "/apis/v2beta1/pipelines/upload": lambda: {
                "pipeline_id": "pl-1", "display_name": entry["query"]["name"][0]},
            "/apis/v2beta1/pipelines/upload_version": lambda: {
                "pipeline_id": entry["query"]["pipelineid"][0], "pipeline_version_id": "ver-1"},
            "/apis/v2beta1/runs": lambda: {"run_id": "run-1", **entry["json"]},
            "/apis/v2beta1/recurringruns": lambda: {"recurring_run_id": "rec-1", **entry["json"]},
        }
        if entry["path"] in replies:
            self._reply(replies[entry["path"]]())
        else:
            self.send_error(404)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def kfp_api(http_server):
    server = http_server(FakeKfpApi)
    server.requests = []
    return server


@pytest.fixture
def host(kfp_api, monkeypatch, tmp_path) -> str:
    monkeypatch.setenv("HOME", str(tmp_path))  # kfp.Client reads ~/.config/kfp/context.json
    return f"http://127.0.0.1:{kfp_api.server_address[1]}"


def posted(kfp_api, path: str) -> list[dict]:
    return [r for r in kfp_api.requests if r["method"] == "POST" and r["path"] == path]


def sent_spec(body: dict) -> dict:
    """The pipeline spec of a run request; the Kubernetes settings travel beside it."""
    assert "secretAsEnv" in json.dumps(body["pipeline_spec"]["platform_spec"])
    return body["pipeline_spec"]["pipeline_spec"]


def test_compile_writes_the_pipeline_spec(tmp_path, capsys):
    out = tmp_path / "p.yaml"
    assert main(["pipeline", "compile", "--output", str(out)]) == 0
    spec = next(yaml.safe_load_all(out.read_text()))
    assert spec["pipelineInfo"]["name"] == "gpt2ops-pretrain"
    assert str(out) in capsys.readouterr().out


def test_upload_then_upload_a_new_version(host, kfp_api):
    assert main(["pipeline", "upload", "--host", host]) == 0
    (upload,) = posted(kfp_api, "/apis/v2beta1/pipelines/upload")
    assert upload["query"]["name"] == ["gpt2ops-pretrain"]
    assert b"gpt2ops-pretrain" in upload["raw"] and b"exec-train" in upload["raw"]

    assert main(["pipeline", "upload", "--host", host, "--version", "v2"]) == 0
    (version,) = posted(kfp_api, "/apis/v2beta1/pipelines/upload_version")
    assert version["query"]["name"] == ["v2"] and version["query"]["pipelineid"] == ["pl-1"]


def test_submit_sends_the_spec_and_only_the_given_parameters(host, kfp_api, capsys):
    code = main(["pipeline", "submit", "--host", host, "--params", "gpt2_small", "--target", "gpu",
                 "--num_gpus", "8", "--node_selector", '{"pool": "h100"}', "--max_steps", "1000"])
    assert code == 0
    (run,) = posted(kfp_api, "/apis/v2beta1/runs")
    body = run["json"]
    assert body["experiment_id"] == "exp-1"
    assert sent_spec(body)["pipelineInfo"]["name"] == "gpt2ops-pretrain"
    assert body["runtime_config"]["parameters"] == {
        "params": "gpt2_small", "target": "gpu", "num_gpus": 8, "node_selector": {"pool": "h100"},
        "max_steps": 1000}
    assert "started run run-1" in capsys.readouterr().out


def test_schedule_creates_an_uncached_recurring_run(host, kfp_api, capsys):
    code = main(["pipeline", "schedule", "--host", host, "--cron", "0 3 * * 0",
                 "--source", "https://example.org/fresh.jsonl", "--job_name", "weekly"])
    assert code == 0
    (rec,) = posted(kfp_api, "/apis/v2beta1/recurringruns")
    body = rec["json"]
    assert body["display_name"] == "weekly"
    assert body["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 0"
    assert body["max_concurrency"] == "1" or body["max_concurrency"] == 1
    assert body["no_catchup"] is True
    # A new source drops the default source's file selection and checksum.
    assert body["runtime_config"]["parameters"] == {
        "source": "https://example.org/fresh.jsonl", "source_include": "", "source_sha256": ""}
    # Fresh data each time: every task of the spec has caching switched off.
    tasks = sent_spec(body)["root"]["dag"]["tasks"]
    assert tasks and all(not t.get("cachingOptions", {}).get("enableCache") for t in tasks.values())
    assert "created recurring run rec-1" in capsys.readouterr().out


def test_kfp_cron_accepts_five_or_six_fields():
    assert kfp_cron("*/15 * * * *") == "0 */15 * * * *"
    assert kfp_cron("30 0 3 * * 1") == "30 0 3 * * 1"


@pytest.mark.parametrize("argv, message", [
    (["pipeline", "submit"], "--host"),
    (["pipeline", "schedule", "--host", "http://127.0.0.1:9", "--cron", "daily"], "--cron"),
    (["pipeline", "upload", "--host", "http://127.0.0.1:9", "--package", "/nonexistent.yaml"],
     "--package"),
])
def test_bad_pipeline_arguments_name_the_flag(argv, message, capsys, monkeypatch):
    monkeypatch.delenv("KF_PIPELINES_ENDPOINT", raising=False)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_json_flag_is_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["pipeline", "submit", "--host", "http://x", "--tolerations", '{"key": "a"}'])
    assert "--tolerations: expected a JSON list" in capsys.readouterr().err


def test_committed_package_is_the_default(host, kfp_api):
    assert Path(PACKAGE_PATH).exists()
    assert main(["pipeline", "upload", "--host", host]) == 0
    (upload,) = posted(kfp_api, "/apis/v2beta1/pipelines/upload")
    assert Path(PACKAGE_PATH).read_bytes() in upload["raw"]


def test_submit_passes_multi_node_and_gpu_pool_parameters(host, kfp_api):
    code = main(["pipeline", "submit", "--host", host, "--target", "gpu", "--num_gpus", "8",
                 "--num_nodes", "4", "--gpu_node_selector", '{"pool": "h100"}',
                 "--gpu_tolerations", '[{"key": "gpu", "operator": "Exists"}]'])
    assert code == 0
    (run,) = posted(kfp_api, "/apis/v2beta1/runs")
    assert run["json"]["runtime_config"]["parameters"] == {
        "target": "gpu", "num_gpus": 8, "num_nodes": 4, "gpu_node_selector": {"pool": "h100"},
        "gpu_tolerations": [{"key": "gpu", "operator": "Exists"}]}

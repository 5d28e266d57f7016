"""The error promise, held for every command: a bad input ends in exit code 2 and one line that names
the key, file, URI or parameter at fault and what was expected; no traceback, no secret, no partial
artifact published, nothing already written lost.

``CASES`` is the catalogue: one row per bad input, ``gpt2ops <argv>`` run as a process of its own
(the real CLI and the real services: SeaweedFS for S3, sqlite for MLflow, local HTTP servers for
http sources and the KFP API, closed ports for unreachable endpoints). A row is a string of
arguments and the strings the error line must hold; both are formatted with the fields of
``World`` (the inputs made once per session). A new command's bad inputs are rows here, e.g.
``bad("argo render --params {missing}", "parameter params")``. The rows of one session run a few at
a time, each forked from a server that imported the CLI once (``tests/cli_forkserver.py``; a few
also run afresh as ``python -m gpt2core.cli`` to show both print the same), then each row is a test
of its own. No row trains: each fails on the check that must come before the work.

The run form (every parameter of ``PipelineParameters``) has its own table below, checked in
process through ``PipelineParameters(...).check()`` and through the start_run component's
body under kfp's executor, as KFP runs it (integers sent as ``5.0`` included).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from gpt2core.errors import ConfigError
from gpt2core.pipeline_parameters import PipelineParameters

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "pa55-w0rd-in-a-uri"  # put into endpoint URIs: it must never be printed
SESSION_COOKIE = "session=c00kie-of-a-login"  # a kfp context's cookie: never printed either
STAGE_COMMANDS = ("download", "preprocess", "validate", "compile", "train", "evaluate", "promote")
PARALLEL = 4  # subprocesses at once: most of a case's time is interpreter start and imports
ERROR_LINE = re.compile(r"^gpt2ops[\w ]*: error: ")

# A corpus in our own words: six short documents, long enough that a 34 % validation split of them
# holds whole sequences of 32 tokens.
DOCUMENTS = [
    "The harbour was quiet before dawn. Fishermen checked their nets by lantern light, and the gulls "
    "waited on the posts for the first boat to come back with its catch. Nobody spoke much; the tide "
    "would decide the day, as it always had.",
    "A good map leaves things out. It shows the roads you will take and the rivers you must cross, but "
    "not every stone on the way, because a map that showed everything would be as large as the land "
    "itself and of no use to anyone walking it.",
    "The library opened at nine. Students came in with wet umbrellas and found their usual tables, the "
    "ones near the windows where the light was best, and for a few hours the only sound was the turning "
    "of pages and the hum of the old radiators.",
    "Bread needs time more than skill. Flour, water, salt and a little yeast, left alone overnight in a "
    "cool kitchen, will do most of the work; the baker only has to shape the dough in the morning and "
    "keep the oven hot enough.",
    "When the power failed, the town went back a century in a minute. Candles came out of drawers, "
    "neighbours knocked on doors to ask if everyone was fine, and children stayed up late listening to "
    "stories their grandparents had almost forgotten.",
    "Mountains make their own weather. A clear morning in the valley can turn into fog on the pass by "
    "noon, so walkers who know the hills carry a coat even in summer and start early, long before the "
    "clouds gather on the summit.",
]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(handler: type[BaseHTTPRequestHandler], **attributes: Any) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    for name, value in attributes.items():
        setattr(server, name, value)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class _Files(SimpleHTTPRequestHandler):
    """Serves the folder of the server's ``root``; /broken/... answers 503 (a source that keeps failing)."""

    def translate_path(self, path: str) -> str:
        return str(Path(self.server.root) / path.lstrip("/").split("?")[0])

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        if self.path.startswith("/broken/"):
            self.send_error(503)
        else:
            super().do_GET()

    def log_message(self, *args: Any) -> None:
        pass


class _Refusing(BaseHTTPRequestHandler):
    """An API behind a login: 401 for everything (what KFP behind an auth proxy says to a stranger),
    but the health check of a caller with the session cookie (a login that lets nothing else in)."""

    def do_GET(self) -> None:  # noqa: N802
        if self.path.startswith("/apis/v2beta1/healthz") and self.headers.get("Cookie") == SESSION_COOKIE:
            body = b"{}"
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_error(401)

    do_POST = do_GET

    def log_message(self, *args: Any) -> None:
        pass


@dataclasses.dataclass
class World:
    """Everything the cases read: made once per session, never changed by a case."""

    root: Path
    env: dict[str, str]  # the environment of every case, before its own
    s3_env: dict[str, str]  # S3 settings of the session's SeaweedFS
    secrets: tuple[str, ...]  # never printed
    fields: dict[str, str]  # what argv and names are formatted with

    def inputs(self) -> dict[str, tuple[int, int]]:
        """(size, mtime) of every input file: what no case may change."""
        return {str(p.relative_to(self.root)): (p.stat().st_size, p.stat().st_mtime_ns)
                for p in sorted((self.root / "inputs").rglob("*")) if p.is_file()}


def _write_h5(path: Path, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs["n_examples"] = np.int64(len(data))
        f.create_dataset("data", data=data)


def _make_inputs(root: Path, bucket: str) -> dict[str, str]:
    """The good and the bad inputs; returns the format fields naming them."""
    import torch

    from gpt2core.config import load_params
    from gpt2core.data.preprocess import PreprocessParams, preprocess_corpus
    from gpt2core.hf_checkpoint import save_pretrained
    from gpt2core.model import GPT2
    from gpt2core.platform.artifacts.manifest import MANIFEST, build_manifest, manifest_bytes

    inputs = root / "inputs"
    f: dict[str, str] = {"bucket": bucket, "closed_port": str(_closed_port()), "password": PASSWORD}

    def folder(name: str, files: dict[str, str | bytes] | None = None) -> Path:
        path = inputs / name
        path.mkdir(parents=True)
        for rel, content in (files or {}).items():
            (path / rel).parent.mkdir(parents=True, exist_ok=True)
            (path / rel).write_bytes(content if isinstance(content, bytes) else content.encode())
        f[name] = str(path)
        return path

    def file(name: str, content: str | bytes) -> Path:
        path = inputs / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        f[name.replace(".", "_")] = str(path)
        return path

    corpus = folder("corpus", {f"doc{i}.txt": text for i, text in enumerate(DOCUMENTS)})
    f["corpus_file"] = str(corpus / "doc0.txt")
    dataset = inputs / "dataset"
    preprocess_corpus(corpus, dataset, PreprocessParams(max_seq_length=32, val_fraction=0.34, processes=1,
                                                        min_sequence_len=2))
    (dataset / MANIFEST).write_bytes(manifest_bytes(build_manifest(dataset)))  # published, as the stage does
    f["dataset"] = str(dataset)
    f["missing"] = str(root / "no-such-thing")
    folder("empty_dir")
    file("empty.txt", "")
    folder("pdf_corpus", {"paper.pdf": b"%PDF-1.4 not text"})
    folder("blank_corpus", {"a.jsonl": '{"text": ""}\n{"text": ""}\n'})
    folder("bad_jsonl", {"a.jsonl": '{"text": "fine"}\n{"text": unquoted}\n'})
    folder("short_corpus", {"long.txt": DOCUMENTS[0] * 3, "short.txt": "Short one."})
    file("broken.yaml", "train_input: [unclosed\n")
    file("list.yaml", "- just\n- a list\n")
    file("typo.yaml", (REPO / "configs" / "gpt2_tiny.yaml").read_text().replace("batch_size: 4", "batch_sise: 4", 1))
    folder("user_files", {"notes.txt": "my own notes, not an artifact"})
    file("garbage.pt", b"\x00 not a checkpoint")
    file("archive.tar.gz", b"this is no gzip stream")
    train_rows = next((dataset / "train").glob("*.h5"))
    with h5py.File(train_rows) as h5:
        rows = h5["data"][:]
    for name, data in (("two_fields", rows[:, :2]), ("float_rows", rows.astype(np.float32))):
        _write_h5(inputs / name / "train" / "data-00000.h5", data)
        _write_h5(inputs / name / "val" / "data-00000.h5", data)
        f[name] = str(inputs / name)
    folder("not_hdf5", {"train/data-00000.h5": b"not an HDF5 file", "val/data-00000.h5": b"not an HDF5 file"})
    empty_val = inputs / "empty_val"
    shutil.copytree(dataset / "train", empty_val / "train")
    (empty_val / "val").mkdir()
    (empty_val / "val" / "data_params.json").write_text(json.dumps(
        {"h5_dataset_stats": {"num_sequences": 0, "num_documents": 1}}))
    f["empty_val"] = str(empty_val)
    params = load_params("gpt2_tiny")
    torch.manual_seed(0)
    f["model"] = str(save_pretrained(GPT2(params.model), params, inputs / "model"))
    return f


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory, s3_server) -> World:  # noqa: ANN001
    import mlflow

    root = tmp_path_factory.mktemp("bad-inputs")
    fields = _make_inputs(root, s3_server.bucket)
    files = _serve(_Files, root=str(root / "inputs" / "corpus"))
    fields["http"] = f"http://127.0.0.1:{files.server_address[1]}"
    fields["refusing"] = f"http://127.0.0.1:{_serve(_Refusing).server_address[1]}"
    fields["s3_endpoint"] = s3_server.endpoint
    # One MLflow store made up front and copied for each case (creating one takes seconds).
    template = root / "mlflow-template.db"
    mlflow.MlflowClient(f"sqlite:///{template}").search_experiments()
    (root / "home").mkdir()
    kfp_context = root / "inputs" / "logged_in_home" / ".config" / "kfp" / "context.json"
    kfp_context.parent.mkdir(parents=True)
    kfp_context.write_text(json.dumps({"namespace": "", "client_authentication_cookie": SESSION_COOKIE}))
    fields["logged_in_home"] = str(root / "inputs" / "logged_in_home")
    keep = ("PATH", "LANG", "LC_ALL", "TMPDIR", "GPT2OPS_TEST_CACHE")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update({"PYTHONPATH": str(REPO), "HOME": str(root / "home"), "PYTHONUNBUFFERED": "1",
                "GPT2OPS_S3_SECRET_DIR": str(root / "no-secret-dir"), "GPT2OPS_S3_OUTAGE_S": "0",
                "AWS_MAX_ATTEMPTS": "1", "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"})
    s3_env = dict(s3_server.env())
    return World(root=root, env=env, s3_env=s3_env, fields=fields,
                 secrets=(s3_server.secret_key, s3_server.access_key, PASSWORD, SESSION_COOKIE))


# ----------------------------------------------------------------------------------- the catalogue


@dataclasses.dataclass(frozen=True)
class Bad:
    """``gpt2ops <argv>`` must fail with one error line holding each of ``names``."""

    argv: str
    names: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    s3: bool = False  # with the session's S3 settings

    @property
    def command(self) -> str:
        words = self.argv.split()
        return " ".join(words[:2]) if words[0] in ("pipeline", "argo") else words[0]


def bad(argv: str, *names: str, s3: bool = False, **env: str) -> Bad:
    return Bad(argv, names, tuple(env.items()), s3)


TINY32 = ("--params gpt2_tiny --set train_input.max_sequence_length=32 --set eval_input.max_sequence_length=32 "
          "--dataset {dataset}")
MLFLOW_DOWN = f"http://mlflow-user:{PASSWORD}@127.0.0.1:{{closed_port}}"

CASES: list[Bad] = [
    # ---- download: sources that are not there, not reachable or not what they claim
    bad("download {missing} --output_dir {out}", "{missing}", "no such file"),
    bad("download ftp://example.org/c.txt --output_dir {out}", "ftp://example.org/c.txt", "unsupported source scheme"),
    bad("download http:///c.txt --output_dir {out}", "http:///c.txt", "expected http(s)://host/path"),
    bad("download http://127.0.0.1:{closed_port}/c.txt --output_dir {out}",
        "http://127.0.0.1:{closed_port}/c.txt", "unreachable", "attempts"),
    bad("download {http}/no-such-file.txt --output_dir {out}", "{http}/no-such-file.txt", "HTTP 404"),
    bad("download {http}/broken/c.txt --output_dir {out}", "{http}/broken/c.txt", "after 5 attempts"),
    bad("download {corpus_file} --sha256 " + "0" * 64 + " --output_dir {out}", "sha256", "expected " + "0" * 64),
    bad("download {corpus_file} --sha256 abc123 --output_dir {out}", "sha256", "pattern", "abc123"),
    bad("download {corpus} --include *.parquet --output_dir {out}", "{corpus}", "include", "*.parquet"),
    bad("download {archive_tar_gz} --output_dir {out}", "{archive_tar_gz}", "not a readable archive"),
    bad("download hf://models/gpt2 --output_dir {out}", "hf://models/gpt2", "hf://datasets/<org>/<name>"),
    bad("download {corpus} --output_dir {user_files}", "{user_files}", "not an artifact", "nothing was overwritten"),
    bad("download {corpus} --output_dir {empty_txt}/corpus", "{empty_txt}/corpus", "cannot write there"),
    bad("download s3:// --output_dir {out}", "s3://", "expected s3://bucket/key"),
    bad("download s3://no-such-bucket-here/c.txt --output_dir {out}", "no-such-bucket-here", "does not exist",
        "{s3_endpoint}", "AWS_ENDPOINT_URL", s3=True),
    bad("download s3://{bucket}/nothing/here --output_dir {out}", "s3://{bucket}/nothing/here",
        "no such object or prefix", s3=True),
    bad("download s3://{bucket}/c.txt --output_dir {out}", "refused", "AWS_ACCESS_KEY_ID", s3=True,
        AWS_SECRET_ACCESS_KEY="wrong-" + PASSWORD),
    bad("download s3://{bucket}/c.txt --output_dir {out}", "no S3 credentials", "AWS_ACCESS_KEY_ID", s3=True,
        AWS_ACCESS_KEY_ID="", AWS_SECRET_ACCESS_KEY=""),
    bad("download s3://{bucket}/c.txt --output_dir {out}", "127.0.0.1:{closed_port}", "AWS_ENDPOINT_URL",
        "GPT2OPS_S3_OUTAGE_S", s3=True, AWS_ENDPOINT_URL_S3="http://127.0.0.1:{closed_port}",
        AWS_ENDPOINT_URL="http://127.0.0.1:{closed_port}"),
    bad("download s3://{bucket}/c.txt --output_dir {out}", "{http}", "AWS_ENDPOINT_URL", s3=True,
        AWS_ENDPOINT_URL_S3="{http}", AWS_ENDPOINT_URL="{http}"),
    bad("download s3://{bucket}/c.txt --output_dir {out}", "AWS_ENDPOINT_URL", "127.0.0.1:{closed_port}", s3=True,
        AWS_ENDPOINT_URL_S3="127.0.0.1:{closed_port}", AWS_ENDPOINT_URL="127.0.0.1:{closed_port}"),
    bad("download {corpus} --output_dir {out}", "MLflow", "127.0.0.1:{closed_port}", "MLFLOW_TRACKING_URI",
        MLFLOW_TRACKING_URI=MLFLOW_DOWN),
    # ---- preprocess: corpora that are missing, empty or unreadable; settings out of range
    bad("preprocess --input_dir {missing} --output_dir {out}", "--input_dir", "{missing}", "no such folder"),
    bad("preprocess --input_dir {empty_txt} --output_dir {out}", "--input_dir", "not a folder"),
    bad("preprocess --input_dir {empty_dir} --output_dir {out}", "{empty_dir}", "empty corpus"),
    bad("preprocess --input_dir {pdf_corpus} --output_dir {out}", "paper.pdf", "unsupported file type"),
    bad("preprocess --input_dir {blank_corpus} --output_dir {out}", "{blank_corpus}", "no text"),
    bad("preprocess --input_dir {bad_jsonl} --output_dir {out}", "a.jsonl:2", "not valid JSON"),
    bad("preprocess --input_dir {short_corpus} --output_dir {out} --max_seq_length 64 --val_fraction 0.4 --seed 3",
        "val", "--min_sequence_len", "--val_fraction"),
    bad("preprocess --input_dir {corpus} --output_dir {out} --max_seq_length 1", "max_seq_length", ">= 2"),
    bad("preprocess --input_dir {corpus} --output_dir {out} --max_seq_length 5.0", "--max_seq_length", "'5.0'"),
    bad("preprocess --input_dir {corpus} --output_dir {out} --val_fraction 1.5", "val_fraction", "less than 1"),
    bad("preprocess --input_dir {corpus} --output_dir {out} --val_fraction nan", "val_fraction", "nan"),
    bad("preprocess --input_dir {corpus} --output_dir {out} --processes -1", "processes", "greater than or equal to 0"),
    bad("preprocess --input_dir {corpus} --output_dir {out} --files_per_record 0", "samples_per_file", "greater"),
    bad("preprocess --input_dir {corpus} --output_dir {out} --compression zstd", "--compression", "zstd"),
    bad("preprocess --input_dir {corpus} --output_dir {out} --params {missing}", "{missing}", "no such config"),
    bad("preprocess --input_dir {corpus} --output_dir {out} --params {broken_yaml}", "{broken_yaml}", "not valid YAML"),
    bad("preprocess --input_dir {corpus} --output_dir {out} --vocab_file {missing}", "--vocab_file", "{missing}"),
    bad("preprocess --input_dir {corpus} --output_dir {user_files}", "{user_files}", "not an artifact"),
    bad("preprocess --input_dir {empty_dir} --output_dir {dataset}", "{empty_dir}", "empty corpus"),
    bad("preprocess --input_dir {corpus} --output_dir s3://no-such-bucket-here/d", "no-such-bucket-here",
        "does not exist", s3=True),
    # ---- validate: everything wrong is listed on the one line
    bad("validate --params {missing} --dataset {dataset}", "config {missing}", "no such config"),
    bad("validate --params gpt2_tiny --dataset {dataset} --target tpu", "--target", "'tpu'"),
    bad("validate --params gpt2_tiny --dataset {dataset} --num_gpus 0", "num_gpus", "greater than 0"),
    bad("validate --params gpt2_tiny --dataset {dataset}", "train_input.data_dir", "max_seq_length is 32, expected 128"),
    bad("validate --params gpt2_tiny --dataset {missing}", "train_input.data_dir", "{missing}"),
    bad(f"validate {TINY32} --target gpu --gpu_type Z9000", "gpu_type", "'Z9000'"),
    bad(f"validate {TINY32} --set model.hidden_size=-64", "model.hidden_size", "> 0"),
    # ---- compile
    bad("compile --params {list_yaml}", "{list_yaml}", "expected a YAML mapping"),
    bad("compile --params gpt2_tiny --set runconfig.torch_compile=maybe", "runconfig.torch_compile", "a boolean"),
    bad("compile --params gpt2_tiny --max_steps -1", "max_steps=-1", "greater than or equal to 0"),
    bad("compile --params gpt2_tiny --target cerebras --dataset {missing}", "train_input.data_dir", "{missing}/train",
        "no such folder"),
    # ---- train: every config section, out of range or of the wrong type; data that does not fit
    bad("train --params {broken_yaml}", "{broken_yaml}", "not valid YAML"),
    bad("train --params gpt2_tiny --set runconfig", "--set", "override 'runconfig'", "KEY.PATH=VALUE"),
    bad("train --params gpt2_tiny --set 'model.hidden_size=[1,'", "--set", "model.hidden_size=[1,",
        "not valid YAML"),
    bad("train --params {empty_txt}", "{empty_txt}", "expected a YAML mapping"),
    bad("train --params {typo_yaml}", "{typo_yaml}", "train_input.batch_size", "missing required key"),
    bad("train --params gpt2_tiny --set optimizer.learning_rate.0.end_learning_rate=.nan",
        "optimizer.learning_rate.0.end_learning_rate", "finite number >= 0"),
    bad("train --params gpt2_tiny --set optimizer.learning_rate.1.initial_learning_rate=.inf",
        "optimizer.learning_rate.1.initial_learning_rate", "finite"),
    bad("train --params gpt2_tiny --set optimizer.learning_rate.0.total_iters=-5",
        "optimizer.learning_rate.0.total_iters", "> 0"),
    bad("train --params gpt2_tiny --set optimizer.learning_rate.0.scheduler=Cosine",
        "optimizer.learning_rate.0.scheduler", "did you mean CosineDecay"),
    bad("train --params gpt2_tiny --set optimizer.eps=0", "optimizer.eps", "> 0"),
    bad("train --params gpt2_tiny --set optimizer.betas=[0.9,1.0]", "optimizer.betas.1", "[0, 1)"),
    bad("train --params gpt2_tiny --set train_input.batch_size=0", "train_input.batch_size", "> 0"),
    bad("train --params gpt2_tiny --set train_input.batch_size=2.0", "train_input.batch_size", "an integer",
        "float 2.0"),
    bad("train --params gpt2_tiny --set eval_input.shuffle_seed=-1", "eval_input.shuffle_seed", ">= 0"),
    bad("train --params gpt2_tiny --set model.dropout_rate=1.5", "model.dropout_rate", "[0, 1)"),
    bad("train --params gpt2_tiny --set model.layer_norm_epsilon=.nan", "model.layer_norm_epsilon", "finite"),
    bad("train --params gpt2_tiny --set model.nonlinearity=relu", "model.nonlinearity", "'gelu'"),
    bad("train --params gpt2_tiny --set runconfig.parallelism=zero", "runconfig.parallelism", "'ddp'"),
    bad("train --params gpt2_tiny --set runconfig.sample_temperature=0", "runconfig.sample_temperature", "> 0"),
    bad("train --params gpt2_tiny --set runconfig.max_steps=1e400", "runconfig.max_steps", "an integer"),
    bad("train --params gpt2_tiny --set runconfig=7", "runconfig", "a mapping"),
    bad("train --params gpt2_tiny --set train_input.max_sequence_length=256", "train_input.max_sequence_length",
        "model.max_position_embeddings"),
    bad("train --params gpt2_tiny --max_steps -3", "max_steps=-3", "greater than or equal to 0"),
    bad("train --params gpt2_tiny --max_steps 5.0", "--max_steps", "'5.0'"),
    bad("train --params gpt2_tiny --dataset {missing}", "train_input.data_dir", "{missing}", "no such folder"),
    bad("train --params gpt2_tiny --dataset {empty_dir}", "train_input.data_dir", "{empty_dir}/train"),
    bad("train --params gpt2_tiny --checkpoint_path {missing} --dataset {dataset}", "--checkpoint_path", "{missing}"),
    bad("train --params gpt2_tiny --dataset {dataset}", "train_input.max_sequence_length: 128",
        "sequences of 32 tokens"),
    bad(f"train {TINY32} --set runconfig.eval_frequency=1 --set eval_input.max_sequence_length=16",
        "eval_input.max_sequence_length: 16", "{dataset}/val", "sequences of 32 tokens"),
    bad("train --params gpt2_tiny --set train_input.max_sequence_length=32 --dataset {empty_val} "
        "--set runconfig.eval_frequency=1 --set eval_input.max_sequence_length=32", "{empty_val}/val",
        "the split is empty", "--min_sequence_len"),
    bad("train --params gpt2_tiny --set train_input.max_sequence_length=32 --dataset {two_fields}",
        "{two_fields}/train/data-00000.h5", "expected int32 [n, 3, max_seq_length]"),
    bad("train --params gpt2_tiny --set train_input.max_sequence_length=32 --dataset {float_rows}",
        "{float_rows}/train/data-00000.h5", "float32"),
    bad("train --params gpt2_tiny --set train_input.max_sequence_length=32 --dataset {not_hdf5}",
        "{not_hdf5}/train/data-00000.h5", "not a readable HDF5 file"),
    bad(f"train {TINY32} --model_dir {{out}} --set model.vocab_size=1000 --set train_input.vocab_size=1000 "
        "--set eval_input.vocab_size=1000", "train_input.vocab_size is 1000", "{dataset}/train"),
    bad(f"train {TINY32} --model_dir {{out}} --checkpoint_path {{garbage_pt}}", "{garbage_pt}",
        "not a readable training checkpoint"),
    bad(f"train {TINY32} --nproc_per_node 0", "nproc_per_node", ">= 1"),
    bad(f"train {TINY32} --model_dir {{empty_txt}}/m", "--model_dir {empty_txt}/m", "cannot make this folder"),
    bad(f"train {TINY32} --model_dir {{out}} --artifact_root {{empty_txt}}/art", "--artifact_root {empty_txt}/art",
        "cannot make this folder"),
    bad(f"train {TINY32} --model_dir {{out}} --set optimizer.learning_rate.1.initial_learning_rate=1e39",
        "optimizer.learning_rate: 1e+39", "float32"),
    bad(f"train {TINY32} --model_dir {{out}}", "MLflow", "127.0.0.1:{closed_port}", "MLFLOW_TRACKING_URI",
        MLFLOW_TRACKING_URI=MLFLOW_DOWN),
    # ---- evaluate
    bad("evaluate --params gpt2_tiny --model_dir {missing} --dataset {dataset} "
        "--set eval_input.max_sequence_length=32", "--model_dir", "{missing}"),
    bad("evaluate --params gpt2_tiny --model_dir {empty_dir} --dataset {dataset} "
        "--set eval_input.max_sequence_length=32", "{empty_dir}"),
    bad("evaluate --params gpt2_tiny --model_dir {model} --dataset {dataset}", "eval_input.max_sequence_length: 128",
        "{dataset}/val", "sequences of 32 tokens"),
    bad("evaluate --params gpt2_tiny --model_dir {model} --dataset {dataset} --set eval_input.max_sequence_length=16",
        "eval_input.max_sequence_length: 16", "sequences of 32 tokens"),
    bad("evaluate --params gpt2_tiny --model_dir {model} --dataset {empty_val} --set eval_input.max_sequence_length=32",
        "{empty_val}/val", "the split is empty"),
    bad("evaluate --params gpt2_tiny --model_dir {model} --checkpoint_path {garbage_pt} --dataset {dataset} "
        "--set eval_input.max_sequence_length=32", "--checkpoint_path {garbage_pt}", "not a readable"),
    bad("evaluate --params gpt2_tiny --model_dir {model} --dataset {dataset} --set eval_input.max_sequence_length=32 "
        "--set model.vocab_size=1000 --set train_input.vocab_size=1000 --set eval_input.vocab_size=1000",
        "--model_dir {model}: the model has vocab_size 50257", "the config has model.vocab_size 1000"),
    bad("evaluate --params gpt2_tiny --dataset {dataset}", "--model_dir", "required"),
    # ---- promote
    bad("promote --params gpt2_tiny --model_dir {model} --dataset {dataset} --eval_loss nan", "eval_loss", "finite"),
    bad("promote --params gpt2_tiny --model_dir {model} --dataset {dataset} --eval_loss -1", "eval_loss",
        "greater than or equal to 0"),
    bad("promote --params gpt2_tiny --model_dir {model} --dataset {dataset}", "evaluate", "--eval_loss"),
    bad("promote --params gpt2_tiny --model_dir {missing} --dataset {dataset} --eval_loss 3", "--model_dir",
        "{missing}"),
    bad("promote --params gpt2_tiny --model_dir {model} --dataset {corpus} --eval_loss 3", "{corpus}",
        "MANIFEST.json"),
    bad("promote --params gpt2_tiny --model_dir {model} --dataset {dataset} --eval_loss 3", "MLflow",
        "MLFLOW_TRACKING_URI", MLFLOW_TRACKING_URI=MLFLOW_DOWN),
    # ---- run: the run form is checked before anything starts
    bad("run --num_gpus 0 --target gpu --work_dir {out}", "parameter num_gpus"),
    bad("run --max_steps -1 --work_dir {out}", "parameter max_steps", "-1"),
    bad("run --num_nodes 2 --work_dir {out}", "parameter num_nodes"),
    bad("run --source ftp://example.org/c.txt --work_dir {out}", "parameter source", "unsupported source scheme"),
    bad("run --artifact_root relative/folder --work_dir {out}", "parameter artifact_root", "'relative/folder'"),
    bad("run --params {missing} --work_dir {out}", "parameter params", "{missing}"),
    bad("run --params gpt2_tiny --target cerebras --work_dir {out}", "parameter target", "runconfig.mgmt_address"),
    bad("run --source_sha256 xyz --work_dir {out}", "source_sha256", "xyz"),
    bad("run --node_selector [1] --work_dir {out}", "--node_selector", "JSON object"),
    bad("run --runner podman --work_dir {out}", "--runner", "'podman'"),
    bad("run --work_dir {empty_txt}/work", "--work_dir {empty_txt}/work", "cannot make this folder"),
    # ---- pipeline: checks before connecting; unreachable, refusing and wrong endpoints
    bad("pipeline compile --output {empty_txt}/p.yaml", "--output {empty_txt}/p.yaml", "cannot write there"),
    bad("pipeline upload", "--host", "KF_PIPELINES_ENDPOINT"),
    bad("pipeline upload --host {refusing} --package {missing}", "--package", "{missing}"),
    bad("pipeline upload --host http://127.0.0.1:{closed_port}", "http://127.0.0.1:{closed_port}", "--host",
        "unreachable"),
    bad("pipeline upload --host 127.0.0.1:{closed_port}", "https://127.0.0.1:{closed_port}", "unreachable"),
    bad("pipeline upload", "http://127.0.0.1:{closed_port}", "KF_PIPELINES_ENDPOINT", "unreachable",
        KF_PIPELINES_ENDPOINT="http://127.0.0.1:{closed_port}"),
    bad("pipeline upload --host {refusing}", "{refusing}", "HTTP 401", "credentials"),
    bad("pipeline upload --host {refusing}", "{refusing}", "could not upload the pipeline", "HTTP 401",
        HOME="{logged_in_home}"),
    bad("pipeline submit --host {http}", "{http}", "HTTP 404", "Kubeflow Pipelines"),
    bad("pipeline submit --host http://127.0.0.1:{closed_port} --num_gpus 0 --target gpu", "parameter num_gpus"),
    bad("pipeline submit --host http://127.0.0.1:{closed_port} --max_steps 2.5", "--max_steps", "'2.5'"),
    bad("pipeline submit --host http://127.0.0.1:{closed_port} --tolerations '{{\"key\": 1}}'", "--tolerations",
        "JSON list"),
    bad("pipeline schedule --host http://127.0.0.1:{closed_port} --cron daily", "--cron", "'daily'"),
    bad("pipeline schedule --host http://127.0.0.1:{closed_port} --cron '0 3 * * 0' --max_concurrency 0",
        "--max_concurrency", ">= 1"),
    bad("pipeline schedule --host http://127.0.0.1:{closed_port} --cron '0 3 * * 0' --source http:///x",
        "parameter source"),
    # ---- compare
    bad("compare --experiment no-such-experiment", "no experiment named 'no-such-experiment'"),
    bad("compare --experiment gpt2ops", "MLflow", "127.0.0.1:{closed_port}", "MLFLOW_TRACKING_URI",
        MLFLOW_TRACKING_URI=MLFLOW_DOWN),
    bad("compare --experiment gpt2ops", "MLFLOW_TRACKING_URI", MLFLOW_TRACKING_URI="127.0.0.1:{closed_port}"),
    bad("compare --experiment gpt2ops --max_runs 0", "--max_runs", ">= 1"),
    bad("compare --experiment gpt2ops", "MLflow at {refusing}", "MLFLOW_TRACKING_URI", MLFLOW_TRACKING_URI="{refusing}"),
    bad("compare --experiment gpt2ops", "MLflow at {http}", "MLFLOW_TRACKING_URI", MLFLOW_TRACKING_URI="{http}"),
]


def _case_id(case: Bad) -> str:
    """The argv and the environment it runs with, spelt for a test id."""
    env = " ".join(f"{k}={v}" for k, v in case.env if not k.startswith("AWS_ENDPOINT_URL_"))
    return re.sub(r"[^A-Za-z0-9_.:=-]+", "-", f"{case.argv} {env}").replace("{", "").replace("}", "").strip("-")


IDS = {_case_id(c): c for c in CASES}
assert len(IDS) == len(CASES), "two cases with the same id"
# Run afresh too, to show the forked commands print what `python -m gpt2core.cli` prints: a flag, a
# config value, a missing input and data that does not fit the config (after MLflow and the data load).
FRESH = [_case_id(c) for c in CASES if c.argv in (
    "train --params gpt2_tiny --max_steps 5.0", "train --params gpt2_tiny --set model.dropout_rate=1.5",
    "preprocess --input_dir {missing} --output_dir {out}", "train --params gpt2_tiny --dataset {dataset}")]
assert len(FRESH) == 4


@dataclasses.dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    folder: Path


def _request(world: World, case_id: str, folder_suffix: str = "") -> dict[str, Any]:
    """What `gpt2ops` is run with for one case: argv, environment, a folder of its own."""
    import shlex

    case = IDS[case_id]
    name = f"{list(IDS).index(case_id):03d}-{case.command.replace(' ', '-')}{folder_suffix}"
    folder = world.root / "cases" / name
    folder.mkdir(parents=True)
    shutil.copy(world.root / "mlflow-template.db", folder / "mlflow.db")
    fields = {**world.fields, "out": str(folder / "out")}
    env = {**world.env, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
           "GPT2OPS_ARTIFACT_ROOT": str(folder / "artifacts"), "GPT2OPS_CACHE_DIR": str(folder / "cache"),
           **(world.s3_env if case.s3 else {}), **{k: v.format(**fields) for k, v in case.env}}
    argv = [part.format(**fields) for part in shlex.split(case.argv)]
    if argv[0] in STAGE_COMMANDS:
        argv += ["--pipeline_run_id", "case"]
    return {"id": case_id, "argv": argv, "env": env, "cwd": str(folder), "stdout": str(folder / "stdout.txt"),
            "stderr": str(folder / "stderr.txt")}


@pytest.fixture(scope="session")
def outcomes(world: World, request: pytest.FixtureRequest) -> dict[str, Outcome]:
    """The outcome of every case this session selected. Each runs as a process of its own, forked
    from a server that imported the CLI's libraries once (tests/cli_forkserver.py: the imports are
    most of a command's time), PARALLEL at a time."""
    chosen = [item.callspec.params["case_id"] for item in request.session.items
              if getattr(item, "callspec", None) and "case_id" in item.callspec.params]
    if any(item.name == "test_the_entry_point_prints_what_the_forked_commands_print" for item in request.session.items):
        chosen += [case_id for case_id in FRESH if case_id not in chosen]
    before = world.inputs()
    requests = {case_id: _request(world, case_id) for case_id in chosen}
    server = subprocess.Popen([sys.executable, str(REPO / "tests" / "cli_forkserver.py"), str(PARALLEL)],
                              env=world.env, cwd=world.root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert json.loads(server.stdout.readline()) == {"ready": True}
    server.stdin.write("".join(json.dumps(r) + "\n" for r in requests.values()))
    server.stdin.close()
    codes = {answer["id"]: answer["returncode"] for answer in map(json.loads, server.stdout)}
    assert server.wait(timeout=60) == 0
    after = world.inputs()
    world.fields["inputs_changed"] = json.dumps(sorted(k for k in set(before) | set(after)
                                                       if before.get(k) != after.get(k)))
    return {case_id: Outcome(codes[case_id], Path(r["stdout"]).read_text(), Path(r["stderr"]).read_text(),
                             Path(r["cwd"])) for case_id, r in requests.items()}


@pytest.mark.slow  # the whole catalogue: about 2 minutes on 2 cores
@pytest.mark.parametrize("case_id", list(IDS))
def test_bad_input_is_one_line_naming_it(case_id: str, outcomes: dict[str, Outcome], world: World):
    case, outcome = IDS[case_id], outcomes[case_id]
    shown = outcome.stdout + outcome.stderr
    assert "Traceback" not in shown, shown[-3000:]
    errors = [line for line in outcome.stderr.splitlines() if ERROR_LINE.match(line)]
    assert outcome.returncode == 2 and len(errors) == 1, shown[-3000:]
    line = errors[0]
    assert outcome.stderr.rstrip("\n").splitlines()[-1] == line, "the error is the last thing printed"
    for name in case.names:
        assert name.format(**world.fields) in line, line
    for secret in world.secrets:
        assert secret not in shown
    # No partial artifact: whatever the stage wrote says it failed; only validate publishes (its report).
    for result in (outcome.folder / "artifacts").rglob("result.json"):
        assert json.loads(result.read_text())["status"] == "failed", result
    published = [p for p in outcome.folder.rglob("MANIFEST.json") if p.parent.parent.name != "validate"]
    assert not published, published
    half_made = [*(outcome.folder / "out").rglob("data_params.json"), *(outcome.folder / "out").rglob("corpus.json")]
    assert not half_made, half_made


@pytest.mark.slow  # the whole catalogue: about 2 minutes on 2 cores
def test_no_case_changed_an_input(outcomes: dict[str, Outcome], world: World):
    """Nothing already written is lost: every input file of every case is as it was."""
    assert json.loads(world.fields.get("inputs_changed", "[]")) == []


def test_the_catalogue_covers_every_command():
    counts: dict[str, int] = {}
    for case in CASES:
        counts[case.command] = counts.get(case.command, 0) + 1
    commands = {*STAGE_COMMANDS, "run", "compare", "pipeline compile", "pipeline upload", "pipeline submit",
                "pipeline schedule"}
    assert commands <= set(counts), commands - set(counts)
    assert len(CASES) >= 60


# ----------------------------------------------------------------------------------- the run form

# (parameter, bad value, what the message says besides "parameter <name>")
FORM_CASES: list[tuple[str, Any, str]] = [
    ("params", "no-such-config", "no such config"),
    ("params", "", "no such config"),
    ("params", 5, "string"),
    ("source", "", "empty"),
    ("source", "ftp://example.org/c.txt", "unsupported source scheme 'ftp'"),
    ("source", "https:///no-host", "malformed URL"),
    ("source", "s3://", "expected s3://bucket/key"),
    ("source", "hf://models/gpt2", "hf://datasets/<org>/<name>"),
    ("source_include", ["*.txt"], "string"),
    ("source_sha256", "abc", "pattern"),
    ("source_sha256", "g" * 64, "pattern"),
    ("target", "tpu", "'cpu', 'gpu' or 'cerebras'"),
    ("target", "", "'cpu', 'gpu' or 'cerebras'"),
    ("num_gpus", 0, ">= 1"),
    ("num_gpus", -2, ">= 1"),
    ("num_gpus", 1.5, "fractional part"),
    ("num_gpus", math.nan, "finite"),
    ("num_gpus", math.inf, "finite"),
    ("num_gpus", "two", "valid integer"),
    ("num_nodes", 0, "expected 1"),
    ("num_nodes", 2, "target gpu"),
    ("num_nodes", 2.5, "fractional part"),
    ("num_nodes", math.nan, "finite"),
    ("gpu_type", None, "string"),
    ("node_selector", ["pool"], "dictionary"),
    ("node_selector", {"pool": 1}, "string"),
    ("tolerations", {"key": "x"}, "list"),
    ("tolerations", ["NoSchedule"], "dictionary"),
    ("gpu_node_selector", "pool=gpu", "dictionary"),
    ("gpu_tolerations", [1], "dictionary"),
    ("max_steps", -1, "expected 0"),
    ("max_steps", 2.5, "fractional part"),
    ("max_steps", math.inf, "finite"),
    ("max_steps", math.nan, "finite"),
    ("max_steps", "ten", "valid integer"),
    ("experiment", "", "at least 1 character"),
    ("artifact_root", "relative/folder", "s3://bucket/prefix or an absolute local folder"),
    ("artifact_root", "s3://", "s3://bucket/prefix"),
    ("artifact_root", "http://example.org/runs", "s3://bucket/prefix"),
    ("run_name", 7, "string"),
    ("gpu_type", " ", "gpu_type"),  # with target gpu, below
    ("extra_parameter", 1, "Extra inputs are not permitted"),
]


@pytest.mark.parametrize("name, value, expected", FORM_CASES, ids=[f"{n}={v!r}" for n, v, _ in FORM_CASES])
def test_bad_run_form_value_names_the_parameter(name: str, value: Any, expected: str):
    values = {name: value, **({"target": "gpu"} if name == "gpu_type" and value == " " else {})}
    with pytest.raises(ConfigError) as err:
        PipelineParameters(**values).check()
    message = str(err.value)
    assert message.startswith(f"parameter {name}") and expected in message, message
    assert "\n" not in message


def test_run_form_parameters_are_all_in_the_table():
    assert {n for n, _, _ in FORM_CASES} >= set(PipelineParameters.model_fields)


def test_integral_floats_are_the_integers_they_are():
    """What KFP's UI and API clients send for an int parameter: 5.0 is taken as 5."""
    form = PipelineParameters(max_steps=5.0, num_gpus=2.0, num_nodes=1.0).check()
    assert (form.max_steps, form.num_gpus, form.num_nodes) == (5, 2, 1)
    assert all(type(v) is int for v in (form.max_steps, form.num_gpus, form.num_nodes))


def _int_fields(model) -> list[str]:  # noqa: ANN001 - a pydantic model class
    import typing

    def is_int(tp: Any) -> bool:
        return tp is int or any(is_int(a) for a in typing.get_args(tp))

    return [name for name, field in model.model_fields.items() if is_int(field.annotation)]


def test_every_stage_request_takes_integral_floats_as_integers():
    """The components pass KFP's parameter values on unchanged: each stage's request takes 5.0 as 5
    and refuses 5.5 naming the field; the launcher does the same for its process counts."""
    from gpt2core.launch import launch
    from gpt2core.stages import STAGES, stage_module
    from gpt2core.data.preprocess import PreprocessParams

    required = {"params": "gpt2_tiny", "input_dir": "/data", "model_dir": "/model"}
    checked = []
    for stage in STAGES:
        request = stage_module(stage).Request
        fields = _int_fields(request)
        base = {k: v for k, v in required.items() if k in request.model_fields and request.model_fields[k].is_required()}
        for name in fields:
            made = request(**base, **{name: 5.0})
            assert getattr(made, name) == 5 and type(getattr(made, name)) is int, (stage, name)
            with pytest.raises(ConfigError, match=rf"^{name}=5\.5: .*fractional part"):
                request(**base, **{name: 5.5})
            checked.append(f"{stage}.{name}")
    for name in _int_fields(PreprocessParams):
        scheme = {"packing_scheme": "overlap"} if name == "overlap_size" else {}
        assert getattr(PreprocessParams(**scheme, **{name: 64.0}), name) == 64
        with pytest.raises(ConfigError, match=rf"^preprocess.{name}=64.5: .*fractional part"):
            PreprocessParams(**scheme, **{name: 64.5})
        checked.append(f"preprocess.{name}")
    assert {"train.max_steps", "validate.num_gpus", "compile.max_steps", "preprocess.max_seq_length"} <= set(checked)
    with pytest.raises(ConfigError, match="nproc_per_node: expected an integer >= 1, got 1.5"):
        launch("train", None, None, nproc_per_node=1.5)


def _execute(component, parameters: dict[str, Any], tmp_path: Path) -> None:  # noqa: ANN001 - a kfp component
    """Run a component's function as KFP runs it: through kfp's executor, parameters as JSON."""
    from kfp.dsl.executor import Executor

    executor_input = {"inputs": {"parameterValues": parameters},
                      "outputs": {"parameters": {}, "artifacts": {},
                                  "outputFile": str(tmp_path / "executor_output.json")}}
    Executor(json.loads(json.dumps(executor_input)), function_to_execute=component.python_func).execute()


START_RUN = {"params": "gpt2_tiny", "source": "https://example.org/corpus.txt", "target": "cpu", "num_gpus": 1.0,
             "num_nodes": 1.0, "gpu_type": "H100", "max_steps": 5.0, "run_name": "", "experiment": "bad-inputs"}


def test_start_run_takes_integers_sent_as_floats(tmp_path: Path):
    """The kfp-int-params-as-float case end to end: start_run accepts max_steps 5.0 and what it records
    on the parent run is the integer."""
    from components.pipeline_run.component import start_run
    from gpt2core.platform import tracking

    _execute(start_run, {**START_RUN, "pipeline_run_id": "floats", "artifact_root": str(tmp_path)}, tmp_path)
    parent = tracking.find_parent_run("floats", "bad-inputs")
    assert parent


def _start_run_cases() -> list[tuple[str, Any, str]]:
    from components.pipeline_run.component import start_run

    inputs = set(start_run.component_spec.inputs)
    return [(n, v, e) for n, v, e in FORM_CASES if n in inputs and n != "gpu_type"]


@pytest.mark.parametrize("name, value, expected", _start_run_cases(),
                         ids=[f"{n}={v!r}" for n, v, _ in _start_run_cases()])
def test_start_run_fails_first_naming_the_parameter(name: str, value: Any, expected: str, tmp_path: Path):
    """Each bad value of a start_run input, as KFP hands it over: the first step fails naming it."""
    from components.pipeline_run.component import start_run

    with pytest.raises(ConfigError) as err:
        _execute(start_run, {**START_RUN, "pipeline_run_id": f"bad-{name}", "artifact_root": str(tmp_path),
                             name: value}, tmp_path)
    assert str(err.value).startswith(f"parameter {name}") and expected in str(err.value), str(err.value)


@pytest.mark.slow  # the whole catalogue: about 2 minutes on 2 cores
def test_the_entry_point_prints_what_the_forked_commands_print(world: World, outcomes: dict[str, Outcome]):
    """The catalogue forks its commands from a server that imported the CLI once; `python -m
    gpt2core.cli` started afresh prints the same line for a flag, a config and a stage error."""
    for case_id in FRESH:
        request = _request(world, case_id, folder_suffix="-fresh")
        done = subprocess.run([sys.executable, "-m", "gpt2core.cli", *request["argv"]], env=request["env"],
                              cwd=request["cwd"], capture_output=True, text=True, timeout=300)
        fresh = [line for line in done.stderr.splitlines() if ERROR_LINE.match(line)]
        forked = [line for line in outcomes[case_id].stderr.splitlines() if ERROR_LINE.match(line)]
        assert done.returncode == outcomes[case_id].returncode == 2
        assert fresh == [line.replace(str(outcomes[case_id].folder), request["cwd"]) for line in forked]

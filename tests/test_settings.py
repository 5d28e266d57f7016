"""Settings: every variable read once into one typed object, from the environment or a mounted
secret folder; a bad value is one line naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpt2core.cli import main as cli
from gpt2core.errors import SettingsError
from gpt2core.platform.settings import Settings, reload_settings, settings

DOCS = Path(__file__).resolve().parents[1] / "docs" / "storage-tracking.md"


@pytest.mark.parametrize("variable, value, expected", [
    ("AWS_MAX_ATTEMPTS", "abc", "AWS_MAX_ATTEMPTS='abc': expected a positive integer"),
    ("AWS_MAX_ATTEMPTS", "0", "AWS_MAX_ATTEMPTS='0': expected a positive integer"),
    ("GPT2OPS_S3_OUTAGE_S", "-1", "GPT2OPS_S3_OUTAGE_S='-1': expected a number of seconds >= 0"),
    ("AWS_RETRY_MODE", "fast", "AWS_RETRY_MODE='fast': expected legacy, standard or adaptive"),
])
def test_a_bad_value_is_one_line_naming_the_variable(monkeypatch, capsys, variable, value, expected):
    monkeypatch.setenv(variable, value)
    reload_settings()
    with pytest.raises(SettingsError) as err:
        settings()
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)
    assert cli(["compare", "--experiment", "any"]) == 2  # the CLI prints it, no traceback
    assert f"error: {expected}" in capsys.readouterr().err


def test_read_once_until_reloaded(monkeypatch):
    monkeypatch.setenv("GPT2OPS_S3_OUTAGE_S", "30")
    reload_settings()
    first = settings()
    assert first.s3_outage_s == 30.0 and settings() is first
    monkeypatch.setenv("GPT2OPS_S3_OUTAGE_S", "45")
    assert settings().s3_outage_s == 30.0  # this process changed its environment: not seen yet
    reload_settings()
    assert settings().s3_outage_s == 45.0
    monkeypatch.setenv("GPT2OPS_S3_OUTAGE_S", "")  # empty is unset: the default
    reload_settings()
    assert settings().s3_outage_s == 120.0


def test_the_secret_folder_fills_what_the_environment_leaves_out(monkeypatch, tmp_path):
    folder = tmp_path / "secret"
    folder.mkdir()
    (folder / "AWS_ACCESS_KEY_ID").write_text("FROMFILE\n")  # Kubernetes secrets often end in \n
    (folder / "AWS_SECRET_ACCESS_KEY").write_text("file-secret-value\n")
    (folder / "AWS_ENDPOINT_URL").write_text("http://from-file:9000\n")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://from-env:8333")  # the environment wins
    monkeypatch.setenv("GPT2OPS_S3_SECRET_DIR", str(folder))
    reload_settings()
    s = settings()
    assert s.aws_access_key_id == "FROMFILE"
    assert s.aws_secret_access_key.get_secret_value() == "file-secret-value"
    assert s.aws_endpoint_url == "http://from-env:8333"
    assert "file-secret-value" not in repr(s) and "FROMFILE" not in repr(s)
    assert "file-secret-value" not in str(s.model_dump())


def test_every_variable_is_documented():
    text = DOCS.read_text()
    missing = [v for names in Settings.variables().values() for v in names if f"`{v}`" not in text]
    assert not missing, f"add to {DOCS.name}: {missing}"

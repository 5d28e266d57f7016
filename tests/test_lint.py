"""Static checks: pyflakes-class errors (undefined names, unused imports, ...) fail the suite.

An undefined name in a rarely run path (the Cerebras child process, a component body that only runs
inside a container) otherwise shows up only when that path runs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_no_pyflakes_errors():
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--select", "F,E9", "--output-format", "concise",
         "gpt2core", "components", "pipelines", "containers", "bench", "tests"],
        cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_layers_point_one_way():
    """The import-linter contracts in pyproject.toml: pipelines -> components -> CLI -> run form ->
    launcher -> stages -> library and platform; gpt2core never imports kfp; the model and trainer
    never import storage or tracking."""
    result = subprocess.run([str(Path(sys.executable).with_name("lint-imports")), "--no-cache"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout

"""Opt-in: replay the Dockerfile's cpu target in a fresh venv and start its entry point.

Runs bench/docker_steps.py (see its docstring and docs/deploy.md): the Dockerfile's RUN lines in a
temporary root, then `loradock serve` as the image would start it, checked over HTTP and stopped
with SIGTERM. It installs the whole project into a new venv (minutes even with pip's cache), so
it runs only with LORADOCK_DOCKER_STEPS=1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("LORADOCK_DOCKER_STEPS") != "1",
                       reason="set LORADOCK_DOCKER_STEPS=1 (installs the project in a new venv)"),
]


def test_dockerfile_cpu_steps_install_and_serve(tmp_path):
    report_path = tmp_path / "docker_steps.json"
    out = subprocess.run([sys.executable, str(REPO / "bench/docker_steps.py"),
                          "--json", str(report_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert report_path.exists(), out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(report_path.read_text())
    checks = report["checks"]
    assert checks["health_status"] == 200, checks["log_tail"]
    assert checks["healthcheck_exit"] == 0
    assert checks["models_without_key"] == 401
    assert checks["models_with_key"] == 200 and "smollm2" in checks["models_listed"]
    assert checks["chat_status"] == 200 and checks["chat_text"]
    assert checks["exit_code"] == 0
    assert checks["cache_unchanged"]
    assert "index.sqlite" in checks["written_data"]
    ran = {(s["stage"], s["action"]) for s in report["steps"]}
    assert ("cpu-venv", "ran") in ran and ("wheels", "ran") in ran
    assert out.returncode == 0 and report["ok"]

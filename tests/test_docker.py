"""docker/: no Docker engine runs here, so the files are checked by hadolint and by reading them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(REPO / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_copies_what_exists():
    for line in (REPO / "docker" / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (REPO / src).exists(), line


def test_compose_runs_a_prefect_server_and_a_scheduled_worker():
    spec = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    server, worker = spec["services"]["prefect-server"], spec["services"]["worker"]
    assert "prefect:3.8" in server["image"] and "server" in server["command"]
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    assert "curate serve" in " ".join(worker["entrypoint"])
    assert (REPO / worker["build"]["dockerfile"]).exists()
    config = worker["environment"]["CURATE_CONFIG"].removeprefix("/app/")
    assert (REPO / config).exists()

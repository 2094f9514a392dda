"""What can be checked of the Docker files without a Docker engine."""
from __future__ import annotations

import subprocess

import yaml

from service_support import REPO


def test_compose_file_wires_the_services():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "redis", "api", "worker"}
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert env["DATABASE_URL"].startswith("postgresql+psycopg://") and "@postgres:" in env["DATABASE_URL"]
        assert env["REDIS_URL"].startswith("redis://redis:")
        assert "checkpoints:/data" in services[name]["volumes"]
        assert set(services[name]["depends_on"]) == {"postgres", "redis"}
    assert services["worker"]["command"] == ["worker"]
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    assert services["api"]["ports"] == ["127.0.0.1:8000:8000"]  # loopback only
    assert "checkpoints" in compose["volumes"]


def test_dockerfile_and_entrypoint():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in dockerfile
    for path in ("baft_core", "app", "migrations", "docker/entrypoint.sh"):
        assert f"COPY {path}" in dockerfile
    entrypoint = REPO / "docker" / "entrypoint.sh"
    assert subprocess.run(["sh", "-n", str(entrypoint)]).returncode == 0  # parses
    text = entrypoint.read_text()
    assert "python -m app migrate" in text and "python -m app worker" in text

"""What can be checked of the Docker files without a Docker engine: they run as they read."""
from __future__ import annotations

import re
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
        # keys are required: the API binds 0.0.0.0 in its container and refuses to without them
        assert env["API_KEYS"].startswith("${API_KEYS:?")
        # scaled workers must not share a name: the default is the container's hostname
        assert "WORKER_NAME" not in env
    assert services["worker"]["command"] == ["worker"]
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    assert services["api"]["ports"] == ["127.0.0.1:8000:8000"]  # loopback only
    assert "checkpoints" in compose["volumes"]


def test_every_service_restarts_and_checks_its_own_health():
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    for name, service in services.items():
        assert service["restart"] == "unless-stopped", name
        assert service["healthcheck"]["test"], name
    api_check = " ".join(services["api"]["healthcheck"]["test"])
    assert "127.0.0.1:8000/health" in api_check
    worker_check = " ".join(services["worker"]["healthcheck"]["test"])
    port = services["worker"]["environment"]["METRICS_PORT"]
    assert f"127.0.0.1:{port}/metrics" in worker_check  # the worker serves no API
    # a deploy lets the worker finish its edit instead of killing it after Docker's 10 s
    assert int(services["worker"]["stop_grace_period"].rstrip("s")) >= 120


def test_dockerfile_and_entrypoint():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in dockerfile
    assert "HEALTHCHECK" not in dockerfile.replace("# No image-wide HEALTHCHECK", "")  # per role, in compose
    assert "sys.version_info >= (3, 11)" in dockerfile
    for path in ("baft_core", "app", "migrations", "docker/entrypoint.sh"):
        assert f"COPY {path}" in dockerfile
    entrypoint = REPO / "docker" / "entrypoint.sh"
    assert subprocess.run(["sh", "-n", str(entrypoint)]).returncode == 0  # parses
    text = entrypoint.read_text()
    assert "python -m app migrate" in text and "exec python -m app worker" in text


def test_cuda_image_has_python_3_11_or_later():
    """Ubuntu 22.04 images ship Python 3.10: the CUDA base must be 24.04 (Python 3.12)."""
    compose = (REPO / "docker-compose.yml").read_text()
    images = re.findall(r"nvidia/cuda:[\w.\-]+", compose + (REPO / "Dockerfile").read_text())
    assert images and all(image.endswith("ubuntu24.04") for image in images), images

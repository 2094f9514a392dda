"""The GPU-serving override (docker-compose.gpu.yml) merged over docker-compose.yml, as
`docker compose -f ... -f ...` merges mappings: the API, which generates, gets a CUDA build and a
GPU; the rest of the deployment is the base file's."""
from __future__ import annotations

import yaml
from service_support import REPO


def merged(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def test_gpu_override_moves_generation_to_the_gpu():
    base = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    override = yaml.safe_load((REPO / "docker-compose.gpu.yml").read_text())
    assert set(override["services"]) == {"api"}  # only the API moves
    api = merged(base, override)["services"]["api"]
    assert api["environment"]["DEVICE"] == "auto" and "DECODE_BATCH_SIZE" in api["environment"]
    assert api["environment"]["REDIS_URL"].startswith("redis://redis:")  # the base wiring stays
    assert "cuda" in api["build"]["args"]["BASE_IMAGE"] and "cu1" in api["build"]["args"]["TORCH_INDEX"]
    assert api["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert api["ports"] == ["127.0.0.1:8000:8000"]

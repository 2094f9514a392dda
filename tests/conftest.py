"""Shared fixtures: a tiny randomly initialised Llama for fast tests, the real bundled model for
integration tests, and the real PostgreSQL/Redis where they run."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

from baft_core.models import BUNDLED, LoadedModel, _dequantised_cache, bundled_gguf, load_model

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
MODEL_CACHE = REPO / "var" / "models"
IN_CI = os.environ.get("CI", "").lower() == "true"

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def bundled_dir() -> Path:
    """The dequantised bundled model (built once, cached under var/models)."""
    path, _ = _dequantised_cache(bundled_gguf(), MODEL_CACHE)
    return path


@pytest.fixture(scope="session")
def bundled(bundled_dir) -> LoadedModel:
    return load_model(BUNDLED, device="cpu", cache_dir=MODEL_CACHE)


def _tiny_llama(directory: Path, tokenizer_dir: Path, init_std: float) -> Path:
    """A 4-layer, d=64 Llama with random weights and the real SmolLM2 tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        initializer_range=init_std,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, bundled_dir) -> Path:
    """The transformers default init (std 0.02): nearly flat logits, for exactness tests."""
    return _tiny_llama(tmp_path_factory.mktemp("tiny-llama"), bundled_dir, 0.02)


@pytest.fixture(scope="session")
def tiny(tiny_dir) -> LoadedModel:
    return load_model(str(tiny_dir), device="cpu", dtype="float32")


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    """Skip with a visible reason where the service is absent; under CI=true that is a failure."""
    if _reachable(host, port):
        return
    message = f"{name} is not reachable at {host}:{port}"
    if IN_CI:
        pytest.fail(message + " (CI=true: the service must be there)")
    pytest.skip(message)


@pytest.fixture
def postgres_url() -> str:
    require_service("PostgreSQL", "127.0.0.1", 5432)
    return os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture
def redis_url() -> str:
    require_service("Redis", "127.0.0.1", 6379)
    return os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture(scope="session")
def tiny_sharp_dir(tmp_path_factory, bundled_dir) -> Path:
    """Initialised with std 0.3, so that its logits have range and an edit can actually make it
    say a target (the std-0.02 tiny model's logits are all within ~0.3)."""
    return _tiny_llama(tmp_path_factory.mktemp("tiny-sharp-llama"), bundled_dir, 0.3)


@pytest.fixture(scope="session")
def tiny_sharp(tiny_sharp_dir) -> LoadedModel:
    return load_model(str(tiny_sharp_dir), device="cpu", dtype="float32")

"""The built-in pool of unrelated prompts the gates learn to stay closed on, when the caller has
none of its own (the service adds its edit log's locality probes)."""
from __future__ import annotations

from importlib import resources


def default_unrelated_prompts() -> list[str]:
    text = resources.files("baft_core").joinpath("unrelated_prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]

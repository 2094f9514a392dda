"""Model loading and generic decoder-layer discovery (Llama, GPT-2, Qwen2), with a tiny edit on each
non-Llama family so that the cached-prefix training path runs on their layers too."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from baft_core import EditConfig, Editor, EditRequest, find_decoder_layers, load_model, models
from baft_core.encoding import context_limit, teacher_forced
from baft_core.prefix_cache import CachedBatch


def test_load_model_missing_directory_names_the_fix():
    with pytest.raises(FileNotFoundError, match=r"'/nonexistent'.*point MODEL at a directory"):
        load_model("/nonexistent", device="cpu")


def test_load_model_tiny_identity(tiny, tiny_dir):
    assert tiny.identity.startswith(tiny_dir.name + "@")
    assert load_model(str(tiny_dir), device="cpu", dtype="float32").identity == tiny.identity  # stable
    assert next(tiny.model.parameters()).dtype == torch.float32


def test_concurrent_cache_builds_run_once_and_keep_the_first(monkeypatch, tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"weights")
    builds = []

    def slow_build(gguf, digest, target):  # the real build's contract: a complete directory
        builds.append(target)
        time.sleep(0.2)  # long enough for the other loader to arrive mid-build
        target.mkdir()
        (target / "complete").write_text("{}")

    monkeypatch.setattr(models, "_build_cache", slow_build)
    results = []
    loaders = [
        threading.Thread(target=lambda: results.append(models._dequantised_cache(gguf, tmp_path / "cache")))
        for _ in range(2)
    ]
    for loader in loaders:
        loader.start()
    for loader in loaders:
        loader.join()
    assert len(builds) == 1 and len(results) == 2 and results[0] == results[1]
    assert (results[0][0] / "complete").is_file()


def test_find_decoder_layers_llama(tiny):
    layers = find_decoder_layers(tiny.model)
    assert layers is tiny.model.model.layers and len(layers) == 4


def _gpt2(vocab):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab, n_positions=64, initializer_range=0.3)
    ).eval()


def _qwen2(vocab):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
            initializer_range=0.3,
        )
    ).eval()


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_generic_layers_and_tiny_edit(tiny, family):
    tokenizer = tiny.tokenizer
    model = _gpt2(len(tokenizer)) if family == "gpt2" else _qwen2(len(tokenizer))
    layers = find_decoder_layers(model)
    expected = model.transformer.h if family == "gpt2" else model.model.layers
    assert layers is expected
    assert context_limit(model) == 64

    last = len(layers) - 1
    editor = Editor(model, tokenizer, EditConfig(layers=[1, last] if last > 1 else [1], rank=4, max_steps=40, lr=0.1, block_edits=0),
                    unrelated_prompts=["Water boils at"])
    try:
        # the cached-prefix batch is exact on this family's layers too
        torch.manual_seed(1)
        with torch.no_grad():
            for layer in editor.layers:
                editor.interventions[layer].source.bias.normal_()
                editor.interventions[layer].gate.bias.fill_(3.0)
        examples = [editor.encode("The capital of France is", "Paris"), editor.encode("Hi", "there")]
        batch = CachedBatch(model, editor.attachment, editor.interventions, examples, 3, editor.pad_id)
        logits = batch.forward().logits
        tf = teacher_forced(examples, 3, editor.pad_id)
        with editor.attachment.intervene(tf.intervene):
            full = model(input_ids=tf.input_ids, attention_mask=tf.attention_mask).logits
        assert torch.allclose(logits, full[tf.targets != -100], atol=1e-4, rtol=1e-4)

        editor.reset()
        request = EditRequest("The mother tongue of Danielle Darrieux is", "Japanese")
        example = editor.encode(request.prompt, request.target)

        def target_loss():
            tf = teacher_forced([example], 3, editor.pad_id)
            with torch.no_grad(), editor.attachment.intervene(tf.intervene):
                out = model(input_ids=tf.input_ids, attention_mask=tf.attention_mask).logits
            keep = tf.targets != -100
            return torch.nn.functional.cross_entropy(out[keep], tf.targets[keep]).item()

        before = target_loss()
        result = editor.edit(request)
        after = target_loss()
        assert after < 0.6 * before, (before, after, result.losses)
        assert len(editor.history) == 1
    finally:
        editor.attachment.detach()


def test_find_decoder_layers_raises_without_a_stack():
    class Config:
        num_hidden_layers = 3

    class NoStack(torch.nn.Module):
        config = Config()

        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(2)])

    with pytest.raises(ValueError, match="no ModuleList of 3 decoder layers"):
        find_decoder_layers(NoStack())

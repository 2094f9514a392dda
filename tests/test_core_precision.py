"""The precision a model runs in: an explicit choice stands, CUDA takes bf16, and a CPU takes the
candidate that ran the probe step fastest, measured once per host and model shape."""
from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import MODEL_CACHE
from torch import nn
from transformers import LlamaConfig

from baft_core import EditConfig, packed_linears, precision
from baft_core.models import cpu_precision_record
from baft_core.precision import FP16_WEIGHTS, FP32_PACKED, cpu_candidates, measured_choice, resolve_precision

CPU = torch.device("cpu")


def _fake_timings(seconds: dict[str, float], calls: list):
    def measure(config, candidates, repeats=precision.PROBE_REPEATS):
        calls.append(list(candidates))
        return {name: seconds[name] for name in candidates}

    return measure


def test_auto_on_a_cpu_takes_the_fastest_measured_candidate_and_remembers_it(monkeypatch, tmp_path, tiny):
    calls = []
    seconds = {"float32": 0.03, "bfloat16": 0.01, FP16_WEIGHTS: 0.02, FP32_PACKED: 0.025}
    monkeypatch.setattr(precision, "measure_candidates", _fake_timings(seconds, calls))
    config = tiny.model.config
    assert resolve_precision("auto", CPU, config, tmp_path) == "bfloat16"
    assert calls == [cpu_candidates()]
    (record,) = [path for path in tmp_path.glob("precision-*.json")]
    assert record.read_text().count('"choice": "bfloat16"') == 1

    seconds["bfloat16"] = 0.05  # a second start reads the first one's choice, it does not measure
    assert resolve_precision(None, CPU, config, tmp_path) == "bfloat16"
    assert len(calls) == 1

    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)  # another host setting: measured again
    assert resolve_precision("auto", CPU, config, tmp_path) in (FP16_WEIGHTS, FP32_PACKED, "float32")
    assert len(calls) == 2 and len(list(tmp_path.glob("precision-*.json"))) == 2

    # a candidate on another kernel (fp16 weights ran on one thread before): its old timing is void
    monkeypatch.setattr(packed_linears.Fp16Linear, "kernel", "FBGEMM fp16, some other way")
    resolve_precision("auto", CPU, config, tmp_path)
    assert len(calls) == 3 and len(list(tmp_path.glob("precision-*.json"))) == 3


def test_packed_fp32_kinds_are_candidates_only_where_their_kernels_run(monkeypatch, tmp_path, tiny):
    monkeypatch.setattr(packed_linears, "fp16_supported", lambda: False)
    monkeypatch.setattr(packed_linears, "fp32_supported", lambda: True)
    assert cpu_candidates() == ["float32", "bfloat16", FP32_PACKED]
    monkeypatch.setattr(packed_linears, "fp32_supported", lambda: False)  # no oneDNN (an ARM build, say)
    calls = []
    monkeypatch.setattr(precision, "measure_candidates", _fake_timings({"float32": 2, "bfloat16": 3}, calls))
    assert resolve_precision("auto", CPU, tiny.model.config, tmp_path) == "float32"
    assert calls == [["float32", "bfloat16"]]


def test_a_model_the_probe_cannot_run_loads_in_fp32_and_is_probed_again_next_time(monkeypatch, tmp_path, tiny, caplog):
    def fails(config, candidates, repeats=precision.PROBE_REPEATS):
        raise TypeError("forward() got an unexpected keyword argument 'inputs_embeds'")

    monkeypatch.setattr(precision, "measure_candidates", fails)
    assert resolve_precision("auto", CPU, tiny.model.config, tmp_path) == "float32"
    assert "timing the precisions failed" in caplog.text and "inputs_embeds" in caplog.text
    assert not list(tmp_path.glob("precision-*.json"))  # not remembered: a fixed probe gets its chance
    last_fastest = {name: 1 + index for index, name in enumerate(cpu_candidates()[::-1])}
    monkeypatch.setattr(precision, "measure_candidates", _fake_timings(last_fastest, []))
    assert resolve_precision("auto", CPU, tiny.model.config, tmp_path) == cpu_candidates()[-1]


def test_processes_starting_together_measure_once(monkeypatch, tmp_path, tiny):
    calls = []
    fake = _fake_timings({"float32": 1, "bfloat16": 2, FP16_WEIGHTS: 3, FP32_PACKED: 4}, calls)

    def slow(config, candidates, repeats=precision.PROBE_REPEATS):
        time.sleep(0.2)  # the other process arrives mid-measurement
        return fake(config, candidates)

    monkeypatch.setattr(precision, "measure_candidates", slow)
    results = []
    starts = [
        threading.Thread(target=lambda: results.append(measured_choice(tiny.model.config, tmp_path)))
        for _ in range(2)
    ]
    for start in starts:
        start.start()
    for start in starts:
        start.join()
    assert len(calls) == 1 and len(results) == 2 and results[0] == results[1]
    assert results[0]["choice"] == "float32"


def test_the_probe_runs_every_candidate_for_real(tiny):
    seconds = precision.measure_candidates(tiny.model.config, cpu_candidates(), repeats=1)
    assert set(seconds) == set(cpu_candidates())
    assert all(0 < value < 5 for value in seconds.values()), seconds


def _small_configs():
    from transformers import Gemma2Config, GPT2Config, GPTNeoXConfig, Qwen2Config

    common = dict(vocab_size=300, num_hidden_layers=6, num_attention_heads=2, max_position_embeddings=64)
    return {
        "qwen2": Qwen2Config(hidden_size=32, intermediate_size=64, num_key_value_heads=1, **common),
        "gemma2": Gemma2Config(hidden_size=32, intermediate_size=64, num_key_value_heads=1, head_dim=16, **common),
        "gpt-neox": GPTNeoXConfig(hidden_size=32, intermediate_size=64, **common),
        "gpt2": GPT2Config(n_layer=6, n_embd=32, n_head=2, vocab_size=300, n_positions=64),
    }


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "gpt-neox", "gpt2"])
def test_the_probe_runs_on_each_model_family(family):
    config = _small_configs()[family]
    model = precision.probe_model(config)
    assert model.config.num_hidden_layers == 3 < config.num_hidden_layers  # layers 3-5 of 6 are a step's
    assert len(getattr(model.config, "layer_types", None) or [0] * 3) == 3  # per-layer kinds cut too
    seconds = precision.measure_candidates(config, cpu_candidates(), repeats=1)
    assert set(seconds) == set(cpu_candidates()) and all(value > 0 for value in seconds.values())


def test_a_candidate_far_behind_after_one_round_runs_no_more(monkeypatch, tiny):
    rounds = {name: 0 for name in cpu_candidates()}

    def step_seconds(model, dtype):
        name = "bfloat16" if dtype == torch.bfloat16 else next(n for n, m in probes.items() if m is model)
        rounds[name] += 1
        return {"float32": 0.01, "bfloat16": 0.05}.get(name, 0.012)

    probes = {}
    real_prepared = precision._prepared
    monkeypatch.setattr(precision, "_prepared", lambda ref, name: probes.setdefault(name, real_prepared(ref, name)))
    monkeypatch.setattr(precision, "probe_step_seconds", step_seconds)
    seconds = precision.measure_candidates(tiny.model.config, cpu_candidates(), repeats=5)
    assert rounds["bfloat16"] == 2 and rounds["float32"] == 6  # warm-up and one timed round
    assert seconds["bfloat16"] == 0.05 and seconds["float32"] == 0.01


def test_the_probe_runs_the_layers_of_a_training_step(tiny):
    model = precision.probe_model(tiny.model.config)  # 4 layers, the first edited one is 2
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == tiny.model.config.vocab_size
    assert next(model.parameters()).dtype == torch.float32
    smollm2 = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30)
    assert precision.probe_layers(smollm2) == 30 - EditConfig().resolved_layers(30)[0] == 13
    # A layer of a 7B Llama is 0.8 GB in fp32: one of them is enough to stream from memory.
    llama_7b = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32)
    assert precision.probe_layers(llama_7b) == 1


def test_each_precision_packs_as_the_model_loader_does():
    def model():
        return nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))

    plain = model()
    precision.pack_frozen(plain, "float32", CPU)
    assert all(type(m) is nn.Linear for m in plain)
    if packed_linears.bf16_supported():
        bf16 = model().bfloat16()
        precision.pack_frozen(bf16, "bfloat16", CPU)
        assert all(isinstance(m, packed_linears.Bf16Linear) for m in bf16)
    if packed_linears.fp16_supported():
        fp16 = model()
        precision.pack_frozen(fp16, FP16_WEIGHTS, CPU)
        assert all(isinstance(m, packed_linears.Fp16Linear) for m in fp16)
    if packed_linears.fp32_supported():
        fp32 = model()
        precision.pack_frozen(fp32, FP32_PACKED, CPU)
        assert all(isinstance(m, packed_linears.Fp32Linear) for m in fp32)


def test_the_bundled_model_runs_in_the_measured_choice(bundled):
    record = cpu_precision_record(cache_dir=MODEL_CACHE)
    assert bundled.precision == record["choice"] == min(record["seconds"], key=record["seconds"].get)


def test_explicit_and_cuda_choices_need_no_measurement(monkeypatch):
    monkeypatch.setattr(precision, "measure_candidates", None)  # calling it would fail
    assert resolve_precision("float16", CPU) == "float16"
    assert resolve_precision(None, torch.device("cuda")) == "bfloat16"
    with pytest.raises(ValueError, match="pass its config and a cache directory"):
        resolve_precision("auto", CPU)


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        resolve_precision("float8", CPU)


@pytest.mark.parametrize(
    "name, check, reason",
    [
        (FP16_WEIGHTS, "fp16_supported", "a CPU that FBGEMM supports"),
        (FP32_PACKED, "fp32_supported", "a CPU and a torch build with oneDNN"),
    ],
)
def test_packed_fp32_precisions_need_their_kernel_on_a_cpu(monkeypatch, name, check, reason):
    with pytest.raises(ValueError, match=f"dtype {name} needs {reason}"):
        resolve_precision(name, torch.device("cuda"))
    monkeypatch.setattr(packed_linears, check, lambda: False)
    with pytest.raises(ValueError, match=f"dtype {name} needs {reason}"):
        resolve_precision(name, CPU)

"""The OpenAI-compatible API, driven by the official `openai` client against a running server
(`python -m app` on the tiny model): model names per version, completions and chat completions
whole and streamed with usage, stop sequences, and errors in OpenAI's shape."""
from __future__ import annotations

import openai
import pytest
from service_support import free_port_in, server, tiny_server_env, tiny_settings
from transformers import AutoTokenizer

PROMPT = "The capital of France is"
KEY, READ_KEY = "test-write-key", "test-read-key"


@pytest.fixture(scope="module")
def running(tiny_sharp_dir, tmp_path_factory):
    """The server, with one edit applied: versions 1 (base) and 2."""
    data = tmp_path_factory.mktemp("openai-data")
    env = tiny_server_env(tiny_settings(tiny_sharp_dir, data), API_KEYS=KEY, READ_API_KEYS=READ_KEY)
    port = free_port_in()
    with server(env, data / "server.log", port) as client:
        client.headers = {"Authorization": f"Bearer {KEY}"}
        edit = client.wait(client.edit("France", "The capital of {subject} is", "Lyon")["id"], timeout=120)
        assert edit["status"] == "applied", edit
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=READ_KEY, max_retries=0, timeout=60)
        yield client, api, port, tiny_sharp_dir.name


def test_models_list_every_version_under_an_immutable_name(running):
    client, api, _, name = running
    ids = [m.id for m in api.models.list()]
    assert ids == [name, f"{name}@current", f"{name}@1", f"{name}@2"]
    assert api.models.retrieve(f"{name}@2").id == f"{name}@2"
    with pytest.raises(openai.NotFoundError) as caught:
        api.models.retrieve(f"{name}@99")
    assert caught.value.body["code"] == "model_not_found"


def test_completion_equals_generate_per_version_with_usage(running, tiny_sharp_dir):
    client, api, _, name = running
    tokenizer = AutoTokenizer.from_pretrained(tiny_sharp_dir)
    for model, version in ((name, 1), (f"{name}@1", 1), (f"{name}@2", 2), (f"{name}@current", 2)):
        expected = client.generate(PROMPT, max_new_tokens=6, version=version)
        out = api.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0)
        assert out.model == f"{name}@{version}"  # the version that answered, by its immutable name
        assert out.choices[0].text == expected["text"]
        assert out.choices[0].finish_reason == "length"
        assert out.usage.prompt_tokens == len(tokenizer(PROMPT).input_ids)
        assert out.usage.completion_tokens == expected["tokens"] == 6
        assert out.usage.total_tokens == out.usage.prompt_tokens + 6
    before = api.completions.create(model=f"{name}@1", prompt=PROMPT, max_tokens=6, temperature=0)
    after = api.completions.create(model=f"{name}@2", prompt=PROMPT, max_tokens=6, temperature=0)
    assert before.choices[0].text != after.choices[0].text  # the edit shows, and only in version 2


def test_streamed_completion_equals_whole_and_reports_usage(running):
    _, api, _, name = running
    whole = api.completions.create(model=f"{name}@2", prompt=PROMPT, max_tokens=10, temperature=0)
    chunks = list(api.completions.create(model=f"{name}@2", prompt=PROMPT, max_tokens=10, temperature=0,
                                         stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10 and not chunks[-1].choices
    assert {c.model for c in chunks} == {f"{name}@2"}


def test_several_prompts_and_a_stop_sequence(running):
    _, api, _, name = running
    prompts = [PROMPT, "Once upon a time"]
    alone = [api.completions.create(model=name, prompt=p, max_tokens=8, temperature=0).choices[0].text for p in prompts]
    together = api.completions.create(model=name, prompt=prompts, max_tokens=8, temperature=0)
    assert [c.text for c in together.choices] == alone and [c.index for c in together.choices] == [0, 1]
    stop = alone[0][3:5]  # a piece of what it would say
    cut = api.completions.create(model=name, prompt=PROMPT, max_tokens=8, temperature=0, stop=[stop])
    assert cut.choices[0].text == alone[0][: alone[0].index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = api.completions.create(model=name, prompt=PROMPT, max_tokens=8, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_chat_completion_uses_the_chat_template_whole_and_streamed(running, tiny_sharp_dir):
    _, api, _, name = running
    tokenizer = AutoTokenizer.from_pretrained(tiny_sharp_dir)
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is the capital of France?"}]
    out = api.chat.completions.create(model=f"{name}@2", messages=messages, max_tokens=7, temperature=0)
    templated = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert out.usage.prompt_tokens == len(tokenizer(templated, add_special_tokens=False).input_ids)
    assert out.choices[0].message.role == "assistant" and out.model == f"{name}@2"
    assert out.usage.completion_tokens == 7 and out.choices[0].finish_reason == "length"
    chunks = list(api.chat.completions.create(model=f"{name}@2", messages=messages, max_tokens=7, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    seeded = [api.chat.completions.create(model=name, messages=messages, max_tokens=7, temperature=0.9, seed=11)
              .choices[0].message.content for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_errors_come_in_openai_shape(running):
    _, api, port, name = running
    with pytest.raises(openai.BadRequestError) as caught:
        api.completions.create(model=name, prompt=PROMPT, temperature=3)
    assert caught.value.body["type"] == "invalid_request_error" and caught.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as caught:
        api.completions.create(model=name, prompt=PROMPT, max_tokens=200)  # the tiny model's context is 128
    assert caught.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as caught:
        api.completions.create(model=name, prompt=PROMPT, frequency_penalty=0.5)
    assert caught.value.body["param"] == "frequency_penalty"
    with pytest.raises(openai.NotFoundError) as caught:
        api.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["code"] == "model_not_found" and "gpt-4o" in caught.value.body["message"]
    stranger = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        stranger.models.list()
    assert caught.value.body["type"] == "authentication_error"

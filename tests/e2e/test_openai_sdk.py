"""End-to-end: the `openai` Python SDK, pointed at the forwarder, works as against vLLM itself."""

import openai
import pytest

from tests.harness import wait_until


@pytest.fixture
def client(fake_backend, forwarder):
    backends = [fake_backend(name="a", config={"tokens": 3}),
                fake_backend(name="b", config={"tokens": 3})]
    fwd = forwarder([b.url for b in backends], wait_healthy=2)
    with openai.OpenAI(base_url=fwd.url + "/v1", api_key="sk-test", max_retries=0) as sdk:
        yield sdk


def test_chat_completion(client):
    reply = client.chat.completions.create(
        model="llama", messages=[{"role": "user", "content": "Hello!"}])
    assert reply.object == "chat.completion"
    assert reply.model == "llama"
    assert reply.choices[0].message.content
    assert reply.usage.total_tokens > 0


def test_chat_completion_stream(client):
    stream = client.chat.completions.create(
        model="llama", messages=[{"role": "user", "content": "Count."}], stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok0 tok1 tok2 "
    assert chunks[-1].usage is not None
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)


def test_completion_plain_and_stream(client):
    reply = client.completions.create(model="llama", prompt="The capital of France is")
    assert reply.object == "text_completion" and reply.choices[0].text
    pieces = [c.choices[0].text for c in client.completions.create(
        model="llama", prompt="The capital of France is", stream=True) if c.choices]
    assert "".join(pieces) == "tok0 tok1 tok2 "


def test_embeddings(client):
    result = client.embeddings.create(model="llama", input=["one", "two"])
    assert len(result.data) == 2
    assert len(result.data[0].embedding) == 8


def test_models_list(client):
    assert [m.id for m in client.models.list()] == ["llama-3.1-8b", "llama"]


def test_backend_errors_reach_the_sdk_as_its_exceptions(fake_backend, forwarder):
    backend = fake_backend(config={"strict_models": True})
    fwd = forwarder([backend.url], wait_healthy=1)
    with openai.OpenAI(base_url=fwd.url + "/v1", api_key="sk-test", max_retries=0) as sdk:
        with pytest.raises(openai.NotFoundError) as info:
            sdk.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
        assert "The model `nope` does not exist." in str(info.value)
        backend.configure(metrics_status=500)
        wait_until(lambda: fwd.backends()["healthy"] == 0)
        with pytest.raises(openai.InternalServerError) as info:
            sdk.chat.completions.create(model="llama", messages=[{"role": "user", "content": "x"}])
        assert info.value.status_code == 503



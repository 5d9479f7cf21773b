"""The official `ollama` and `openai` Python clients through olb, unmodified."""

import pytest

from olb.sim import SimConfig

from harness import start_cluster

ollama = pytest.importorskip("ollama")
openai = pytest.importorskip("openai")


@pytest.fixture
def cluster(loop_thread):
    c = loop_thread.run(start_cluster(2, SimConfig(token_rate=0, ttft=0, seed=5)))
    try:
        yield c
    finally:
        loop_thread.run(c.close())


def test_ollama_client(cluster):
    with ollama.Client(host=f"http://127.0.0.1:{cluster.port}") as client:
        check_ollama_client(client)


def check_ollama_client(client):
    names = [m.model for m in client.list().models]
    assert "llama3.2:latest" in names

    reply = client.chat(model="llama3.2", messages=[{"role": "user", "content": "hello"}])
    assert reply.message.role == "assistant" and reply.message.content and reply.done

    parts = list(client.chat(model="llama3.2", messages=[{"role": "user", "content": "hello"}], stream=True))
    assert parts[-1].done and "".join(p.message.content for p in parts) == reply.message.content

    gen = client.generate(model="llama3.2", prompt="Why is the sky blue?")
    assert gen.response and gen.eval_count
    streamed = list(client.generate(model="llama3.2", prompt="Why is the sky blue?", stream=True))
    assert "".join(p.response for p in streamed) == gen.response

    emb = client.embed(model="nomic-embed-text", input=["a", "b"])
    assert len(emb.embeddings) == 2 and len(emb.embeddings[0]) > 0

    assert client.show("llama3.2").modelinfo
    client.ps()

    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 404


def test_openai_client(cluster):
    with openai.OpenAI(base_url=f"http://127.0.0.1:{cluster.port}/v1", api_key="unused",
                       max_retries=0) as client:
        check_openai_client(client)


def check_openai_client(client):
    models = [m.id for m in client.models.list()]
    assert "llama3.2:latest" in models

    done = client.chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": "hi"}])
    text = done.choices[0].message.content
    assert text and done.usage.completion_tokens > 0

    stream = client.chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": "hi"}],
                                            stream=True)
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert "".join(pieces) == text

    emb = client.embeddings.create(model="nomic-embed-text", input="hello")
    assert len(emb.data[0].embedding) > 0

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])


def test_openai_client_sees_mid_stream_error(loop_thread):
    c = loop_thread.run(start_cluster(1, SimConfig(token_rate=0, ttft=0, seed=5, fail_after_tokens=3,
                                                   num_predict_default=40)))
    try:
        with openai.OpenAI(base_url=f"http://127.0.0.1:{c.port}/v1", api_key="x", max_retries=0) as client:
            stream = client.chat.completions.create(
                model="llama3.2", messages=[{"role": "user", "content": "hi"}], stream=True)
            with pytest.raises(openai.APIError):
                for _ in stream:
                    pass
        with ollama.Client(host=f"http://127.0.0.1:{c.port}") as ollama_client:
            with pytest.raises(ollama.ResponseError):
                for _ in ollama_client.generate(model="llama3.2", prompt="x", stream=True):
                    pass
    finally:
        loop_thread.run(c.close())

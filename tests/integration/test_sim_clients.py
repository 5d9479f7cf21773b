"""The official clients, unmodified, against olb.sim (server on a loop thread)."""

import ollama
import openai
import pytest

from olb.sim import SimConfig, start_sim

CONFIG = SimConfig(token_rate=0, ttft=0, seed=9)


@pytest.fixture
def sim(loop_thread):
    server = loop_thread.run(start_sim(CONFIG))
    try:
        yield server
    finally:
        loop_thread.run(server.close())


def test_ollama_client(sim):
    with ollama.Client(host=sim.url) as c:
        listed = c.list()
        assert [m.model for m in listed.models] == list(CONFIG.models)
        assert listed.models[0].details.family == "llama"
        assert c.ps().models == []

        r = c.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 6})
        assert r.message.role == "assistant" and r.message.content and r.done_reason == "length"
        assert r.eval_count == 6 and r.total_duration > 0
        parts = list(c.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}], stream=True,
                            options={"num_predict": 6}))
        assert "".join(p.message.content for p in parts) == r.message.content
        assert parts[-1].done and not parts[0].done

        g = c.generate(model="llama3.2", prompt="Why is the sky blue?")
        assert g.done_reason == "stop" and g.eval_count == CONFIG.num_predict_default and g.context
        streamed = list(c.generate(model="llama3.2", prompt="Why is the sky blue?", stream=True))
        assert "".join(p.response for p in streamed) == g.response

        loaded = c.ps().models
        assert [m.model for m in loaded] == ["llama3.2:latest"] and loaded[0].size_vram > 0
        assert loaded[0].context_length == CONFIG.num_ctx

        shown = c.show("llama3.1:8b")
        assert shown.modelinfo["llama.context_length"] == 131072
        assert shown.capabilities == ["completion", "tools"] and shown.details.parameter_size == "8.0B"

        e = c.embed(model="nomic-embed-text", input=["a", "b"])
        assert len(e.embeddings) == 2 and len(e.embeddings[0]) == 768
        assert len(c.embeddings(model="nomic-embed-text", prompt="a").embedding) == 768

        assert [p.status for p in c.pull("llama3.2:1b", stream=True)][-1] == "success"
        assert c.copy("llama3.2:1b", "copy:1").status == "success"
        assert c.delete("copy:1").status == "success"

        with pytest.raises(ollama.ResponseError) as info:
            c.chat(model="nope", messages=[{"role": "user", "content": "x"}])
        assert info.value.status_code == 404 and info.value.error == "model 'nope' not found"
        with pytest.raises(ollama.ResponseError) as info:
            list(c.generate(model="nope", prompt="x", stream=True))
        assert info.value.status_code == 404


def test_openai_client(sim):
    with openai.OpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0) as c:
        assert [m.id for m in c.models.list()] == list(CONFIG.models)
        assert c.models.retrieve("llama3.2").owned_by == "library"

        r = c.chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": "hi"}],
                                      max_tokens=5)
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
        stream = c.chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=5, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == r.choices[0].message.content
        assert chunks[-1].usage.total_tokens == r.usage.total_tokens
        assert chunks[-2].choices[0].finish_reason == "length"

        done = c.completions.create(model="llama3.2", prompt="x", max_tokens=3)
        assert done.choices[0].finish_reason == "length" and done.choices[0].text

        emb = c.embeddings.create(model="nomic-embed-text", input="hello")   # base64 on the wire
        flt = c.embeddings.create(model="nomic-embed-text", input="hello", encoding_format="float")
        assert len(emb.data[0].embedding) == 768
        assert emb.data[0].embedding == pytest.approx(flt.data[0].embedding, abs=1e-6)

        with pytest.raises(openai.NotFoundError) as info:
            c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
        assert info.value.body["type"] == "not_found_error"


def test_openai_client_sees_faults(loop_thread):
    server = loop_thread.run(start_sim(CONFIG.replace(error_after_tokens=2)))
    try:
        with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as c:
            stream = c.chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": "x"}],
                                               stream=True)
            with pytest.raises(openai.APIError):
                list(stream)
        with ollama.Client(host=server.url) as c:
            with pytest.raises(ollama.ResponseError) as info:
                list(c.generate(model="llama3.2", prompt="x", stream=True))
            assert "unexpected EOF" in info.value.error
    finally:
        loop_thread.run(server.close())

"""olb.sim's model store over real sockets: blobs, create, copy, delete, push
(the official `ollama` client where it has a call for it), and the two
compatibility layers /v1/messages (Anthropic) and /v1/responses (openai client)."""

import hashlib
import tracemalloc

import httpx
import ollama
import openai
import orjson
import pytest

from olb.sim import SimConfig, gguf, start_sim
from tests.integration.test_sim_api import fetch

CONFIG = SimConfig(token_rate=0, ttft=0, seed=5)
KV = {"general.architecture": "llama", "general.parameter_count": 1_235_814_432, "general.file_type": 7,
      "llama.context_length": 8192, "llama.block_count": 16, "llama.embedding_length": 2048}


@pytest.fixture
def sim(loop_thread):
    server = loop_thread.run(start_sim(CONFIG))
    try:
        yield server
    finally:
        loop_thread.run(server.close())


@pytest.fixture
def gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    data = gguf.write(KV) + bytes(range(256)) * 4000     # ~1 MB: more than one read
    path.write_bytes(data)
    return path, data


def call(loop_thread, server, method, path, body=None, headers=None):
    return loop_thread.run(fetch(server, method, path, body, headers))


def test_create_from_a_blob_then_generate_copy_push_delete(sim, gguf_file, loop_thread):
    path, data = gguf_file
    with ollama.Client(host=sim.url) as c:
        digest = c.create_blob(path)
        assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
        assert call(loop_thread, sim, "HEAD", f"/api/blobs/{digest}").status == 200
        steps = [p.status for p in c.create(model="mine", files={"model.gguf": digest}, stream=True)]
        assert steps == ["parsing GGUF", f"using existing layer {digest}", "writing manifest", "success"]

        tags = {m.model: m for m in c.list().models}
        mine = tags["mine:latest"]
        config = sim.catalogue.lookup(sim.catalogue.installed["registry.ollama.ai/library/mine:latest"].name).config
        assert mine.size == len(data) + config.size
        assert mine.details.parameter_size == "1.2B" and mine.details.quantization_level == "Q8_0"
        shown = c.show("mine")
        assert shown.modelinfo["llama.context_length"] == 8192 and shown.modelinfo["llama.block_count"] == 16

        g = c.generate(model="mine", prompt="hi", options={"num_predict": 4})
        assert g.done_reason == "length" and g.eval_count == 4 and g.response

        # Made here, so the (simulated) registry does not have it.
        with pytest.raises(ollama.ResponseError) as info:
            c.pull("mine")
        assert info.value.error == "pull model manifest: file does not exist"
        assert c.copy("mine", "me/copy:v1").status == "success"
        tags = {m.model: m for m in c.list().models}
        assert tags["me/copy:v1"].digest == tags["mine:latest"].digest

        pushed = list(c.push("mine", stream=True))
        assert pushed[0].status == "retrieving manifest"
        assert [p.status for p in pushed[-2:]] == ["pushing manifest", "success"]
        layer = [p for p in pushed if p.digest == digest]
        assert layer[0].status == f"pushing {digest[7:19]}" and layer[-1].completed == layer[-1].total == len(data)
        with pytest.raises(ollama.ResponseError) as info:
            c.push("nope")
        assert info.value.error == ("open /root/.ollama/models/manifests/registry.ollama.ai/library/nope/latest:"
                                    " no such file or directory")

        # The blob is shared with the copy: deleting one keeps it, the second removes it.
        assert c.delete("mine").status == "success"
        assert "mine:latest" not in [m.model for m in c.list().models]
        assert call(loop_thread, sim, "HEAD", f"/api/blobs/{digest}").status == 200
        c.delete("me/copy:v1")
        assert call(loop_thread, sim, "HEAD", f"/api/blobs/{digest}").status == 404
        with pytest.raises(ollama.ResponseError) as info:
            c.delete("mine")
        assert info.value.status_code == 404 and info.value.error == "model 'mine' not found"
        with pytest.raises(ollama.ResponseError) as info:
            c.generate(model="mine", prompt="hi")
        assert info.value.status_code == 404


def test_create_from_a_base_with_system_and_parameters(sim, loop_thread):
    with ollama.Client(host=sim.url) as c:
        steps = [p.status for p in c.create(model="terse", from_="llama3.2", system="Be brief.",
                                            parameters={"temperature": 0.2}, stream=True)]
        base = sim.catalogue.installed["registry.ollama.ai/library/llama3.2:latest"]
        system = "sha256:" + hashlib.sha256(b"Be brief.").hexdigest()
        params = "sha256:" + hashlib.sha256(b'{"temperature":0.2}\n').hexdigest()
        assert steps == [f"using existing layer {base.layers[0].digest}", f"creating new layer {system}",
                         f"creating new layer {params}", "writing manifest", "success"]
        # Again: every layer exists now.
        again = [p.status for p in c.create(model="terse", from_="llama3.2", system="Be brief.",
                                            parameters={"temperature": 0.2}, stream=True)]
        assert again[1:3] == [f"using existing layer {system}", f"using existing layer {params}"]
        listed = {m.model: m for m in c.list().models}
        assert listed["terse:latest"].details.family == "llama"
        shown = call(loop_thread, sim, "POST", "/api/show", {"model": "terse"}).json()
        assert shown["system"] == "Be brief." and shown["parameters"] == f"{'temperature':<30} 0.2"
        assert 'SYSTEM """Be brief."""' in shown["modelfile"]
        assert "PARAMETER temperature 0.2" in shown["modelfile"]
        r = c.chat(model="terse", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 3})
        assert r.eval_count == 3
        # A base the simulated registry knows is pulled first (parseFromModel).
        pulled = [p.status for p in c.create(model="small", from_="qwen2.5:0.5b", stream=True)]
        assert pulled[0] == "pulling manifest" and pulled[-2:] == ["writing manifest", "success"]
        assert "qwen2.5:0.5b" in [m.model for m in c.list().models]


@pytest.mark.parametrize("body, status, lines", [
    # Errors before the first line are plain statuses; after one, in-band lines.
    ({"model": "x", "files": {"a.gguf": "sha256:" + "1" * 64}}, 200,
     [{"status": "parsing GGUF"},
      {"error": "open /root/.ollama/models/blobs/sha256-" + "1" * 64 + ": no such file or directory"}]),
    ({"model": "x", "files": {"a.bin": "sha256:" + "1" * 64}}, 400, {"error": "unknown type"}),
    ({"model": "x"}, 400, {"error": "neither 'from' or 'files' was specified"}),
    ({"model": "x", "from": "no-such-base"}, 200,
     [{"status": "pulling manifest"}, {"error": "pull model manifest: file does not exist"}]),
    ({"model": "x", "files": {"/abs.gguf": "sha256:" + "1" * 64}}, 400, {"error": "file path must be relative"}),
    ({"model": "x", "files": {"a.gguf": ""}}, 400, {"error": "invalid digest format"}),
    ({"model": "bad name!", "from": "llama3.2"}, 400, {"error": "invalid model name"}),
    ({"model": "x", "from": "llama3.2", "quantize": "q4_k_m"}, 200,
     [{"error": "quantization is only supported for F16, BF16 and F32 models"}]),
    ({"model": "x", "files": {"a.gguf": "sha256:" + "1" * 64}, "stream": False}, 500,
     {"error": "open /root/.ollama/models/blobs/sha256-" + "1" * 64 + ": no such file or directory"}),
    ({"model": "x", "from": "llama3.2", "stream": False}, 200, {"status": "success"}),
])
def test_create_errors(sim, loop_thread, body, status, lines):
    r = call(loop_thread, sim, "POST", "/api/create", body)
    if body.get("quantize"):
        # The only error, but after nothing: a plain 500.
        assert (r.status, r.json()) == (500, lines[0])
        return
    assert r.status == status
    if isinstance(lines, list):
        assert r.headers["content-type"] == "application/x-ndjson" and r.lines() == lines
    else:
        # "application/json" from the progress channel, gin's "; charset=utf-8"
        # from the checks CreateHandler makes before it.
        assert r.headers["content-type"].startswith("application/json") and r.json() == lines


def test_blob_endpoints(sim, loop_thread):
    good = b"not a gguf"
    digest = "sha256:" + hashlib.sha256(good).hexdigest()
    wrong = "sha256:" + "0" * 64
    mismatch = call(loop_thread, sim, "POST", f"/api/blobs/{wrong}", good)
    assert mismatch.status == 400 and mismatch.json() == {
        "error": f'digest mismatch, expected "{wrong}", got "{digest}"'}
    bad = call(loop_thread, sim, "POST", "/api/blobs/sha256:xyz", good)
    assert (bad.status, bad.json()) == (400, {"error": "invalid digest format"})
    assert call(loop_thread, sim, "HEAD", "/api/blobs/md5:00").status == 400
    assert call(loop_thread, sim, "HEAD", f"/api/blobs/{digest}").status == 404
    created = call(loop_thread, sim, "POST", f"/api/blobs/{digest}", good)
    assert (created.status, created.body) == (201, b"")
    assert call(loop_thread, sim, "POST", f"/api/blobs/{digest}", good).status == 200
    assert call(loop_thread, sim, "HEAD", f"/api/blobs/{digest}").status == 200
    # Ollama's blob path swaps ':' for '-': both spellings name one blob.
    assert call(loop_thread, sim, "HEAD", f"/api/blobs/{digest.replace(':', '-')}").status == 200
    # Chunked upload (no Content-Length), the body fed to the hash piece by piece.
    chunked = b"5\r\nnot a\r\n5\r\n gguf\r\n0\r\n\r\n"
    r = call(loop_thread, sim, "POST", f"/api/blobs/{wrong}", chunked, {"Transfer-Encoding": "chunked"})
    assert r.status == 400 and digest in r.json()["error"]
    # Not a GGUF: create refuses it after parsing.
    r = call(loop_thread, sim, "POST", "/api/create", {"model": "x", "files": {"a.gguf": digest}})
    assert r.lines() == [{"status": "parsing GGUF"}, {"error": "supplied file was not in GGUF format"}]
    # Push to a host the simulator cannot reach; http without insecure.
    call(loop_thread, sim, "POST", "/api/copy", {"source": "llama3.2", "destination": "example.com/me/m:1"})
    far = call(loop_thread, sim, "POST", "/api/push", {"model": "example.com/me/m:1"})
    assert far.lines()[0] == {"status": "retrieving manifest"}
    assert far.lines()[-1]["error"].endswith("dial tcp: lookup example.com: no such host")
    insecure = call(loop_thread, sim, "POST", "/api/push", {"model": "http://example.com/me/m:1", "stream": False})
    assert (insecure.status, insecure.json()) == (500, {"error": "insecure protocol http"})
    assert call(loop_thread, sim, "POST", "/api/push", {}).json() == {"error": "model is required"}


def test_anthropic_messages(sim, loop_thread):
    body = {"model": "llama3.2", "max_tokens": 5, "system": "Be brief.",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}]}
    r = call(loop_thread, sim, "POST", "/v1/messages", body)
    assert r.status == 200 and r.headers["content-type"] == "application/json" and r.body.endswith(b"}\n")
    m = r.json()
    assert list(m) == ["id", "type", "role", "model", "content", "stop_reason", "usage"]
    assert m["id"].startswith("msg_") and m["type"] == "message" and m["model"] == "llama3.2"
    assert m["stop_reason"] == "max_tokens" and m["usage"]["output_tokens"] == 5
    text = m["content"][0]["text"]
    assert m["content"] == [{"type": "text", "text": text}] and text

    s = call(loop_thread, sim, "POST", "/v1/messages", dict(body, stream=True))
    assert s.status == 200 and s.headers["content-type"] == "text/event-stream"
    events = [e.split(b"\n") for e in s.events()]
    names = [e[0].decode() for e in events]
    assert names == (["event: message_start", "event: content_block_start"] + ["event: content_block_delta"] * 5
                     + ["event: content_block_stop", "event: message_delta", "event: message_stop"])
    data = [orjson.loads(e[1][len(b"data: "):]) for e in events]
    assert [d["type"] for d in data] == [n[len("event: "):] for n in names]
    assert "".join(d["delta"]["text"] for d in data[2:7]) == text
    assert data[-2]["delta"] == {"stop_reason": "max_tokens"} and data[-2]["usage"]["output_tokens"] == 5
    assert len(s.chunks) == len(events) + 0    # one chunk per event (writeSSE flushes)

    missing = call(loop_thread, sim, "POST", "/v1/messages", dict(body, model="nope"))
    err = missing.json()
    assert missing.status == 404 and err["type"] == "error" and err["request_id"].startswith("req_")
    assert err["error"] == {"type": "not_found_error", "message": "model 'nope' not found"}
    no_max = call(loop_thread, sim, "POST", "/v1/messages", {"model": "llama3.2", "messages": body["messages"]})
    assert no_max.status == 400 and no_max.headers["content-type"] == "application/json; charset=utf-8"
    assert no_max.json()["error"] == {"type": "invalid_request_error",
                                      "message": "max_tokens is required and must be positive"}
    bad_image = call(loop_thread, sim, "POST", "/v1/messages", dict(body, messages=[
        {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "x"}}]}]))
    assert bad_image.json()["error"]["message"] == "invalid image source type: url. Only base64 images are supported."


def test_responses_with_the_openai_client(sim):
    c = openai.OpenAI(base_url=sim.url + "/v1", api_key="x")
    r = c.responses.create(model="llama3.2", input="hello", max_output_tokens=4, instructions="Be brief.")
    assert r.status == "completed" and r.id.startswith("resp_") and r.instructions == "Be brief."
    assert r.output_text and r.usage.output_tokens == 4 and r.usage.total_tokens == r.usage.input_tokens + 4
    events = list(c.responses.create(model="llama3.2", input=[{"role": "user", "content": "hello"}],
                                     max_output_tokens=4, stream=True))
    kinds = [e.type for e in events]
    assert kinds == (["response.created", "response.in_progress", "response.output_item.added",
                      "response.content_part.added"] + ["response.output_text.delta"] * 4
                     + ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                        "response.completed"])
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[-1].response.output_text == text == events[-4].text
    with pytest.raises(openai.NotFoundError) as info:
        c.responses.create(model="nope", input="x")
    assert info.value.body["message"] == "model 'nope' not found"
    with pytest.raises(openai.BadRequestError) as info:
        c.responses.create(model="llama3.2", input=[{"type": "bogus"}])
    assert info.value.body["message"] == 'input[0]: unknown input item type: "bogus"'
    with pytest.raises(openai.BadRequestError) as info:
        c.responses.create(model="llama3.2", input="x", reasoning={"effort": "huge"})
    assert info.value.body["message"].startswith('invalid reasoning value: "huge" (must be "minimal"')
    # "none" turns thinking off, which a model without thinking accepts.
    assert c.responses.create(model="llama3.2", input="x", reasoning={"effort": "none"},
                              max_output_tokens=2).usage.output_tokens == 2


def test_compat_layers_without_messages_give_the_load_reply(sim, loop_thread):
    # ChatHandler answers no messages with the load reply; both writers convert it.
    r = call(loop_thread, sim, "POST", "/v1/responses", {"model": "llama3.2", "input": ""})
    out = r.json()
    assert r.status == 200 and out["output"][0]["content"][0]["text"] == ""
    assert out["usage"]["output_tokens"] == 0
    s = call(loop_thread, sim, "POST", "/v1/responses", {"model": "llama3.2", "input": [], "stream": True})
    assert [e.split(b"\n")[0] for e in s.events()] == [
        b"event: response.created", b"event: response.in_progress", b"event: response.completed"]
    m = call(loop_thread, sim, "POST", "/v1/messages", {"model": "llama3.2", "max_tokens": 3,
                                                        "messages": [{"role": "user", "content": []}]})
    assert m.status == 200 and m.json()["content"] is None and m.json()["stop_reason"] == "stop_sequence"
    missing = call(loop_thread, sim, "POST", "/v1/responses", {"model": "nope", "input": ""})
    assert missing.status == 404 and missing.json()["error"]["message"] == "model 'nope' not found"


def test_blob_upload_is_hashed_as_it_streams(sim):
    # A 16 MiB chunked upload: the server's peak allocation stays far below
    # the body's size (only the first MiB is kept, for the GGUF header).
    chunk = bytes(range(256)) * 256
    n = 256
    sha = hashlib.sha256()
    for _ in range(n):
        sha.update(chunk)
    digest = "sha256:" + sha.hexdigest()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        r = httpx.post(f"{sim.url}/api/blobs/{digest}", content=(chunk for _ in range(n)), timeout=60)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert r.status_code == 201
    assert sim.catalogue.blob(digest).size == n * len(chunk)
    assert peak < 4 * 2**20

"""olb.sim over real sockets (127.0.0.1, port 0): endpoints, framing, errors,
scheduling, pipelining, disconnects, faults, determinism, flow control.

A raw client reads responses off the wire and keeps the chunk structure, so
tests can check that every streamed line is its own HTTP chunk.  Nothing
sleeps for readiness: `until()` waits for a condition on the server, yielding
to the loop.
"""

from __future__ import annotations

import asyncio
import base64
import re
import socket
import struct

import orjson
import pytest

from olb.sim import SimConfig, start_cluster, start_sim

FAST = SimConfig(token_rate=0, ttft=0, seed=3)
CREATED_AT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d*[1-9])?Z$")
METRICS = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
           "eval_count", "eval_duration")
QUEUE_FULL = "server busy, please try again.  maximum pending requests exceeded"


class Reply:
    def __init__(self, status, reason, headers, raw_headers, body, chunks):
        self.status = status
        self.reason = reason
        self.headers = headers          # lower-case names
        self.raw_headers = raw_headers  # as sent
        self.body = body
        self.chunks = chunks            # None unless chunked

    def json(self):
        return orjson.loads(self.body)

    def lines(self):
        return [orjson.loads(x) for x in self.body.split(b"\n") if x]

    def events(self):
        assert self.body.endswith(b"\n\n")
        return self.body[:-2].split(b"\n\n")


def request_bytes(method, path, body=None, headers=None, version="1.1", host="127.0.0.1"):
    if isinstance(body, (dict, list)):
        body = orjson.dumps(body)
    lines = [f"{method} {path} HTTP/{version}", f"Host: {host}"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


async def read_reply(reader, head_only=False):
    status_line = await reader.readline()
    assert status_line, "connection closed before a response"
    _, status, reason = status_line.decode().rstrip("\r\n").split(" ", 2)
    headers, raw = {}, []
    while True:
        line = await reader.readline()
        if line == b"\r\n":
            break
        name, value = line.decode().rstrip("\r\n").split(":", 1)
        raw.append(name)
        headers[name.lower()] = value.strip()
    body, chunks = b"", None
    if head_only:
        pass
    elif headers.get("transfer-encoding") == "chunked":
        chunks = []
        while True:
            size = int((await reader.readline()).strip(), 16)
            if size == 0:
                assert await reader.readline() == b"\r\n"
                break
            chunks.append(await reader.readexactly(size))
            assert await reader.readexactly(2) == b"\r\n"
        body = b"".join(chunks)
    elif "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    else:
        body = await reader.read()
    return Reply(int(status), reason, headers, raw, body, chunks)


async def fetch(server, method, path, body=None, headers=None, **kw):
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(request_bytes(method, path, body, headers, **kw))
        return await read_reply(reader, head_only=method == "HEAD")
    finally:
        writer.close()


async def until(cond, timeout=5.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0)


def run(loop, coro_fn, config=FAST):
    async def main():
        server = await start_sim(config)
        try:
            return await coro_fn(server)
        finally:
            await server.close()
    return loop.run_until_complete(main())


# --- plain endpoints ---------------------------------------------------------------

def test_root_version_and_keep_alive(loop):
    async def go(s):
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        writer.write(request_bytes("GET", "/"))
        r1 = await read_reply(reader)
        writer.write(request_bytes("HEAD", "/"))
        r2 = await read_reply(reader, head_only=True)
        writer.write(request_bytes("GET", "/api/version"))
        r3 = await read_reply(reader)
        writer.close()
        return r1, r2, r3, s.stats
    r1, r2, r3, stats = run(loop, go)
    assert (r1.status, r1.reason, r1.body) == (200, "OK", b"Ollama is running")
    assert r1.headers["content-type"] == "text/plain; charset=utf-8"
    assert r1.raw_headers == ["Content-Type", "Date", "Content-Length"]
    assert r2.status == 200 and r2.headers["content-length"] == "17"
    assert r3.json() == {"version": "0.12.6"} and r3.headers["content-type"] == "application/json; charset=utf-8"
    assert stats.connections_total == 1 and stats.requests == 3
    assert stats.by_path == {"/": 2, "/api/version": 1}


def test_tags_show_ps(loop):
    async def go(s):
        tags = await fetch(s, "GET", "/api/tags")
        ps0 = await fetch(s, "GET", "/api/ps")
        await fetch(s, "POST", "/api/generate", {"model": "llama3.2", "prompt": "hi", "stream": False})
        ps1 = await fetch(s, "GET", "/api/ps")
        show = await fetch(s, "POST", "/api/show", {"model": "llama3.1:8b"})
        show_old = await fetch(s, "POST", "/api/show", {"name": "llama3.1:8b"})
        return tags, ps0, ps1, show, show_old
    tags, ps0, ps1, show, show_old = run(loop, go)
    models = tags.json()["models"]
    assert [m["name"] for m in models] == list(FAST.models)
    m = models[0]
    assert list(m) == ["name", "model", "modified_at", "size", "digest", "details"]
    assert m["model"] == "llama3.2:latest" and len(m["digest"]) == 64
    assert m["details"] == {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
                            "parameter_size": "3.2B", "quantization_level": "Q4_K_M"}
    assert ps0.json() == {"models": []}
    (p,) = ps1.json()["models"]
    assert list(p) == ["name", "model", "size", "digest", "details", "expires_at", "size_vram", "context_length"]
    assert p["name"] == "llama3.2:latest" and p["size"] == p["size_vram"] > m["size"]
    assert p["context_length"] == 4096
    body = show.json()
    assert show.body == show_old.body
    info = body["model_info"]
    assert list(info) == sorted(info)        # a Go map: sorted keys
    assert info["llama.context_length"] == 131072 and info["llama.embedding_length"] == 4096
    assert body["capabilities"] == ["completion", "tools"]
    assert body["details"]["parameter_size"] == "8.0B"
    assert "\\u003c|start_header_id|\\u003e" in show.body.decode()   # Go escapes < and >


# --- inference: native -------------------------------------------------------------

def test_generate_stream_framing(loop):
    async def go(s):
        return await fetch(s, "POST", "/api/generate",
                           {"model": "llama3.2", "prompt": "Why is the sky blue?", "options": {"num_predict": 7}})
    r = run(loop, go)
    assert r.status == 200 and r.headers["content-type"] == "application/x-ndjson"
    assert "content-length" not in r.headers
    assert len(r.chunks) == 8
    for chunk in r.chunks:                   # one line per chunk, never a partial or blank line
        assert chunk.endswith(b"\n") and chunk.count(b"\n") == 1
    lines = r.lines()
    for line in lines[:-1]:
        assert list(line) == ["model", "created_at", "response", "done"]
        assert line["model"] == "llama3.2" and line["done"] is False
        assert CREATED_AT.match(line["created_at"])
    final = lines[-1]
    assert list(final)[:6] == ["model", "created_at", "response", "done", "done_reason", "context"]
    assert final["done"] is True and final["done_reason"] == "length" and final["response"] == ""
    assert all(isinstance(final[k], int) and final[k] > 0 for k in METRICS)
    assert final["eval_count"] == 7
    assert len(final["context"]) == final["prompt_eval_count"] + 7
    assert not lines[0]["response"].startswith(" ")


def test_generate_default_length_stops_and_non_stream_matches(loop):
    async def go(s):
        body = {"model": "llama3.2", "prompt": "tell me"}
        streamed = await fetch(s, "POST", "/api/generate", body)
        whole = await fetch(s, "POST", "/api/generate", dict(body, stream=False))
        return streamed, whole
    streamed, whole = run(loop, go, FAST.replace(num_predict_default=12))
    lines = streamed.lines()
    assert len(lines) == 13 and lines[-1]["done_reason"] == "stop" and lines[-1]["eval_count"] == 12
    assert whole.headers["content-type"] == "application/json; charset=utf-8"
    assert "content-length" in whole.headers and not whole.body.endswith(b"\n")
    obj = whole.json()
    assert obj["response"] == "".join(x["response"] for x in lines)
    assert obj["context"] == lines[-1]["context"] and obj["done_reason"] == "stop"


def test_chat_stream_and_not(loop):
    async def go(s):
        body = {"model": "qwen2.5:7b", "messages": [{"role": "user", "content": "hi"}],
                "options": {"num_predict": 4}}
        return (await fetch(s, "POST", "/api/chat", body),
                await fetch(s, "POST", "/api/chat", dict(body, stream=False)))
    streamed, whole = run(loop, go)
    lines = streamed.lines()
    assert len(lines) == 5
    for line in lines:
        assert line["message"]["role"] == "assistant"
    assert list(lines[0]) == ["model", "created_at", "message", "done"]
    # ChatResponse puts done_reason before done (api/types.go field order).
    assert b'"done_reason":"length","done":true' in streamed.chunks[-1]
    assert whole.json()["message"] == {"role": "assistant",
                                       "content": "".join(x["message"]["content"] for x in lines)}
    assert all(whole.json()[k] > 0 for k in METRICS)


def test_load_and_unload_replies(loop):
    async def go(s):
        out = [await fetch(s, "POST", "/api/generate", {"model": "llama3.2"}),
               await fetch(s, "POST", "/api/chat", {"model": "llama3.2", "messages": []})]
        loaded = (await fetch(s, "GET", "/api/ps")).json()["models"]
        out += [await fetch(s, "POST", "/api/generate", {"model": "llama3.2", "keep_alive": 0}),
                await fetch(s, "POST", "/api/chat", {"model": "llama3.2", "keep_alive": "0s"})]
        unloaded = (await fetch(s, "GET", "/api/ps")).json()["models"]
        return out, loaded, unloaded
    (gen_load, chat_load, gen_unload, chat_unload), loaded, unloaded = run(loop, go)
    assert gen_load.json()["done_reason"] == "load" and gen_load.json()["done"] is True
    assert list(gen_load.json()) == ["model", "created_at", "response", "done", "done_reason"]
    assert chat_load.json()["message"] == {"role": "assistant", "content": ""}
    assert chat_load.json()["done_reason"] == "load"
    assert gen_unload.json()["done_reason"] == "unload" and chat_unload.json()["done_reason"] == "unload"
    assert [m["name"] for m in loaded] == ["llama3.2:latest"] and unloaded == []


def test_embed_and_embeddings(loop):
    async def go(s):
        return (await fetch(s, "POST", "/api/embed", {"model": "nomic-embed-text", "input": ["a", "b"]}),
                await fetch(s, "POST", "/api/embed", {"model": "nomic-embed-text", "input": "a", "dimensions": 64}),
                await fetch(s, "POST", "/api/embed", {"model": "nomic-embed-text", "input": ""}),
                await fetch(s, "POST", "/api/embed", {"model": "nomic-embed-text", "input": [1]}),
                await fetch(s, "POST", "/api/embeddings", {"model": "nomic-embed-text", "prompt": "a"}),
                await fetch(s, "POST", "/api/embeddings", {"model": "nomic-embed-text"}))
    many, small, empty, bad, legacy, legacy_empty = run(loop, go)
    obj = many.json()
    assert list(obj) == ["model", "embeddings", "total_duration", "load_duration", "prompt_eval_count"]
    a, b = obj["embeddings"]
    assert len(a) == 768 and a != b
    assert sum(x * x for x in a) == pytest.approx(1.0, abs=1e-4)
    assert len(small.json()["embeddings"][0]) == 64
    assert empty.json() == {"model": "nomic-embed-text", "embeddings": []}
    assert (bad.status, bad.json()) == (400, {"error": "invalid input type"})
    vec = legacy.json()["embedding"]
    assert len(vec) == 768 and vec == pytest.approx(a, abs=1e-6)
    assert legacy_empty.json() == {"embedding": []}


def test_pull_copy_delete(loop):
    async def go(s):
        pulled = await fetch(s, "POST", "/api/pull", {"model": "llama3.2:1b"})
        tags1 = [m["name"] for m in (await fetch(s, "GET", "/api/tags")).json()["models"]]
        unknown = await fetch(s, "POST", "/api/pull", {"model": "no-such-model"})
        unknown_sync = await fetch(s, "POST", "/api/pull", {"model": "no-such-model", "stream": False})
        sync = await fetch(s, "POST", "/api/pull", {"model": "llama3.2", "stream": False})
        copied = await fetch(s, "POST", "/api/copy", {"source": "llama3.2", "destination": "me/mine:v1"})
        tags2 = [m["name"] for m in (await fetch(s, "GET", "/api/tags")).json()["models"]]
        deleted = await fetch(s, "DELETE", "/api/delete", {"model": "me/mine:v1"})
        again = await fetch(s, "DELETE", "/api/delete", {"model": "me/mine:v1"})
        tags3 = [m["name"] for m in (await fetch(s, "GET", "/api/tags")).json()["models"]]
        return pulled, tags1, unknown, unknown_sync, sync, copied, tags2, deleted, again, tags3
    pulled, tags1, unknown, unknown_sync, sync, copied, tags2, deleted, again, tags3 = run(loop, go)
    statuses = [x["status"] for x in pulled.lines()]
    assert statuses[0] == "pulling manifest" and statuses[-3:] == ["verifying sha256 digest", "writing manifest",
                                                                   "success"]
    assert any(x.get("total") for x in pulled.lines())
    assert "llama3.2:1b" in tags1
    assert unknown.status == 200 and unknown.lines() == [
        {"status": "pulling manifest"}, {"error": "pull model manifest: file does not exist"}]
    assert unknown_sync.status == 500 and unknown_sync.headers["content-type"] == "application/json"
    assert sync.json() == {"status": "success"}
    assert copied.status == 200 and copied.body == b""
    assert "me/mine:v1" in tags2 and "me/mine:v1" not in tags3
    assert deleted.status == 200 and again.status == 404
    assert again.json() == {"error": "model 'me/mine:v1' not found"}


# --- errors -------------------------------------------------------------------------

ERRORS = [
    # (method, path, body, status, error text)
    ("POST", "/api/generate", {"model": "nope", "prompt": "x"}, 404, "model 'nope' not found"),
    ("POST", "/api/generate", {"prompt": "x"}, 404, "model '' not found"),
    ("POST", "/api/chat", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404,
     "model 'nope' not found"),
    ("POST", "/api/chat", {"messages": []}, 400, "model is required"),
    ("POST", "/api/embed", {"model": "nope", "input": "x"}, 404, 'model "nope" not found, try pulling it first'),
    ("POST", "/api/embeddings", {"model": "nope", "prompt": "x"}, 404,
     'model "nope" not found, try pulling it first'),
    ("POST", "/api/embeddings", {"prompt": "x"}, 400, "model is required"),
    ("POST", "/api/show", {"model": "nope"}, 404, "model 'nope' not found"),
    ("POST", "/api/show", {}, 400, "model is required"),
    ("DELETE", "/api/delete", {"model": "nope"}, 404, "model 'nope' not found"),
    ("POST", "/api/copy", {"source": "nope", "destination": "x"}, 404, 'model "nope" not found'),
    ("POST", "/api/generate", b"", 400, "missing request body"),
    ("POST", "/api/chat", b"{bad", 400, "invalid character 'b' looking for beginning of object key string"),
    ("POST", "/api/generate", b'{"model":"llama3.2","prompt":', 400, "unexpected EOF"),
    ("POST", "/api/generate", {"model": "llama3.2", "prompt": 5}, 400,
     "json: cannot unmarshal number into Go struct field GenerateRequest.prompt of type string"),
    ("POST", "/api/generate", {"model": "nomic-embed-text", "prompt": "x"}, 400,
     '"nomic-embed-text" does not support generate'),
    ("POST", "/api/chat", {"model": "nomic-embed-text", "messages": [{"role": "user", "content": "x"}]}, 400,
     '"nomic-embed-text" does not support chat'),
    ("POST", "/api/chat", {"model": "llama3.2", "think": True, "messages": [{"role": "user", "content": "x"}]},
     400, '"llama3.2" does not support thinking'),
    ("POST", "/api/generate", {"model": "llama3.2", "prompt": "x", "options": {"num_predict": "9"}}, 500,
     'option "num_predict" must be of type integer'),
    ("POST", "/api/generate", {"model": "llama3.2", "prompt": "x", "raw": True, "system": "s"}, 400,
     "raw mode does not support template, system, or context"),
    ("POST", "/api/generate", {"model": "llama3.2", "prompt": "x", "top_logprobs": 21}, 400,
     "top_logprobs must be between 0 and 20"),
    ("POST", "/api/generate", {"model": "llama3.2", "prompt": "x", "keep_alive": "5"}, 400,
     'time: missing unit in duration "5"'),
]


@pytest.mark.parametrize("method, path, body, status, text", ERRORS)
def test_native_errors(loop, method, path, body, status, text):
    r = run(loop, lambda s: fetch(s, method, path, body))
    assert r.status == status
    assert r.headers["content-type"] == "application/json; charset=utf-8"
    assert r.json() == {"error": text}


@pytest.mark.parametrize("version, generate, chat", [
    ("0.3.14", 'model "nope" not found, try pulling it first', 'model "nope" not found, try pulling it first'),
    ("0.11.10", "model 'nope' not found", 'model "nope" not found, try pulling it first'),
    ("0.12.0", "model 'nope' not found", "model 'nope' not found"),
])
def test_not_found_text_follows_the_version(loop, version, generate, chat):
    async def go(s):
        return (await fetch(s, "POST", "/api/generate", {"model": "nope", "prompt": "x"}),
                await fetch(s, "POST", "/api/chat", {"model": "nope", "messages": []}))
    g, c = run(loop, go, FAST.replace(version=version))
    assert g.json()["error"] == generate and c.json()["error"] == chat


def test_router_404_405(loop):
    async def go(s):
        return (await fetch(s, "GET", "/api/nothing"), await fetch(s, "POST", "/api/tags", b""),
                await fetch(s, "GET", "/api/generate"), await fetch(s, "GET", "/v1/models/a/b"))
    missing, wrong, wrong2, deep = run(loop, go)
    assert (missing.status, missing.body, missing.headers["content-type"]) == (404, b"404 page not found",
                                                                               "text/plain")
    assert (wrong.status, wrong.body) == (405, b"405 method not allowed")
    assert wrong2.status == 405 and deep.status == 404


def test_openai_errors(loop):
    async def go(s):
        return (await fetch(s, "POST", "/v1/chat/completions",
                            {"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
                await fetch(s, "POST", "/v1/chat/completions", {"model": "llama3.2", "messages": []}),
                await fetch(s, "POST", "/v1/chat/completions", b"{"),
                await fetch(s, "POST", "/v1/chat/completions", b""),
                await fetch(s, "POST", "/v1/embeddings", {"model": "nope", "input": "x"}),
                await fetch(s, "POST", "/v1/embeddings", {"model": "nomic-embed-text", "input": []}),
                await fetch(s, "GET", "/v1/models/nope"),
                await fetch(s, "POST", "/v1/completions", {"model": "nope", "prompt": "x"}))
    nf, empty, bad, nobody, emb_nf, emb_empty, model_nf, cmpl_nf = run(loop, go)

    def err(r, status, etype, message):
        assert r.status == status
        assert r.json() == {"error": {"message": message, "type": etype, "param": None, "code": None}}

    err(nf, 404, "not_found_error", "model 'nope' not found")
    assert nf.headers["content-type"] == "application/json" and nf.body.endswith(b"}\n")
    err(empty, 400, "invalid_request_error", "[] is too short - 'messages'")
    err(bad, 400, "invalid_request_error", "unexpected EOF")
    err(nobody, 400, "invalid_request_error", "EOF")
    err(emb_nf, 404, "not_found_error", 'model "nope" not found, try pulling it first')
    err(emb_empty, 400, "invalid_request_error", "invalid input")
    err(model_nf, 404, "not_found_error", "model 'nope' not found")
    err(cmpl_nf, 404, "not_found_error", "model 'nope' not found")


# --- OpenAI compatibility --------------------------------------------------------------

def test_openai_chat_stream_framing(loop):
    async def go(s):
        body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                "stream": True, "stream_options": {"include_usage": True}}
        return (await fetch(s, "POST", "/v1/chat/completions", body),
                await fetch(s, "POST", "/v1/chat/completions", dict(body, stream=False)))
    streamed, whole = run(loop, go)
    assert streamed.headers["content-type"] == "text/event-stream"
    for chunk in streamed.chunks[:-1]:        # one event per token chunk
        assert chunk.startswith(b"data: ") and chunk.endswith(b"\n\n") and chunk.count(b"\n\n") == 1
    events = streamed.events()
    assert events[-1] == b"data: [DONE]"
    chunks = [orjson.loads(e[6:]) for e in events[:-1]]
    assert len(chunks) == 6
    first, *middle, finish, usage = chunks
    assert list(first) == ["id", "object", "created", "model", "system_fingerprint", "choices"]
    assert first["object"] == "chat.completion.chunk" and re.match(r"^chatcmpl-\d{1,3}$", first["id"])
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in middle)
    assert all(c["choices"][0]["finish_reason"] is None for c in [first] + middle)
    assert finish["choices"] == [{"index": 0, "delta": {}, "finish_reason": "length"}]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 4
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    text = "".join(c["choices"][0]["delta"]["content"] for c in [first] + middle)
    obj = whole.json()
    assert whole.headers["content-type"] == "application/json"
    assert obj["object"] == "chat.completion" and obj["system_fingerprint"] == "fp_ollama"
    assert obj["choices"] == [{"index": 0, "message": {"role": "assistant", "content": text},
                               "finish_reason": "length"}]
    assert obj["usage"] == usage["usage"]


def test_openai_completions_models_embeddings(loop):
    async def go(s):
        return (await fetch(s, "POST", "/v1/completions", {"model": "llama3.2", "prompt": "x", "max_tokens": 3,
                                                           "stream": True}),
                await fetch(s, "POST", "/v1/completions", {"model": "llama3.2", "prompt": "x", "max_tokens": 3}),
                await fetch(s, "GET", "/v1/models"),
                await fetch(s, "GET", "/v1/models/llama3.2"),
                await fetch(s, "POST", "/v1/embeddings", {"model": "nomic-embed-text", "input": ["a", "b"]}),
                await fetch(s, "POST", "/v1/embeddings", {"model": "nomic-embed-text", "input": ["a", "b"],
                                                          "encoding_format": "base64"}))
    cs, cj, models, model, ef, eb = run(loop, go)
    events = cs.events()
    assert events[-1] == b"data: [DONE]"
    chunks = [orjson.loads(e[6:]) for e in events[:-1]]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "length"]
    assert chunks[0]["object"] == "text_completion" and chunks[0]["id"].startswith("cmpl-")
    assert cj.json()["choices"][0]["text"] == "".join(c["choices"][0]["text"] for c in chunks)
    data = models.json()
    assert data["object"] == "list" and data["data"][0] == {
        "id": "llama3.2:latest", "object": "model", "created": data["data"][0]["created"], "owned_by": "library"}
    assert model.json()["id"] == "llama3.2" and model.json()["owned_by"] == "library"
    floats = ef.json()
    assert floats["object"] == "list" and floats["usage"]["prompt_tokens"] > 0
    vec = floats["data"][1]["embedding"]
    raw = base64.b64decode(eb.json()["data"][1]["embedding"])
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == pytest.approx(vec, abs=1e-6)


# --- host check -------------------------------------------------------------------------

@pytest.mark.parametrize("host, status", [
    ("example.com", 403), ("example.com:11434", 403), ("8.8.8.8", 403),
    ("localhost", 200), ("localhost:11434", 200), ("127.0.0.1:1", 200), ("[::1]:11434", 200),
    ("10.1.2.3", 200), ("192.168.0.9:80", 200), ("0.0.0.0", 200), ("ollama.internal", 200),
    ("box.local:11434", 200), (socket.gethostname(), 200),
])
def test_host_check_on_loopback(loop, host, status):
    r = run(loop, lambda s: fetch(s, "GET", "/api/version", host=host))
    assert r.status == status
    if status == 403:
        assert r.body == b"" and r.headers["content-length"] == "0"


def test_host_check_can_be_switched_off_and_options(loop):
    off = run(loop, lambda s: fetch(s, "GET", "/api/version", host="example.com"), FAST.replace(host_check=False))
    assert off.status == 200
    opts = run(loop, lambda s: fetch(s, "OPTIONS", "/api/chat"))
    assert opts.status == 204


# --- scheduling -----------------------------------------------------------------------

def test_queue_full_gives_503(loop):
    config = SimConfig(num_parallel=1, max_queue=1, token_rate=0, ttft=30, seed=1)

    async def go(s):
        body = {"model": "llama3.2", "prompt": "x"}
        conns = []
        for expect_active in (1, 2):
            reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
            writer.write(request_bytes("POST", "/api/generate", body))
            conns.append((reader, writer))
            await until(lambda: s.stats.active == expect_active)
        rejected = await fetch(s, "POST", "/api/generate", body)
        rejected_v1 = await fetch(s, "POST", "/v1/chat/completions",
                                  {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]})
        # A loaded model answers the load-only request without a slot.
        load = await fetch(s, "POST", "/api/generate", {"model": "llama3.2"})
        for _, writer in conns:
            writer.close()
        await until(lambda: s.stats.active == 0)
        return rejected, rejected_v1, load, s.stats
    rejected, rejected_v1, load, stats = run(loop, go, config)
    assert rejected.status == 503 and rejected.json() == {"error": QUEUE_FULL}
    assert rejected_v1.status == 503
    assert rejected_v1.json()["error"] == {"message": QUEUE_FULL, "type": "api_error", "param": None, "code": None}
    assert load.json()["done_reason"] == "load"
    assert stats.rejected == 2 and stats.aborted == 2


def test_parallel_slots_are_fifo(loop):
    config = SimConfig(num_parallel=2, token_rate=200, ttft=0, seed=1, num_predict_default=6)

    async def go(s):
        t = asyncio.get_running_loop().time
        conns = []
        for i in range(6):
            reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
            writer.write(request_bytes("POST", "/api/generate", {"model": "llama3.2", "prompt": str(i)}))
            conns.append((reader, writer))
            await until(lambda: s.stats.active == i + 1)

        async def timeline(reader):
            await reader.readline()                      # status line: the first token is being sent
            start = t()
            reply = await read_reply_after_status(reader)
            return start, t(), reply

        results = await asyncio.gather(*(timeline(r) for r, _ in conns))
        for _, w in conns:
            w.close()
        return results, s.stats.max_active
    results, max_active = run(loop, go, config)
    starts = [r[0] for r in results]
    ends = [r[1] for r in results]
    assert max_active == 6
    # Two slots: requests 2..5 start only after an earlier one ended, in order.
    assert starts == sorted(starts)
    for i in range(2, 6):
        assert starts[i] >= min(ends[i - 2], ends[i - 1]) - 0.002
    assert all(len(r[2].lines()) == 7 for r in results)


async def read_reply_after_status(reader):
    headers = {}
    while (line := await reader.readline()) != b"\r\n":
        k, v = line.decode().split(":", 1)
        headers[k.lower()] = v.strip()
    chunks = []
    while (size := int((await reader.readline()).strip(), 16)):
        chunks.append(await reader.readexactly(size))
        await reader.readexactly(2)
    await reader.readline()
    from types import SimpleNamespace
    return SimpleNamespace(lines=lambda: [orjson.loads(c) for c in chunks])


def test_pipelined_requests_are_answered_in_order(loop):
    async def go(s):
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        writer.write(request_bytes("POST", "/api/generate", {"model": "llama3.2", "prompt": "a",
                                                             "options": {"num_predict": 3}})
                     + request_bytes("GET", "/api/version")
                     + request_bytes("POST", "/api/chat", {"model": "nope", "messages": []})
                     + request_bytes("GET", "/"))
        replies = [await read_reply(reader) for _ in range(4)]
        writer.close()
        return replies, s.stats.connections_total
    (gen, version, chat, root), conns = run(loop, go, FAST.replace(token_rate=500))
    assert len(gen.lines()) == 4 and version.json()["version"] == "0.12.6"
    assert chat.status == 404 and root.body == b"Ollama is running" and conns == 1


def test_connection_close_and_http10(loop):
    async def go(s):
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        writer.write(request_bytes("GET", "/api/version", headers={"Connection": "close"}))
        r = await read_reply(reader)
        eof = await reader.read()
        reader2, writer2 = await asyncio.open_connection("127.0.0.1", s.port)
        writer2.write(request_bytes("POST", "/api/generate", {"model": "llama3.2", "prompt": "a",
                                                              "options": {"num_predict": 2}}, version="1.0"))
        r10 = await read_reply(reader2)
        writer.close()
        writer2.close()
        return r, eof, r10
    r, eof, r10 = run(loop, go)
    assert r.status == 200 and r.headers.get("connection") == "close" and eof == b""
    assert "transfer-encoding" not in r10.headers and len(r10.lines()) == 3


def test_bad_http_gets_400_and_close(loop):
    async def go(s):
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        data = await reader.read()
        writer.close()
        return data
    data = run(loop, go)
    assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n") and b"Connection: close" in data


# --- disconnects and faults ---------------------------------------------------------------

def test_client_disconnect_mid_stream_aborts(loop):
    config = SimConfig(token_rate=100, ttft=0, seed=1, num_predict_default=1000)

    async def go(s):
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        writer.write(request_bytes("POST", "/api/generate", {"model": "llama3.2", "prompt": "x"}))
        await read_reply(reader, head_only=True)
        await reader.readline()
        await reader.readline()                     # the first line's chunk
        closed_at = asyncio.get_running_loop().time()
        writer.close()
        await asyncio.wait_for(s.abort_event.wait(), 2)
        runner = next(iter(s.engine.runners.values()))
        return closed_at, list(s.aborts), s.stats, runner
    closed_at, aborts, stats, runner = run(loop, go, config)
    assert len(aborts) == 1 and aborts[0] - closed_at < 0.5
    assert stats.aborted == 1 and stats.active == 0
    assert runner.busy == 0 and runner.decoding == 0 and runner.refs == 0


def test_client_disconnect_while_queued_frees_the_queue(loop):
    config = SimConfig(token_rate=0, ttft=30, seed=1, num_parallel=1)

    async def go(s):
        conns = []
        for n in (1, 2):
            reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
            writer.write(request_bytes("POST", "/api/chat", {"model": "llama3.2",
                                                             "messages": [{"role": "user", "content": "x"}]}))
            conns.append(writer)
            await until(lambda: s.stats.active == n)
        assert s.engine.waiting == 1
        conns[1].close()
        await asyncio.wait_for(s.abort_event.wait(), 2)
        waiting = s.engine.waiting
        conns[0].close()
        await until(lambda: s.stats.aborted == 2)
        return waiting, next(iter(s.engine.runners.values()))
    waiting, runner = run(loop, go, config)
    assert waiting == 0 and runner.busy == 0 and runner.refs == 0


def test_fail_after_tokens_drops_the_connection(loop):
    async def go(s):
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        writer.write(request_bytes("POST", "/api/generate", {"model": "llama3.2", "prompt": "x"}))
        data = await reader.read()
        writer.close()
        return data, s.stats
    data, stats = run(loop, go, FAST.replace(fail_after_tokens=3))
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"200 OK" in head
    assert body.count(b'"done":false}\n') == 3 and not body.endswith(b"0\r\n\r\n")
    assert stats.faults == 1 and stats.aborted == 0 and stats.active == 0


def test_error_after_tokens_is_in_band(loop):
    async def go(s):
        body = {"model": "llama3.2", "prompt": "x"}
        return (await fetch(s, "POST", "/api/generate", body),
                await fetch(s, "POST", "/api/generate", dict(body, stream=False)))
    streamed, whole = run(loop, go, FAST.replace(error_after_tokens=2))
    lines = streamed.lines()
    assert streamed.status == 200 and len(lines) == 3
    assert lines[-1] == {"error": "an error was encountered while running the model: unexpected EOF"}
    assert whole.status == 500 and "error" in whole.json()
    before = run(loop, lambda s: fetch(s, "POST", "/api/chat", {"model": "llama3.2", "messages": [
        {"role": "user", "content": "x"}]}), FAST.replace(error_after_tokens=0))
    assert before.status == 500 and before.headers["content-type"] == "application/json"


# --- determinism, fragmentation ---------------------------------------------------------------

DETERMINISTIC = SimConfig(token_rate=0, ttft=0, seed=11, deterministic_time=True)
SAME_REQUESTS = [
    ("POST", "/api/generate", {"model": "llama3.2", "prompt": "Why is the sky blue?"}),
    ("POST", "/api/chat", {"model": "mistral", "messages": [{"role": "user", "content": "hi"}], "stream": False}),
    ("POST", "/v1/chat/completions", {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}],
                                      "stream": True, "stream_options": {"include_usage": True}}),
    ("POST", "/api/embed", {"model": "nomic-embed-text", "input": "hello"}),
    ("GET", "/api/tags", None),
]


def _bodies(loop, config):
    async def go():
        servers = await start_cluster(2, config)
        try:
            return [[(await fetch(s, m, p, b)).body for m, p, b in SAME_REQUESTS] for s in servers]
        finally:
            for s in servers:
                await s.close()
    return loop.run_until_complete(go())


def test_same_seed_gives_byte_identical_bodies(loop):
    a, b = _bodies(loop, DETERMINISTIC)
    assert a == b
    c, _ = _bodies(loop, DETERMINISTIC.replace(seed=12))
    assert c[0] != a[0] and c[1] != a[1] and c[3] != a[3]
    assert c[4] == a[4]                      # the catalogue does not depend on the seed
    assert b'"created_at":"2024-06-01T12:00:00Z"' in a[0]


def test_fragmented_writes_still_frame_correctly(loop):
    plain, _ = _bodies(loop, DETERMINISTIC)
    fragmented, _ = _bodies(loop, DETERMINISTIC.replace(fragment=7))
    assert fragmented == plain


# --- flow control ---------------------------------------------------------------------------

def test_slow_reader_pauses_generation(loop):
    """Backpressure as in uvloop's tests: tiny socket buffers on both ends and
    a client that does not read; the stream must stop, then finish intact."""
    config = SimConfig(token_rate=0, ttft=0, seed=1)
    n = 20000

    async def go(s):
        aio = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        try:
            await aio.sock_connect(sock, ("127.0.0.1", s.port))
            await until(lambda: len(s._connections) == 1)
            (proto,) = s._connections
            proto.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            await aio.sock_sendall(sock, request_bytes("POST", "/api/generate", {
                "model": "llama3.2", "prompt": "x", "options": {"num_predict": n}}))
            await until(lambda: proto.job is not None and proto.job._paused)
            gen = proto.job
            emitted = gen.emitted
            buffered = proto.transport.get_write_buffer_size()
            for _ in range(50):                  # stays paused while nobody reads
                await asyncio.sleep(0)
            still = gen.emitted
            data = bytearray()
            while not data.endswith(b"\r\n0\r\n\r\n"):
                chunk = await aio.sock_recv(sock, 65536)
                assert chunk
                data += chunk
        finally:
            sock.close()
        return emitted, still, buffered, bytes(data)
    emitted, still, buffered, data = run(loop, go, config)
    assert emitted == still < n
    assert buffered < 64 * 1024 + 512           # high-water mark plus one line
    body = data.partition(b"\r\n\r\n")[2]
    lines = []
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if not size:
            break
        lines.append(orjson.loads(body[:size]))
        body = body[size + 2:]
    assert len(lines) == n + 1 and lines[-1]["eval_count"] == n


# --- clusters -------------------------------------------------------------------------------

def test_start_cluster_ports(loop):
    async def go():
        servers = await start_cluster(3, FAST)
        ports = [s.port for s in servers]
        urls = [s.url for s in servers]
        versions = [(await fetch(s, "GET", "/api/version")).status for s in servers]
        for s in servers:
            await s.close()
        await servers[0].close()                 # idempotent
        base = None
        for attempt in range(20):
            try:
                consecutive = await start_cluster(2, FAST, base_port=20000 + 97 * attempt + 1000)
            except OSError:
                continue
            base = [s.port for s in consecutive]
            for s in consecutive:
                await s.close()
            break
        return ports, urls, versions, base
    ports, urls, versions, base = loop.run_until_complete(go())
    assert len(set(ports)) == 3 and versions == [200] * 3
    assert urls == [f"http://127.0.0.1:{p}" for p in ports]
    assert base is not None and base[1] == base[0] + 1


def test_start_sim_on_a_given_socket(loop):
    async def go():
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        sock.setblocking(False)
        server = await start_sim(FAST, sock=sock)
        try:
            return sock.getsockname()[1], server.port, (await fetch(server, "GET", "/")).status
        finally:
            await server.close()
    bound, port, status = loop.run_until_complete(go())
    assert bound == port and status == 200


def test_close_drops_streams_without_counting_aborts(loop):
    async def go():
        s = await start_sim(SimConfig(token_rate=50, ttft=0, seed=1))
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        writer.write(request_bytes("POST", "/api/generate", {"model": "llama3.2", "prompt": "x"}))
        await read_reply(reader, head_only=True)
        await s.close()
        rest = await reader.read()
        writer.close()
        runner = next(iter(s.engine.runners.values()))
        return rest, s.stats, runner
    rest, stats, runner = loop.run_until_complete(go())
    assert not rest.endswith(b"0\r\n\r\n")
    assert stats.active == 0 and stats.aborted == 0 and runner.busy == 0


def test_head_expect_continue_and_eof_after_pipelined(loop):
    async def go(s):
        head = await fetch(s, "HEAD", "/api/tags")
        get = await fetch(s, "GET", "/api/tags")
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        body = orjson.dumps({"model": "llama3.2", "prompt": "x", "stream": False})
        writer.write(request_bytes("POST", "/api/generate", headers={"Expect": "100-continue",
                                                                     "Content-Length": len(body)}))
        interim = await reader.readuntil(b"\r\n\r\n")
        writer.write(body)
        final = await read_reply(reader)
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        writer.write(request_bytes("GET", "/api/version") + request_bytes("GET", "/"))
        writer.write_eof()
        replies = [await read_reply(reader), await read_reply(reader)]
        writer.close()
        return head, get, interim, final, replies
    head, get, interim, final, replies = run(loop, go)
    assert head.status == 200 and head.body == b""
    assert head.headers["content-length"] == get.headers["content-length"]
    assert interim.startswith(b"HTTP/1.1 100 ")
    assert final.status == 200 and final.json()["done"] is True
    assert [r.status for r in replies] == [200, 200]


def test_keep_alive_forever_and_by_path_cap(loop):
    async def go(s):
        await fetch(s, "POST", "/api/generate", {"model": "llama3.2", "keep_alive": -1})
        ps = (await fetch(s, "GET", "/api/ps")).json()["models"]
        for i in range(5):
            await fetch(s, "GET", f"/x{i}")
        return ps, dict(s.stats.by_path)
    import olb.sim.server as server_mod
    cap, server_mod.MAX_PATHS = server_mod.MAX_PATHS, 3
    try:
        ps, by_path = run(loop, go)
    finally:
        server_mod.MAX_PATHS = cap
    assert ps[0]["expires_at"].startswith("23")          # now + MaxInt64 ns: year 2318
    assert len(by_path) == 4 and by_path["<other>"] == 4


# --- an assistant prefill (template.go Execute: the last assistant turn stays open) ----------

@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
def test_chat_continues_an_assistant_prefill(loop, path):
    """A conversation that ends with the start of the answer the model would
    give gets the rest of that answer (a deterministic model continuing its
    own text), and its natural end stays where it was; a prefill the answer
    does not start with gets an answer of its own; num_predict / max_tokens
    count new tokens only, as in Ollama."""
    oai = path.startswith("/v1")
    ask = [{"role": "user", "content": "why is the sky blue?"}]

    def text_of(reply):
        if oai:
            chunks = [orjson.loads(e[6:]) for e in reply.events() if e != b"data: [DONE]"]
            return [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
        return [line["message"]["content"] for line in reply.lines()]

    async def go(s):
        async def chat(messages, **extra):
            body = {"model": "llama3.2", "messages": messages, "stream": True, **extra}
            return text_of(await fetch(s, "POST", path, body))
        whole = await chat(ask)
        pieces = [p for p in whole if p]
        prefix = "".join(pieces[:7])
        rest = await chat(ask + [{"role": "assistant", "content": prefix}])
        # Two assistant messages in a row are one turn (collate: a blank line between).
        split = await chat(ask + [{"role": "assistant", "content": "".join(pieces[:3])},
                                  {"role": "assistant", "content": "".join(pieces[3:7])}])
        other = await chat(ask + [{"role": "assistant", "content": "Something else entirely"}])
        limit = {"max_tokens": 5} if oai else {"options": {"num_predict": 5}}
        limited = await chat(ask + [{"role": "assistant", "content": prefix}], **limit)
        whole_reply = (await fetch(s, "POST", path, {"model": "llama3.2", "stream": False,
                                                     "messages": ask + [{"role": "assistant", "content": prefix}]}))
        doc = whole_reply.json()
        unstreamed = doc["choices"][0]["message"]["content"] if oai else doc["message"]["content"]
        return pieces, prefix, rest, split, other, limited, unstreamed

    pieces, prefix, rest, split, other, limited, unstreamed = run(loop, go, FAST.replace(num_predict_default=20))
    assert unstreamed == "".join(rest)
    assert len(pieces) == 20
    assert prefix + "".join(rest) == "".join(pieces)
    assert len([p for p in rest if p]) == 13
    assert "".join(split) != "".join(rest)  # "a\n\nb" is not the answer's start
    assert "".join(other) and not "".join(other).startswith(pieces[7])
    assert "".join(limited) == "".join(pieces[7:12])

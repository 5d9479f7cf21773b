"""Streams that survive their backend: a chat stream whose backend dies is
continued on another one (olb/resume.py; docs/operations.md).

Backends are olb-sim instances killed mid-stream (SimServer.close(), or
fail_after_tokens: the connection dropped without the body's end) and, for
what the simulator cannot be told to do, hand-driven ones. The simulator
continues an assistant prefill as a deterministic model does (api.py _chat),
so a continued stream must read exactly like the uninterrupted answer.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest

from olb.server import start_proxy
from olb.sim import SimConfig, start_sim

from harness import RawClient, proxy_config, run, start_cluster, until
from test_failure_paths import ScriptedBackend

ollama = pytest.importorskip("ollama")
openai = pytest.importorskip("openai")

ASK = [{"role": "user", "content": "Why is the sky blue?"}]
#: Three backends that each drop the connection after 10 tokens of an answer of 25.
CRASHY = SimConfig(token_rate=0, ttft=0, seed=7, fail_after_tokens=10, num_predict_default=25)


def ndjson_text(resp) -> tuple[str, list]:
    lines = resp.lines()
    return "".join(line.get("message", {}).get("content", "") for line in lines), lines


def sse_events(resp) -> list:
    assert resp.body.endswith(b"\n\n")
    return [e for e in resp.body[:-2].split(b"\n\n")]


def sse_text(events) -> str:
    docs = [orjson.loads(e[6:]) for e in events if e != b"data: [DONE]"]
    return "".join(d["choices"][0]["delta"].get("content") or "" for d in docs if d.get("choices"))


async def reference(path, body, config=CRASHY):
    """The answer of one healthy backend, uninterrupted (the same seed: the same text)."""
    sim = await start_sim(config.replace(fail_after_tokens=None))
    try:
        client = await RawClient.connect(sim.port)
        resp = await client.request("POST", path, body)
        client.close()
        return resp
    finally:
        await sim.close()


def chat_counts(cluster, path):
    return [s.stats.by_path.get(path, 0) for s in cluster.sims]


# --- the official clients, against a backend killed mid-stream ----------------------------

@pytest.fixture
def slow_cluster(loop_thread):
    # 200 tokens/s: the client is reading the stream when its backend goes.
    c = loop_thread.run(start_cluster(3, SimConfig(token_rate=200, ttft=0, seed=5, num_predict_default=40)))
    try:
        yield c
    finally:
        loop_thread.run(c.close())


def kill_serving_backend(loop_thread, cluster):
    """Close the simulated Ollama that is streaming now (its listener and connections)."""
    serving = loop_thread.call(lambda: [s for s in cluster.sims if s.stats.active])
    assert len(serving) == 1
    loop_thread.run(serving[0].close())
    return serving[0]


def test_ollama_client_chat_stream_outlives_its_backend(loop_thread, slow_cluster):
    with ollama.Client(host=f"http://127.0.0.1:{slow_cluster.port}") as client:
        whole = client.chat(model="llama3.2", messages=ASK)
        parts, killed = [], None
        for part in client.chat(model="llama3.2", messages=ASK, stream=True):
            parts.append(part)
            if len(parts) == 5:
                killed = kill_serving_backend(loop_thread, slow_cluster)
    assert killed is not None
    # One stream, no error: the text so far plus its continuation is the
    # whole answer, and one final line ends it.
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert len([p for p in parts if p.message.content]) == 40
    # The final line is the second backend's: its counts are of its own run
    # (the text so far was prompt there), docs/operations.md.
    final = parts[-1]
    assert final.done_reason == "stop"
    assert 0 < final.eval_count <= 40 - 5
    assert final.prompt_eval_count > whole.prompt_eval_count
    assert killed.stats.by_path.get("/api/chat", 0) >= 1


def test_openai_client_chat_stream_outlives_its_backend(loop_thread, slow_cluster):
    with openai.OpenAI(base_url=f"http://127.0.0.1:{slow_cluster.port}/v1", api_key="x", max_retries=0) as client:
        whole = client.chat.completions.create(model="llama3.2", messages=ASK)
        chunks = []
        for chunk in client.chat.completions.create(model="llama3.2", messages=ASK, stream=True,
                                                    stream_options={"include_usage": True}):
            chunks.append(chunk)
            if len(chunks) == 5:
                kill_serving_backend(loop_thread, slow_cluster)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    # One completion: the continuation's events carry the first id and created.
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage is not None and not chunks[-1].choices


# --- raw sockets: framing, chained failures, the token budget -------------------------------

@pytest.mark.parametrize("options", [{}, {"options": {"num_predict": 22}}])
def test_ndjson_stream_survives_two_backend_deaths(loop, options):
    """Each backend dies after 10 tokens: the second continues the first, the
    third the second. The chunked framing stays valid across both splices
    (h11 reads it, and the connection serves the next request), and
    num_predict counts the whole answer, not each backend's part."""
    body = {"model": "llama3.2", "messages": ASK, **options}

    async def main():
        cluster = await start_cluster(3, CRASHY, retries=0)
        try:
            client = await RawClient.connect(cluster.port)
            resp = await client.request("POST", "/api/chat", body)
            again = await client.request("GET", "/olb/status")
            client.close()
            return (resp, again, chat_counts(cluster, "/api/chat"), await reference("/api/chat", body),
                    [cluster.proxy.balancer.table.inflight(i) for i in range(3)])
        finally:
            await cluster.close()

    resp, again, counts, ref, inflight = run(loop, main())
    assert resp.status == 200 and again.status == 200
    assert again.json()["resume"] == {"cut": 1, "resumed": 1}
    text, lines = ndjson_text(resp)
    assert text == ndjson_text(ref)[0]
    assert not any("error" in line for line in lines)
    assert [line["done"] for line in lines] == [False] * (len(lines) - 1) + [True]
    assert len(lines) - 1 == options.get("options", {}).get("num_predict", 25)
    assert counts == [1, 1, 1]
    assert inflight == [0, 0, 0]


def test_sse_stream_survives_two_backend_deaths(loop):
    body = {"model": "llama3.2", "messages": ASK, "stream": True, "max_tokens": 23}

    async def main():
        cluster = await start_cluster(3, CRASHY)
        try:
            client = await RawClient.connect(cluster.port)
            resp = await client.request("POST", "/v1/chat/completions", body)
            again = await client.request("GET", "/olb/health")
            client.close()
            return resp, again, chat_counts(cluster, "/v1/chat/completions"), \
                await reference("/v1/chat/completions", body)
        finally:
            await cluster.close()

    resp, again, counts, ref = run(loop, main())
    assert resp.status == 200 and again.status == 200
    events = sse_events(resp)
    assert sse_text(events) == sse_text(sse_events(ref))
    assert events[-1] == b"data: [DONE]"
    docs = [orjson.loads(e[6:]) for e in events[:-1]]
    assert not any("error" in d for d in docs)
    assert len({d["id"] for d in docs}) == 1 and len({d["created"] for d in docs}) == 1
    assert len([d for d in docs if d["choices"][0]["delta"].get("content")]) == 23
    assert counts == [1, 1, 1]


# --- where it does not apply: the stream ends as before, with an error line -----------------

@pytest.mark.parametrize("path,body,overrides,cut", [
    ("/api/chat", {"model": "llama3.2", "messages": ASK, "format": "json"}, {}, 1),
    ("/api/chat", {"model": "llama3.2", "messages": ASK}, {"resume_max_bytes": 0}, 0),
    ("/api/chat", {"model": "llama3.2", "messages": ASK}, {"resume_max_bytes": 600}, 1),   # ~5 lines
    ("/api/generate", {"model": "llama3.2", "prompt": "x"}, {}, 0),
    ("/v1/chat/completions", {"model": "llama3.2", "messages": ASK, "stream": True,
                              "response_format": {"type": "json_object"}}, {}, 1),
])
def test_streams_that_are_not_continued_end_with_the_error_line(loop, path, body, overrides, cut):
    async def main():
        cluster = await start_cluster(2, CRASHY, **overrides)
        try:
            client = await RawClient.connect(cluster.port)
            resp = await client.request("POST", path, body)
            again = await client.request("GET", "/olb/status")
            client.close()
            return resp, again, chat_counts(cluster, path)
        finally:
            await cluster.close()

    resp, again, counts = run(loop, main())
    assert resp.status == 200 and again.status == 200
    assert again.json()["resume"] == {"cut": cut, "resumed": 0}
    last = resp.body.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    assert b'"error"' in last and b"failed mid-request" in last
    assert sum(counts) == 1


def test_a_stream_with_no_other_backend_names_the_first_failure(loop):
    async def main():
        cluster = await start_cluster(1, CRASHY)
        try:
            client = await RawClient.connect(cluster.port)
            resp = await client.request("POST", "/api/chat", {"model": "llama3.2", "messages": ASK})
            client.close()
            return resp
        finally:
            await cluster.close()

    text, lines = ndjson_text(run(loop, main()))
    assert len(lines) == 11 and "failed mid-request (connection closed)" in lines[-1]["error"]


# --- hand-driven backends: what the simulator cannot be told ---------------------------------

def chunk(doc) -> bytes:
    line = orjson.dumps(doc) + b"\n"
    return b"%x\r\n%s\r\n" % (len(line), line)


STREAM_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n")


def token(text: str) -> bytes:
    return chunk({"model": "llama3.2", "created_at": "2026-01-01T00:00:00Z",
                  "message": {"role": "assistant", "content": text}, "done": False})


def two_backends(handler):
    async def start():
        backends = [await ScriptedBackend(handler).start() for _ in range(2)]
        proxy = await start_proxy(proxy_config([b.url for b in backends], models_interval=0))
        return backends, proxy
    return start()


def test_a_backend_that_dies_after_its_final_line_ends_the_stream_cleanly(loop):
    """Everything but the end of the body arrived: nothing to continue, and
    no error either."""
    async def handler(conn, req):
        conn.writer.write(STREAM_HEAD + token("Hi") + chunk({"model": "llama3.2", "created_at": "x",
                                                             "message": {"role": "assistant", "content": ""},
                                                             "done": True, "done_reason": "stop"}))
        await conn.writer.drain()
        return None  # close without the last chunk

    async def main():
        backends, proxy = await two_backends(handler)
        try:
            client = await RawClient.connect(proxy.port)
            resp = await client.request("POST", "/api/chat", {"model": "llama3.2", "messages": ASK})
            again = await client.request("GET", "/olb/health")
            client.close()
            return resp, again, sum(len(b.requests) for b in backends)
        finally:
            await proxy.close()
            for b in backends:
                await b.close()

    resp, again, requests = run(loop, main())
    lines = resp.lines()
    assert [line["done"] for line in lines] == [False, True] and again.status == 200
    assert requests == 1


def test_the_continuation_carries_the_text_so_far_and_its_failure_ends_the_stream(loop):
    """The continuation is the client's request plus the text it has seen as
    the assistant's message; a backend that refuses it (here a 500) ends the
    stream with an error line naming both failures."""
    async def handler(conn, req):
        if b'"assistant"' in req.body:
            body = b'{"error":"no"}'
            return (b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        conn.writer.write(STREAM_HEAD + token("Hello") + token(" there"))
        await conn.writer.drain()
        return None

    async def main():
        backends, proxy = await two_backends(handler)
        try:
            client = await RawClient.connect(proxy.port)
            resp = await client.request("POST", "/api/chat",
                                        {"model": "llama3.2", "messages": ASK, "options": {"num_predict": 9}})
            await until(lambda: sum(len(b.requests) for b in backends) == 2)
            again = await client.request("GET", "/olb/health")
            client.close()
            return resp, again, [orjson.loads(r.body) for b in backends for _, r in b.requests]
        finally:
            await proxy.close()
            for b in backends:
                await b.close()

    resp, again, bodies = run(loop, main())
    lines = resp.lines()
    assert [line.get("message", {}).get("content") for line in lines[:-1]] == ["Hello", " there"]
    assert "failed mid-request" in lines[-1]["error"] and "continued stream with 500" in lines[-1]["error"]
    assert again.status == 200
    first, second = sorted(bodies, key=lambda b: len(b["messages"]))
    assert second["messages"] == ASK + [{"role": "assistant", "content": "Hello there"}]
    assert second["options"] == {"num_predict": 7}


def test_a_client_that_leaves_while_its_stream_is_continued_frees_everything(loop):
    """The continuation waits in olb's queue (every slot busy): the client
    going away takes it out, and nothing stays counted."""
    release = asyncio.Event()

    async def handler(conn, req):
        if b'"assistant"' in req.body:
            await release.wait()
            return None
        if b"hold" in req.body:  # a request that keeps backend 1's only slot
            conn.writer.write(STREAM_HEAD + token("busy"))
            await release.wait()
            return None
        conn.writer.write(STREAM_HEAD + token("Hello"))
        await conn.writer.drain()
        return None

    async def main():
        backends = [await ScriptedBackend(handler).start() for _ in range(2)]
        proxy = await start_proxy(proxy_config([b.url for b in backends], models_interval=0, max_inflight=1,
                                               backend_opts=[";max=1", ";max=1"]))
        try:
            holder = await RawClient.connect(proxy.port)
            holder.send("POST", "/api/chat", {"model": "llama3.2", "messages": [{"role": "user", "content": "hold"}]})
            await until(lambda: sum(len(b.requests) for b in backends) == 1)
            client = await RawClient.connect(proxy.port)
            client.send("POST", "/api/chat", {"model": "llama3.2", "messages": ASK})
            await until(lambda: sum(len(b.requests) for b in backends) == 2)
            # The second stream died; its continuation needs the holder's backend.
            await until(lambda: len(proxy.balancer.queue) == 1)
            client.close()
            await until(lambda: len(proxy.balancer.queue) == 0)
            release.set()
            holder.close()
            await until(lambda: all(proxy.balancer.table.inflight(i) == 0 for i in range(2)))
            return True
        finally:
            release.set()
            await proxy.close()
            for b in backends:
                await b.close()

    assert run(loop, main())


def test_an_sse_stream_cut_before_its_first_event_keeps_the_id_the_client_saw_first(loop):
    """The first backend dies after its head: the continuation is the same
    request, its events go out as they come (their id is the first the
    client sees); when that one dies too, the third backend's events get
    that id."""
    calls = []

    def event(id, **delta):
        doc = {"id": id, "object": "chat.completion.chunk", "created": 1700000000 + len(id), "model": "llama3.2",
               "system_fingerprint": "fp_ollama",
               "choices": [{"index": 0, "delta": delta, "finish_reason": "stop" if not delta else None}]}
        line = b"data: " + orjson.dumps(doc) + b"\n\n"
        return b"%x\r\n%s\r\n" % (len(line), line)

    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"

    async def handler(conn, req):
        calls.append(orjson.loads(req.body))
        if len(calls) == 1:
            out = head
        elif len(calls) == 2:
            out = head + event("chatcmpl-2", role="assistant", content="Hello") + event("chatcmpl-2", content=" you")
        else:
            done = b"data: [DONE]\n\n"
            conn.writer.write(head + event("chatcmpl-333", role="assistant", content=" all") + event("chatcmpl-333")
                              + b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
            return b""
        conn.writer.write(out)
        await conn.writer.drain()
        return None

    async def main():
        backends = [await ScriptedBackend(handler).start() for _ in range(3)]
        proxy = await start_proxy(proxy_config([b.url for b in backends], models_interval=0))
        try:
            client = await RawClient.connect(proxy.port)
            resp = await client.request("POST", "/v1/chat/completions",
                                        {"model": "llama3.2", "messages": ASK, "stream": True})
            again = await client.request("GET", "/olb/health")
            client.close()
            return resp, again
        finally:
            await proxy.close()
            for b in backends:
                await b.close()

    resp, again = run(loop, main())
    events = sse_events(resp)
    assert again.status == 200 and events[-1] == b"data: [DONE]"
    docs = [orjson.loads(e[6:]) for e in events[:-1]]
    assert sse_text(events) == "Hello you all"
    assert {(d["id"], d["created"]) for d in docs} == {("chatcmpl-2", 1700000010)}
    assert [c["messages"][-1] for c in calls] == [ASK[0], ASK[0], {"role": "assistant", "content": "Hello you"}]

"""The control plane over real sockets: requests that run no model never
wait for an inference slot, timeouts tell slow from dead, and the Host check
of an Ollama bound to loopback."""

import asyncio

import orjson
import pytest

from olb.sim import SimConfig, start_sim
from olb.server import start_proxy

from harness import RawClient, fetch, proxy_config, read_response, run, until

FAST = SimConfig(token_rate=0, ttft=0, seed=5)



async def start(sim_configs, **overrides):
    sims = [await start_sim(c) for c in sim_configs]
    overrides.setdefault("models_interval", 60)  # the tests refresh by hand
    proxy = await start_proxy(proxy_config([s.url for s in sims], **overrides))
    if proxy.balancer.models is not None:
        await proxy.balancer.models.refresh_all()
    return proxy, sims


async def stop(proxy, sims):
    await proxy.close()
    for s in sims:
        await s.close()


def inflight(proxy):
    return [row["inflight"] for row in proxy.balancer.table.snapshot()]


# --- no slot for requests that run no model ---------------------------------------------

@pytest.mark.parametrize("policy", ["llm", "least-inflight"])
def test_control_requests_are_answered_while_every_slot_is_busy(loop, policy):
    """Both backends hold their one slot with a long generation and a third
    request waits in olb's queue: HEAD / (the ollama CLI's first request),
    GET /, /api/version, /api/show, /api/tags and /v1/models/{id} are
    answered all the same, without counting a slot or touching the queue."""
    slow = SimConfig(token_rate=0, ttft=60, seed=5, preload=("llama3.2:latest",))

    async def main():
        proxy, sims = await start([slow.replace(models=("llama3.2:latest",)),
                                   slow.replace(models=("llama3.2:latest", "qwen2.5:7b"))],
                                  max_inflight=1, queue_timeout=60, policy=policy)
        holders = []
        try:
            for i in range(3):
                c = await RawClient.connect(proxy.port)
                c.send("POST", "/api/generate", {"model": "llama3.2", "prompt": f"q{i}", "stream": False})
                holders.append(c)
            await until(lambda: inflight(proxy) == [1, 1] and len(proxy.balancer.queue) == 1)
            out = {}
            client = await RawClient.connect(proxy.port)
            for method, path, body in [("HEAD", "/", None), ("GET", "/", None), ("GET", "/api/version", None),
                                       ("POST", "/api/show", {"model": "qwen2.5:7b"}),
                                       ("GET", "/api/tags", None), ("GET", "/v1/models/llama3.2", None)]:
                client.send(method, path, body)
                out[method, path] = await client.response(method, timeout=5)
                assert inflight(proxy) == [1, 1] and len(proxy.balancer.queue) == 1
            client.close()
            shows = [s.stats.by_path.get("/api/show", 0) for s in sims]
            for c in holders:
                c.close()
            # The held slots come back when their clients leave: every acquire
            # was released exactly once, and the control requests took none.
            await until(lambda: inflight(proxy) == [0, 0] and len(proxy.balancer.queue) == 0)
            return out, shows
        finally:
            for c in holders:
                c.close()
            await stop(proxy, sims)

    out, shows = run(loop, main())
    head, root = out["HEAD", "/"], out["GET", "/"]
    assert head.status == 200 and head.headers["content-length"] == "17" and head.body == b""
    assert root.status == 200 and root.body == b"Ollama is running"
    assert out["GET", "/api/version"].status == 200 and out["GET", "/api/version"].json()["version"]
    assert out["POST", "/api/show"].status == 200 and "modelfile" in out["POST", "/api/show"].json()
    assert out["GET", "/api/tags"].status == 200
    if policy == "llm":
        # /api/show went to the backend that has the model; /v1/models/{id}
        # came from the merged view.
        assert shows == [0, 1] and out["GET", "/v1/models/llama3.2"].status == 200
    else:
        # The plain policies know no models: one backend answers, whichever.
        assert out["GET", "/v1/models/llama3.2"].status in (200, 404)


def test_show_goes_where_the_model_is_and_loads_nothing(loop):
    async def main():
        proxy, sims = await start([FAST.replace(models=("llama3.2:latest",)),
                                   FAST.replace(models=("qwen2.5:7b", "nomic-embed-text:latest"))])
        models = proxy.balancer.models
        try:
            statuses = []
            for _ in range(3):
                for model in ("llama3.2", "qwen2.5:7b", "nomic-embed-text"):
                    statuses.append((await fetch(proxy.port, "POST", "/api/show", {"model": model})).status)
            loaded = {m: bytes(models.loaded_mask(m)) for m in ("llama3.2:latest", "qwen2.5:7b")}
            return statuses, [s.stats.by_path.get("/api/show", 0) for s in sims], loaded, models.placed
        finally:
            await stop(proxy, sims)

    statuses, shows, loaded, placed = run(loop, main())
    assert statuses == [200] * 9 and shows == [3, 6]
    # Showing a model does not load it: nothing counts it as warm or placed.
    assert loaded == {"llama3.2:latest": b"\0\0", "qwen2.5:7b": b"\0\0"} and not placed


def test_show_with_no_healthy_backend_is_502_at_once(loop):
    async def main():
        proxy, sims = await start([FAST.replace(models=("llama3.2:latest",)), FAST.replace(models=("qwen2.5:7b",))])
        try:
            proxy.balancer.mark_down(0, "test: down")
            r = await fetch(proxy.port, "POST", "/api/show", {"model": "llama3.2"})
            return r, [s.stats.by_path.get("/api/show", 0) for s in sims]
        finally:
            await stop(proxy, sims)

    r, shows = run(loop, main())
    assert r.status == 502 and "no backend reachable" in r.json()["error"] and shows == [0, 0]


# --- /v1/models/{id} from the merged view ------------------------------------------------

def test_openai_retrieve_model_from_the_merged_view(loop):
    async def main():
        proxy, sims = await start([FAST.replace(models=("llama3.2:latest",)),
                                   FAST.replace(models=("qwen2.5:7b",)),
                                   FAST.replace(models=("qwen2.5:7b",))])
        try:
            found = [await fetch(proxy.port, "GET", "/v1/models/qwen2.5:7b") for _ in range(6)]
            direct = await fetch(sims[1].port, "GET", "/v1/models/qwen2.5:7b")
            quoted = await fetch(proxy.port, "GET", "/v1/models/llama3.2%3Alatest")
            missing = await fetch(proxy.port, "GET", "/v1/models/nope")
            return found, direct, quoted, missing
        finally:
            await stop(proxy, sims)

    found, direct, quoted, missing = run(loop, main())
    assert all(r.status == 200 for r in found)
    assert found[0].json() == direct.json() == {"id": "qwen2.5:7b", "object": "model",
                                                "created": direct.json()["created"], "owned_by": "library"}
    assert quoted.status == 200 and quoted.json()["id"] == "llama3.2:latest"
    # ShowHandler names the model by its DisplayShortest; RetrieveWriter wraps
    # it in the OpenAI shape.
    assert missing.status == 404 and missing.json() == {
        "error": {"message": "model 'nope:latest' not found", "type": "not_found_error",
                  "param": None, "code": None}}


# --- any body with a model is routed by it ------------------------------------------------

def test_anthropic_and_responses_requests_are_routed_by_model(loop):
    """/v1/messages and /v1/responses go to the backend that has the model;
    a model no backend has gets Ollama's 404 in each endpoint's shape without
    sending the request to a backend (olb re-reads the catalogues first:
    ModelDirectory.recheck). (A backend that lacks the route answers gin's
    text/plain 404, which says nothing about its models.)"""

    async def main():
        proxy, sims = await start([FAST.replace(models=("llama3.2:latest",)),
                                   FAST.replace(models=("qwen2.5:7b",))])
        try:
            for _ in range(3):
                await fetch(proxy.port, "POST", "/v1/messages",
                            {"model": "qwen2.5:7b", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]})
                await fetch(proxy.port, "POST", "/v1/responses", {"model": "llama3.2", "input": "x"})
            counts = [(s.stats.by_path.get("/v1/messages", 0), s.stats.by_path.get("/v1/responses", 0))
                      for s in sims]
            installed = bytes(proxy.balancer.models.installed_mask("qwen2.5:7b"))
            def inference():
                return sum(s.stats.by_path.get(p, 0) for s in sims for p in ("/v1/messages", "/v1/responses"))

            before = inference()
            msg = await fetch(proxy.port, "POST", "/v1/messages",
                              {"model": "nope", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]})
            resp = await fetch(proxy.port, "POST", "/v1/responses", {"model": "nope", "input": "x"})
            return counts, installed, msg, resp, inference() - before
        finally:
            await stop(proxy, sims)

    counts, installed, msg, resp, touched = run(loop, main())
    assert counts == [(0, 3), (3, 0)] and installed == b"\0\1"
    assert msg.status == 404 and resp.status == 404 and touched == 0
    doc = msg.json()
    assert doc["type"] == "error" and doc["error"] == {"type": "not_found_error", "message": "model 'nope' not found"}
    assert doc["request_id"].startswith("req_")
    assert resp.json()["error"]["message"] == "model 'nope' not found"
    assert resp.json()["error"]["type"] == "not_found_error"


# --- timeouts: slow is not dead ---------------------------------------------------------------

def test_slow_non_streamed_answers_do_not_mark_a_healthy_backend_down(loop):
    """A non-streamed answer arrives whole, after its last token: slower than
    OLB_FIRST_BYTE_TIMEOUT here, more times than OLB_EJECT_AFTER. Each
    timeout probes the backend, which answers, so each request waits on and
    completes, and the backend is never marked down."""
    slow = SimConfig(token_rate=0, ttft=0.5, seed=5)

    async def main():
        proxy, sims = await start([slow], models_interval=0, first_byte_timeout=0.1, eject_after=2)
        try:
            out = [await fetch(proxy.port, "POST", "/api/generate",
                               {"model": "llama3.2", "prompt": f"q{i}", "stream": False}) for i in range(3)]
            chat = await fetch(proxy.port, "POST", "/v1/chat/completions",
                               {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]})
            status = (await fetch(proxy.admin_port, "GET", "/olb/status")).json()["backends"][0]
            return out, chat, status, sims[0].stats.by_path.get("/", 0)
        finally:
            await stop(proxy, sims)

    out, chat, row, probes = run(loop, main())
    assert [r.status for r in out] == [200] * 3 and all(r.json()["done"] for r in out)
    assert chat.status == 200 and chat.json()["object"] == "chat.completion"
    assert row["healthy"] is True and row["last_error"] is None
    assert probes >= 4  # at least one probe per request


def test_slow_first_token_of_a_stream_is_504_without_ejecting(loop):
    """A streamed request whose first token is later than the first-byte
    timeout ends with 504, but the backend answers its probe: it stays in,
    however many times it happens, and serves the next request."""
    slow = SimConfig(token_rate=0, ttft=0.5, seed=5)

    async def main():
        proxy, sims = await start([slow], models_interval=0, first_byte_timeout=0.1, eject_after=2)
        try:
            streamed = [await fetch(proxy.port, "POST", "/api/generate", {"model": "llama3.2", "prompt": f"s{i}"})
                        for i in range(3)]
            await until(lambda: not proxy.balancer._checks)  # the last probe is done
            up = proxy.balancer.backends[0].up
            after = await fetch(proxy.port, "POST", "/api/generate",
                                {"model": "llama3.2", "prompt": "x", "stream": False})
            return streamed, up, after
        finally:
            await stop(proxy, sims)

    streamed, up, after = run(loop, main())
    assert [r.status for r in streamed] == [504] * 3
    assert "OLB_FIRST_BYTE_TIMEOUT" in streamed[0].json()["error"]
    assert up is True and after.status == 200


def test_a_stream_silent_past_the_idle_timeout_ends_without_ejecting(loop):
    """Mid-stream silence longer than OLB_IDLE_TIMEOUT ends that stream with
    Ollama's error line; the backend answers its probe and stays in."""
    halting = SimConfig(token_rate=0.5, ttft=0, seed=5)  # the first token at once, then one per 2 s

    async def main():
        proxy, sims = await start([halting], models_interval=0, first_byte_timeout=0.3, idle_timeout=0.3,
                                  eject_after=2)
        try:
            streams = [await fetch(proxy.port, "POST", "/api/generate",
                                   {"model": "llama3.2", "prompt": f"s{i}", "options": {"num_predict": 4}})
                       for i in range(3)]
            await until(lambda: not proxy.balancer._checks)
            return streams, proxy.balancer.backends[0].up, inflight(proxy)
        finally:
            await stop(proxy, sims)

    streams, up, counts = run(loop, main())
    assert all(r.status == 200 and "OLB_IDLE_TIMEOUT" in r.lines()[-1]["error"] for r in streams)
    assert up is True and counts == [0]


# --- Host check on a loopback listener ------------------------------------------------------

def raw_request(port, data: bytes, method="GET", count=1):
    async def go():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(data)
            return [await asyncio.wait_for(read_response(reader, method), 5) for _ in range(count)]
        finally:
            writer.close()
    return go()


@pytest.mark.parametrize("host,status", [
    ("example.com", 403), ("evil.example:11434", 403), ("8.8.8.8", 403), ("[::1]", 403),
    ("localhost", 200), ("LOCALHOST:11434", 200), ("127.0.0.1:11434", 200), ("[::1]:11434", 200),
    ("10.0.0.7", 200), ("192.168.1.2:80", 200), ("0.0.0.0", 200), ("ollama.internal", 200),
    ("box.local:11434", 200), ("app.localhost", 200),
])
def test_foreign_host_is_refused_on_loopback(loop, host, status):
    async def main():
        proxy, sims = await start([FAST], models_interval=0)
        try:
            req = f"GET /api/version HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
            (r,) = await raw_request(proxy.port, req)
            return r, sims[0].stats.requests
        finally:
            await stop(proxy, sims)

    r, reached = run(loop, main())
    assert r.status == status
    if status == 403:
        # Ollama's c.AbortWithStatus: no body; the backend never saw it.
        assert r.body == b"" and r.headers["content-length"] == "0" and reached == 0
    else:
        assert "version" in r.json()


def test_host_check_covers_every_path_and_keeps_the_connection(loop):
    async def main():
        proxy, sims = await start([FAST], models_interval=0)
        try:
            evil = b"Host: rebind.example\r\n"
            body = orjson.dumps({"model": "llama3.2", "prompt": "x", "stream": False})
            data = (b"GET /olb/status HTTP/1.1\r\n" + evil + b"\r\n"
                    + b"POST /api/generate HTTP/1.1\r\n" + evil
                    + b"Content-Length: %d\r\n\r\n" % len(body) + body
                    + b"GET /api/tags HTTP/1.1\r\n" + evil + b"\r\n"
                    + b"GET /api/version HTTP/1.1\r\nHost: localhost\r\n\r\n")
            out = await raw_request(proxy.port, data, count=4)
            # HTTP/1.0 without a Host: Go's Request.Host is "", which is allowed.
            (old,) = await raw_request(proxy.port, b"GET /api/version HTTP/1.0\r\n\r\n")
            return out, old, sims[0].stats.requests
        finally:
            await stop(proxy, sims)

    out, old, reached = run(loop, main())
    assert [r.status for r in out] == [403, 403, 403, 200]
    assert old.status == 200
    assert reached == 2  # the allowed /api/version twice; nothing refused got through


# --- the control-plane client under probes and polls ----------------------------------------

def test_probes_and_model_polls_share_one_keep_alive_connection(loop):
    async def main():
        proxy, sims = await start([FAST], models_interval=60)
        try:
            balancer = proxy.balancer
            stats = sims[0].stats
            results = [await balancer.probe(balancer.backends[0])]
            opened, tags = stats.connections_total, stats.by_path["/api/tags"]
            for _ in range(3):
                results.append(await balancer.models.refresh(0))
                results.append(await balancer.probe(balancer.backends[0]))
            return results, stats.connections_total - opened, stats.by_path["/api/tags"] - tags
        finally:
            await stop(proxy, sims)

    results, opened, tags = run(loop, main())
    assert results == [None] + [True, None] * 3 and tags == 3
    assert opened == 0  # all of it over a connection already open


def test_an_oversized_catalogue_is_refused_not_read_whole(loop, monkeypatch):
    from olb import models

    async def main():
        proxy, sims = await start([FAST], models_interval=60)
        try:
            monkeypatch.setattr(models, "MAX_CATALOGUE_BYTES", 256)  # the sim's /api/tags is larger
            return await proxy.balancer.models.refresh(0), await proxy.balancer.probe(proxy.balancer.backends[0])
        finally:
            await stop(proxy, sims)

    refreshed, probe = run(loop, main())
    assert refreshed is False and probe is None  # the poll failed; the backend is fine


def test_a_probe_of_a_stopped_backend_says_why(loop):
    async def main():
        proxy, sims = await start([FAST], models_interval=0)
        try:
            assert await proxy.balancer.probe(proxy.balancer.backends[0]) is None
            await sims[0].close()  # its keep-alive connection goes too
            return await proxy.balancer.probe(proxy.balancer.backends[0])
        finally:
            await stop(proxy, sims)

    error = run(loop, main())
    assert error is not None and "connect to 127.0.0.1:" in error


# --- the official clients -----------------------------------------------------------------------

def test_official_clients_non_streamed_and_slower_than_the_first_byte_timeout(loop_thread):
    """The official clients send non-streamed requests by default: answers
    slower than OLB_FIRST_BYTE_TIMEOUT, more of them than OLB_EJECT_AFTER,
    all arrive, and the backend stays in. The openai client's model
    retrieve reads /v1/models/{id} from the merged view."""
    ollama = pytest.importorskip("ollama")
    openai = pytest.importorskip("openai")
    slow = SimConfig(token_rate=0, ttft=0.4, seed=5)
    proxy, sims = loop_thread.run(start([slow, FAST.replace(models=("qwen2.5:7b",))],
                                        first_byte_timeout=0.1, eject_after=2))
    try:
        url = f"http://127.0.0.1:{proxy.port}"
        with ollama.Client(host=url) as client:
            replies = [client.generate(model="llama3.2", prompt=f"q{i}") for i in range(3)]
            assert all(r.done and r.response for r in replies)
            assert client.show("qwen2.5:7b").modelinfo is not None
        with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client:
            chat = client.chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": "x"}])
            assert chat.choices[0].message.content
            assert client.models.retrieve("qwen2.5:7b").id == "qwen2.5:7b"
            with pytest.raises(openai.NotFoundError):
                client.models.retrieve("nope")
        assert [b.up for b in proxy.balancer.backends] == [True, True]
    finally:
        loop_thread.run(stop(proxy, sims))

"""The proxy over real sockets: olb in front of simulated Ollama instances."""

import asyncio
import gc

import orjson
import pytest

from olb.sim import SimConfig, start_sim
from olb.server import start_proxy

from harness import RawClient, fetch, proxy_config, read_response, request_bytes, run, start_cluster, until

FAST = SimConfig(token_rate=0, ttft=0, seed=7, deterministic_time=True)



REQUESTS = [
    ("POST", "/api/generate", {"model": "llama3.2", "prompt": "Why is the sky blue?"}),
    ("POST", "/api/chat", {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}),
    ("POST", "/api/generate", {"model": "llama3.2", "prompt": "hi", "stream": False}),
    ("POST", "/v1/chat/completions", {"model": "llama3.2", "stream": True,
                                      "messages": [{"role": "user", "content": "hi"}]}),
    ("POST", "/v1/chat/completions", {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}),
    ("POST", "/api/embed", {"model": "nomic-embed-text", "input": ["a", "b"]}),
    ("GET", "/api/version", None),
    ("GET", "/", None),
    ("POST", "/api/chat", {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}),
    ("POST", "/api/chat", b"{not json"),
]


@pytest.mark.parametrize("fragment", [0, 7])
@pytest.mark.parametrize("method,path,body", REQUESTS, ids=[f"{m} {p} {i}" for i, (m, p, _) in enumerate(REQUESTS)])
def test_bytes_identical_to_direct(loop, fragment, method, path, body):
    """NDJSON, SSE and Content-Length bodies come through olb byte for byte,
    also when the backend writes them in 7-byte pieces."""

    async def main():
        cluster = await start_cluster(1, FAST.replace(fragment=fragment))
        try:
            direct = await fetch(cluster.sims[0].port, method, path, body)
            proxied = await fetch(cluster.port, method, path, body)
        finally:
            await cluster.close()
        assert proxied.status == direct.status
        assert proxied.raw_body == direct.raw_body
        assert proxied.headers.get("content-type") == direct.headers.get("content-type")
        assert proxied.headers.get("transfer-encoding") == direct.headers.get("transfer-encoding")
        return direct

    direct = run(loop, main())
    assert direct.raw_body  # something was compared


def test_stream_chunks_are_forwarded_as_they_come(loop):
    """With a slow token rate the client sees the first lines long before the last."""

    async def main():
        cluster = await start_cluster(1, SimConfig(token_rate=50, ttft=0, seed=1))
        try:
            client = await RawClient.connect(cluster.port)
            client.send("POST", "/api/generate", {"model": "llama3.2", "prompt": "x",
                                                  "options": {"num_predict": 10}})
            head = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), 5)
            t0 = loop.time()
            first = await asyncio.wait_for(client.reader.readuntil(b'"done":false'), 5)  # first NDJSON line
            t1 = loop.time()
            rest = await asyncio.wait_for(client.reader.readuntil(b"0\r\n\r\n"), 5)
            t2 = loop.time()
            client.close()
        finally:
            await cluster.close()
        assert head.startswith(b"HTTP/1.1 200")
        assert b'"done":false' in first
        assert b'"done":true' in rest
        # 10 tokens at 50/s take ~0.2 s; the first arrives well before the end.
        assert t2 - t0 > 2 * (t1 - t0)

    run(loop, main())


def test_keep_alive_reuses_backend_connections(loop):
    async def main():
        cluster = await start_cluster(1, FAST, models_interval=0)  # no model polls
        try:
            client = await RawClient.connect(cluster.port)
            for _ in range(20):
                resp = await client.request("POST", "/api/generate",
                                            {"model": "llama3.2", "prompt": "x", "stream": False})
                assert resp.status == 200
            client.close()
            return cluster.proxy.balancer.backends[0].pool.opened, cluster.sims[0].stats.connections_total
        finally:
            await cluster.close()

    opened, sim_connections = run(loop, main())
    assert opened == 1 and sim_connections == 1


def test_host_header_is_the_backends(loop):
    """The sim answers 403 to a non-local Host, like Ollama bound to 127.0.0.1;
    olb sends each backend its own address. (olb bound to loopback refuses
    that Host itself, as Ollama does: tests/integration/test_control_plane.py;
    here its check is off, as when it listens on a non-loopback address.)"""

    # request_bytes already sends Host: 127.0.0.1; a second Host is invalid,
    # so send the client's own Host by hand:
    async def main():
        cluster = await start_cluster(1, FAST)
        cluster.proxy.ctx.host_check = None
        try:
            out = []
            for port in (cluster.sims[0].port, cluster.port):
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(b"GET /api/version HTTP/1.1\r\nHost: olb.example.com\r\n\r\n")
                out.append(await asyncio.wait_for(read_response(r, "GET"), 5))
                w.close()
            return out
        finally:
            await cluster.close()

    direct, proxied = run(loop, main())
    assert direct.status == 403
    assert proxied.status == 200 and "version" in proxied.json()


def test_pipelined_requests_answered_in_order(loop):
    async def main():
        cluster = await start_cluster(2, FAST)
        try:
            client = await RawClient.connect(cluster.port)
            prompts = [f"prompt number {i}" for i in range(6)]
            client.writer.write(b"".join(
                request_bytes("POST", "/api/generate", {"model": "llama3.2", "prompt": p, "stream": i % 2 == 0})
                for i, p in enumerate(prompts)))
            out = [await client.response() for _ in prompts]
            client.close()
            # The same requests one by one, directly, for the expected bodies.
            expected = [await fetch(cluster.sims[0].port, "POST", "/api/generate",
                                    {"model": "llama3.2", "prompt": p, "stream": i % 2 == 0})
                        for i, p in enumerate(prompts)]
            return out, expected
        finally:
            await cluster.close()

    out, expected = run(loop, main())
    assert [r.raw_body for r in out] == [r.raw_body for r in expected]


def test_malformed_request_gets_400_and_close(loop):
    async def main():
        cluster = await start_cluster(1, FAST)
        try:
            r, w = await asyncio.open_connection("127.0.0.1", cluster.port)
            w.write(b"GARBAGE\r\n\r\n")
            data = await asyncio.wait_for(r.read(), 5)  # read() to EOF: olb closes
            w.close()
            # Another client is not disturbed.
            ok = await fetch(cluster.port, "GET", "/api/tags")
            return data, ok
        finally:
            await cluster.close()

    data, ok = run(loop, main())
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"connection: close" in head.lower()
    assert "error" in orjson.loads(body)
    assert ok.status == 200 and ok.json()["models"]


def test_body_over_limit_gets_413(loop):
    async def main():
        cluster = await start_cluster(1, FAST, max_body=1024)
        try:
            big = {"model": "llama3.2", "prompt": "x" * 5000}
            resp = await fetch(cluster.port, "POST", "/api/generate", big)
            small = await fetch(cluster.port, "POST", "/api/generate",
                                {"model": "llama3.2", "prompt": "x", "stream": False})
            return resp, small, cluster.sims[0].stats.by_path.get("/api/generate", 0)
        finally:
            await cluster.close()

    resp, small, sim_requests = run(loop, main())
    assert resp.status == 413
    assert "OLB_MAX_BODY" in resp.json()["error"]
    assert small.status == 200
    assert sim_requests == 1  # the oversized one never reached a backend


def test_http10_client(loop):
    async def main():
        cluster = await start_cluster(1, FAST)
        try:
            r, w = await asyncio.open_connection("127.0.0.1", cluster.port)
            w.write(request_bytes("POST", "/api/generate", {"model": "llama3.2", "prompt": "hi"}, http10=True))
            data = await asyncio.wait_for(r.read(), 5)
            w.close()
            return data
        finally:
            await cluster.close()

    data = run(loop, main())
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"chunked" not in head.lower()
    lines = [orjson.loads(x) for x in body.splitlines()]
    assert lines[-1]["done"] is True


def test_spread_follows_capacity(loop):
    """Concurrent streams land on backends in proportion to their max=."""

    async def main():
        slow = SimConfig(token_rate=20, ttft=0, seed=3, num_parallel=8, num_predict_default=40)
        sims = [await start_sim(slow) for _ in range(3)]
        # models_interval=0: plain least-in-flight, without model affinity.
        proxy = await start_proxy(proxy_config([s.url for s in sims], models_interval=0,
                                               backend_opts=[";max=1", ";max=2", ";max=4"]))
        try:
            clients = [await RawClient.connect(proxy.port) for _ in range(7)]
            for c in clients:
                c.send("POST", "/api/generate", {"model": "llama3.2", "prompt": "x"})
            # While all seven stream, each backend is exactly full.
            await asyncio.sleep(0)  # let the proxy accept them
            await until(lambda: sum(s.stats.active for s in sims) == 7, timeout=8)
            active = [s.stats.active for s in sims]
            inflight = [proxy.balancer.table.inflight(i) for i in range(3)]
            for c in clients:
                await c.response()
                c.close()
            return active, inflight
        finally:
            await proxy.close()
            for s in sims:
                await s.close()

    active, inflight = run(loop, main())
    assert active == [1, 2, 4]
    assert inflight == [1, 2, 4]


def test_client_disconnect_closes_backend_at_once(loop):
    async def main():
        slow = SimConfig(token_rate=20, ttft=0, seed=3, num_predict_default=1000)
        cluster = await start_cluster(1, slow)
        sim = cluster.sims[0]
        try:
            client = await RawClient.connect(cluster.port)
            client.send("POST", "/api/chat", {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]})
            await asyncio.wait_for(client.reader.readuntil(b'"done":false'), 5)
            assert cluster.proxy.balancer.table.inflight(0) == 1
            t0 = loop.time()
            client.writer.transport.abort()
            await asyncio.wait_for(sim.abort_event.wait(), 2)
            elapsed = sim.aborts[-1] - t0
            await until(lambda: cluster.proxy.balancer.table.inflight(0) == 0, timeout=2)
            return elapsed, cluster.proxy.balancer.table.inflight(0), sim.stats.aborted
        finally:
            await cluster.close()

    elapsed, inflight, aborted = run(loop, main())
    assert elapsed < 0.1
    assert inflight == 0 and aborted == 1


def test_client_disconnect_while_queued_leaves_no_trace(loop):
    async def main():
        slow = SimConfig(token_rate=20, ttft=0, seed=3, num_predict_default=1000)
        cluster = await start_cluster(1, slow, max_inflight=1)
        try:
            first = await RawClient.connect(cluster.port)
            first.send("POST", "/api/generate", {"model": "llama3.2", "prompt": "x"})
            await asyncio.wait_for(first.reader.readuntil(b'"done":false'), 5)
            second = await RawClient.connect(cluster.port)
            second.send("POST", "/api/generate", {"model": "llama3.2", "prompt": "y"})
            await until(lambda: cluster.proxy.balancer.queue, timeout=2)
            queued = len(cluster.proxy.balancer.queue)
            second.writer.transport.abort()
            await until(lambda: not cluster.proxy.balancer.queue, timeout=2)
            first.writer.transport.abort()
            await until(lambda: cluster.proxy.balancer.table.inflight(0) == 0, timeout=2)
            return queued, len(cluster.proxy.balancer.queue), cluster.proxy.balancer.table.inflight(0)
        finally:
            await cluster.close()

    assert run(loop, main()) == (1, 0, 0)


def test_queue_full_and_queue_timeout_give_503_with_retry_after(loop):
    async def main():
        slow = SimConfig(token_rate=20, ttft=0, seed=3, num_predict_default=1000)
        cluster = await start_cluster(1, slow, max_inflight=1, queue_size=1, queue_timeout=0.3)
        try:
            holder = await RawClient.connect(cluster.port)
            holder.send("POST", "/api/generate", {"model": "llama3.2", "prompt": "x"})
            await asyncio.wait_for(holder.reader.readuntil(b'"done":false'), 5)
            waiting = await RawClient.connect(cluster.port)
            waiting.send("POST", "/api/generate", {"model": "llama3.2", "prompt": "y", "stream": False})
            await until(lambda: cluster.proxy.balancer.queue, timeout=2)
            full = await fetch(cluster.port, "POST", "/api/generate", {"model": "llama3.2", "prompt": "z"})
            t0 = loop.time()
            timed_out = await waiting.response()
            waited = loop.time() - t0
            holder.close()
            waiting.close()
            return full, timed_out, waited
        finally:
            await cluster.close()

    full, timed_out, waited = run(loop, main())
    assert full.status == 503 and full.headers["retry-after"] == "1"
    assert full.json() == {"error": "server busy, please try again.  maximum pending requests exceeded"}
    assert timed_out.status == 503 and timed_out.headers["retry-after"] == "1"
    assert "OLB_QUEUE_TIMEOUT" in timed_out.json()["error"]
    assert waited < 1.0


def test_queued_request_proceeds_when_a_slot_frees(loop):
    async def main():
        sim = SimConfig(token_rate=200, ttft=0, seed=3, num_predict_default=20)
        # No model directory: its own reads of /api/tags and /api/ps (one follows the first
        # load) are not proxied requests, but the sim's max_active would count them.
        cluster = await start_cluster(1, sim, max_inflight=1, queue_size=10, queue_timeout=10, models_interval=0)
        try:
            clients = [await RawClient.connect(cluster.port) for _ in range(4)]
            for i, c in enumerate(clients):
                c.send("POST", "/api/generate", {"model": "llama3.2", "prompt": f"p{i}", "stream": False})
            out = [await c.response() for c in clients]
            for c in clients:
                c.close()
            return out, cluster.sims[0].stats.max_active
        finally:
            await cluster.close()

    out, max_active = run(loop, main())
    assert [r.status for r in out] == [200] * 4
    assert max_active == 1  # olb never sent the backend more than its max


def test_connect_failure_retries_on_another_backend(loop):
    async def main():
        sim = await start_sim(FAST)
        # A port with nothing listening: bind, never listen, so it refuses.
        import socket
        dead = socket.socket()
        dead.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{dead.getsockname()[1]}"
        # No model or conversation affinity, so the dead backend keeps being chosen.
        proxy = await start_proxy(proxy_config([dead_url, sim.url], models_interval=0, session_bound=0))
        try:
            statuses = []
            for _ in range(6):
                resp = await fetch(proxy.port, "POST", "/api/generate",
                                   {"model": "llama3.2", "prompt": "x", "stream": False})
                statuses.append(resp.status)
            health = await fetch(proxy.admin_port, "GET", "/olb/status")
            return statuses, health.json()
        finally:
            await proxy.close()
            await sim.close()
            dead.close()

    statuses, status = run(loop, main())
    assert statuses == [200] * 6
    assert status["backends"][0]["healthy"] is False
    assert "refused" in status["backends"][0]["last_error"].lower()
    assert status["backends"][1]["served"] == 6


def test_no_backend_reachable_is_502(loop):
    async def main():
        import socket
        dead = [socket.socket() for _ in range(2)]
        for s in dead:
            s.bind(("127.0.0.1", 0))
        proxy = await start_proxy(proxy_config([f"http://127.0.0.1:{s.getsockname()[1]}" for s in dead]))
        try:
            first = await fetch(proxy.port, "POST", "/api/chat", {"model": "x"})
            second = await fetch(proxy.port, "POST", "/v1/chat/completions", {"model": "x"})
            health = await fetch(proxy.admin_port, "GET", "/olb/health")
            return first, second, health
        finally:
            await proxy.close()
            for s in dead:
                s.close()

    first, second, health = run(loop, main())
    assert first.status == 502 and "refused" in first.json()["error"].lower()
    assert second.status == 502 and second.json()["error"]["type"] == "api_error"
    assert health.status == 503


def test_backend_killed_mid_run(loop):
    """Streams on the killed backend end with an error line; new requests go
    to the survivor; nothing hangs."""

    async def main():
        slow = SimConfig(token_rate=100, ttft=0, seed=3, num_predict_default=200, num_parallel=8)
        cluster = await start_cluster(2, slow, models_interval=0)  # spread one model over both
        victim, survivor = cluster.sims
        try:
            clients = [await RawClient.connect(cluster.port) for _ in range(4)]
            for c in clients:
                c.send("POST", "/api/generate", {"model": "llama3.2", "prompt": "x"})
            await until(lambda: victim.stats.active and survivor.stats.active, timeout=4)
            await victim.close()
            results = [await c.response(timeout=10) for c in clients]
            after = [await fetch(cluster.port, "POST", "/api/generate",
                                 {"model": "llama3.2", "prompt": "y", "stream": False}) for _ in range(4)]
            for c in clients:
                c.close()
            return results, after
        finally:
            await cluster.close()

    results, after = run(loop, main())
    endings = [r.lines()[-1] for r in results]
    assert any("error" in e for e in endings)          # the victim's streams
    assert any(e.get("done") is True for e in endings)  # the survivor's streams
    assert all(r.status == 200 for r in results)
    assert [r.status for r in after] == [200] * 4


@pytest.mark.parametrize("path,body,shape", [
    ("/api/generate", {"model": "llama3.2", "prompt": "x"}, "ndjson"),
    ("/v1/chat/completions", {"model": "llama3.2", "stream": True,
                              "messages": [{"role": "user", "content": "x"}]}, "sse"),
])
def test_backend_crash_mid_stream_ends_with_error_line(loop, path, body, shape):
    async def main():
        crashy = FAST.replace(fail_after_tokens=5, num_predict_default=50)
        cluster = await start_cluster(1, crashy, retries=2)
        try:
            client = await RawClient.connect(cluster.port)
            resp = await client.request("POST", path, body)
            # The connection is still usable afterwards.
            again = await client.request("GET", "/olb/health")
            client.close()
            return resp, again, cluster.sims[0].stats.by_path.get(path, 0)
        finally:
            await cluster.close()

    resp, again, sim_requests = run(loop, main())
    assert resp.status == 200
    if shape == "ndjson":
        last = resp.lines()[-1]
        assert "error" in last and isinstance(last["error"], str)
    else:
        events = [e for e in resp.body.split(b"\n\n") if e]
        assert b'"error"' in events[-1]
    assert again.status == 404  # olb's own answer (the admin gate on the data port): the connection works
    assert sim_requests == 1  # no retry after the first byte


def test_first_byte_timeout_is_504(loop):
    async def main():
        sleepy = SimConfig(ttft=5, token_rate=0, seed=1)
        cluster = await start_cluster(1, sleepy, first_byte_timeout=0.2)
        try:
            t0 = loop.time()
            resp = await fetch(cluster.port, "POST", "/api/generate", {"model": "llama3.2", "prompt": "x"})
            return resp, loop.time() - t0, cluster.proxy.balancer.table.inflight(0)
        finally:
            await cluster.close()

    resp, elapsed, inflight = run(loop, main())
    assert resp.status == 504 and "OLB_FIRST_BYTE_TIMEOUT" in resp.json()["error"]
    assert elapsed < 2 and inflight == 0


def test_slow_reader_does_not_grow_memory(loop):
    """A client that stops reading: olb pauses the backend; its buffers stay bounded."""

    async def main():
        chatty = SimConfig(token_rate=0, ttft=0, seed=1, num_predict_default=200_000)
        cluster = await start_cluster(1, chatty)
        try:
            r, w = await asyncio.open_connection("127.0.0.1", cluster.port, limit=1024)
            w.transport.set_write_buffer_limits(0)
            w.write(request_bytes("POST", "/api/generate", {"model": "llama3.2", "prompt": "x"}))
            w.transport.pause_reading()  # never read
            # Wait (bounded) until the buffers between us and the backend are
            # full and olb has paused reading from the backend.
            for _ in range(500):
                clients = [c for c in cluster.proxy.ctx.clients if c.exchange and c.exchange.conn]
                if clients and clients[0].exchange.conn.gate.paused:
                    break
                await asyncio.sleep(0.01)
            proxy_clients = list(cluster.proxy.ctx.clients)
            buffered = [c.transport.get_write_buffer_size() for c in proxy_clients]
            backend_paused = [c.exchange.conn.gate.paused for c in proxy_clients if c.exchange]
            await asyncio.sleep(0.5)
            buffered_later = [c.transport.get_write_buffer_size() for c in proxy_clients]
            w.transport.abort()
            return buffered, buffered_later, backend_paused
        finally:
            await cluster.close()

    buffered, later, paused = run(loop, main())
    assert paused == [True]
    # At most the high-water mark plus one read of the backend's bytes.
    assert max(buffered + later) < 32 * 1024 + 256 * 1024
    assert later == buffered  # not growing


def test_admin_status_and_health(loop):
    async def main():
        cluster = await start_cluster(2, FAST)
        try:
            await fetch(cluster.port, "POST", "/api/generate", {"model": "llama3.2", "prompt": "x", "stream": False})
            status = await fetch(cluster.admin_port, "GET", "/olb/status")
            health = await fetch(cluster.admin_port, "GET", "/olb/health")
            missing = await fetch(cluster.admin_port, "GET", "/olb/nope")
            return status, health, missing
        finally:
            await cluster.close()

    status, health, missing = run(loop, main())
    doc = status.json()
    assert status.status == 200 and len(doc["backends"]) == 2
    for key in ("url", "healthy", "inflight", "capacity", "gpu_util", "served"):
        assert key in doc["backends"][0]
    assert sum(b["served"] for b in doc["backends"]) == 1
    assert doc["queue"] == 0
    assert health.status == 200 and health.json()["status"] == "ok"
    assert missing.status == 404 and "error" in missing.json()


def test_many_clients_do_not_disturb_each_other(loop):
    """A burst of mixed good and bad clients; the good ones all succeed."""

    async def main():
        cluster = await start_cluster(2, FAST)
        try:
            async def good(i):
                return await fetch(cluster.port, "POST", "/api/chat",
                                   {"model": "llama3.2", "messages": [{"role": "user", "content": str(i)}]})

            async def bad():
                r, w = await asyncio.open_connection("127.0.0.1", cluster.port)
                w.write(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"mod")
                w.transport.abort()

            tasks = [good(i) for i in range(30)] + [bad() for _ in range(10)]
            out = await asyncio.gather(*tasks)
            return [r for r in out if r is not None], cluster.proxy.balancer.table
        finally:
            await cluster.close()

    results, table = run(loop, main())
    assert len(results) == 30 and all(r.status == 200 and r.lines()[-1]["done"] for r in results)
    assert table.inflight(0) == 0 and table.inflight(1) == 0
    gc.collect()


def test_gpu_load_steers_requests(loop, monkeypatch):
    """Backends behind a busy GPU get fewer requests: a fake pynvml reports
    GPU 0 at 95% and GPU 1 idle; olb polls it and the choice follows."""
    import sys

    from fake_pynvml import FakeNvml

    GiB = 1 << 30
    fake = FakeNvml([{"util": 95, "total": 80 * GiB, "free": 10 * GiB},
                     {"util": 0, "total": 80 * GiB, "free": 70 * GiB}])
    monkeypatch.setitem(sys.modules, "pynvml", fake)

    async def main():
        slow = SimConfig(token_rate=20, ttft=0, seed=3, num_parallel=8, num_predict_default=100)
        sims = [await start_sim(slow) for _ in range(2)]
        # No model or conversation affinity: only the GPU loads separate the two.
        proxy = await start_proxy(proxy_config([s.url for s in sims], backend_opts=[";gpus=0", ";gpus=1"],
                                               gpu_poll=0.05, models_interval=0, session_bound=0))
        try:
            proxy.ctx.gpu.poll_once()  # do not wait for the thread's first poll
            status = (await fetch(proxy.admin_port, "GET", "/olb/status")).json()
            clients = [await RawClient.connect(proxy.port) for _ in range(6)]
            for c in clients:
                c.send("POST", "/api/generate", {"model": "llama3.2", "prompt": "x"})
            await until(lambda: sum(s.stats.active for s in sims) == 6, timeout=8)
            active = [s.stats.active for s in sims]
            for c in clients:
                c.writer.transport.abort()
            return status, active
        finally:
            await proxy.close()
            for s in sims:
                await s.close()

    status, active = run(loop, main())
    assert [b["gpu_util"] for b in status["backends"]] == [0.95, 0.0]
    assert status["gpu"]["available"] is True
    # Scores (n+1)/(8*0.5) vs (n+1)/8 (a busy GPU counts as half its size):
    # the idle GPU takes twice the share, whatever order ties break in.
    assert active == [2, 4]


def test_no_nvml_driver_means_neutral_weights(loop, monkeypatch):
    import sys

    from fake_pynvml import FakeNvml, FakeNVMLError

    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([], init_error=FakeNVMLError(9)))

    async def main():
        cluster = await start_cluster(2, FAST, backend_opts=[";gpus=0", ";gpus=1"], gpu_poll=0.05)
        try:
            cluster.proxy.ctx.gpu.poll_once()
            resps = [await fetch(cluster.port, "POST", "/api/generate",
                                 {"model": "llama3.2", "prompt": "x", "stream": False}) for _ in range(4)]
            status = (await fetch(cluster.admin_port, "GET", "/olb/status")).json()
            return resps, status
        finally:
            await cluster.close()

    resps, status = run(loop, main())
    assert all(r.status == 200 for r in resps)
    assert [b["gpu_util"] for b in status["backends"]] == [None, None]
    assert status["gpu"]["available"] is False


def test_drain_stops_new_requests_without_cutting_streams(loop):
    async def main():
        slow = SimConfig(token_rate=50, ttft=0, seed=3, num_predict_default=15, num_parallel=8)
        cluster = await start_cluster(2, slow, models_interval=0, session_bound=0)
        a, b = cluster.sims
        try:
            stream = await RawClient.connect(cluster.port)
            stream.send("POST", "/api/generate", {"model": "llama3.2", "prompt": "x"})
            await asyncio.wait_for(stream.reader.readuntil(b'"done":false'), 5)
            busy = 0 if a.stats.active else 1
            url = cluster.sims[busy].url
            bad = await fetch(cluster.admin_port, "POST", "/olb/drain", {"backend": "http://nope:1"})
            drained = await fetch(cluster.admin_port, "POST", f"/olb/drain?backend={url}")
            others = [await fetch(cluster.port, "POST", "/api/generate",
                                  {"model": "llama3.2", "prompt": str(i), "stream": False}) for i in range(4)]
            served_while_drained = cluster.sims[busy].stats.by_path.get("/api/generate", 0)
            # The running stream was not cut: it ends normally.
            finished = await asyncio.wait_for(stream.reader.readuntil(b"0\r\n\r\n"), 10)
            stream.close()
            status = (await fetch(cluster.admin_port, "GET", "/olb/status")).json()
            undrained = await fetch(cluster.admin_port, "POST", "/olb/undrain", {"backend": url})
            return bad, drained, others, served_while_drained, finished, status, undrained, busy
        finally:
            await cluster.close()

    bad, drained, others, served, finished, status, undrained, busy = run(loop, main())
    assert bad.status == 404 and "no backend" in bad.json()["error"]
    assert drained.status == 200 and drained.json()["draining"] is True
    assert all(r.status == 200 for r in others)
    assert served == 1  # only the stream that was already running
    assert b'"done":true' in finished
    assert status["backends"][busy]["draining"] is True and status["backends"][busy]["healthy"] is True
    assert undrained.status == 200 and undrained.json()["draining"] is False


def test_ejected_backend_returns_after_a_probe(loop):
    async def main():
        sims = [await start_sim(FAST) for _ in range(2)]
        port = sims[0].port
        proxy = await start_proxy(proxy_config([s.url for s in sims], models_interval=0, session_bound=0))
        try:
            await sims[0].close()
            backend = proxy.balancer.backends[0]
            statuses = []
            for i in range(30):  # ties break at random: until one lands on the dead one
                statuses.append((await fetch(proxy.port, "POST", "/api/generate",
                                             {"model": "llama3.2", "prompt": str(i), "stream": False})).status)
                if not backend.up:
                    break
            ejected = not backend.up
            # The same instance comes back on its port; the back-off probe
            # (GET /) finds it and lets it take requests again.
            sims[0] = await start_sim(FAST, port=port)
            await until(lambda: backend.up, timeout=12)
            back = backend.up
            for i in range(20):  # ties break at random: 2^-20 that none lands there
                await fetch(proxy.port, "POST", "/api/generate",
                            {"model": "llama3.2", "prompt": f"again {i}", "stream": False})
            return statuses, ejected, back, sims[0].stats.by_path.get("/api/generate", 0)
        finally:
            await proxy.close()
            for s in sims:
                await s.close()

    statuses, ejected, back, served_after = run(loop, main())
    assert set(statuses) == {200}  # the failed attempt was retried on the other backend
    assert ejected and back
    assert served_after > 0


def test_consecutive_failures_eject_a_backend(loop):
    """A backend that accepts connections but never answers, not even a
    probe, is taken out at its first timeout (a timeout alone is no strike:
    the probe that follows it decides); the other backend serves the rest."""

    async def main():
        silent_conns = []

        async def silent(reader, writer):  # reads, never answers
            silent_conns.append(writer)
            await reader.read()

        dead = await asyncio.start_server(silent, "127.0.0.1", 0)
        dead_url = "http://127.0.0.1:%d" % dead.sockets[0].getsockname()[1]
        sim = await start_sim(FAST)
        proxy = await start_proxy(proxy_config([dead_url, sim.url], models_interval=0, session_bound=0,
                                               policy="round-robin", first_byte_timeout=0.1,
                                               connect_timeout=0.2, eject_after=3))
        backend = proxy.balancer.backends[0]
        try:
            statuses = []
            for i in range(8):
                r = await fetch(proxy.port, "POST", "/api/generate",
                                {"model": "llama3.2", "prompt": str(i), "stream": False})
                statuses.append(r.status)
                if not backend.up:
                    break
            status = (await fetch(proxy.admin_port, "GET", "/olb/status")).json()
            after = [(await fetch(proxy.port, "POST", "/api/generate",
                                  {"model": "llama3.2", "prompt": f"after {i}", "stream": False})).status
                     for i in range(4)]
            return statuses, status["backends"][0], after
        finally:
            await proxy.close()
            await sim.close()
            for w in silent_conns:
                w.close()
            dead.close()

    statuses, row, after = run(loop, main())
    assert statuses.count(504) == 1 and set(statuses) <= {200, 504} and statuses[-1] == 504
    assert row["healthy"] is False and "then a probe failed" in row["last_error"]
    assert after == [200] * 4

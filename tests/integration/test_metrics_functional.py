"""/metrics, the access log and the backend header, over real sockets: olb in front of olb-sim.

The counts on the page are checked against the traffic the test sent, the
page parsed with prometheus_client's own parser; the access lines against
the requests.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest
from harness import RawClient, fetch, run, start_cluster, until
from prometheus_client.parser import text_string_to_metric_families

from olb.sim import SimConfig, start_sim

GEN = {"model": "llama3.2", "prompt": "Why is the sky blue?", "options": {"num_predict": 7}}


def scrape(page: bytes) -> dict:
    """name -> list of (labels, value) samples, as prometheus_client parses the page."""
    out: dict = {}
    for family in text_string_to_metric_families(page.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def total(samples: dict, name: str, **labels) -> float:
    return sum(v for lab, v in samples.get(name, ()) if all(lab.get(k) == w for k, w in labels.items()))


def test_metrics_count_the_traffic_sent(loop, tmp_path):
    async def main():
        cluster = await start_cluster(2)
        try:
            client = await RawClient.connect(cluster.port)
            generated = prompt = 0
            # 4 NDJSON streams, 3 non-streamed answers, 2 OpenAI streams with usage, 1 missing model.
            for _ in range(4):
                r = await client.request("POST", "/api/generate", GEN)
                assert r.status == 200
                headers = r.headers
                last = r.lines()[-1]
                generated += last["eval_count"]
                prompt += last["prompt_eval_count"]
            for _ in range(3):
                r = await client.request("POST", "/api/chat", {"model": "llama3.2", "stream": False,
                                                               "messages": [{"role": "user", "content": "hi"}],
                                                               "options": {"num_predict": 5}})
                assert r.status == 200
                generated += r.json()["eval_count"]
                prompt += r.json()["prompt_eval_count"]
            for _ in range(2):
                r = await client.request("POST", "/v1/chat/completions", {
                    "model": "llama3.2", "stream": True, "max_tokens": 6,
                    "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": "hi"}]})
                assert r.status == 200
                events = [orjson.loads(e[6:]) for e in r.body.split(b"\n\n") if e.startswith(b"data: {")]
                usage = events[-1]["usage"]
                generated += usage["completion_tokens"]
                prompt += usage["prompt_tokens"]
            r = await client.request("POST", "/api/generate", {"model": "no-such-model", "prompt": "x"})
            assert r.status == 404
            r = await fetch(cluster.admin_port, "GET", "/metrics")
            client.close()
            assert r.status == 200
            assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
            return scrape(r.body), [s.url for s in cluster.sims], generated, prompt, headers
        finally:
            await cluster.close()

    m, urls, generated, prompt, headers = run(loop, main())
    assert total(m, "olb_requests_total", endpoint="/api/generate", status="200", model="llama3.2:latest") == 4
    assert total(m, "olb_requests_total", endpoint="/api/chat", status="200") == 3
    assert total(m, "olb_requests_total", endpoint="/v1/chat/completions", status="200") == 2
    # A model no backend has: counted under model="" (a client cannot grow the label set).
    assert total(m, "olb_requests_total", endpoint="/api/generate", status="404", model="", backend="") == 1
    assert total(m, "olb_requests_total") == 10
    served = {lab["backend"] for lab, v in m["olb_requests_total"] if lab["status"] == "200"}
    assert served <= set(urls) and served
    # Every answered request reached a backend: TTFT observed for each, tokens summed from the answers.
    assert total(m, "olb_time_to_first_byte_seconds_count", model="llama3.2:latest") == 9
    assert total(m, "olb_request_duration_seconds_count") == 10
    assert total(m, "olb_queue_wait_seconds_count", model="llama3.2:latest") == 9
    assert total(m, "olb_generated_tokens_total", model="llama3.2:latest") == generated
    assert total(m, "olb_prompt_tokens_total", model="llama3.2:latest") == prompt
    # Tokens per second for the 6 streams (4 NDJSON, 2 SSE), not for the non-streamed answers.
    assert total(m, "olb_stream_tokens_per_second_count", model="llama3.2:latest") == 6
    # A histogram's +Inf bucket holds every observation.
    assert total(m, "olb_request_duration_seconds_bucket", le="+Inf") == 10
    # The first request loaded llama3.2 somewhere (the simulator starts cold).
    assert total(m, "olb_model_loads_total", model="llama3.2:latest") >= 1
    assert total(m, "olb_model_load_wait_seconds_total", model="llama3.2:latest") > 0
    # Gauges per backend: capacity (OLB_MAX_INFLIGHT's 8), nothing in flight, both up.
    assert [v for _, v in m["olb_backend_capacity"]] == [8, 8]
    assert total(m, "olb_backend_in_flight") == 0
    assert total(m, "olb_backend_up") == 2 and total(m, "olb_backend_draining") == 0
    assert total(m, "olb_backend_model_loaded", model="llama3.2:latest") >= 1
    assert total(m, "olb_rejections_total") == 0 and total(m, "olb_retries_total") == 0
    # OLB_BACKEND_HEADER is off by default.
    assert "x-olb-backend" not in headers


def test_rejections_and_queue_depth(loop):
    """A full queue (503), a queue timeout (503) and the queue-depth gauge while requests wait."""
    slow = SimConfig(token_rate=20, ttft=0, seed=7, num_parallel=4)

    async def main():
        cluster = await start_cluster(1, slow, max_inflight=1, queue_size=2, queue_timeout=1.0)
        try:
            body = {"model": "llama3.2", "prompt": "x", "options": {"num_predict": 100}}
            holder = await RawClient.connect(cluster.port)
            holder.send("POST", "/api/generate", body)  # takes the only slot for ~5 s
            await until(lambda: cluster.proxy.balancer.table.snapshot()[0]["inflight"] == 1)
            waiting = [await RawClient.connect(cluster.port) for _ in range(2)]
            for c in waiting:
                c.send("POST", "/api/generate", body, headers={"X-Priority": "batch"})
            await until(lambda: len(cluster.proxy.balancer.queue) == 2)
            page = scrape((await fetch(cluster.admin_port, "GET", "/metrics")).body)
            assert total(page, "olb_queue_depth", model="llama3.2:latest", **{"class": "batch"}) == 2
            full = await fetch(cluster.port, "POST", "/api/generate", body)  # a third: the queue is full
            assert full.status == 503
            expired = [await c.response(timeout=5) for c in waiting]
            assert [r.status for r in expired] == [503, 503]
            page = scrape((await fetch(cluster.admin_port, "GET", "/metrics")).body)
            for c in (holder, *waiting):
                c.close()
            return page
        finally:
            await cluster.close()

    m = run(loop, main())
    assert total(m, "olb_rejections_total", reason="queue_full") == 1
    assert total(m, "olb_rejections_total", reason="queue_timeout") == 2
    assert total(m, "olb_rejections_total", reason="client_share") == 0
    assert total(m, "olb_requests_total", status="503", endpoint="/api/generate") == 3
    assert total(m, "olb_queue_depth") == 0
    # Only the holder got a slot, and it is still streaming: its wait is observed at its end.
    assert total(m, "olb_queue_wait_seconds_count") == 0
    assert total(m, "olb_backend_in_flight") == 1


def test_retries_ejections_and_returns_counted(loop):
    """A backend that refuses connections: the request is retried on the other, the dead one
    ejected; the same instance back on its port returns after a probe."""
    fast = SimConfig(token_rate=0, ttft=0, seed=7)

    async def main():
        cluster = await start_cluster(2, fast, policy="round-robin")
        dead = cluster.sims[0]
        port = dead.port
        await dead.close()
        try:
            client = await RawClient.connect(cluster.port)
            for _ in range(2):
                r = await client.request("POST", "/api/generate", GEN)
                assert r.status == 200
            r = await fetch(cluster.admin_port, "GET", "/metrics")
            down = scrape(r.body)
            cluster.sims[0] = await start_sim(fast, port=port)
            backend = cluster.proxy.balancer.backends[0]
            await until(lambda: backend.up, timeout=10)
            r = await fetch(cluster.admin_port, "GET", "/metrics")
            client.close()
            return down, scrape(r.body), dead.url
        finally:
            await cluster.close()

    m, back, dead_url = run(loop, main())
    assert total(m, "olb_retries_total", backend=dead_url) == 1
    assert total(m, "olb_backend_ejections_total", backend=dead_url) == 1
    assert total(m, "olb_backend_up", backend=dead_url) == 0
    assert total(m, "olb_backend_returns_total", backend=dead_url) == 0
    assert total(m, "olb_requests_total", status="200") == 2
    assert total(back, "olb_backend_returns_total", backend=dead_url) == 1
    assert total(back, "olb_backend_up", backend=dead_url) == 1


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_access_log_lines_match_the_requests(loop, tmp_path, fmt):
    path = tmp_path / "access.log"

    async def main():
        cluster = await start_cluster(2, access_log=str(path), log_format=fmt, backend_header="X-Olb-Backend")
        try:
            client = await RawClient.connect(cluster.port)
            sent = []
            r = await client.request("POST", "/api/generate", GEN)
            sent.append(("POST", "/api/generate", r, r.lines()[-1]["eval_count"], r.lines()[-1]["prompt_eval_count"]))
            r = await client.request("POST", "/api/chat", {"model": "llama3.2", "stream": False,
                                                           "messages": [{"role": "user", "content": "hi"}]},
                                     headers={"X-Session-Id": "s1"})
            sent.append(("POST", "/api/chat", r, r.json()["eval_count"], r.json()["prompt_eval_count"]))
            r = await client.request("GET", "/api/version")
            sent.append(("GET", "/api/version", r, None, None))
            r = await client.request("POST", "/api/generate", {"model": "no-such-model", "prompt": "x"})
            sent.append(("POST", "/api/generate", r, None, None))
            client.close()
            await until(lambda: path.exists() and path.read_bytes().count(b"\n") == 4, timeout=5)
            return sent, path.read_text().splitlines(), [s.url for s in cluster.sims]
        finally:
            await cluster.close()

    sent, lines, urls = run(loop, main())
    assert len(lines) == 4
    for (method, target, resp, generated, prompt), line in zip(sent, lines):
        # The backend header names the backend, and the log line the same one.
        backend = resp.headers.get("x-olb-backend")
        assert (backend in urls) if resp.status == 200 else backend is None
        if fmt == "json":
            doc = orjson.loads(line)
            assert (doc["method"], doc["path"], doc["status"], doc["client"]) == (method, target, resp.status,
                                                                                  "127.0.0.1")
            assert doc["backend"] == backend
            assert doc["bytes"] == len(resp.raw)
            assert doc["eval_tokens"] == generated and doc["prompt_tokens"] == prompt
            assert doc["retries"] == 0 and doc["duration_ms"] >= 0
            if backend is not None:
                assert doc["ttft_ms"] is not None and doc["ttft_ms"] <= doc["duration_ms"]
            assert doc["time"].endswith("Z")
        else:
            # time client "METHOD path" model backend status queue ttft duration bytes prompt eval retries
            fields = line.split(" ")
            assert fields[1] == "127.0.0.1" and fields[2] == f'"{method}' and fields[3] == f'{target}"'
            assert fields[5] == (backend or "-") and int(fields[6]) == resp.status
            assert int(fields[10]) == len(resp.raw)
            assert fields[11] == (str(prompt) if prompt is not None else "-")
            assert fields[12] == (str(generated) if generated is not None else "-")
            assert fields[13] == "0"
    if fmt == "json":
        assert orjson.loads(lines[0])["model"] == "llama3.2:latest"
        assert orjson.loads(lines[2])["queue_ms"] is None  # /api/version takes no slot


def test_client_that_leaves_is_logged_499(loop, tmp_path):
    path = tmp_path / "access.log"
    slow = SimConfig(token_rate=20, ttft=0, seed=7)

    async def main():
        cluster = await start_cluster(1, slow, access_log=str(path), log_format="json")
        try:
            client = await RawClient.connect(cluster.port)
            client.send("POST", "/api/generate", {"model": "llama3.2", "prompt": "x",
                                                  "options": {"num_predict": 100}})
            await client.reader.readuntil(b'"done":false')
            client.writer.transport.abort()
            await until(lambda: path.exists() and path.read_bytes().count(b"\n") == 1, timeout=5)
            page = scrape((await fetch(cluster.admin_port, "GET", "/metrics")).body)
            return orjson.loads(path.read_text()), page
        finally:
            await cluster.close()

    doc, m = run(loop, main())
    assert doc["status"] == 499 and doc["path"] == "/api/generate" and doc["bytes"] > 0
    assert total(m, "olb_requests_total", status="499") == 1


def test_metrics_off(loop):
    async def main():
        cluster = await start_cluster(1, metrics=False)
        try:
            # olb's page is off: 404 from the admin listener.
            return await fetch(cluster.admin_port, "GET", "/metrics")
        finally:
            await cluster.close()

    assert run(loop, main()).status == 404


def test_scrape_during_a_stream(loop):
    """A scrape while a stream runs sees it in flight, and does not disturb it."""
    slow = SimConfig(token_rate=50, ttft=0, seed=7)

    async def main():
        cluster = await start_cluster(1, slow)
        try:
            client = await RawClient.connect(cluster.port)
            client.send("POST", "/api/generate", {"model": "llama3.2", "prompt": "x",
                                                  "options": {"num_predict": 20}})
            await client.reader.readuntil(b'"done":false')
            during = scrape((await fetch(cluster.admin_port, "GET", "/metrics")).body)
            rest = await asyncio.wait_for(client.reader.readuntil(b"\r\n0\r\n\r\n"), 10)
            after = scrape((await fetch(cluster.admin_port, "GET", "/metrics")).body)
            client.close()
            return during, rest, after
        finally:
            await cluster.close()

    during, rest, after = run(loop, main())
    assert total(during, "olb_backend_in_flight") == 1
    assert total(during, "olb_requests_total", endpoint="/api/generate") == 0
    assert b'"done":true' in rest
    assert total(after, "olb_backend_in_flight") == 0
    assert total(after, "olb_requests_total", endpoint="/api/generate", status="200") == 1

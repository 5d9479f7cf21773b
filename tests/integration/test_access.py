"""Access control over real sockets: API keys (401, 429 with Retry-After,
fairness by key, a reload), the admin endpoints kept off the data port,
served on the admin listener and behind the token, and a cross-site form
post to /olb/drain refused (issue 14, item 1)."""

import dataclasses
import os
import signal
import time

import httpx
import pytest
from harness import RawClient, fetch, run, start_cluster, until
from test_cli import olb_log, read_lines_matching, start_olb, stop

from olb.sim import SimConfig

FAST = SimConfig(token_rate=0, ttft=0, seed=3)
# One request at a time, ~0.1 s each: the queue decides the order.
SLOW = SimConfig(token_rate=100, ttft=0, seed=5, num_predict_default=10, num_parallel=1)
TOKEN = "admin-token-0123456789abcdef"
GEN = {"model": "llama3.2", "prompt": "hi", "stream": False}
CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}


def keys_file(tmp_path, text):
    path = tmp_path / "keys"
    path.write_text(text)
    return str(path)


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def test_missing_or_unknown_key_is_401_in_ollama_and_openai_shapes(loop, tmp_path):
    async def main():
        cluster = await start_cluster(1, FAST, api_keys=keys_file(tmp_path, "sk-a\n"))
        try:
            return (await fetch(cluster.port, "POST", "/api/generate", GEN),
                    await fetch(cluster.port, "POST", "/api/generate", GEN, bearer("sk-b")),
                    await fetch(cluster.port, "POST", "/v1/chat/completions", CHAT),
                    await fetch(cluster.port, "POST", "/v1/chat/completions", CHAT, bearer("sk-b")),
                    await fetch(cluster.port, "POST", "/api/generate", GEN, bearer("sk-a")),
                    dict(cluster.sims[0].stats.by_path))
        finally:
            await cluster.close()

    missing, unknown, v1_missing, v1_unknown, ok, reached = run(loop, main())
    for resp in (missing, unknown):
        assert resp.status == 401 and resp.headers["www-authenticate"].startswith("Bearer")
        assert set(resp.json()) == {"error"} and "unauthorized" in resp.json()["error"]
    assert "send an API key" in missing.json()["error"] and "unknown" in unknown.json()["error"]
    for resp in (v1_missing, v1_unknown):
        assert resp.status == 401
        assert resp.json()["error"]["message"].startswith("unauthorized") and resp.json()["error"]["type"]
    assert ok.status == 200 and ok.json()["done"]
    # The refused requests never reached a backend.
    assert reached.get("/api/generate") == 1 and "/v1/chat/completions" not in reached


def test_official_clients_send_their_key(loop_thread, tmp_path):
    ollama = pytest.importorskip("ollama")
    openai = pytest.importorskip("openai")
    cluster = loop_thread.run(start_cluster(1, FAST, api_keys=keys_file(tmp_path, "sk-team-a\n")))
    try:
        url = f"http://127.0.0.1:{cluster.port}"
        with ollama.Client(host=url, headers=bearer("sk-team-a")) as client:
            assert client.generate(model="llama3.2", prompt="hi").done
        with ollama.Client(host=url) as client:
            with pytest.raises(ollama.ResponseError) as err:
                client.generate(model="llama3.2", prompt="hi")
            assert err.value.status_code == 401
        with openai.OpenAI(base_url=url + "/v1", api_key="sk-team-a") as client:
            reply = client.chat.completions.create(model="llama3.2", messages=CHAT["messages"])
            assert reply.choices[0].message.content
        with openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0) as client:
            with pytest.raises(openai.AuthenticationError):
                client.chat.completions.create(model="llama3.2", messages=CHAT["messages"])
    finally:
        loop_thread.run(cluster.close())


def test_concurrent_limit_is_429_with_retry_after_and_per_key(loop, tmp_path):
    slow = SimConfig(token_rate=20, ttft=0, seed=3, num_predict_default=2000, num_parallel=4)

    async def main():
        cluster = await start_cluster(1, slow, api_keys=keys_file(tmp_path, "sk-a;concurrent=1\nsk-b\n"))
        try:
            stream = await RawClient.connect(cluster.port)
            stream.send("POST", "/api/generate", {"model": "llama3.2", "prompt": "long"}, bearer("sk-a"))
            await until(lambda: cluster.proxy.balancer.table.inflight(0) == 1)
            over = await fetch(cluster.port, "POST", "/api/generate", GEN, bearer("sk-a"))
            v1_over = await fetch(cluster.port, "POST", "/v1/chat/completions", CHAT, bearer("sk-a"))
            other = await fetch(cluster.port, "POST", "/api/generate", {**GEN, "options": {"num_predict": 3}},
                                bearer("sk-b"))
            stream.close()  # the client leaves: its key's slot comes back
            await until(lambda: cluster.proxy.balancer.table.inflight(0) == 0)
            again = await fetch(cluster.port, "POST", "/api/generate", {**GEN, "options": {"num_predict": 3}},
                                bearer("sk-a"))
            return over, v1_over, other, again
        finally:
            await cluster.close()

    over, v1_over, other, again = run(loop, main())
    assert over.status == 429 and over.headers["retry-after"] == "1"
    assert "concurrent" in over.json()["error"]
    assert v1_over.status == 429 and "concurrent" in v1_over.json()["error"]["message"]
    assert other.status == 200
    assert again.status == 200


def test_rpm_and_tpm_limits_are_429_with_retry_after(loop, tmp_path):
    async def main():
        cluster = await start_cluster(1, FAST.replace(num_predict_default=20),
                                      api_keys=keys_file(tmp_path, "sk-r;rpm=2\nsk-t;tpm=15\n"))
        try:
            r = [await fetch(cluster.port, "POST", "/api/generate", GEN, bearer("sk-r")) for _ in range(3)]
            # One response of 20 generated tokens (and its prompt's) puts sk-t over 15 a minute.
            t = [await fetch(cluster.port, "POST", "/api/generate", GEN, bearer("sk-t")) for _ in range(2)]
            return r, t, cluster.proxy.ctx.keys.status()
        finally:
            await cluster.close()

    r, t, status = run(loop, main())
    assert [x.status for x in r] == [200, 200, 429]
    assert "rpm" in r[2].json()["error"] and 50 <= int(r[2].headers["retry-after"]) <= 60
    assert [x.status for x in t] == [200, 429]
    first = t[0].json()
    assert first["eval_count"] == 20
    assert "tpm" in t[1].json()["error"] and 50 <= int(t[1].headers["retry-after"]) <= 60
    row = next(k for k in status["keys"] if k["tpm"])
    assert row["tokens_last_minute"] == first["eval_count"] + first["prompt_eval_count"]
    assert status["refused"] == {"rpm": 1, "tpm": 1}


def test_the_key_is_the_fair_queue_identity(loop, tmp_path):
    """A flood from one key, each request claiming another client in the
    client header: with keys, the key is who asks, so a light key that
    arrives last is still served among the first."""
    from test_fairness import send_all

    async def main():
        cluster = await start_cluster(1, SLOW, max_inflight=1, models_interval=0, session_bound=0,
                                      client_header="x-client",
                                      api_keys=keys_file(tmp_path, "sk-heavy\nsk-light\n"))
        try:
            flood = [(f"heavy{i}", {**bearer("sk-heavy"), "X-Client": f"c{i}"}) for i in range(10)]
            return await send_all(cluster, flood + [("light", {**bearer("sk-light"), "X-Client": "c0"})])
        finally:
            await cluster.close()

    done = run(loop, main(), timeout=60)
    names = [n for n, _ in done]
    assert all(status == 200 for _, status in done)
    assert names.index("light") <= 2, names


def test_sighup_rereads_the_keys_file(loop_thread, tmp_path):
    from olb.sim import start_sim

    sim = loop_thread.run(start_sim(FAST))
    path = keys_file(tmp_path, "sk-old\n")
    proc = start_olb(OLB_BACKENDS=sim.url, OLB_LISTEN="127.0.0.1:0", OLB_HEALTH_INTERVAL="0",
                     OLB_API_KEYS=path)
    try:
        url, admin = (m.group(1) for m in read_lines_matching(proc, r"listening on (http://\S+)",
                                                               r"admin on (http://\S+)"))
        with httpx.Client(base_url=url, timeout=10) as c:
            assert c.post("/api/generate", json=GEN, headers=bearer("sk-old")).status_code == 200
            assert c.post("/api/generate", json=GEN, headers=bearer("sk-new")).status_code == 401
            with open(path, "w") as f:
                f.write("sk-new;rpm=100\n")
            os.kill(proc.pid, signal.SIGHUP)
            # The reload shows in the admin status: a poll bounded in time.
            with httpx.Client(base_url=admin, timeout=10) as a:
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    keys = a.get("/olb/status").json()["api_keys"]["keys"]
                    if keys[0]["rpm"] == 100:
                        break
                    time.sleep(0.02)
                assert [k["key"] for k in keys] == ["sk...8da9"] and keys[0]["rpm"] == 100
            assert c.post("/api/generate", json=GEN, headers=bearer("sk-new")).status_code == 200
            assert c.post("/api/generate", json=GEN, headers=bearer("sk-old")).status_code == 401
            # A bad file is refused whole: the keys stay as they were.
            with open(path, "w") as f:
                f.write("sk-broken;rpm=zero\n")
            os.kill(proc.pid, signal.SIGHUP)
            deadline = time.monotonic() + 10
            while "API keys not reloaded" not in olb_log(proc) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert "line 1" in olb_log(proc) and "rpm=zero" in olb_log(proc)
            assert c.post("/api/generate", json=GEN, headers=bearer("sk-new")).status_code == 200
        assert proc.poll() is None  # SIGHUP did not kill it
    finally:
        assert stop(proc) == 0
        loop_thread.run(sim.close())


ADMIN_PATHS = [("GET", "/olb/status"), ("GET", "/olb/health"), ("GET", "/olb/"), ("GET", "/metrics"),
               ("POST", "/olb/drain")]


def test_admin_endpoints_are_refused_on_the_data_port_by_default(loop):
    async def main():
        cluster = await start_cluster(1, FAST)
        try:
            url = cluster.sims[0].url
            data = [await fetch(cluster.port, m, f"{p}?backend={url}" if m == "POST" else p)
                    for m, p in ADMIN_PATHS]
            admin = [await fetch(cluster.admin_port, m, p) for m, p in ADMIN_PATHS[:3]]
            # The admin listener serves nothing else.
            other = await fetch(cluster.admin_port, "POST", "/api/generate", GEN)
            return data, admin, other, cluster.proxy.balancer.status()["backends"][0]["draining"]
        finally:
            await cluster.close()

    data, admin, other, draining = run(loop, main())
    for resp in data:
        assert resp.status == 404 and "OLB_ADMIN_LISTEN" in resp.json()["error"]
        assert b"127.0.0.1" not in resp.body  # no backend URL leaks
    assert not draining
    status, health, page = admin
    assert status.status == 200 and status.json()["backends"][0]["url"].startswith("http://127.0.0.1:")
    assert health.status == 200
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert other.status == 404


def test_admin_on_the_data_port_behind_the_token(loop):
    async def main():
        cluster = await start_cluster(1, FAST, admin_token=TOKEN, admin_listen=None)
        try:
            url = cluster.sims[0].url
            return (cluster.admin_port,
                    await fetch(cluster.port, "GET", "/olb/status"),
                    await fetch(cluster.port, "GET", "/olb/status", headers=bearer(TOKEN[:-1] + "x")),
                    await fetch(cluster.port, "GET", "/olb/status", headers=bearer(TOKEN)),
                    await fetch(cluster.port, "POST", f"/olb/drain?backend={url}"),
                    await fetch(cluster.port, "POST", f"/olb/drain?backend={url}", headers=bearer(TOKEN)),
                    await fetch(cluster.port, "POST", "/api/generate", GEN),
                    await fetch(cluster.port, "GET", "/olb/"))
        finally:
            await cluster.close()

    admin_port, none, wrong, right, drain_none, drain, generate, page = run(loop, main())
    # The page holds no data: a browser loads it, and it asks with the token from its URL fragment.
    assert page.status == 200 and b"Bearer" in page.body
    assert admin_port == 0  # OLB_ADMIN_LISTEN=off
    for resp in (none, wrong, drain_none):
        assert resp.status == 401 and resp.headers["www-authenticate"].startswith("Bearer")
    assert right.status == 200 and right.json()["backends"]
    assert drain.status == 200 and drain.json()["draining"] is True
    assert generate.status == 502  # its only backend drained


def test_admin_listener_off_loopback_asks_for_the_token(loop):
    import socket

    from harness import proxy_config

    from olb.server import start_proxy

    async def main():
        from olb.sim import start_sim

        sim = await start_sim(FAST)
        sock = socket.socket()
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        sock.setblocking(False)
        cfg = dataclasses.replace(proxy_config([sim.url]), admin_token=TOKEN)
        proxy = await start_proxy(cfg, admin_sock=sock)
        try:
            return (await fetch(proxy.admin_port, "GET", "/olb/status"),
                    await fetch(proxy.admin_port, "GET", "/olb/status", headers=bearer(TOKEN)),
                    await fetch(proxy.admin_port, "GET", "/olb/"))
        finally:
            await proxy.close()
            await sim.close()

    without, with_token, page = run(loop, main())
    assert without.status == 401
    assert with_token.status == 200
    assert page.status == 200  # the page holds no data; it asks with the token in its URL fragment


def test_cross_site_form_post_cannot_drain(loop):
    async def main():
        cluster = await start_cluster(1, FAST)
        try:
            url = cluster.sims[0].url
            port = cluster.admin_port
            form = {"Content-Type": "application/x-www-form-urlencoded"}
            body = f"backend={url}".encode()
            attempts = [
                # What a page on another site gets a browser to send: a form post.
                await fetch(port, "POST", "/olb/drain", body, {**form, "Origin": "http://evil.example",
                                                               "Sec-Fetch-Site": "cross-site"}),
                # An older browser without Origin: the form's content type gives it away.
                await fetch(port, "POST", f"/olb/drain?backend={url}", body, form),
                await fetch(port, "POST", f"/olb/drain?backend={url}", b"x", {"Content-Type": "text/plain"}),
                # fetch() in no-cors mode without a body still sends Origin.
                await fetch(port, "POST", f"/olb/drain?backend={url}", headers={"Origin": "http://evil.example"}),
            ]
            draining = cluster.proxy.balancer.status()["backends"][0]["draining"]
            # The same page's own JSON post (an Origin that is the Host the
            # request went to: the harness sends `Host: 127.0.0.1`) and curl's are fine.
            same = await fetch(port, "POST", "/olb/drain", {"backend": url}, {"Origin": "http://127.0.0.1"})
            undrain = await fetch(port, "POST", f"/olb/undrain?backend={url}")
            return attempts, draining, same, undrain
        finally:
            await cluster.close()

    attempts, draining, same, undrain = run(loop, main())
    assert [a.status for a in attempts] == [403, 415, 415, 403]
    assert "cross-site" in attempts[0].json()["error"]
    assert not draining
    assert same.status == 200 and same.json()["draining"] is True
    assert undrain.status == 200 and undrain.json()["draining"] is False

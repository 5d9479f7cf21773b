"""The dashboard's data without a browser: /olb/status's `recent` (samples,
events, totals) under load, and with OLB_WORKERS=2 the whole group's counts
whichever worker answers."""

import httpx

from olb.sim import SimConfig, start_sim

from harness import fetch, run, start_cluster, until
from test_cli import read_lines_matching, start_olb, stop

GEN = {"model": "llama3.2", "prompt": "hi", "stream": False}


def test_recent_samples_count_requests_ttft_and_tokens(loop):
    async def main():
        cluster = await start_cluster(1, SimConfig(token_rate=0, ttft=0, seed=3, num_predict_default=7))
        try:
            for _ in range(5):
                assert (await fetch(cluster.port, "POST", "/api/generate", GEN)).status == 200
            stream = await fetch(cluster.port, "POST", "/api/generate", {**GEN, "stream": True})
            assert stream.status == 200
            samples = cluster.proxy.ctx.samples
            # The next tick (one a second) puts them in a sample.
            await until(lambda: sum(s["rps"] for s in samples.series) > 0, timeout=5)
            return (await fetch(cluster.admin_port, "GET", "/olb/status")).json()["recent"]
        finally:
            await cluster.close()

    recent = run(loop, main())
    assert recent["totals"]["requests"] == 6 and recent["totals"]["first_bytes"] == 6
    # Each generated 7 tokens; a stream whose final line came in its own read may go uncounted.
    assert recent["totals"]["tokens"] in (35, 42)
    busy = [s for s in recent["series"] if s["rps"]]
    assert busy and all(s["ttft_ms"] is not None and s["tok_s"] > 0 for s in busy)
    assert {e["kind"] for e in recent["events"]} == {"loaded"}


def test_workers_share_the_dashboards_counts(loop_thread):
    sim = loop_thread.run(start_sim(SimConfig(token_rate=0, ttft=0, seed=1)))
    proc = start_olb(OLB_BACKENDS=sim.url, OLB_LISTEN="127.0.0.1:0", OLB_WORKERS="2", OLB_HEALTH_INTERVAL="0")
    try:
        url, admin = (m.group(1) for m in read_lines_matching(proc, r"listening on (http://\S+)",
                                                               r"admin on (http://\S+)"))
        # Separate connections, which SO_REUSEPORT spreads over both workers.
        for _ in range(12):
            with httpx.Client(timeout=10) as c:
                assert c.post(url + "/api/generate", json=GEN).status_code == 200
        seen = {}
        for _ in range(40):  # bounded: 40 polls, each on a new connection (a random worker)
            with httpx.Client(timeout=10) as c:
                doc = c.get(admin + "/olb/status").json()
            seen[doc["pid"]] = doc["recent"]["totals"]["requests"]
            if len(seen) == 2:
                break
        assert len(seen) == 2 and set(seen.values()) == {12}, seen
    finally:
        assert stop(proc) == 0
        loop_thread.run(sim.close())

"""OLB_POLICY over real sockets: what `llm`, `least-inflight` and `round-robin` send where.

Three simulated backends with the same models; llama3.2 is resident on
backend 1 only. `llm` keeps the model's requests there; the plain policies
do not look at models and spread them.
"""

import asyncio

import pytest

from olb.server import start_proxy
from olb.sim import SimConfig, start_sim

from harness import RawClient, fetch, proxy_config, run

# ttft keeps each request in flight for a while, so concurrent ones overlap.
SIM = SimConfig(token_rate=0, ttft=0.15, seed=5)
BODY = {"model": "llama3.2", "prompt": "x", "stream": False, "options": {"num_predict": 2}}



async def served_by(policy: str, concurrent: int, sequential: int):
    sims = [await start_sim(SIM) for _ in range(3)]
    proxy = None
    try:
        # Resident on backend 1, behind olb's back, before olb reads /api/ps.
        assert (await fetch(sims[1].port, "POST", "/api/generate", BODY)).status == 200
        proxy = await start_proxy(proxy_config([s.url for s in sims], policy=policy, models_interval=60,
                                               spread_queue=100, session_bound=0))
        if proxy.balancer.models is not None:
            await proxy.balancer.models.refresh_all()
        before = [s.stats.by_path.get("/api/generate", 0) for s in sims]
        clients = [await RawClient.connect(proxy.port) for _ in range(concurrent)]
        for c in clients:
            c.send("POST", "/api/generate", BODY)
        statuses = [(await c.response(timeout=10)).status for c in clients]
        for c in clients:
            c.close()
        after_burst = [s.stats.by_path.get("/api/generate", 0) for s in sims]
        for _ in range(sequential):
            statuses.append((await fetch(proxy.port, "POST", "/api/generate", BODY)).status)
        after = [s.stats.by_path.get("/api/generate", 0) for s in sims]
        return (statuses, [a - b for a, b in zip(after_burst, before)],
                [a - b for a, b in zip(after, after_burst)], proxy.balancer.models is None)
    finally:
        if proxy is not None:
            await proxy.close()
        for s in sims:
            await s.close()


def test_llm_keeps_a_model_where_it_is_loaded(loop):
    statuses, burst, one_by_one, blind = run(loop, served_by("llm", 6, 6))
    assert statuses == [200] * 12 and not blind
    assert burst == [0, 6, 0] and one_by_one == [0, 6, 0]


def test_least_inflight_ignores_where_the_model_is_loaded(loop):
    statuses, burst, one_by_one, blind = run(loop, served_by("least-inflight", 6, 15))
    assert statuses == [200] * 21 and blind
    # Six at once on three idle backends: two each, the loaded one included.
    assert burst == [2, 2, 2]
    # One at a time every backend is tied at 0 in flight: ties break at
    # random, so the 15 land on more than one backend (all on one: p = 3**-14).
    assert sum(one_by_one) == 15 and max(one_by_one) < 15


@pytest.mark.parametrize("concurrent,sequential", [(6, 9), (3, 6)])
def test_round_robin_takes_turns(loop, concurrent, sequential):
    statuses, burst, one_by_one, blind = run(loop, served_by("round-robin", concurrent, sequential))
    assert statuses == [200] * (concurrent + sequential) and blind
    assert burst == [concurrent // 3] * 3
    assert one_by_one == [sequential // 3] * 3

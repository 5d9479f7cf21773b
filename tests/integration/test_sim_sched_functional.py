"""olb-sim's Ollama scheduler over real sockets (127.0.0.1, port 0): a victim
that keeps receiving requests delays the load that evicts it (sched.go
getRunner's fast path), needsReload on another num_ctx, a load aborted by
its client, and GET /sim/stats.

Simulated time runs fast (time_scale); durations in replies and in
/sim/stats are simulated seconds.  Nothing sleeps for readiness.
"""

from __future__ import annotations

import asyncio

import pytest

from olb.sim import SimConfig

from test_sim_api import fetch, until
from test_sim_gpu import GPU, PROFILE, SLACK, Open, _name, _spec, gen_body, generate, ps, run

STATS_KEYS = ["loads", "unloads", "evictions", "reloads", "eviction_wait_s", "pending"]


async def sim_stats(s):
    r = await fetch(s, "GET", "/sim/stats")
    assert r.status == 200 and r.headers["content-type"] == "application/json; charset=utf-8"
    return r.json()


def test_busy_victim_keeps_taking_requests_and_delays_the_load(loop):
    config = GPU.replace(max_loaded_models=1, preload=("llama3.2",))
    per_client = 6

    async def client(s, name, replies):
        # One request after the other; with two clients one is always in
        # flight on the victim (its slot queue), so it never drains.
        for i in range(per_client):
            r = await fetch(s, "POST", "/api/generate",
                            gen_body("llama3.2", prompt=f"{name} {i}", options={"num_predict": 400}))
            replies.append(r)

    async def go(s):
        replies = []
        victim = s.engine.runners[_name("llama3.2").key]
        first = asyncio.ensure_future(client(s, "a", replies))
        second = asyncio.ensure_future(client(s, "b", replies))
        await until(lambda: victim.refs == 2)
        other = await Open.send(s, "POST", "/api/generate", gen_body("mistral"))
        await until(lambda: victim.expire_reason == "evict")
        during = await sim_stats(s)
        t_evict = s.engine.now()
        await asyncio.gather(first, second)
        last_end = s.engine.now()
        mistral = (await other.reply()).json()
        return replies, during, (last_end - t_evict) * config.time_scale, mistral, await sim_stats(s), \
            await ps(s)
    replies, during, traffic_s, mistral, after, models = run(loop, go, config)
    assert [r.status for r in replies] == [200] * 2 * per_client
    assert during["pending"] == 1 and during["loads"] == 0 and during["evictions"] == 0
    # The victim served every request that came while the load waited:
    # no reload of llama3.2, one load (mistral), one eviction.
    assert after["loads"] == 1 and after["evictions"] == 1 and after["unloads"] == 1
    assert [m["name"] for m in models] == ["mistral:latest"]
    # The load waited for the whole stream of victim traffic, then the unload.
    assert traffic_s > 5.0
    assert after["eviction_wait_s"] > traffic_s
    load = PROFILE.load_seconds(_spec("mistral"))
    assert mistral["load_duration"] / 1e9 == pytest.approx(after["eviction_wait_s"] + load, abs=4 * SLACK)
    assert after["pending"] == 0


def test_other_num_ctx_reloads_after_in_flight_requests(loop):
    config = GPU.replace(preload=("llama3.2",))

    async def go(s):
        before = await ps(s)
        stream = await Open.send(s, "POST", "/api/generate",
                                 {"model": "llama3.2", "prompt": "x", "options": {"num_predict": 300}})
        await until(lambda: s.engine.gpu.decoding)
        bigger = await Open.send(s, "POST", "/api/generate", gen_body("llama3.2", options={"num_ctx": 8192}))
        await until(lambda: s.engine.stats()["pending"] == 1)
        waiting = await ps(s)
        streamed = await stream.reply()
        reloaded = (await bigger.reply()).json()
        at_8k = await ps(s), await sim_stats(s)
        back = await generate(s, "llama3.2")                  # the default num_ctx again: reload
        return before, waiting, streamed, reloaded, at_8k, back, await ps(s), await sim_stats(s)
    before, waiting, streamed, reloaded, at_8k, back, at_4k, stats = run(loop, go, config)
    assert [m["context_length"] for m in before] == [4096]
    # The runner with the old options serves its stream to the end first.
    assert [m["context_length"] for m in waiting] == [4096]
    assert len(streamed.lines()) == 301 and streamed.lines()[-1]["done"] is True
    load = PROFILE.load_seconds(_spec("llama3.2"))
    assert reloaded["load_duration"] / 1e9 > PROFILE.unload_s + load
    models, mid = at_8k
    assert [m["context_length"] for m in models] == [8192]
    assert (mid["reloads"], mid["loads"], mid["evictions"], mid["unloads"]) == (1, 1, 0, 1)
    assert back["load_duration"] / 1e9 == pytest.approx(PROFILE.unload_s + load, abs=SLACK)
    assert [m["context_length"] for m in at_4k] == [4096]
    assert (stats["reloads"], stats["loads"]) == (2, 2)


def test_sim_stats_shape_with_and_without_gpu(loop):
    async def go(s):
        return await sim_stats(s), (await fetch(s, "POST", "/sim/stats")).status
    for config in (GPU, SimConfig(token_rate=0, ttft=0)):
        stats, post = run(loop, go, config)
        assert list(stats) == STATS_KEYS and post == 405
        assert stats == {"loads": 0, "unloads": 0, "evictions": 0, "reloads": 0, "eviction_wait_s": 0.0,
                         "pending": 0}


def test_client_gone_during_its_load_aborts_the_load(loop):
    config = GPU.replace(time_scale=10)

    async def go(s):
        big = await Open.send(s, "POST", "/api/generate", gen_body("llama3.1:70b"))
        await until(lambda: s.engine.loads == 1)
        listed = [m["name"] for m in await ps(s)]
        big.writer.close()
        await until(lambda: s.stats.aborted == 1)
        gone = await ps(s), await sim_stats(s)
        after = await generate(s, "mistral")                  # no 25 s load ahead of it
        return listed, gone, after, await sim_stats(s)
    listed, (models, stats), after, final = run(loop, go, config)
    assert listed == ["llama3.1:70b"]
    assert models == [] and stats["loads"] == 1 and stats["pending"] == 0 and stats["unloads"] == 0
    load = PROFILE.load_seconds(_spec("mistral"))
    assert after["load_duration"] / 1e9 == pytest.approx(load, abs=SLACK)
    assert final["loads"] == 2

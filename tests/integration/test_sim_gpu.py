"""olb.sim with a simulated GPU, over real sockets (127.0.0.1, port 0): loads,
the fast path, one load at a time, eviction, keep-alive, /api/ps, the pending
queue's 503, decode slowdown, the prefix cache, DCGM /metrics, time_scale.

Every test runs simulated time fast (time_scale), so a 3 s load takes tens of
milliseconds; durations in responses stay simulated.  Tolerances allow for
the loop's millisecond timers times the scale.  Nothing sleeps for
readiness: `until()` polls a condition on the server, yielding to the loop.
"""

from __future__ import annotations

import asyncio
import re
import time

import orjson
import pytest

from olb.sim import SimConfig, start_sim
from olb.sim.gpu import GIB, MIB, GpuProfile, runner_bytes

from test_sim_api import QUEUE_FULL, fetch, read_reply, request_bytes, until

SCALE = 20
GPU = SimConfig(gpu="default", time_scale=SCALE, seed=1)
# Tests that only need a 70B (25 s) load in progress run faster still.
FASTER = GPU.replace(time_scale=50)
PROFILE = GpuProfile()
# Loop ticks and scheduling noise, in simulated seconds (20 ms real).
SLACK = 0.4


def run(loop, coro_fn, config=GPU):
    async def main():
        server = await start_sim(config)
        try:
            return await coro_fn(server)
        finally:
            await server.close()
    return loop.run_until_complete(main())


def load_s(server, name):
    return PROFILE.load_seconds(server.catalogue.lookup(_name(name)).spec)


def _name(n):
    from olb.sim.catalogue import parse_name
    return parse_name(n)


def gen_body(model, prompt="hello", **kw):
    body = {"model": model, "prompt": prompt, "stream": False}
    body.update(kw)
    return body


async def generate(s, model, **kw):
    r = await fetch(s, "POST", "/api/generate", gen_body(model, **kw))
    assert r.status == 200, r.body
    return r.json()


async def ps(s):
    return (await fetch(s, "GET", "/api/ps")).json()["models"]


class Open:
    """A request sent on its own connection, answered later."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer

    @classmethod
    async def send(cls, s, method, path, body):
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        writer.write(request_bytes(method, path, body))
        return cls(reader, writer)

    async def reply(self):
        try:
            return await read_reply(self.reader)
        finally:
            self.writer.close()


# --- loads and the fast path ------------------------------------------------------------

def test_cold_load_then_fast_path(loop):
    async def go(s):
        assert await ps(s) == []
        cold = await generate(s, "llama3.1:8b")
        warm = await generate(s, "llama3.1:8b", prompt="again")
        return cold, warm, await ps(s), s.engine.loads
    cold, warm, loaded, loads = run(loop, go)
    # load_duration includes the load (server/routes.go, GenerateHandler: checkpointLoaded -
    # checkpointStart); ~3.3 s for an 8B (olb/sim/gpu.py's load model).
    assert cold["load_duration"] / 1e9 == pytest.approx(PROFILE.load_seconds(_spec("llama3.1:8b")), abs=SLACK)
    assert warm["load_duration"] / 1e9 < SLACK
    for r in (cold, warm):
        parts = r["load_duration"] + r["prompt_eval_duration"] + r["eval_duration"]
        assert r["total_duration"] >= parts
        # 64 tokens at 130 t/s, reported in simulated ns.
        assert r["eval_count"] / r["eval_duration"] * 1e9 == pytest.approx(130, rel=0.1)
    assert loads == 1 and [m["name"] for m in loaded] == ["llama3.1:8b"]
    assert loaded[0]["size"] == loaded[0]["size_vram"] == runner_bytes(_spec("llama3.1:8b"), 4096, 1)


def _spec(name):
    from olb.sim.catalogue import known_spec
    return known_spec(name)


def test_one_load_at_a_time(loop):
    async def go(s):
        first = await Open.send(s, "POST", "/api/generate", gen_body("llama3.1:8b"))
        await until(lambda: s.engine.loads == 1)
        second = await Open.send(s, "POST", "/api/generate", gen_body("qwen2.5:7b"))
        await until(lambda: len(s.engine.pending) == 1)
        a, b = await first.reply(), await second.reply()
        return a.json(), b.json()
    a, b = run(loop, go)
    la, lb = PROFILE.load_seconds(_spec("llama3.1:8b")), PROFILE.load_seconds(_spec("qwen2.5:7b"))
    assert a["load_duration"] / 1e9 == pytest.approx(la, abs=SLACK)
    # The second waited for the first load, then had its own.
    assert b["load_duration"] / 1e9 == pytest.approx(la + lb, abs=2 * SLACK)


def test_loading_model_is_listed_and_others_keep_serving(loop):
    config = FASTER.replace(preload=("llama3.2",))

    async def go(s):
        big = await Open.send(s, "POST", "/api/generate", gen_body("llama3.1:70b"))
        await until(lambda: s.engine.loads == 1)
        during = await ps(s)
        t = time.perf_counter()
        small = await generate(s, "llama3.2")           # the fast path, mid-load
        small_wall = time.perf_counter() - t
        still_loading = s.engine.runners[_name("llama3.1:70b").key].state
        return during, small, small_wall, still_loading, (await big.reply()).json()
    during, small, small_wall, still_loading, big = run(loop, go, config)
    assert {m["name"] for m in during} == {"llama3.2:latest", "llama3.1:70b"}
    assert still_loading == "loading" and small["load_duration"] / 1e9 < SLACK
    assert small_wall < PROFILE.load_seconds(_spec("llama3.1:70b")) / 50 / 2
    assert 24 < big["load_duration"] / 1e9 < 26


def test_ps_contents_and_order(loop):
    async def go(s):
        for model, ka in (("mistral", "10m"), ("llama3.2", -1), ("qwen2.5:7b", "1h")):
            await generate(s, model, keep_alive=ka)
        return await ps(s), s.clock.now()
    models, now = run(loop, go)
    # PsHandler: longest remaining first; keep_alive -1 = forever (year 2318).
    assert [m["name"] for m in models] == ["llama3.2:latest", "qwen2.5:7b", "mistral:latest"]
    assert models[0]["expires_at"].startswith("23")
    assert list(models[1]) == ["name", "model", "size", "digest", "details", "expires_at", "size_vram",
                               "context_length"]
    assert all(m["context_length"] == 4096 and m["size"] == m["size_vram"] for m in models)


# --- eviction ----------------------------------------------------------------------------

def test_max_loaded_evicts_the_shortest_keep_alive(loop):
    config = GPU.replace(max_loaded_models=2)

    async def go(s):
        await generate(s, "llama3.2", keep_alive="1h")
        await generate(s, "mistral", keep_alive="10m")
        third = await generate(s, "qwen2.5:7b")
        return third, await ps(s), s.engine.evictions
    third, models, evictions = run(loop, go, config)
    assert {m["name"] for m in models} == {"llama3.2:latest", "qwen2.5:7b"} and evictions == 1
    expect = PROFILE.unload_s + PROFILE.load_seconds(_spec("qwen2.5:7b"))
    assert third["load_duration"] / 1e9 == pytest.approx(expect, abs=SLACK)


def test_vram_that_does_not_fit_evicts(loop):
    config = GPU.replace(gpu=GpuProfile(vram=10 * GIB))

    async def go(s):
        await generate(s, "llama3.1:8b")
        await generate(s, "qwen2.5:7b")
        return await ps(s), await dcgm(s)
    models, metrics = run(loop, go, config)
    assert [m["name"] for m in models] == ["qwen2.5:7b"]
    assert metrics["DCGM_FI_DEV_FB_USED"] == runner_bytes(_spec("qwen2.5:7b"), 4096, 1) // MIB
    assert metrics["DCGM_FI_DEV_FB_FREE"] == 10 * 1024 - metrics["DCGM_FI_DEV_FB_USED"]


def test_busy_victim_is_waited_for(loop):
    config = GPU.replace(max_loaded_models=1, preload=("llama3.2",))

    async def go(s):
        long = await Open.send(s, "POST", "/api/generate",
                               {"model": "llama3.2", "prompt": "x", "options": {"num_predict": 2000}})
        await until(lambda: s.engine.gpu.decoding)
        other = await Open.send(s, "POST", "/api/generate", gen_body("mistral"))
        victim = s.engine.runners[_name("llama3.2").key]
        await until(lambda: victim.expire_reason == "evict")
        victim_busy = victim.refs
        stream = await long.reply()
        t_stream = time.perf_counter()
        mistral = await other.reply()
        return victim_busy, stream, mistral.json(), time.perf_counter() - t_stream
    victim_busy, stream, mistral, after = run(loop, go, config)
    assert victim_busy == 1 and stream.lines()[-1]["done"] is True
    assert len(stream.lines()) == 2001                       # the victim's stream was not cut
    # mistral waited for the stream, then the unload and its own load.
    assert mistral["load_duration"] / 1e9 > PROFILE.unload_s + PROFILE.load_seconds(_spec("mistral"))
    assert after * SCALE > PROFILE.unload_s


# --- keep-alive ---------------------------------------------------------------------------

def test_keep_alive_zero_and_expiry_unload(loop):
    async def go(s):
        await generate(s, "llama3.2", keep_alive=0)
        after_zero = await ps(s)
        load = await fetch(s, "POST", "/api/generate", {"model": "mistral"})
        loaded = await ps(s)
        unload = await fetch(s, "POST", "/api/generate", {"model": "mistral", "keep_alive": 0})
        after_unload = await ps(s)
        await generate(s, "qwen2.5:7b", keep_alive="2s")        # 0.1 s real at scale 20
        await until(lambda: not s.engine.runners, timeout=5)
        return after_zero, load.json(), loaded, unload.json(), after_unload, s.engine.unloads
    after_zero, load, loaded, unload, after_unload, unloads = run(loop, go)
    assert after_zero == [] and after_unload == []
    assert load["done_reason"] == "load" and [m["name"] for m in loaded] == ["mistral:latest"]
    assert unload["done_reason"] == "unload" and unloads == 3


def test_expires_at_follows_keep_alive_scaled(loop):
    async def go(s):
        await generate(s, "llama3.2", keep_alive="10m")
        return await ps(s), s.clock.now()
    models, now = run(loop, go)
    # 10 simulated minutes from now = 30 real seconds at scale 20.
    assert _parse_local(models[0]["expires_at"]) - now == pytest.approx(600 / SCALE, abs=0.5)


def _parse_local(text):
    from datetime import datetime
    text = re.sub(r"\.(\d{6})\d*", r".\1", text).replace("Z", "+00:00")
    return datetime.fromisoformat(text).timestamp()


# --- the pending queue -----------------------------------------------------------------------

def test_pending_queue_full_gives_503(loop):
    config = FASTER.replace(max_queue=1, preload=("llama3.2",))

    async def go(s):
        big = await Open.send(s, "POST", "/api/generate", gen_body("llama3.1:70b"))
        await until(lambda: s.engine.loads == 1)
        queued = await Open.send(s, "POST", "/api/generate", gen_body("mistral"))
        await until(lambda: len(s.engine.pending) == 1)
        rejected = await fetch(s, "POST", "/api/generate", gen_body("qwen2.5:7b"))
        rejected_chat = await fetch(s, "POST", "/v1/chat/completions",
                                    {"model": "qwen2.5:7b", "messages": [{"role": "user", "content": "x"}]})
        loaded_model = await fetch(s, "POST", "/api/generate", gen_body("llama3.2"))
        replies = [await big.reply(), await queued.reply()]
        return rejected, rejected_chat, loaded_model, replies, s.stats.rejected
    rejected, rejected_chat, loaded_model, replies, count = run(loop, go, config)
    assert rejected.status == 503 and rejected.json() == {"error": QUEUE_FULL}
    assert rejected_chat.status == 503 and rejected_chat.json()["error"]["message"] == QUEUE_FULL
    assert loaded_model.status == 200                # the fast path never sees the queue
    assert [r.status for r in replies] == [200, 200] and count == 2


def test_client_gone_while_pending_is_skipped(loop):
    async def go(s):
        big = await Open.send(s, "POST", "/api/generate", gen_body("llama3.1:70b"))
        await until(lambda: s.engine.loads == 1)
        gone = await Open.send(s, "POST", "/api/generate", gen_body("mistral"))
        await until(lambda: len(s.engine.pending) == 1)
        gone.writer.close()
        await until(lambda: s.stats.aborted == 1)
        await big.reply()
        await until(lambda: not s.engine.pending and s.engine._current is None)
        return s.engine.loads, [m["name"] for m in await ps(s)]
    loads, names = run(loop, go, FASTER)
    assert loads == 1 and names == ["llama3.1:70b"]


# --- speed --------------------------------------------------------------------------------

def test_decode_slows_with_concurrency(loop):
    config = GPU.replace(num_parallel=4, preload=("llama3.1:8b",), time_scale=20)

    async def go(s):
        alone = await generate(s, "llama3.1:8b", options={"num_predict": 200})
        together = await asyncio.gather(*(generate(s, "llama3.1:8b", prompt=f"q{i}", options={"num_predict": 200})
                                          for i in range(4)))
        return alone, together
    alone, together = run(loop, go, config)
    rate = lambda r: r["eval_count"] / r["eval_duration"] * 1e9  # noqa: E731
    assert rate(alone) == pytest.approx(130, rel=0.05)
    # r(4) = r1 / (1 + 0.15 * 3), fitted to llama.cpp PR #16894 (olb/sim/gpu.py); the aggregate is 4 r(4) > r1.
    per = [rate(r) for r in together]
    assert per == pytest.approx([130 / 1.45] * 4, rel=0.1)
    assert sum(per) == pytest.approx(4 * 130 / 1.45, rel=0.1) and sum(per) > 2.5 * rate(alone)


def test_prefill_time_and_prefix_cache(loop):
    system = "You are terse. " * 1600                          # ~6000 prompt tokens
    config = GPU.replace(preload=("llama3.1:8b",), time_scale=20)

    async def go(s):
        turn1 = [{"role": "system", "content": system}, {"role": "user", "content": "first question"}]
        r1 = (await fetch(s, "POST", "/api/chat", {"model": "llama3.1:8b", "messages": turn1,
                                                     "stream": False})).json()
        turn2 = turn1 + [r1["message"], {"role": "user", "content": "second question"}]
        r2 = (await fetch(s, "POST", "/api/chat", {"model": "llama3.1:8b", "messages": turn2,
                                                     "stream": False})).json()
        return r1, r2
    r1, r2 = run(loop, go, config)
    # Prefill at 6000 t/s: ~1 s for ~6000 tokens, cache cold.
    assert r1["prompt_eval_duration"] / 1e9 == pytest.approx(r1["prompt_eval_count"] / 6000, rel=0.1)
    # The follow-up holds turn 1 in its slot: count = cached + new, duration only the new ones.
    assert r2["prompt_eval_count"] > r1["prompt_eval_count"] + 64
    new = r2["prompt_eval_count"] - r1["prompt_eval_count"] - 64
    assert r2["prompt_eval_duration"] / 1e9 < (new + 40) / 6000 + 0.05
    assert r2["prompt_eval_duration"] < r1["prompt_eval_duration"] / 10


def test_embeddings_load_and_share_the_gpu(loop):
    async def go(s):
        r = await fetch(s, "POST", "/api/embed", {"model": "nomic-embed-text", "input": ["a", "b"]})
        return r.json()
    body = run(loop, go)
    assert len(body["embeddings"]) == 2
    assert body["load_duration"] / 1e9 == pytest.approx(PROFILE.load_seconds(_spec("nomic-embed-text")),
                                                         abs=SLACK)


# --- DCGM /metrics -------------------------------------------------------------------------------

SAMPLE = re.compile(r'^(DCGM_FI_DEV_[A-Z_]+)\{gpu="0",UUID="GPU-[0-9a-f-]{36}",pci_bus_id="[0-9A-F:.]+",'
                    r'device="nvidia0",modelName="[^"]+",Hostname="[^"]*"\} (\d+)$')


async def dcgm(s):
    r = await fetch(s, "GET", "/metrics")
    assert r.status == 200 and r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    out = {}
    lines = r.body.decode().splitlines()
    for i in range(0, len(lines), 3):
        name = lines[i].split()[2]
        assert lines[i].startswith(f"# HELP {name} ") and lines[i + 1] == f"# TYPE {name} gauge"
        m = SAMPLE.match(lines[i + 2])
        assert m and m.group(1) == name, lines[i + 2]
        out[name] = int(m.group(2))
    return out


def test_metrics_reflect_memory_and_utilisation(loop):
    async def go(s):
        idle = await dcgm(s)
        await generate(s, "llama3.1:8b")
        loaded = await dcgm(s)
        stream = await Open.send(s, "POST", "/api/generate",
                                 {"model": "llama3.1:8b", "prompt": "x", "options": {"num_predict": 1000}})
        await until(lambda: s.engine.gpu.decoding)
        # Let a simulated second of decoding pass (50 ms real at scale 20).
        t = s.engine.clock()
        await until(lambda: s.engine.clock() - t > 1.0 / SCALE)
        busy = await dcgm(s)
        await stream.reply()
        await fetch(s, "POST", "/api/generate", {"model": "llama3.1:8b", "keep_alive": 0})
        await until(lambda: s.engine.gpu.used == 0)
        t = s.engine.clock()
        await until(lambda: s.engine.clock() - t > 1.2 / SCALE)
        return idle, loaded, busy, await dcgm(s)
    idle, loaded, busy, after = run(loop, go)
    total = PROFILE.vram // MIB
    assert idle == {"DCGM_FI_DEV_GPU_UTIL": 0, "DCGM_FI_DEV_FB_FREE": total, "DCGM_FI_DEV_FB_USED": 0}
    assert loaded["DCGM_FI_DEV_FB_USED"] == runner_bytes(_spec("llama3.1:8b"), 4096, 1) // MIB
    assert loaded["DCGM_FI_DEV_FB_FREE"] + loaded["DCGM_FI_DEV_FB_USED"] == total
    assert busy["DCGM_FI_DEV_GPU_UTIL"] >= 90
    assert after == idle


def test_no_metrics_without_a_gpu(loop):
    r = run(loop, lambda s: fetch(s, "GET", "/metrics"), SimConfig(token_rate=0, ttft=0))
    assert r.status == 404 and r.body == b"404 page not found"


# --- time scale -------------------------------------------------------------------------------

def test_time_scale_runs_simulated_time_faster(loop):
    async def go(s):
        t = time.perf_counter()
        r = await generate(s, "llama3.1:8b", options={"num_predict": 130})
        return r, time.perf_counter() - t
    r, wall = run(loop, go, GPU.replace(time_scale=100))
    simulated = r["total_duration"] / 1e9
    assert simulated == pytest.approx(PROFILE.load_seconds(_spec("llama3.1:8b")) + 1.0, abs=0.3)
    assert wall < simulated / 20


def test_time_scale_without_a_gpu(loop):
    config = SimConfig(token_rate=10, ttft=0.5, seed=1, num_predict_default=20, time_scale=10)

    async def go(s):
        t = time.perf_counter()
        r = await generate(s, "llama3.2")
        return r, time.perf_counter() - t
    r, wall = run(loop, go, config)
    assert r["eval_duration"] / 1e9 == pytest.approx(2.0, rel=0.05)
    assert r["prompt_eval_duration"] / 1e9 == pytest.approx(0.5, rel=0.05)
    assert 0.2 < wall < 1.0


def test_stream_is_framed_as_before(loop):
    async def go(s):
        return await fetch(s, "POST", "/api/generate", {"model": "llama3.2", "prompt": "hi",
                                                        "options": {"num_predict": 5}})
    r = run(loop, go)
    assert r.headers["content-type"] == "application/x-ndjson" and len(r.chunks) == 6
    lines = [orjson.loads(c) for c in r.chunks]
    assert [x["done"] for x in lines] == [False] * 5 + [True]


def test_metrics_read_by_olbs_scraper(loop):
    """The contract with olb.telemetry: its strict parser takes the page, and
    its readings are the simulated GPU's."""
    from olb.telemetry import dcgm_readings, parse_text

    async def go(s):
        r = await fetch(s, "GET", "/metrics")
        return r.body.decode(), s.engine.gpu.used, s.engine.gpu.total
    text, used, total = run(loop, go, GPU.replace(gpu="l40s", preload=("llama3.1:8b", "llama3.2")))
    readings, problems = dcgm_readings(parse_text(text))
    assert problems == {} and list(readings) == [0]
    used_mib, total_mib = used // MIB, total // MIB
    assert readings[0] == {"util": 0.0, "mem_free": pytest.approx((total_mib - used_mib) / total_mib),
                           "mem_free_bytes": (total_mib - used_mib) * MIB, "mem_total": total_mib * MIB}

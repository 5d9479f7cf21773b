"""Model-aware routing over real sockets: olb knows what each backend has."""

import asyncio

import pytest

from olb.sim import SimConfig, start_sim
from olb.sim.gpu import PROFILES
from olb.server import start_proxy

from harness import RawClient, fetch, proxy_config, run

BASE = SimConfig(token_rate=0, ttft=0, seed=11)
GiB = 1 << 30



async def start(sim_configs, **overrides):
    sims = [await start_sim(c) for c in sim_configs]
    overrides.setdefault("models_interval", 60)  # the tests refresh by hand
    proxy = await start_proxy(proxy_config([s.url for s in sims], **overrides))
    await proxy.balancer.models.refresh_all()
    return proxy, sims


async def stop(proxy, sims):
    await proxy.close()
    for s in sims:
        await s.close()


def inference(sim, path="/api/generate"):
    return sim.stats.by_path.get(path, 0)


async def generate_burst(port, model, n, num_predict=None, prompt=None, timeout=30):
    """n non-streamed /api/generate requests for `model` at once, one
    connection each (prompt: "q0", "q1", ... unless given); their responses,
    in order."""
    clients = [await RawClient.connect(port) for _ in range(n)]
    try:
        for i, c in enumerate(clients):
            body = {"model": model, "prompt": prompt or f"q{i}", "stream": False}
            if num_predict is not None:
                body["options"] = {"num_predict": num_predict}
            c.send("POST", "/api/generate", body)
        return [await c.response(timeout=timeout) for c in clients]
    finally:
        for c in clients:
            c.close()


def test_routes_only_to_backends_that_have_the_model(loop):
    async def main():
        proxy, sims = await start([BASE.replace(models=("llama3.2:latest",)),
                                   BASE.replace(models=("qwen2.5:7b", "nomic-embed-text:latest"))])
        try:
            for _ in range(4):
                for model in ("llama3.2", "qwen2.5:7b"):
                    r = await fetch(proxy.port, "POST", "/api/generate",
                                    {"model": model, "prompt": "x", "stream": False})
                    assert r.status == 200 and r.json()["model"] == model
            emb = await fetch(proxy.port, "POST", "/api/embed", {"model": "nomic-embed-text", "input": "x"})
            assert emb.status == 200
            return [inference(s) for s in sims], [inference(s, "/api/embed") for s in sims]
        finally:
            await stop(proxy, sims)

    generate, embed = run(loop, main())
    assert generate == [4, 4] and embed == [0, 1]


@pytest.mark.parametrize("path,body,text", [
    ("/api/generate", {"model": "nope", "prompt": "x"}, "model 'nope' not found"),
    ("/api/chat", {"model": "nope:7b", "messages": []}, "model 'nope:7b' not found"),
    ("/api/embed", {"model": "nope", "input": "x"}, 'model "nope" not found, try pulling it first'),
    ("/api/show", {"model": "nope"}, "model 'nope' not found"),
])
def test_missing_model_is_ollamas_404_without_a_backend(loop, path, body, text):
    async def main():
        proxy, sims = await start([BASE.replace(models=("llama3.2:latest",))] * 2)
        try:
            r = await fetch(proxy.port, "POST", path, body)
            return r, sum(inference(s, path) for s in sims)
        finally:
            await stop(proxy, sims)

    r, touched = run(loop, main())
    assert r.status == 404 and r.json() == {"error": text}
    assert touched == 0


@pytest.mark.parametrize("body", [
    b'{"model":"nope","prompt":"x","options":{"num_predict":1,,}}',   # malformed past the model
    b'{"model":"nope","prompt":"x","stream":tru}',
])
def test_missing_model_in_a_malformed_body_is_the_backends_400(loop, body):
    """Routing steps over what it does not read (olb/_body.pyx); Ollama binds
    the whole body before it looks the model up, so a body malformed
    anywhere is answered 400 by a backend, not 404 by olb."""
    async def main():
        proxy, sims = await start([BASE.replace(models=("llama3.2:latest",))])
        try:
            r = await fetch(proxy.port, "POST", "/api/generate", body,
                            headers={"Content-Type": "application/json"})
            return r, inference(sims[0], "/api/generate")
        finally:
            await stop(proxy, sims)

    r, touched = run(loop, main())
    assert r.status == 400 and r.json()["error"].startswith("invalid character")
    assert touched == 1


def test_missing_model_openai_shape(loop):
    async def main():
        proxy, sims = await start([BASE.replace(models=("llama3.2:latest",))])
        try:
            return await fetch(proxy.port, "POST", "/v1/chat/completions",
                               {"model": "nope", "messages": [{"role": "user", "content": "x"}]})
        finally:
            await stop(proxy, sims)

    r = run(loop, main())
    assert r.status == 404
    assert r.json()["error"] == {"message": "model 'nope' not found", "type": "not_found_error",
                                 "param": None, "code": None}


def test_merged_tags_ps_and_models(loop):
    async def main():
        proxy, sims = await start([BASE.replace(models=("llama3.2:latest", "mistral:latest")),
                                   BASE.replace(models=("qwen2.5:7b", "mistral:latest"))])
        try:
            await fetch(proxy.port, "POST", "/api/generate", {"model": "qwen2.5:7b", "prompt": "x", "stream": False})
            tags = (await fetch(proxy.port, "GET", "/api/tags")).json()
            ps = (await fetch(proxy.port, "GET", "/api/ps")).json()
            v1 = (await fetch(proxy.port, "GET", "/v1/models")).json()
            return tags, ps, v1
        finally:
            await stop(proxy, sims)

    tags, ps, v1 = run(loop, main())
    assert sorted(m["name"] for m in tags["models"]) == ["llama3.2:latest", "mistral:latest", "qwen2.5:7b"]
    assert "qwen2.5:7b" in [m["name"] for m in ps["models"]]
    assert v1["object"] == "list"
    assert sorted(m["id"] for m in v1["data"]) == ["llama3.2:latest", "mistral:latest", "qwen2.5:7b"]
    assert all(m["created"] > 1_600_000_000 for m in v1["data"])


async def burst(n: int, sim_config: SimConfig, **overrides):
    """n concurrent non-streaming requests for one model on three backends;
    returns the statuses and how many each backend served."""
    proxy, sims = await start([sim_config] * 3, **overrides)
    try:
        out = await generate_burst(proxy.port, "llama3.2", n, prompt="x", timeout=10)
        return [r.status for r in out], [inference(s) for s in sims]
    finally:
        await stop(proxy, sims)


SLOW = BASE.replace(token_rate=50, num_predict_default=20, num_parallel=8)


def test_cold_model_is_loaded_once_not_everywhere(loop):
    """Concurrent first requests for a model wait for the backend already
    loading it instead of starting a load on every backend."""
    statuses, per_backend = run(loop, burst(4, SLOW, spread_queue=10))
    assert statuses == [200] * 4
    assert sorted(per_backend) == [0, 0, 4]


def test_hot_model_spreads_past_the_threshold(loop):
    statuses, per_backend = run(loop, burst(6, SLOW, spread_queue=1, max_inflight=1))
    assert statuses == [200] * 6
    assert sum(1 for n in per_backend if n) >= 2


def test_unknown_catalogue_does_not_block(loop):
    """A backend whose /api/tags has not been read yet may have any model."""

    async def main():
        sims = [await start_sim(BASE)]
        proxy = await start_proxy(proxy_config([s.url for s in sims], models_interval=60))
        try:
            # No refresh: the directory knows nothing yet.
            r = await fetch(proxy.port, "POST", "/api/generate", {"model": "llama3.2", "prompt": "x", "stream": False})
            return r.status
        finally:
            await stop(proxy, sims)

    assert run(loop, main()) == 200


def test_backend_busy_or_missing_model_retries_elsewhere(loop):
    """A 503 "server busy" or a 404 for a model the backend was thought to
    have is retried on another backend before anything reaches the client."""

    async def main():
        busy = BASE.replace(num_parallel=1, max_queue=0, token_rate=20, num_predict_default=200)
        proxy, sims = await start([busy, BASE], max_inflight=4)
        try:
            # Occupy the busy backend's only slot directly, so it answers 503.
            hog = await RawClient.connect(sims[0].port)
            hog.send("POST", "/api/generate", {"model": "llama3.2", "prompt": "x"})
            await asyncio.wait_for(hog.reader.readuntil(b'"done":false'), 5)
            proxy.balancer.models.mark_loaded("llama3.2:latest", 0)  # olb believes it is warm there
            r = await fetch(proxy.port, "POST", "/api/generate", {"model": "llama3.2", "prompt": "x", "stream": False})
            hog.close()
            busy_seen = sims[0].stats.rejected
            # Now a backend that lost the model: olb still thinks it has it.
            proxy.balancer.models.set_catalogue(0, [{"name": "ghost:latest"}], [{"name": "ghost:latest"}])
            proxy.balancer.models.set_catalogue(1, [{"name": "ghost:latest"}], [])
            g = await fetch(proxy.port, "POST", "/api/generate", {"model": "ghost", "prompt": "x", "stream": False})
            return r, busy_seen, g, bytes(proxy.balancer.models.installed_mask("ghost:latest"))
        finally:
            await stop(proxy, sims)

    r, busy_seen, ghost, mask = run(loop, main())
    assert r.status == 200 and busy_seen == 1
    # Neither sim has "ghost": both 404; the client gets the last one, and olb
    # has learnt that nobody has it.
    assert ghost.status == 404 and ghost.json() == {"error": "model 'ghost' not found"}
    assert mask == b"\x00\x00"


def test_conversations_stay_where_their_cache_is(loop):
    """Turns of one conversation go to one backend; conversations spread."""

    async def main():
        proxy, sims = await start([BASE] * 3, spread_queue=1)
        try:
            for s in sims:  # the model is warm everywhere: only affinity decides
                proxy.balancer.models.mark_loaded("llama3.2:latest", sims.index(s))
            homes = {}
            for conv in range(12):
                history = [{"role": "system", "content": "be brief"},
                           {"role": "user", "content": f"conversation {conv}"}]
                for turn in range(3):
                    before = [inference(s, "/api/chat") for s in sims]
                    r = await fetch(proxy.port, "POST", "/api/chat",
                                    {"model": "llama3.2", "messages": history, "stream": False})
                    assert r.status == 200
                    after = [inference(s, "/api/chat") for s in sims]
                    home = [a - b for a, b in zip(after, before)].index(1)
                    if turn:
                        homes.setdefault(conv, set()).add(home)
                    history = history + [r.json()["message"], {"role": "user", "content": f"more {turn}"}]
            # An explicit session header pins unrelated requests together.
            pinned = set()
            for i in range(5):
                before = [inference(s, "/api/generate") for s in sims]
                await fetch(proxy.port, "POST", "/api/generate",
                            {"model": "llama3.2", "prompt": f"unrelated {i}", "stream": False},
                            headers={"X-Session-Id": "agent-7"})
                after = [inference(s, "/api/generate") for s in sims]
                pinned.add([a - b for a, b in zip(after, before)].index(1))
            return homes, pinned
        finally:
            await stop(proxy, sims)

    homes, pinned = run(loop, main())
    # Follow-up turns (2 and 3) land where the conversation hashes; the
    # first turn, with no cache anywhere yet, goes to the least loaded.
    assert all(len(h) == 1 for h in homes.values())  # every follow-up on its conversation's backend
    assert len({next(iter(h)) for h in homes.values()}) >= 2  # conversations spread
    assert len(pinned) == 1


def test_cold_model_loads_where_fewest_models_are_resident(loop):
    async def main():
        proxy, sims = await start([BASE] * 3)
        try:
            # Make models resident on backends 0 and 2 behind olb's back.
            for i in (0, 2):
                r = await fetch(sims[i].port, "POST", "/api/generate",
                                {"model": "mistral", "prompt": "x", "stream": False})
                assert r.status == 200
            await proxy.balancer.models.refresh_all()
            r = await fetch(proxy.port, "POST", "/api/generate",
                            {"model": "qwen2.5:7b", "prompt": "x", "stream": False})
            return r.status, [inference(s) for s in sims]
        finally:
            await stop(proxy, sims)

    status, per_backend = run(loop, main())
    assert status == 200 and per_backend == [1, 1, 1]  # 0 and 2 from the setup, qwen on 1


def test_loaded_is_preferred_over_installed(loop):
    async def main():
        proxy, sims = await start([BASE] * 3, session_bound=0)
        try:
            # llama3.2 becomes resident on backend 1 only (behind olb's back).
            await fetch(sims[1].port, "POST", "/api/generate", {"model": "llama3.2", "prompt": "x", "stream": False})
            await proxy.balancer.models.refresh_all()
            for i in range(6):
                r = await fetch(proxy.port, "POST", "/api/generate",
                                {"model": "llama3.2", "prompt": str(i), "stream": False})
                assert r.status == 200
            return [inference(s) for s in sims]
        finally:
            await stop(proxy, sims)

    assert run(loop, main()) == [0, 7, 0]


def test_conversation_moves_when_its_backend_is_overloaded(loop):
    """The load bound: a conversation's turn leaves its backend while that
    backend is far busier than the average, and comes back after."""

    async def main():
        proxy, sims = await start([BASE] * 2, max_inflight=16)
        table = proxy.balancer.table
        try:
            for i in range(2):
                proxy.balancer.models.mark_loaded("llama3.2:latest", i)
            body = {"model": "llama3.2", "stream": False,
                    "messages": [{"role": "user", "content": "same conversation"},
                                 {"role": "assistant", "content": "yes?"},
                                 {"role": "user", "content": "go on"}]}

            async def turn():
                before = [inference(s, "/api/chat") for s in sims]
                r = await fetch(proxy.port, "POST", "/api/chat", body)
                assert r.status == 200
                return [inference(s, "/api/chat") - b for s, b in zip(sims, before)].index(1)

            home = await turn()
            # Six other requests in flight on the home backend (held in the
            # table, as the proxy would hold them): 7 > ceil(1.25 * 7 / 2).
            only_home = bytearray(2)
            only_home[home] = 1
            held = [table.acquire(only_home) for _ in range(6)]
            away = await turn()
            for index in held:
                table.release(index)
            back = await turn()
            return home, away, back
        finally:
            await stop(proxy, sims)

    home, away, back = run(loop, main())
    assert away == 1 - home
    assert back == home


def test_gpu_cluster_loads_a_cold_model_once(loop):
    """Against simulated GPUs (real load times, one load at a time, VRAM):
    a burst for a cold model costs one load in the cluster, not one per
    backend, and requests for a model resident somewhere never load it again."""

    async def main():
        gpu = BASE.replace(gpu="default", time_scale=50, num_parallel=4, preload=("mistral:latest",))
        proxy, sims = await start([gpu] * 3, spread_queue=100)
        try:
            out = await generate_burst(proxy.port, "llama3.1:8b", 6, num_predict=8)
            warm = [await fetch(proxy.port, "POST", "/api/generate",
                                {"model": "mistral", "prompt": f"w{i}", "stream": False,
                                 "options": {"num_predict": 4}}) for i in range(3)]
            return ([r.status for r in out + warm], [s.engine.loads for s in sims],
                    [r.json()["load_duration"] for r in out])
        finally:
            await stop(proxy, sims)

    statuses, loads, load_durations = run(loop, main())
    assert statuses == [200] * 9
    # Exactly one load of llama3.1:8b in the cluster (mistral was preloaded
    # everywhere and its requests went to where it was resident).
    assert sorted(loads) == [0, 0, 1], loads
    assert max(load_durations) > 1e9  # the simulated load took seconds (of simulated time)


@pytest.mark.parametrize("spread_queue, cluster_loads", [(2, 3), (100, 1)])
def test_requests_waiting_behind_a_cold_load_spread_it(loop, spread_queue, cluster_loads):
    """Simulated GPUs, a cold model, a burst of 8 with room for all of them
    on any backend (max=8, so nothing waits in olb's queue). The requests
    admitted to the backend loading the model wait behind that load; once
    OLB_SPREAD_QUEUE of them do, the next loads it on an idle GPU too (as
    least-in-flight would), instead of piling all 8 behind one load."""

    async def main():
        gpu = BASE.replace(gpu="default", time_scale=50, num_parallel=4)
        proxy, sims = await start([gpu] * 3, spread_queue=spread_queue, max_inflight=8, session_bound=0)
        try:
            statuses = [r.status for r in await generate_burst(proxy.port, "llama3.1:8b", 8, num_predict=8)]
            return statuses, [s.engine.loads for s in sims]
        finally:
            await stop(proxy, sims)

    statuses, loads = run(loop, main(), timeout=60)
    assert statuses == [200] * 8
    # With 2: requests 1-2 wait behind the first load, the 3rd starts a
    # second, 5th a third; with 100, one load serves the whole burst.
    assert sum(loads) == cluster_loads and max(loads) == 1, loads


@pytest.mark.parametrize("other_busy", [True, False])
def test_hot_model_spreads_only_where_no_busy_model_is_evicted(loop, other_busy):
    """Simulated GPUs that hold one model each: llama3.2 is warm on backend 0,
    qwen2.5 on backend 1. A burst for llama3.2 queues past OLB_SPREAD_QUEUE;
    while a qwen2.5 stream runs on backend 1, loading llama3.2 there would
    evict it mid-stream (Ollama waits for it, then the next qwen2.5 request
    reloads), so the burst waits for backend 0. With qwen2.5 idle, the burst
    spreads onto backend 1."""

    async def main():
        gpu = BASE.replace(gpu="default", time_scale=50, num_parallel=2, max_loaded_models=1)
        proxy, sims = await start([gpu.replace(preload=("llama3.2:latest",)),
                                   gpu.replace(preload=("qwen2.5:7b",))],
                                  spread_queue=1, max_inflight=2, session_bound=0)
        try:
            stream = None
            if other_busy:
                stream = await RawClient.connect(proxy.port)
                stream.send("POST", "/api/generate", {"model": "qwen2.5:7b", "prompt": "long",
                                                      "options": {"num_predict": 4000}})
                # Running on backend 1 before the burst starts.
                await asyncio.wait_for(stream.reader.readuntil(b'"done":false'), 10)
            statuses = [r.status for r in await generate_burst(proxy.port, "llama3.2", 6, num_predict=20)]
            if stream is not None:
                stream.close()
            return statuses, [inference(s) for s in sims], [s.engine.loads for s in sims]
        finally:
            await stop(proxy, sims)

    statuses, per_backend, loads = run(loop, main(), timeout=60)
    assert statuses == [200] * 6
    if other_busy:
        # qwen2.5 was serving: no llama3.2 load on backend 1, the burst stayed on 0.
        assert per_backend == [6, 1] and loads == [0, 0], (per_backend, loads)
    else:
        assert per_backend[1] >= 1 and loads == [0, 1], (per_backend, loads)


def test_a_load_that_evicts_is_seen_before_the_next_poll(loop):
    """A GPU that holds one model: llama3.2 is resident (and olb has read
    /api/ps), then a request for qwen2.5 loads it there, which unloads
    llama3.2. olb re-reads the backend's catalogue as soon as qwen2.5 is
    answered for, not at the next poll (60 s away), so llama3.2 is no longer
    taken for warm there."""
    from test_sim_api import until

    async def main():
        gpu = BASE.replace(gpu="default", time_scale=50, max_loaded_models=1, preload=("llama3.2:latest",))
        proxy, sims = await start([gpu])
        models = proxy.balancer.models
        try:
            warm_before = models.loaded_mask("llama3.2:latest")[0]
            r = await fetch(proxy.port, "POST", "/api/generate",
                            {"model": "qwen2.5:7b", "prompt": "x", "stream": False, "options": {"num_predict": 2}})
            assert r.status == 200
            await until(lambda: not models.loaded_mask("llama3.2:latest")[0])
            return warm_before, models.loaded_mask("qwen2.5:7b")[0], sims[0].engine.evictions
        finally:
            await stop(proxy, sims)

    assert run(loop, main()) == (1, 1, 1)


@pytest.mark.parametrize("big_down", [False, True])
def test_a_cold_model_loads_beside_others_where_it_has_room(loop, big_down):
    """Two simulated GPUs. Backend 0 holds up to three models and olb has
    seen it hold three; one is then unloaded behind olb's back, leaving two.
    Backend 1 holds one model, its limit. A request for the unloaded model
    reloads it on 0, beside the two, where counting models alone would pick
    1 (one resident against two) and evict its model. With backend 0 marked
    down, its room counts for nothing: the model loads on 1."""

    async def main():
        big = BASE.replace(gpu="default", time_scale=50, max_loaded_models=3,
                           preload=("mistral:latest", "qwen2.5:7b", "llama3.2:latest"))
        small = BASE.replace(gpu="default", time_scale=50, max_loaded_models=1, preload=("llama3.1:8b",))
        proxy, sims = await start([big, small])
        models = proxy.balancer.models
        try:
            seen = models.room_models[:]
            r = await fetch(sims[0].port, "POST", "/api/generate", {"model": "llama3.2", "keep_alive": 0})
            assert r.status == 200
            await models.refresh_all()
            resident = [len(models.ps[i]) for i in range(2)]
            if big_down:
                proxy.balancer.table.set_health(0, False)
            r = await fetch(proxy.port, "POST", "/api/generate",
                            {"model": "llama3.2", "prompt": "x", "stream": False, "options": {"num_predict": 2}})
            return (seen, resident, r.status, [s.engine.loads for s in sims],
                    [s.engine.evictions for s in sims])
        finally:
            await stop(proxy, sims)

    seen, resident, status, loads, evictions = run(loop, main())
    assert seen == [3, 1] and resident == [2, 1]
    assert status == 200
    if big_down:
        assert loads == [0, 1] and evictions == [0, 1], (loads, evictions)
    else:
        assert loads == [1, 0] and evictions == [0, 0], (loads, evictions)


@pytest.mark.parametrize("busy", [False, True])
def test_with_gpu_telemetry_a_cold_model_loads_where_free_vram_fits_it(loop, busy):
    """The simulated GPUs' own DCGM pages (metrics=) tell olb the free VRAM.
    Backend 0 (80 GiB, max=1 request) holds two models and has never been
    seen with more; backend 1 (8 GiB) holds one 8B model and has no room for
    another. llama3.2's footprint is known from when backend 1 held it. A
    request for it loads it on 0, where it fits in free VRAM and under
    Ollama's 3 models per GPU, not on 1 (fewer models, but an eviction) --
    and when 0's one slot is taken by a stream, it waits for that slot
    rather than evict on 1."""
    from test_sim_api import until

    async def main():
        big = BASE.replace(gpu="default", time_scale=50, preload=("mistral:latest", "qwen2.5:7b"))
        small = BASE.replace(gpu=PROFILES["rtx3090"].replace(vram=8 * GiB), time_scale=50,
                             preload=("llama3.2:latest",))
        sims = [await start_sim(c) for c in (big, small)]
        opts = [f";metrics={sims[0].url}/metrics;max=1", f";metrics={sims[1].url}/metrics"]
        proxy = await start_proxy(proxy_config([s.url for s in sims], backend_opts=opts, gpu_poll=30,
                                               models_interval=60))
        models = proxy.balancer.models
        stream = None
        try:
            await models.refresh_all()
            # llama3.2 out of backend 1, llama3.1 in, behind olb's back.
            for body in ({"model": "llama3.2", "keep_alive": 0},
                         {"model": "llama3.1:8b", "prompt": "x", "stream": False, "options": {"num_predict": 1}}):
                assert (await fetch(sims[1].port, "POST", "/api/generate", body)).status == 200
            await models.refresh_all()
            assert await proxy.telemetry.scrape_once() == {f"{s.url}/metrics": None for s in sims}
            state = (models.room_models[:], models.vram_free[0] is not None, "llama3.2:latest" in models.footprint)
            loads_before = [s.engine.loads for s in sims]
            if busy:
                stream = await RawClient.connect(proxy.port)
                stream.send("POST", "/api/generate", {"model": "mistral", "prompt": "long",
                                                      "options": {"num_predict": 4000}})
                await asyncio.wait_for(stream.reader.readuntil(b'"done":false'), 10)
            client = await RawClient.connect(proxy.port)
            client.send("POST", "/api/generate",
                        {"model": "llama3.2", "prompt": "x", "stream": False, "options": {"num_predict": 2}})
            if busy:
                # It waits in olb's queue for backend 0's slot, not on backend 1.
                await until(lambda: len(proxy.balancer.queue) == 1)
                stream.close()  # the slot frees: the queued request takes it
                stream = None
            r = await client.response(timeout=20)
            client.close()
            loads = [s.engine.loads - b for s, b in zip(sims, loads_before)]
            return state, r.status, loads, sims[1].engine.evictions
        finally:
            if stream is not None:
                stream.close()
            await stop(proxy, sims)

    state, status, loads, evictions_on_1 = run(loop, main())
    assert state == ([2, 1], True, True)
    assert status == 200 and loads == [1, 0], loads
    assert evictions_on_1 == 0


def test_a_model_leaving_a_backend_goes_to_its_other_copy(loop):
    """Two simulated GPUs of one model each, llama3.2 warm on both. olb sends
    qwen2.5 to one of them, which evicts llama3.2 there (Ollama keeps the
    victim taking requests until it drains, and the load waits for it).
    While that load is under way, llama3.2's requests all go to its other
    copy; once the load is seen (answer, then /api/ps), it is no longer
    leaving."""
    from test_sim_api import until

    async def main():
        gpu = BASE.replace(gpu="default", time_scale=20, max_loaded_models=1, num_parallel=4,
                           preload=("llama3.2:latest",))
        proxy, sims = await start([gpu] * 2, max_inflight=8, session_bound=0)
        models = proxy.balancer.models
        try:
            cold = await RawClient.connect(proxy.port)
            cold.send("POST", "/api/generate", {"model": "qwen2.5:7b", "prompt": "x", "stream": False,
                                                "options": {"num_predict": 2}})
            await until(lambda: models.held("llama3.2:latest"))
            [(_, target)] = models.evicting
            await until(lambda: inference(sims[target]) == 1)  # qwen2.5 is loading there
            before = [inference(s) for s in sims]
            statuses = [r.status for r in await generate_burst(proxy.port, "llama3.2", 6, num_predict=2)]
            served = [inference(s) - b for s, b in zip(sims, before)]
            r = await cold.response(timeout=20)
            cold.close()
            await until(lambda: not models.held("llama3.2:latest"), timeout=10)
            return target, statuses, served, r.status, [s.engine.loads for s in sims]
        finally:
            await stop(proxy, sims)

    target, statuses, served, cold_status, loads = run(loop, main())
    assert statuses == [200] * 6 and cold_status == 200
    assert served[target] == 0 and served[1 - target] == 6, (target, served)
    assert loads[target] == 1 and loads[1 - target] == 0, loads


def test_requests_go_to_the_runner_with_their_options(loop):
    """llama3.2 warm (default options) on two simulated GPUs. Requests with
    options.num_ctx=8192 and without it, in turns: the first 8192 one
    reloads the model on one backend (Ollama's needsReload), and from then
    on each kind goes to its own runner -- one reload in all, where
    alternating the options on one backend reloads on every turn."""

    async def main():
        gpu = BASE.replace(gpu="default", time_scale=50, preload=("llama3.2:latest",))
        proxy, sims = await start([gpu] * 2, session_bound=0)
        try:
            homes = {8192: set(), None: set()}
            for i in range(8):
                ctx = 8192 if i % 2 == 0 else None
                body = {"model": "llama3.2", "prompt": f"t{i}", "stream": False, "options": {"num_predict": 2}}
                if ctx:
                    body["options"]["num_ctx"] = ctx
                before = [inference(s) for s in sims]
                r = await fetch(proxy.port, "POST", "/api/generate", body)
                assert r.status == 200
                homes[ctx].add([inference(s) - b for s, b in zip(sims, before)].index(1))
            return homes, [s.engine.loads for s in sims]
        finally:
            await stop(proxy, sims)

    homes, loads = run(loop, main())
    assert len(homes[8192]) == 1 and len(homes[None]) == 1 and homes[8192] != homes[None], homes
    assert sum(loads) == 1, loads


def test_a_model_leaving_its_only_backend_waits_in_olbs_queue(loop):
    """One simulated GPU that holds one model, llama3.2 on it. olb sends
    qwen2.5 there, which evicts llama3.2. llama3.2's requests that arrive
    during that load wait in olb's queue (held), not on the backend, where
    they would attach to the victim and hold the load up; once the load is
    seen they are routed again and load llama3.2 back."""
    from test_sim_api import until

    async def main():
        gpu = BASE.replace(gpu="default", time_scale=20, max_loaded_models=1, num_parallel=4,
                           preload=("llama3.2:latest",))
        proxy, sims = await start([gpu], max_inflight=8, session_bound=0)
        models = proxy.balancer.models
        clients = []
        try:
            cold = await RawClient.connect(proxy.port)
            clients.append(cold)
            cold.send("POST", "/api/generate", {"model": "qwen2.5:7b", "prompt": "x", "stream": False,
                                                "options": {"num_predict": 2}})
            await until(lambda: models.held("llama3.2:latest") and inference(sims[0]) == 1)
            for i in range(3):
                c = await RawClient.connect(proxy.port)
                c.send("POST", "/api/generate", {"model": "llama3.2", "prompt": f"w{i}", "stream": False,
                                                 "options": {"num_predict": 2}})
                clients.append(c)
            await until(lambda: len(proxy.balancer.queue) == 3)
            held = inference(sims[0])
            first = (await cold.response(timeout=20)).status
            statuses = [(await c.response(timeout=20)).status for c in clients[1:]]
            return (held, first, statuses, sims[0].engine.loads, sims[0].engine.evictions,
                    proxy.balancer.router.decisions)
        finally:
            for c in clients:
                c.close()
            await stop(proxy, sims)

    held, first, statuses, loads, evictions, decisions = run(loop, main())
    assert held == 1  # only qwen2.5 reached the backend while it loaded
    # Each llama3.2 request was routed twice: on arrival, and once the load
    # was seen (not again at every slot freed while it was held).
    assert decisions == 1 + 3 + 3
    assert first == 200 and statuses == [200] * 3
    assert loads == 2 and evictions == 2  # qwen2.5 in, then llama3.2 back in


def test_a_request_queued_before_an_evicting_load_does_not_join_the_victim(loop):
    """One simulated GPU that holds one model, llama3.2 on it, olb's max=2
    taken by two llama3.2 streams. A qwen2.5 request waits in olb's queue
    (rule 5), then a llama3.2 one (for its warm backend). The streams end:
    qwen2.5 takes the first slot and starts a load that evicts llama3.2;
    the llama3.2 request, queued before that, does not take the second slot
    (it would join the victim and hold the load up, as Ollama's fast path
    attaches it to the runner being evicted): it waits until the load is
    seen, then loads llama3.2 back."""
    from test_sim_api import until

    async def main():
        gpu = BASE.replace(gpu="default", time_scale=20, max_loaded_models=1, num_parallel=4,
                           preload=("llama3.2:latest",))
        proxy, sims = await start([gpu], max_inflight=2, session_bound=0)
        balancer = proxy.balancer
        clients = []
        try:
            streams = []
            for i in range(2):
                s = await RawClient.connect(proxy.port)
                s.send("POST", "/api/generate", {"model": "llama3.2", "prompt": f"long {i}",
                                                 "options": {"num_predict": 4000}})
                await asyncio.wait_for(s.reader.readuntil(b'"done":false'), 10)
                streams.append(s)
            for model in ("qwen2.5:7b", "llama3.2"):
                c = await RawClient.connect(proxy.port)
                c.send("POST", "/api/generate", {"model": model, "prompt": "x", "stream": False,
                                                 "options": {"num_predict": 2}})
                clients.append(c)
                await until(lambda: len(balancer.queue) == len(clients))
            for s in streams:
                s.close()
            # Both slots freed: qwen2.5 holds one; the llama3.2 request is still queued.
            await until(lambda: balancer.table.inflight(0) == 1 and balancer.models.held("llama3.2:latest"))
            await until(lambda: sims[0].stats.active == 1)
            queued = len(balancer.queue)
            statuses = [(await c.response(timeout=20)).status for c in clients]
            return queued, statuses, sims[0].engine.loads
        finally:
            for c in clients:
                c.close()
            await stop(proxy, sims)

    queued, statuses, loads = run(loop, main())
    assert queued == 1
    assert statuses == [200, 200]
    assert loads == 2  # qwen2.5, then llama3.2 again


def test_a_model_pulled_behind_olbs_back_is_found_before_a_404(loop, monkeypatch):
    """olb's directory is as old as its last poll; one Ollama's 404 comes from
    its disk. A model pulled on a backend directly (or through another olb
    worker) is served at once, not refused until the next poll; a model
    nobody has is still refused, and misses re-read the catalogues at most
    once per RECHECK_INTERVAL."""
    import olb.models
    monkeypatch.setattr(olb.models, "RECHECK_INTERVAL", 60.0)

    async def main():
        proxy, sims = await start([BASE.replace(models=("llama3.2:latest",)),
                                   BASE.replace(models=("llama3.2:latest",))])
        try:
            pulled = await fetch(sims[1].port, "POST", "/api/pull", {"model": "qwen2.5:7b", "stream": False})
            assert pulled.status == 200, pulled.body
            # olb has not seen it: its poll is a minute away.
            assert not any(proxy.balancer.models.installed_mask("qwen2.5:7b"))
            r = await fetch(proxy.port, "POST", "/api/generate",
                            {"model": "qwen2.5:7b", "prompt": "hi", "stream": False})
            assert r.status == 200, r.body
            assert inference(sims[1]) == 1 and inference(sims[0]) == 0
            tags_before = [s.stats.by_path.get("/api/tags", 0) for s in sims]
            misses = await asyncio.gather(*(fetch(proxy.port, "POST", "/api/generate",
                                                  {"model": "nope", "prompt": "hi", "stream": False})
                                            for _ in range(5)))
            tags_after = [s.stats.by_path.get("/api/tags", 0) for s in sims]
            return misses, tags_before, tags_after
        finally:
            await stop(proxy, sims)

    misses, before, after = run(loop, main())
    assert [m.status for m in misses] == [404] * 5
    assert all(m.json() == {"error": "model 'nope' not found"} for m in misses)
    # The round that found qwen2.5 was under RECHECK_INTERVAL ago: the five
    # misses are answered from it, without polling the backends again.
    assert after == before

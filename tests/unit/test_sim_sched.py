"""olb.sim.engine's scheduler against Ollama's server/sched.go, one rule at a
time, on the virtual clock of test_sim_engine (no sockets).

Each test names the Go function whose rule it checks; olb/sim/README.md
lists the same rules.  Requests are held on their runner with a SlotHold of
a known length (GPU work, shared with other holds running at the same time).
"""

import math

import pytest

from olb.sim.engine import (DEFAULT_NUM_BATCH, EVICT, FOREVER_S, RELOAD, Pending, RunnerOptions,
                            SlotHold, needs_reload, runner_options)
from olb.sim.gpu import GpuProfile

from test_sim_engine import T0, Got, gpu_engine, load_s, model

UNLOAD_S = GpuProfile().unload_s


def request(engine, m, seconds, keep_alive=None, options=None, holds=None):
    """A request that holds a slot of `m`'s runner for `seconds` of GPU work
    once it has the runner; returns acquire's result and the Got."""
    got = Got(engine.loop)

    def then(runner):
        got(runner)
        if seconds:
            hold = SlotHold(engine, runner, seconds, lambda h: None)
            hold.start()
            if holds is not None:
                holds.append(hold)
    return engine.acquire(m, keep_alive, then, options), got


def at(loop, when, fn):
    loop.call_at(when, fn)


# --- needsReload: the runner options ----------------------------------------------------

LOADED = RunnerOptions(4096)

@pytest.mark.parametrize("loaded, options, reload", [
    (LOADED, None, False),                                    # all defaults
    (LOADED, {"num_ctx": 4096, "temperature": 0.1}, False),   # sampling options never reload
    (LOADED, {"num_ctx": 8192}, True),
    (LOADED, {"num_ctx": 4096.9}, False),                     # FromMap truncates to int
    (RunnerOptions(4), {"num_ctx": 0}, False),                # getRunner: at least 4
    (RunnerOptions(131072), {"num_ctx": 10**6}, False),       # effectiveContext: capped at training
    (LOADED, {"num_batch": DEFAULT_NUM_BATCH}, False),
    (LOADED, {"num_batch": 256}, True),
    (LOADED, {"num_gpu": -1}, False),
    (RunnerOptions(4096, num_gpu=20), {}, False),             # num_gpu -1 (default) matches any
    (RunnerOptions(4096, num_gpu=20), {"num_gpu": 20}, False),
    (LOADED, {"num_gpu": 20}, True),
    (LOADED, {"main_gpu": 0}, True),                          # nil vs set pointer
    (RunnerOptions(4096, main_gpu=1), {"main_gpu": 1}, False),
    (RunnerOptions(4096, main_gpu=1), {}, True),
    (LOADED, {"use_mmap": False}, True),
    (RunnerOptions(4096, use_mmap=False), {"use_mmap": False}, False),
    (LOADED, {"num_thread": 8}, True),
    (LOADED, {"num_thread": None}, False),                    # null = absent
])
def test_needs_reload(loaded, options, reload):
    assert needs_reload(loaded, runner_options(options, 4096, 131072)) is reload


def test_needs_reload_unloads_after_in_flight_requests_and_old_options_keep_the_old_runner():
    loop, engine, cat = gpu_engine()
    m = model(cat, "llama3.2")
    engine.preload([m])
    old = engine.runners[m.name.key]
    holds = []
    request(engine, m, 5.0, holds=holds)                      # in flight on the old runner
    p, new = request(engine, m, 0, options={"num_ctx": 8192})
    assert isinstance(p, Pending) and old.expire_reason == RELOAD
    # While the reload waits, a request with the old options still takes the
    # old runner (getRunner fast path) and delays the reload further.
    same = []
    at(loop, T0 + 1, lambda: same.append(request(engine, m, 2.0, holds=holds)))
    loop.run(until=T0 + 30)
    assert same[0][0] is None and same[0][1].calls[0][0] is old
    drained = holds[-1].t_end
    assert drained == pytest.approx(T0 + 7)
    assert new.at == pytest.approx(drained + UNLOAD_S + load_s(cat, "llama3.2"))
    runner = new.calls[0][0]
    assert runner.num_ctx == 8192 and runner.opts.num_ctx == 8192
    assert (engine.reloads, engine.evictions, engine.loads, engine.unloads) == (1, 0, 1, 1)
    # Alternating options on one runner reloads every time (thrash).
    p, back = request(engine, m, 0)
    assert isinstance(p, Pending)
    loop.run(until=T0 + 60)
    assert back.calls[0][0].num_ctx == 4096 and engine.reloads == 2


# --- getRunner's fast path and the victim --------------------------------------------------

def test_victim_keeps_taking_requests_and_the_load_waits_until_it_drains():
    """getRunner L197-203: a victim stays in s.loaded until it unloads, so
    steady traffic to it holds the pending load -- and everything behind it."""
    loop, engine, cat = gpu_engine(max_loaded_models=1)
    v = model(cat, "llama3.2")
    engine.preload([v])
    victim = engine.runners[v.name.key]
    holds = []
    request(engine, v, 1.0, holds=holds)
    _, x = request(engine, model(cat, "mistral"), 0)          # needs the victim's place
    _, behind = request(engine, model(cat, "qwen2.5:7b"), 0)  # queued behind it
    assert victim.expire_reason == EVICT and len(engine.pending) == 1
    for k in range(1, 20):                                    # one more every 0.5 s
        at(loop, T0 + 0.5 * k, lambda: request(engine, v, 1.0, holds=holds))
    loop.run(until=T0 + 15)
    assert x.calls == [] and behind.calls == [] and victim.state == "ready"
    assert engine.stats()["eviction_wait_s"] == pytest.approx(15.0)
    loop.run(until=T0 + 60)
    assert all(h.runner is victim for h in holds) and len(holds) == 20
    drained = holds[-1].t_end
    assert drained == pytest.approx(T0 + 20)                  # 20 serial requests of 1 s
    assert x.at == pytest.approx(drained + UNLOAD_S + load_s(cat, "mistral"))
    assert behind.at == pytest.approx(x.at + UNLOAD_S + load_s(cat, "qwen2.5:7b"))
    stats = engine.stats()
    assert stats["evictions"] == 2 and stats["loads"] == 2 and stats["pending"] == 0
    # The head waited on victims: the drain plus two VRAM recoveries.
    assert stats["eviction_wait_s"] == pytest.approx(20 + 2 * UNLOAD_S)


@pytest.mark.parametrize("keep_alive, unload_after_drain", [
    (None, 0.0),      # no keep_alive: the victim's 0 stands, it unloads when drained
    (0.0, 0.0),
    (30.0, 30.0),     # useLoadedRunner sets the duration back: an idle timer, no unload
])
def test_victim_keep_alive_is_set_back_by_a_request(keep_alive, unload_after_drain):
    loop, engine, cat = gpu_engine(max_loaded_models=1)
    v = model(cat, "llama3.2")
    engine.preload([v])
    victim = engine.runners[v.name.key]
    holds = []
    request(engine, v, 10.0, holds=holds)
    _, x = request(engine, model(cat, "mistral"), 0)
    at(loop, T0 + 5, lambda: request(engine, v, 1.0, keep_alive=keep_alive, holds=holds))
    loop.run(until=T0 + 120)
    drained = holds[-1].t_end
    assert drained == pytest.approx(T0 + 11)
    unloaded = drained + unload_after_drain
    assert x.at == pytest.approx(unloaded + UNLOAD_S + load_s(cat, "mistral"))
    assert engine.evictions == (0 if unload_after_drain else 1) and engine.unloads == 1
    assert engine.stats()["eviction_wait_s"] == pytest.approx(unloaded + UNLOAD_S - T0)


def test_any_unload_wakes_the_scheduler_which_reevaluates():
    """processPending waits on unloadedCh, which any unload sends: a victim
    revived by keep_alive stays, and another model's expiry makes the room."""
    loop, engine, cat = gpu_engine(max_loaded_models=2)
    v, w = model(cat, "llama3.2"), model(cat, "mistral")
    engine.preload([v, w])
    holds = []
    request(engine, v, 10.0, keep_alive=100.0, holds=holds)
    request(engine, w, 10.0, keep_alive=200.0, holds=holds)
    _, x = request(engine, model(cat, "qwen2.5:7b"), 0)      # both busy: the shorter keep-alive
    victim = engine.runners[v.name.key]
    assert victim.expire_reason == EVICT
    at(loop, T0 + 5, lambda: request(engine, v, 1.0, keep_alive=1000.0, holds=holds))
    loop.run(until=T0 + 400)
    w_drained = holds[1].t_end
    assert x.at == pytest.approx(w_drained + 200 + UNLOAD_S + load_s(cat, "qwen2.5:7b"))
    assert v.name.key in engine.runners and w.name.key not in engine.runners
    assert victim.keep_alive == 1000.0 and engine.evictions == 0 and engine.unloads == 1


# --- findRunnerToUnload / ByDurationAndName ------------------------------------------------

NAMES = ("llama3.2", "mistral")

@pytest.mark.parametrize("keep_alives, busy, victim", [
    ((60.0, 600.0), (), "llama3.2"),                  # shortest keep-alive first
    ((600.0, 60.0), (), "mistral"),
    ((60.0, 600.0), ("llama3.2",), "mistral"),        # the first idle one
    ((60.0, 600.0), ("llama3.2", "mistral"), "llama3.2"),   # none idle: the first, waited for
    ((math.inf, 60.0), (), "mistral"),                # forever sorts last
    ((300.0, 300.0), (), None),                       # a tie: the model path decides
])
def test_find_runner_to_unload(keep_alives, busy, victim):
    loop, engine, cat = gpu_engine(max_loaded_models=2)
    for name, ka in zip(NAMES, keep_alives):
        request(engine, model(cat, name), 0, keep_alive=ka)
        loop.run(until=loop.now + 10)                         # loaded, not yet expired
    for name in busy:
        request(engine, model(cat, name), 50.0)
    if victim is None:
        victim = min(NAMES, key=lambda n: model(cat, n).blob_path)
    request(engine, model(cat, "qwen2.5:7b"), 0)
    chosen = [r for r in engine.runners.values() if r.expire_reason == EVICT]
    gone = [n for n in NAMES if model(cat, n).name.key not in engine.runners]
    assert [r.model.name.key for r in chosen] + [model(cat, n).name.key for n in gone] \
        == [model(cat, victim).name.key]


# --- processPending: the queue, cancellation, one load at a time ---------------------------

def test_requests_for_a_loading_model_queue_and_share_its_load():
    """load puts the runner in s.loaded only once llama.Load has returned:
    until then requests for it are pending, then useLoadedRunner serves them."""
    loop, engine, cat = gpu_engine()
    m = model(cat, "llama3.1:8b")
    first, a = request(engine, m, 0)
    second, b = request(engine, m, 0)
    assert isinstance(second, Pending) and engine.stats()["pending"] == 2
    loop.run(until=T0 + 10)
    assert a.at == b.at == pytest.approx(T0 + load_s(cat, "llama3.1:8b"))
    assert a.calls[0][0] is b.calls[0][0] and engine.loads == 1



def test_cancelled_during_its_load_aborts_it_and_the_scheduler_moves_on():
    loop, engine, cat = gpu_engine()
    big, _ = request(engine, model(cat, "llama3.1:70b"), 0)
    _, nxt = request(engine, model(cat, "mistral"), 0)
    assert engine.stats()["pending"] == 2                     # the one loading and the queued one
    at(loop, T0 + 5, big.cancel)
    loop.run(until=T0 + 5)
    assert model(cat, "llama3.1:70b").name.key not in engine.runners
    assert engine.stats()["pending"] == 1
    loop.run(until=T0 + 60)
    assert nxt.at == pytest.approx(T0 + 5 + load_s(cat, "mistral"))
    assert engine.loads == 2 and engine.unloads == 0
    assert engine.gpu.used == engine.runners[model(cat, "mistral").name.key].size_vram


def test_cancelled_while_evicting_still_evicts_but_never_loads():
    """processPending checks ctx.Err() only at dequeue; the load then fails."""
    loop, engine, cat = gpu_engine(max_loaded_models=1)
    v = model(cat, "llama3.2")
    engine.preload([v])
    request(engine, v, 10.0)
    p, x = request(engine, model(cat, "mistral"), 0)
    at(loop, T0 + 2, p.cancel)
    loop.run(until=T0 + 60)
    assert x.calls == [] and engine.runners == {}
    assert (engine.evictions, engine.loads, engine.stats()["pending"]) == (1, 0, 0)


# --- keep_alive (useLoadedRunner, load, processCompleted) ------------------------------------

@pytest.mark.parametrize("first, second, expected", [
    (None, None, 300.0),      # load: envconfig.KeepAlive() when the request sets none
    (60.0, None, 60.0),       # a request without keep_alive leaves the runner's
    (None, 60.0, 60.0),       # a request with one replaces it
    (60.0, math.inf, FOREVER_S),
])
def test_keep_alive_of_loads_and_fast_path(first, second, expected):
    loop, engine, cat = gpu_engine(keep_alive=300.0)
    m = model(cat, "llama3.2")
    request(engine, m, 0, keep_alive=first)
    loop.run(until=T0 + 10)
    assert request(engine, m, 1.0, keep_alive=second)[0] is None
    r = engine.runners[m.name.key]
    assert min(r.keep_alive, FOREVER_S) == expected and r.timer is None   # busy: no idle timer
    loop.run(until=T0 + 12)
    assert (r.timer is None) == (expected >= FOREVER_S)       # idle: the timer runs (not forever)


def test_expire_runner():
    """expireRunner: idle -> unloaded now; busy -> when its requests end;
    loading -> not in s.loaded yet, untouched."""
    loop, engine, cat = gpu_engine()
    a, b, c = model(cat, "llama3.2"), model(cat, "mistral"), model(cat, "qwen2.5:7b")
    engine.preload([a, b])
    request(engine, b, 5.0)
    request(engine, c, 0)
    for m in (a, b, c):
        engine.unload(m.name.key)
    assert a.name.key not in engine.runners and b.name.key in engine.runners
    loop.run(until=T0 + 60)
    assert b.name.key not in engine.runners and c.name.key in engine.runners
    assert engine.unloads == 2 and engine.evictions == 0


# --- /sim/stats ----------------------------------------------------------------------------

def test_stats_shape_and_wait_in_progress():
    loop, engine, cat = gpu_engine(max_loaded_models=1)
    v = model(cat, "llama3.2")
    engine.preload([v])
    request(engine, v, 10.0)
    request(engine, model(cat, "mistral"), 0)
    loop.run(until=T0 + 4)
    stats = engine.stats()
    assert list(stats) == ["loads", "unloads", "evictions", "reloads", "eviction_wait_s", "pending"]
    assert stats == {"loads": 0, "unloads": 0, "evictions": 0, "reloads": 0,
                     "eviction_wait_s": pytest.approx(4.0), "pending": 1}

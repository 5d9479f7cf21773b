"""olb.sim.engine: slots, FIFO, queue bound, timing math -- on a virtual clock.

A FakeLoop stands in for asyncio: call_soon/call_later/call_at queue
callbacks on virtual time, `run()` fires them in time order.  No sockets.
"""

import heapq
import itertools

import pytest

from olb.sim.catalogue import Catalogue, parse_name
from olb.sim.config import SimConfig
from olb.sim.engine import (RESYNC_S, Engine, Generation, SlotHold, decode_interval, fault_plan,
                            prefill_seconds)


class _Handle:
    def __init__(self):
        self.cancelled = False

    def cancel(self):
        self.cancelled = True


class FakeLoop:
    def __init__(self):
        self.now = 100.0
        self._heap = []
        self._seq = itertools.count()

    def time(self):
        return self.now

    def call_at(self, when, fn, *args):
        h = _Handle()
        heapq.heappush(self._heap, (when, next(self._seq), h, fn, args))
        return h

    def call_later(self, delay, fn, *args):
        return self.call_at(self.now + delay, fn, *args)

    def call_soon(self, fn, *args):
        return self.call_at(self.now, fn, *args)

    def step(self):
        """Fire the earliest live callback."""
        while self._heap:
            when, _, h, fn, args = heapq.heappop(self._heap)
            if not h.cancelled:
                self.now = max(self.now, when)
                fn(*args)
                return

    def run(self, until=None):
        while self._heap:
            when, _, h, fn, args = self._heap[0]
            if until is not None and when > until:
                break
            heapq.heappop(self._heap)
            if h.cancelled:
                continue
            self.now = max(self.now, when)
            fn(*args)
        if until is not None:
            self.now = max(self.now, until)


class Sink:
    """Records what the engine asks for, with virtual times."""

    def __init__(self, loop, name=""):
        self.loop = loop
        self.name = name
        self.tokens = []
        self.ended = None
        self.writable = True
        self.pause_after = None

    def token(self, i):
        self.tokens.append((i, self.loop.now))
        if self.pause_after is not None and len(self.tokens) >= self.pause_after:
            self.writable = False

    def finish(self, gen):
        self.ended = ("done", self.loop.now)

    def fail(self, gen):
        self.ended = ("error", self.loop.now)

    def crash(self):
        self.ended = ("crash", self.loop.now)


def make(config=None, **kw):
    config = config or SimConfig(**kw)
    loop = FakeLoop()
    engine = Engine(config, loop, lambda: 1_700_000_000.0)
    cat = Catalogue.from_models(config.models, 1_700_000_000.0)
    runner = engine.runner(cat.lookup(parse_name("llama3.2")))
    return loop, engine, runner, cat


def gen(engine, runner, loop, n=3, prefill=0.05, stream=True, name=""):
    sink = Sink(loop, name)
    g = Generation(engine, runner, sink, n, prefill, stream)
    return g, sink


def test_decode_interval_and_prefill():
    assert decode_interval(130, 1.0, 1, 0.0) == pytest.approx(1 / 130)
    assert decode_interval(0, 1.0, 5, 0.15) == 0.0
    assert decode_interval(100, 0.5, 1, 0.0) == pytest.approx(0.02)
    # r(n) = r1 / (1 + alpha (n - 1)), fitted to llama.cpp PR #16894 (olb/sim/gpu.py).
    assert decode_interval(100, 1.0, 4, 0.15) == pytest.approx(1.45 / 100)
    assert decode_interval(100, 1.0, 0, 0.15) == pytest.approx(1 / 100)
    assert prefill_seconds(0.05, 6000, 0) == 0.05
    assert prefill_seconds(0.05, 6000, 6000) == pytest.approx(1.05)


@pytest.mark.parametrize("n, crash, error, plan", [
    (10, None, None, (10, "done")),
    (10, 3, None, (3, "crash")),
    (10, None, 4, (4, "error")),
    (10, 5, 2, (2, "error")),
    (10, 0, None, (0, "crash")),
    (10, 10, None, (10, "done")),     # the stream completes first
    (10, 12, 11, (10, "done")),
])
def test_fault_plan(n, crash, error, plan):
    assert fault_plan(n, SimConfig(fail_after_tokens=crash, error_after_tokens=error)) == plan


def test_tokens_follow_the_grid_after_ttft():
    loop, engine, runner, _ = make(token_rate=100, ttft=0.05)
    g, sink = gen(engine, runner, loop, n=5, prefill=0.05)
    t0 = loop.now
    assert g.start()
    loop.run()
    times = [t - t0 for _, t in sink.tokens]
    assert [i for i, _ in sink.tokens] == [0, 1, 2, 3, 4]
    assert times == pytest.approx([0.05, 0.06, 0.07, 0.08, 0.09])
    assert sink.ended == ("done", pytest.approx(t0 + 0.09))
    assert runner.busy == 0 and runner.refs == 0 and runner.decoding == 0


def test_non_stream_uses_one_timer_and_ends_at_the_same_time():
    loop, engine, runner, _ = make(token_rate=100)
    g, sink = gen(engine, runner, loop, n=5, prefill=0.05, stream=False)
    t0 = loop.now
    g.start()
    loop.run()
    assert sink.tokens == []
    assert g.emitted == 5 and sink.ended == ("done", pytest.approx(t0 + 0.09))


def test_as_fast_as_possible_batches_but_still_one_call_per_token():
    loop, engine, runner, _ = make(token_rate=0, ttft=0)
    g, sink = gen(engine, runner, loop, n=100, prefill=0)
    g.start()
    loop.run()
    assert [i for i, _ in sink.tokens] == list(range(100))
    assert sink.ended[0] == "done"


def test_slots_are_fifo_and_bounded():
    loop, engine, runner, _ = make(num_parallel=2, token_rate=100, max_queue=3)
    gens = [gen(engine, runner, loop, n=2, prefill=0.0, name=str(i)) for i in range(6)]
    started = [g.start() for g, _ in gens]
    # Two slots, three waiters, the sixth is over max_queue: 503.
    assert started == [True, True, True, True, True, False]
    assert runner.busy == 2 and engine.waiting == 3 and [g.queued for g, _ in gens[2:5]] == [True] * 3
    loop.run()
    first = {s.name: s.tokens[0][1] for _, s in gens[:5]}
    ends = {s.name: s.ended[1] for _, s in gens[:5]}
    assert first["2"] >= ends["0"] and first["3"] >= ends["1"] and first["4"] >= ends["2"]
    assert sorted(first, key=lambda k: (first[k], int(k))) == ["0", "1", "2", "3", "4"]
    assert runner.busy == 0 and engine.waiting == 0 and runner.refs == 0


def test_max_queue_zero_rejects_as_soon_as_slots_are_busy():
    loop, engine, runner, _ = make(num_parallel=1, max_queue=0)
    a, _ = gen(engine, runner, loop)
    b, _ = gen(engine, runner, loop)
    assert a.start() and not b.start()


def test_cancel_while_queued_and_while_decoding():
    loop, engine, runner, _ = make(num_parallel=1, token_rate=100)
    a, sa = gen(engine, runner, loop, n=50, prefill=0.0)
    b, sb = gen(engine, runner, loop, n=50, prefill=0.0)
    c, sc = gen(engine, runner, loop, n=2, prefill=0.0)
    for g in (a, b, c):
        assert g.start()
    b.cancel()                      # queued: leaves the queue
    assert engine.waiting == 1 and b not in runner.waiters
    loop.run(until=loop.now + 0.1)
    a.cancel()                      # decoding: frees the slot for c
    assert runner.decoding == 0
    loop.run()
    assert sb.tokens == [] and sb.ended is None
    assert sa.ended is None and 5 <= len(sa.tokens) < 50
    assert sc.ended[0] == "done"
    assert runner.busy == 0 and runner.refs == 0 and engine.waiting == 0
    a.cancel()                      # idempotent
    assert runner.busy == 0


def test_cancel_between_release_and_grant_returns_the_slot():
    loop, engine, runner, _ = make(num_parallel=1, token_rate=0, ttft=0)
    a, _ = gen(engine, runner, loop, n=1, prefill=0.0)
    b, sb = gen(engine, runner, loop, n=1, prefill=0.0)
    a.start()
    b.start()
    loop.step()                     # a's only token and its end: b's grant is scheduled
    assert runner.waiters == type(runner.waiters)() and b.queued
    b.cancel()
    loop.run()
    assert sb.tokens == [] and runner.busy == 0 and runner.refs == 0


def test_backpressure_pauses_and_resume_continues_without_a_burst():
    loop, engine, runner, _ = make(token_rate=100)
    g, sink = gen(engine, runner, loop, n=10, prefill=0.0)
    sink.pause_after = 3
    g.start()
    loop.run()
    assert len(sink.tokens) == 3 and sink.ended is None
    loop.now += 1.0                 # a long stall in the reader
    sink.writable = True
    sink.pause_after = None
    g.resume()
    loop.run()
    times = [t for _, t in sink.tokens[3:]]
    assert len(sink.tokens) == 10 and sink.ended[0] == "done"
    # After the stall tokens come at the normal rate again, not all at once.
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps == pytest.approx([0.01] * len(gaps))


def test_a_late_loop_resyncs_the_grid():
    loop, engine, runner, _ = make(token_rate=100)
    g, sink = gen(engine, runner, loop, n=6, prefill=0.0)
    g.start()
    loop.run(until=loop.now + 0.015)   # tokens 0 and 1
    loop.now += 5 * RESYNC_S           # the loop was blocked
    loop.run()
    times = [t for _, t in sink.tokens[2:]]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps == pytest.approx([0.01] * len(gaps))


def test_faults_end_the_stream_early():
    loop, engine, runner, _ = make(token_rate=0, fail_after_tokens=3)
    g, sink = gen(engine, runner, loop, n=10, prefill=0.0)
    g.start()
    loop.run()
    assert len(sink.tokens) == 3 and sink.ended[0] == "crash" and runner.busy == 0


def test_slowdown_follows_the_number_decoding():
    loop, engine, runner, _ = make(token_rate=100, num_parallel=4, parallel_slowdown=0.5)
    a, sa = gen(engine, runner, loop, n=3, prefill=0.0)
    b, sb = gen(engine, runner, loop, n=3, prefill=0.0)
    a.start()
    b.start()
    loop.run()
    # a's first gap was set before b decoded; after that both decode: 1.5 x.
    gaps_a = [y - x for (_, x), (_, y) in zip(sa.tokens, sa.tokens[1:])]
    gaps_b = [y - x for (_, x), (_, y) in zip(sb.tokens, sb.tokens[1:])]
    assert gaps_a == pytest.approx([0.01, 0.015])
    assert gaps_b == pytest.approx([0.015, 0.015])


def test_runner_keep_alive_and_unload():
    config = SimConfig()
    loop = FakeLoop()
    wall = [1000.0]
    engine = Engine(config, loop, lambda: wall[0])
    cat = Catalogue.from_models(config.models, 0)
    entry = cat.lookup(parse_name("llama3.2"))
    r = engine.runner(entry)
    assert r.parallel == 1 and r.expires_at == 1300.0
    emb = engine.runner(cat.lookup(parse_name("nomic-embed-text")))
    assert emb.parallel == config.embed_parallel
    hold = SlotHold(engine, r, 0.5, lambda h: None)
    hold.start()
    wall[0] = 1100.0
    loop.run()                      # released at wall 1100: expires at 1400
    assert r.expires_at == 1400.0
    wall[0] = 1350.0
    assert {x.model.name.display for x in engine.loaded()} == {"llama3.2:latest"}
    wall[0] = 1500.0
    assert engine.loaded() == []
    r = engine.runner(entry, keep_alive=0)
    hold = SlotHold(engine, r, 0.5, lambda h: None)
    hold.start()
    assert entry.name.key in engine.runners
    loop.run()
    assert entry.name.key not in engine.runners      # keep_alive 0: unloaded when done
    with pytest.raises(RuntimeError):
        engine.release(r)


# --- GPU mode: the scheduler, loads, eviction, sharing (virtual clock) ---------

from olb.sim.engine import REJECTED, Pending, common_prefix, cached_tokens  # noqa: E402
from olb.sim.gpu import GIB, GpuProfile, runner_bytes  # noqa: E402

T0 = 100.0
WALL0 = 1_700_000_000.0


def gpu_engine(gpu="default", **kw):
    config = SimConfig(gpu=gpu, **kw)
    loop = FakeLoop()
    engine = Engine(config, loop, lambda: WALL0 + loop.now, clock=lambda: loop.now)
    cat = Catalogue.from_models(config.models, WALL0)
    return loop, engine, cat


def model(cat, name):
    return cat.lookup(parse_name(name))


class Got:
    """A `then` for Engine.acquire: records (runner, time) per call."""

    def __init__(self, loop):
        self.loop = loop
        self.calls = []

    def __call__(self, runner):
        self.calls.append((runner, self.loop.now))

    @property
    def at(self):
        return self.calls[0][1]


def load_s(cat, name, profile=GpuProfile()):
    return profile.load_seconds(model(cat, name).spec)


def test_cold_model_loads_then_takes_the_fast_path():
    loop, engine, cat = gpu_engine()
    m = model(cat, "llama3.1:8b")
    first = Got(loop)
    p = engine.acquire(m, None, first)
    assert isinstance(p, Pending) and first.calls == []
    assert engine.runners[m.name.key].state == "loading"
    loop.run(until=T0 + 10)
    # ~3 s for an 8B q4 (0.5 s + 4.92 GB / 1.75 GB/s; olb/sim/gpu.py's load model).
    assert first.at == pytest.approx(T0 + load_s(cat, "llama3.1:8b")) and 3.0 < first.at - T0 < 3.5
    runner = first.calls[0][0]
    assert runner.state == "ready" and engine.loads == 1
    again = Got(loop)
    assert engine.acquire(m, None, again) is None       # fast path: at once, no queue
    assert again.calls == [(runner, loop.now)] and engine.loads == 1


def test_one_load_at_a_time_and_strict_fifo():
    loop, engine, cat = gpu_engine()
    a, b = Got(loop), Got(loop)
    engine.acquire(model(cat, "llama3.1:8b"), None, a)
    engine.acquire(model(cat, "qwen2.5:7b"), None, b)
    assert len(engine.pending) == 1                     # b waits behind a's load
    loop.run(until=T0 + 20)
    la, lb = load_s(cat, "llama3.1:8b"), load_s(cat, "qwen2.5:7b")
    assert a.at == pytest.approx(T0 + la)
    assert b.at == pytest.approx(T0 + la + lb)
    assert engine.loads == 2


def test_loaded_model_is_served_while_another_loads():
    loop, engine, cat = gpu_engine()
    engine.preload([model(cat, "llama3.2")])
    slow, fast = Got(loop), Got(loop)
    engine.acquire(model(cat, "llama3.1:70b"), None, slow)
    assert engine.acquire(model(cat, "llama3.2"), None, fast) is None
    assert fast.at == T0 and slow.calls == []
    loop.run(until=T0 + 60)
    # ~25 s for a 70B q4 from NVMe (olb/sim/gpu.py's load model).
    assert 24 < slow.at - T0 < 26


def test_pending_queue_full_is_rejected_and_cancelled_requests_hold_their_place():
    loop, engine, cat = gpu_engine(max_queue=1)
    loading = Got(loop)
    engine.acquire(model(cat, "llama3.1:8b"), None, loading)     # being served (not queued)
    queued = Got(loop)
    p = engine.acquire(model(cat, "qwen2.5:7b"), None, queued)   # the one queued place
    assert engine.acquire(model(cat, "mistral"), None, Got(loop)) is REJECTED
    p.cancel()
    # Like Ollama's channel, a cancelled request keeps its place until dequeued.
    assert engine.acquire(model(cat, "mistral"), None, Got(loop)) is REJECTED
    loop.run(until=T0 + 30)
    assert loading.calls and queued.calls == [] and engine.loads == 1
    assert engine.pending == type(engine.pending)()


def test_max_loaded_evicts_by_keep_alive_then_model_path():
    loop, engine, cat = gpu_engine(max_loaded_models=3)
    names = ["llama3.1:8b", "qwen2.5:7b", "mistral"]
    for name, ka in zip(names, (600.0, 300.0, 300.0)):
        engine.acquire(model(cat, name), ka, Got(loop))
    loop.run(until=T0 + 20)
    assert len(engine.runners) == 3
    # Shortest keep-alive first; qwen and mistral tie, the model path decides.
    tied = sorted((model(cat, n) for n in names[1:]), key=lambda e: e.blob_path)
    expected = tied[0]
    t = loop.now
    got = Got(loop)
    engine.acquire(model(cat, "llama3.2"), None, got)
    assert expected.name.key not in engine.runners       # idle victim: unloaded at once
    loop.run(until=t + 20)
    profile = GpuProfile()
    assert got.at == pytest.approx(t + profile.unload_s + load_s(cat, "llama3.2"))
    assert expected.name.key not in engine.runners and len(engine.runners) == 3
    assert engine.evictions == 1 and engine.unloads == 1


def test_vram_that_does_not_fit_evicts():
    # 10 GiB: an 8B (5.7 GB with KV) and a 7B (5.2 GB) do not fit together
    # (server/sched.go, load: the new one must fit in 80 % of the free memory).
    loop, engine, cat = gpu_engine(GpuProfile(vram=10 * GIB))
    engine.acquire(model(cat, "llama3.1:8b"), None, Got(loop))
    loop.run(until=T0 + 5)
    used = engine.gpu.used
    assert used == runner_bytes(model(cat, "llama3.1:8b").spec, 4096, 1)
    engine.acquire(model(cat, "qwen2.5:7b"), None, Got(loop))
    loop.run(until=T0 + 20)
    assert list(engine.runners) == [model(cat, "qwen2.5:7b").name.key] and engine.evictions == 1
    # A small one fits beside it: no eviction.
    engine.acquire(model(cat, "llama3.2"), None, Got(loop))
    loop.run(until=T0 + 30)
    assert len(engine.runners) == 2 and engine.evictions == 1
    assert engine.gpu.used == sum(r.size_vram for r in engine.runners.values())


def test_busy_victim_is_waited_for():
    loop, engine, cat = gpu_engine(max_loaded_models=1)
    engine.preload([model(cat, "llama3.2")])
    runner = engine.runners[model(cat, "llama3.2").name.key]
    hold = SlotHold(engine, runner, 10.0, lambda h: None)      # busy for 10 s
    hold.start()
    got = Got(loop)
    engine.acquire(model(cat, "mistral"), None, got)
    # The victim stays loaded until it unloads: getRunner's fast path still
    # hands it to a request for its model (sched.go getRunner).
    back = Got(loop)
    assert engine.acquire(model(cat, "llama3.2"), None, back) is None
    assert back.calls == [(runner, T0)]
    loop.run(until=T0 + 9)
    assert got.calls == [] and runner.expire_reason == "evict" and engine.unloads == 0
    loop.run(until=T0 + 60)
    assert hold.t_end == pytest.approx(T0 + 10)
    mistral = T0 + 10 + GpuProfile().unload_s + load_s(cat, "mistral")
    assert got.at == pytest.approx(mistral)
    assert engine.evictions == 1 and engine.loads == 1


def test_keep_alive_timer_and_zero_unload():
    loop, engine, cat = gpu_engine(keep_alive=60.0)
    m = model(cat, "llama3.2")
    engine.acquire(m, None, Got(loop))
    loop.run(until=T0 + 5)
    r = engine.runners[m.name.key]
    assert r.expires_at == pytest.approx(WALL0 + T0 + load_s(cat, "llama3.2") + 60.0)
    loop.run(until=T0 + 70)
    assert m.name.key not in engine.runners and engine.unloads == 1
    assert engine.gpu.used == 0
    # keep_alive 0 on the request: unloaded as soon as it is done with it.
    engine.acquire(m, 0.0, Got(loop))
    loop.run(until=T0 + 80)
    assert m.name.key not in engine.runners and engine.unloads == 2


def test_other_num_ctx_reloads():
    loop, engine, cat = gpu_engine()
    m = model(cat, "llama3.2")
    engine.acquire(m, None, Got(loop))
    loop.run(until=T0 + 5)
    got = Got(loop)
    p = engine.acquire(m, None, got, {"num_ctx": 8192})
    assert isinstance(p, Pending)
    loop.run(until=T0 + 20)
    assert got.calls[0][0].num_ctx == 8192 and engine.loads == 2 and engine.unloads == 1
    assert engine.reloads == 1 and engine.evictions == 0


def test_spill_to_cpu_when_alone_too_big():
    loop, engine, cat = gpu_engine("rtx4090")
    m = model(cat, "llama3.1:70b")
    engine.acquire(m, None, Got(loop))
    loop.run(until=T0 + 60)
    r = engine.runners[m.name.key]
    assert 0 < r.size_vram < r.size and r.size_vram < engine.gpu.total
    assert r.eval_rate < 0.5 * engine.gpu.profile.eval_rate(m.spec)


def _gen(engine, runner, loop, n, stream=True, tokens=600, text=None, name=""):
    sink = Sink(loop, name)
    g = Generation(engine, runner, sink, n, 0.0, stream)
    g.prompt_tokens = tokens
    g.prompt_text = text
    return g, sink


def test_prefill_is_shared_and_decode_slows_with_the_batch():
    loop, engine, cat = gpu_engine(num_parallel=4)
    engine.preload([model(cat, "llama3.1:8b")])
    r = engine.runners[model(cat, "llama3.1:8b").name.key]
    assert r.eval_rate == pytest.approx(130.0) and r.prompt_rate == pytest.approx(6000.0)
    gens = [_gen(engine, r, loop, 20, text=f"prompt {i}") for i in range(4)]
    for g, _ in gens:
        g.start()
    loop.run()
    # Four 600-token prefills share 6000 t/s: all first tokens at 0.4 s.
    firsts = [s.tokens[0][1] - T0 for _, s in gens]
    assert firsts == pytest.approx([0.4] * 4)
    # Four decode together: each at 130 / (1 + 0.15 * 3) tokens/s.  (The
    # interval is read per token: the first to start saw a batch of one.)
    for _, sink in gens:
        gaps = [b[1] - a[1] for a, b in zip(sink.tokens, sink.tokens[1:])]
        assert gaps[1:] == pytest.approx([1.45 / 130] * 18)
    assert engine.gpu.step == 0 and engine.gpu.decoding == {}


def test_two_models_on_one_gpu_take_turns():
    loop, engine, cat = gpu_engine()
    engine.preload([model(cat, "llama3.1:8b"), model(cat, "qwen2.5:7b")])
    ra, rb = (engine.runners[model(cat, n).name.key] for n in ("llama3.1:8b", "qwen2.5:7b"))
    (a, sa), (b, sb) = _gen(engine, ra, loop, 10), _gen(engine, rb, loop, 10)
    a.start()
    b.start()
    loop.run(until=T0 + 0.3)
    assert engine.gpu.step == pytest.approx(1 / ra.eval_rate + 1 / rb.eval_rate)


def test_non_streamed_end_follows_the_changing_batch():
    loop, engine, cat = gpu_engine(num_parallel=2)
    engine.preload([model(cat, "llama3.1:8b")])
    r = engine.runners[model(cat, "llama3.1:8b").name.key]
    a, sa = _gen(engine, r, loop, 101, stream=False, tokens=1)
    a.start()
    loop.run(until=T0 + 0.001)
    t_first = a.t_first
    # 50 tokens alone, then a second request joins for the rest of a's run.
    loop.run(until=t_first + 50 / 130)
    b, sb = _gen(engine, r, loop, 10_000, stream=False, tokens=1)
    b.start()
    loop.run(until=T0 + 5)
    joined = b.t_first
    alone = (joined - t_first) * 130
    expected = joined + (100 - alone) * 1.15 / 130
    assert sa.ended == ("done", pytest.approx(expected, abs=1e-6))
    b.cancel()


def test_prefix_cache_shortens_prefill():
    loop, engine, cat = gpu_engine()
    engine.preload([model(cat, "llama3.1:8b")])
    r = engine.runners[model(cat, "llama3.1:8b").name.key]
    text = "user\n" + "x" * 2400 + "\n"
    a, _ = _gen(engine, r, loop, 5, tokens=600, text=text)
    a.cache_tail = lambda n: f"assistant\nreply of {n}\n"
    a.start()
    loop.run()
    assert a.cached == 0 and a.t_first - a.t_granted == pytest.approx(600 / 6000)
    follow = text + "assistant\nreply of 5\n" + "user\nmore\n"
    b, _ = _gen(engine, r, loop, 5, tokens=610, text=follow)
    b.start()
    loop.run()
    assert b.cached == 610 * (len(text) + len("assistant\nreply of 5\n")) // len(follow)
    assert b.t_first - b.t_granted == pytest.approx((610 - b.cached) / 6000)
    same, _ = _gen(engine, r, loop, 5, tokens=610, text=follow)
    same.start()
    loop.run()
    assert same.cached == 609                       # one token is always evaluated


def test_prefix_cache_picks_the_matching_slot():
    loop, engine, cat = gpu_engine(num_parallel=2)
    engine.preload([model(cat, "llama3.1:8b")])
    r = engine.runners[model(cat, "llama3.1:8b").name.key]
    for text in ("alpha " * 100, "beta " * 100):
        g, _ = _gen(engine, r, loop, 1, tokens=150, text=text)
        g.start()
        loop.run()
    g, _ = _gen(engine, r, loop, 1, tokens=160, text="beta " * 100 + "more")
    g.start()
    loop.run()
    assert g.cached > 140


def test_common_prefix_and_cached_tokens():
    assert common_prefix("", "abc") == 0
    assert common_prefix("abcdef", "abcxyz") == 3
    assert common_prefix("abc", "abcdef") == 3
    assert common_prefix("x" * 10_000 + "a", "x" * 10_000 + "b") == 10_000
    assert cached_tokens(100, "a" * 400, 400) == 99
    assert cached_tokens(100, "a" * 400, 200) == 50
    assert cached_tokens(1, "a", 1) == 0


def test_utilisation_window():
    loop, engine, cat = gpu_engine()
    engine.preload([model(cat, "llama3.1:8b")])
    r = engine.runners[model(cat, "llama3.1:8b").name.key]
    assert engine.gpu.utilisation() == 0
    g, _ = _gen(engine, r, loop, 390, tokens=1)       # ~3 s of decoding
    g.start()
    loop.run(until=T0 + 1.5)
    assert engine.gpu.utilisation() == 100
    loop.run(until=T0 + 3.5)                          # ended at ~3.0 s
    assert 40 <= engine.gpu.utilisation() <= 60
    loop.run(until=T0 + 5)
    assert engine.gpu.utilisation() == 0


def test_time_scale_divides_every_timer():
    loop, engine, cat = gpu_engine(time_scale=10)
    m = model(cat, "llama3.1:8b")
    got = Got(loop)
    engine.acquire(m, None, got)
    loop.run(until=T0 + 1)
    assert got.at == pytest.approx(T0 + load_s(cat, "llama3.1:8b") / 10)
    r = got.calls[0][0]
    assert r.expires_at == pytest.approx(WALL0 + got.at + 30.0)    # 5 min / 10
    g, sink = _gen(engine, r, loop, 3, tokens=600)
    t = loop.now
    g.start()
    loop.run(until=T0 + 2)
    times = [x - t for _, x in sink.tokens]
    assert times == pytest.approx([0.01, 0.01 + 1 / 1300, 0.01 + 2 / 1300])


def test_legacy_time_scale():
    loop, engine, runner, _ = make(token_rate=100, ttft=0.05, time_scale=5)
    g, sink = gen(engine, runner, loop, n=3, prefill=0.05)
    t0 = loop.now
    g.start()
    loop.run()
    assert [t - t0 for _, t in sink.tokens] == pytest.approx([0.01, 0.012, 0.014])

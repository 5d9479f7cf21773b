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
    # spec §6.3: r(n) = r1 / (1 + alpha (n - 1)).
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

"""Per-instance scheduling: loaded models, parallel slots, the FIFO wait, timing.

Rules for this module: it decides *when* things happen and never formats a
byte.  Output goes through a sink (api.py) with four calls: `token(i)`,
`finish(gen)`, `fail(gen)` (in-band error), `crash()` (drop the connection),
and one property, `writable` (write flow control).  Issue 3's simulated GPU
belongs here too: model loads and eviction become steps of `Engine.runner`
and `_grant`, VRAM a field of Runner -- keep the sink contract unchanged.

Theory of operation (spec §4.2, §7.3):

    submit --(slot free, nobody waiting)--> granted --prefill--> first token
       |                                      ^                   |
       +--(all slots busy)--> runner.waiters -+ (FIFO)            v
       +--(engine.waiting >= max_queue)--> rejected (503)   token every
                                                             interval --> done

* A Runner is one loaded model with `parallel` slots (SlotGuard-style:
  `release` is called exactly once per granted job, on finish, fault or
  cancel).  It is created ("loaded") on first use, instantly for now.
* Waiters queue per runner, strictly FIFO.  `max_queue` bounds the waiters of
  the whole instance.  Deviation from Ollama, on purpose: real Ollama's slot
  semaphore is unbounded (issue #7758) and its 503 comes from the scheduler's
  pending channel while a model loads; without simulated loads that channel
  never fills, so the bound is applied to the slot wait instead, which gives
  a balancer the same signal (503 "server busy") at a controllable depth.
* Timing: the first token comes `prefill` seconds after the grant, then one
  token per `decode_interval` (re-evaluated per token, so the parallel
  slowdown follows the number of requests decoding).  Token times are kept on
  an ideal grid (t_first + k * interval), not chained from the actual callback
  time: the loop's timers have millisecond granularity and chaining would
  drift the rate down.  If the loop falls more than RESYNC_S behind (overload)
  the grid restarts at now instead of bursting to catch up.
* Backpressure: after each token, if the sink is not writable the stream
  stops scheduling; the sink calls `resume()` when it drains.  Like a real
  runner whose callback blocks on a full channel, generation pauses.
"""

from __future__ import annotations

import time
from collections import deque

from olb.sim.catalogue import Installed, ModelSpec
from olb.sim.config import SimConfig

# Fall this far behind the token grid and the grid restarts at "now".
RESYNC_S = 0.05
# time.Duration(math.MaxInt64) in seconds: a negative keep_alive ("forever")
# expires ~292 years out (spec §2.5: expires_at in 2318).
FOREVER_S = 9223372036.854775807
# With token_rate 0 ("as fast as possible"), tokens per loop callback: enough
# to amortise the callback, small enough to let other connections run.
FAST_BATCH = 32


def decode_interval(token_rate: float, speed: float, decoding: int, slowdown: float) -> float:
    """Seconds between tokens of one request while `decoding` requests decode
    on the same model: 1 / r(n), r(n) = r1 / (1 + alpha (n - 1)) (spec §6.3).
    0 means as fast as possible."""
    if token_rate <= 0 or speed <= 0:
        return 0.0
    return (1.0 + slowdown * max(0, decoding - 1)) / (token_rate * speed)


def prefill_seconds(ttft: float, prompt_tokens: int, prompt_rate: float) -> float:
    """Time from slot grant to first token: fixed ttft plus prompt processing."""
    if prompt_rate > 0:
        return ttft + prompt_tokens / prompt_rate
    return ttft


def fault_plan(n_tokens: int, config: SimConfig) -> tuple:
    """(tokens to emit, how the stream ends): "done", "error" or "crash".

    The earliest configured fault wins; a fault at or past the natural end
    never fires (the stream completes first)."""
    end, limit = "done", n_tokens
    for kind, at in (("crash", config.fail_after_tokens), ("error", config.error_after_tokens)):
        if at is not None and at < limit:
            end, limit = kind, at
    return limit, end


class Runner:
    """One loaded model: its slots, FIFO waiters and keep-alive."""

    __slots__ = ("model", "parallel", "busy", "waiters", "decoding", "refs",
                 "keep_alive", "expires_at", "num_ctx")

    def __init__(self, model: Installed, parallel: int, keep_alive: float, num_ctx: int):
        self.model = model
        self.parallel = parallel
        self.busy = 0
        self.waiters: deque = deque()
        self.decoding = 0
        self.refs = 0                # submitted and not yet released
        self.keep_alive = keep_alive
        self.expires_at = 0.0        # wall seconds; 0 = in use / not set
        self.num_ctx = num_ctx

    @property
    def spec(self) -> ModelSpec:
        return self.model.spec


class Engine:
    """The scheduler of one instance."""

    def __init__(self, config: SimConfig, loop, wall_clock):
        self.config = config
        self.loop = loop
        self.wall = wall_clock            # seconds since the epoch (Clock.now)
        self.runners: dict = {}           # model key -> Runner
        self.waiting = 0                  # jobs queued for a slot, all runners

    # --- loaded models ------------------------------------------------------

    def runner(self, model: Installed, keep_alive: float | None = None) -> Runner:
        """The model's runner, loading it if needed.  `keep_alive` (seconds)
        replaces the runner's duration when the request set one (spec §4.3)."""
        key = model.name.key
        r = self.runners.get(key)
        if r is None:
            parallel = self.config.embed_parallel if model.spec.embedding_only else self.config.num_parallel
            r = Runner(model, parallel, self.config.keep_alive, self.config.num_ctx)
            self.runners[key] = r
        if keep_alive is not None:
            r.keep_alive = keep_alive
        if r.refs == 0:
            r.expires_at = self.wall() + min(r.keep_alive, FOREVER_S)
        return r

    def unload(self, key: str) -> None:
        """expireRunner: gone now if idle, else once its requests finish."""
        r = self.runners.get(key)
        if r is None:
            return
        r.keep_alive = 0.0
        if r.refs == 0:
            del self.runners[key]

    def loaded(self) -> list:
        """Runners still loaded (idle ones past their keep-alive are dropped)."""
        now = self.wall()
        for key, r in list(self.runners.items()):
            if r.refs == 0 and r.expires_at <= now:
                del self.runners[key]
        return list(self.runners.values())

    # --- slots --------------------------------------------------------------

    def submit(self, runner: Runner, job) -> bool:
        """Ask for a slot.  False: the queue is full (the caller answers 503)."""
        if runner.busy < runner.parallel and not runner.waiters:
            runner.busy += 1
            runner.refs += 1
            job.granted()
            return True
        if self.waiting >= self.config.max_queue:
            return False
        runner.refs += 1
        runner.waiters.append(job)
        self.waiting += 1
        return True

    def withdraw(self, runner: Runner, job) -> None:
        """A queued job gave up (its client went away)."""
        runner.waiters.remove(job)
        self.waiting -= 1
        self._unref(runner)

    def release(self, runner: Runner) -> None:
        """A granted job is done with its slot: hand it to the next waiter."""
        if runner.busy <= 0:
            raise RuntimeError("release of an idle slot")
        if runner.waiters:
            job = runner.waiters.popleft()
            self.waiting -= 1
            # Granted from the loop, not from inside the releasing job's
            # callback: keeps stacks flat and orders it after that job's output.
            self.loop.call_soon(job.granted)
        else:
            runner.busy -= 1
        self._unref(runner)

    def _unref(self, runner: Runner) -> None:
        runner.refs -= 1
        if runner.refs == 0:
            if runner.keep_alive <= 0:
                self.runners.pop(runner.model.name.key, None)
            else:
                runner.expires_at = self.wall() + min(runner.keep_alive, FOREVER_S)


class Generation:
    """One inference request: slot wait -> prefill -> tokens -> end.

    Reported times (t_submit, t_granted, t_first, t_end) are
    time.perf_counter() seconds: uvloop's loop.time() has millisecond
    resolution, fine for scheduling but too coarse for the ns metrics.
    """

    __slots__ = ("engine", "runner", "sink", "n_tokens", "limit", "end", "prefill",
                 "stream", "emitted", "t_submit", "t_granted", "t_first", "t_end",
                 "_state", "_timer", "_next", "_paused", "_base", "_alpha")

    # _state: "new" -> "queued" -> "prefill" -> "decode" -> "ended" | "cancelled"

    def __init__(self, engine: Engine, runner: Runner, sink, n_tokens: int, prefill: float,
                 stream: bool):
        self.engine = engine
        self.runner = runner
        self.sink = sink
        self.n_tokens = n_tokens
        self.limit, self.end = fault_plan(n_tokens, engine.config)
        self.prefill = prefill
        self.stream = stream
        self.emitted = 0
        self.t_submit = self.t_granted = self.t_first = self.t_end = 0.0
        self._state = "new"
        self._timer = None
        self._next = 0.0
        self._paused = False
        # decode_interval() unrolled for the per-token path: base interval
        # and slowdown, the number decoding read at each token.
        cfg = engine.config
        self._base = decode_interval(cfg.token_rate, runner.spec.speed, 1, 0.0)
        self._alpha = cfg.parallel_slowdown

    @property
    def queued(self) -> bool:
        return self._state == "queued"

    def start(self) -> bool:
        """Submit for a slot; False if the instance's queue is full."""
        self.t_submit = time.perf_counter()
        self._state = "queued"
        if not self.engine.submit(self.runner, self):
            self._state = "new"
            return False
        return True

    def granted(self) -> None:
        """Called by the engine when a slot is ours."""
        if self._state != "queued":
            return
        self._state = "prefill"
        self.t_granted = time.perf_counter()
        self._timer = self.engine.loop.call_later(self.prefill, self._first)

    def _interval(self) -> float:
        if self._alpha:
            return self._base * (1.0 + self._alpha * max(0, self.runner.decoding - 1))
        return self._base

    def _first(self) -> None:
        self._timer = None
        self._state = "decode"
        self.runner.decoding += 1
        self.t_first = time.perf_counter()
        self._next = self.engine.loop.time()
        if not self.stream:
            # Nobody sees tokens one by one: jump to the end in one timer.
            self.emitted = self.limit
            at = self._next + max(0, self.limit - 1) * self._interval()
            self._timer = self.engine.loop.call_at(at, self._finish)
            return
        self._tick()

    def _tick(self) -> None:
        self._timer = None
        sink = self.sink
        limit = self.limit
        i = self.emitted
        interval = self._interval() if self._alpha else self._base
        if interval:
            sink.token(i)
            i += 1
        else:
            batch = FAST_BATCH
            while i < limit and batch:
                sink.token(i)
                i += 1
                batch -= 1
                if not sink.writable:
                    break
        self.emitted = i
        if i >= limit:
            self._finish()
            return
        if not sink.writable:
            self._paused = True
            return
        loop = self.engine.loop
        if not interval:
            self._timer = loop.call_soon(self._tick)
            return
        # _next is the grid time of the token just written; a tick that ran
        # far behind its grid time (overloaded loop) restarts the grid.
        now = loop.time()
        if now - self._next > RESYNC_S:
            self._next = now
        nxt = self._next + interval
        self._next = nxt
        self._timer = loop.call_at(nxt, self._tick)

    def resume(self) -> None:
        """The sink drained: continue where the stream paused."""
        if not self._paused or self._state != "decode":
            return
        self._paused = False
        loop = self.engine.loop
        # The next token is due one interval after the last one; if the pause
        # outlasted that, it goes now -- time spent paused is not owed back as
        # a burst of tokens.
        due = self._next + self._interval()
        now = loop.time()
        if due < now:
            due = now
        self._next = due
        self._timer = loop.call_at(due, self._tick)

    def _finish(self) -> None:
        self._timer = None
        self._state = "ended"
        self.t_end = time.perf_counter()
        self.runner.decoding -= 1
        self.engine.release(self.runner)
        if self.end == "done":
            self.sink.finish(self)
        elif self.end == "error":
            self.sink.fail(self)
        else:
            self.sink.crash()

    def cancel(self) -> None:
        """The client went away: stop, and give the slot or queue place back."""
        state = self._state
        if state in ("ended", "cancelled", "new"):
            return
        self._state = "cancelled"
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if state == "queued":
            if self in self.runner.waiters:
                self.engine.withdraw(self.runner, self)
            else:
                # Popped by release() with granted() still scheduled: the slot
                # is ours already, give it straight back.
                self.engine.release(self.runner)
            return
        if state == "decode":
            self.runner.decoding -= 1
        self.engine.release(self.runner)


class SlotHold:
    """A request that needs a slot for a fixed time (embeddings)."""

    __slots__ = ("engine", "runner", "duration", "on_done", "t_submit", "t_granted",
                 "t_end", "_state", "_timer")

    def __init__(self, engine: Engine, runner: Runner, duration: float, on_done):
        self.engine = engine
        self.runner = runner
        self.duration = duration
        self.on_done = on_done
        self.t_submit = self.t_granted = self.t_end = 0.0
        self._state = "new"
        self._timer = None

    def start(self) -> bool:
        self.t_submit = time.perf_counter()
        self._state = "queued"
        if not self.engine.submit(self.runner, self):
            self._state = "new"
            return False
        return True

    def granted(self) -> None:
        if self._state != "queued":
            return
        self._state = "running"
        self.t_granted = time.perf_counter()
        self._timer = self.engine.loop.call_later(self.duration, self._done)

    def _done(self) -> None:
        self._timer = None
        self._state = "ended"
        self.t_end = time.perf_counter()
        self.engine.release(self.runner)
        self.on_done(self)

    def cancel(self) -> None:
        state = self._state
        if state in ("ended", "cancelled", "new"):
            return
        self._state = "cancelled"
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if state == "queued" and self in self.runner.waiters:
            self.engine.withdraw(self.runner, self)
        else:
            self.engine.release(self.runner)

"""Per-instance scheduling: loaded models, loads and evictions, slots, timing.

Rules for this module: it decides *when* things happen and never formats a
byte.  Output goes through a sink (api.py) with four calls: `token(i)`,
`finish(gen)`, `fail(gen)` (in-band error), `crash()` (drop the connection),
and one property, `writable` (write flow control).  The GPU's physics
(sizes, speeds, sharing, utilisation) live in gpu.py; this module arms the
timers.

Two modes, chosen by SimConfig.gpu:

* No GPU (the default, the simulator's first mode): a model "loads" instantly
  on first use, nothing is ever evicted, `max_queue` bounds the slot wait
  (see below), every request decodes at `token_rate`.
* A GPU profile: Ollama's scheduler (server/sched.go) in front of the slots.

Theory of operation, GPU mode (server/sched.go at HEAD: getRunner, processPending, load):

    acquire --(loaded, ready, !needs_reload)------------------> then(runner)  [getRunner fast path]
       |
       +--(pending full)--> REJECTED (503 ErrMaxQueue)
       +--> pending FIFO --> the scheduler (processPending), ONE request at a time:
              loaded & !needs_reload       -> then(runner), next       [useLoadedRunner]
              loaded, needs_reload         -> expire it (reload), wait
              len(loaded) >= max_loaded    -> expire a victim, wait    [findRunnerToUnload]
              others resident, no room     -> expire a victim, wait    [load's pre-flight check]
              else                         -> load (fixed + size/disk), then(runner), next
            expire = keep_alive 0, timer stopped; unloaded now if idle, else
            when its last request ends (processCompleted).  wait = until ANY
            unload has recovered its VRAM (unloadedCh); then re-evaluate
            from the top.

A runner chosen for eviction stays in `runners` until it has drained and
unloaded, and the fast path only asks `runners` and needs_reload: new
requests for the victim's model keep attaching to it, and one that carries
keep_alive sets its duration back from 0 -- then it does not unload when it
drains, it gets an idle timer, and the scheduler (and everything pending
behind it) waits for some other unload.  That stall is Ollama's, on purpose.

    then(runner) --> submit: slot free -> granted, else runner.waiters (FIFO,
    unbounded as Ollama's semaphore) --> prefill (shared GPU prompt rate,
    minus the slot's cached prefix) --> first token --> one token per decode
    round (gpu.step) --> done --> release slot; last ref -> keep-alive timer.

* The pending queue holds requests not yet taken by the scheduler, like
  Ollama's buffered channel: `max_queue` of them, the one being served not
  counted.  A request whose client left stays queued until the scheduler
  reaches it and skips it (Ollama checks ctx.Err() at dequeue).  Once taken,
  it is not checked again while the scheduler evicts for it; a client that
  leaves during its load aborts the load (llama-server's WaitUntilRunning
  returns on ctx.Done: no runner, the scheduler moves on).
* Victims (sched.go findRunnerToUnload, ByDurationAndName): loaded runners
  sorted by keep-alive (forever last), then model blob path; the first idle
  one, else the first, waited for.
* needs_reload (sched.go needsReload): the request's runner options
  (RunnerOptions: num_ctx capped at the training context, num_batch,
  num_gpu unless -1, main_gpu, use_mmap, num_thread) differ from the
  loaded runner's.  The fast path then sends it to the pending queue; the
  scheduler expires the runner and reloads the model once its requests end.
* Keep-alive: a runner whose last request ends gets a timer (`keep_alive`;
  0 = unload at once).  A request's keep_alive replaces the runner's; a new
  load without one uses SimConfig.keep_alive (sched.go useLoadedRunner,
  load).  `expires_at` is the wall time of that timer, or now + keep_alive
  while loading.
* Unloads hold their VRAM for `unload_s` (recovery); an unload that ends
  while the scheduler waits for one wakes it, like Ollama's unloadedCh.

Slots, both modes: a Runner has `parallel` slots (SlotGuard-style: `release`
is called exactly once per granted job, on finish, fault or cancel) and a
FIFO of waiters.  Without a GPU, `max_queue` bounds the waiters of the
whole instance (the only 503 the simulator had before it modelled loads);
with one, the slot wait is unbounded as in Ollama (ollama issue #7758) unless
SimConfig.slot_queue bounds it.

Timing: the first token comes when the prefill ends, then one token per
interval (re-evaluated per token, so slowdowns follow the number decoding).
Token times are kept on an ideal grid (t_first + k * interval), not chained
from the actual callback time: the loop's timers have millisecond
granularity and chaining would drift the rate down.  If the loop falls more
than RESYNC_S behind (overload) the grid restarts at now instead of bursting
to catch up.  A non-streamed job emits nothing per token: it tracks its
progress and re-plans its single end timer whenever the GPU's decode round
changes.  Every duration is simulated; timers get it divided by
`time_scale`, and reported durations are measured and multiplied back.

Backpressure: after each token, if the sink is not writable the stream
stops scheduling; the sink calls `resume()` when it drains.  Like a real
runner whose callback blocks on a full channel, generation pauses.
"""

from __future__ import annotations

import time
from collections import deque
from typing import NamedTuple

from olb.sim.catalogue import Installed, ModelSpec
from olb.sim.config import SimConfig
from olb.sim.gpu import FIT_FRACTION, SPILL_HEADROOM, Gpu, runner_bytes, spilled_rate

# Fall this far behind the token grid and the grid restarts at "now".
RESYNC_S = 0.05
# time.Duration(math.MaxInt64) in seconds: a negative keep_alive ("forever")
# expires ~292 years out (api/types.go, Duration.UnmarshalJSON: expires_at in 2318).
FOREVER_S = 9223372036.854775807
# With token_rate 0 ("as fast as possible"), tokens per loop callback: enough
# to amortise the callback, small enough to let other connections run.
FAST_BATCH = 32
# Ollama's default OLLAMA_MAX_LOADED_MODELS per GPU (server/sched.go, defaultModelsPerGPU).
MODELS_PER_GPU = 3
# A prefill this close to done (in real seconds) counts as done: floating
# point noise in the shared-work accounting.
PREFILL_SLACK_S = 1e-6
# Returned by Engine.acquire when the pending queue is full.
REJECTED = "rejected"
# api.DefaultOptions' runner fields (api/types.go): num_batch 512, num_gpu -1
# ("set dynamically"), num_thread 0 ("let the runtime decide"); main_gpu and
# use_mmap are nil pointers.
DEFAULT_NUM_BATCH = 512
DEFAULT_NUM_GPU = -1
DEFAULT_NUM_THREAD = 0
# Why a runner was expired by the scheduler (counted when it unloads).
EVICT = "evict"
RELOAD = "reload"


class RunnerOptions(NamedTuple):
    """The options a runner is started with (api.Runner, "must be set when the
    model is loaded"); a request whose options differ needs a reload."""

    num_ctx: int
    num_batch: int = DEFAULT_NUM_BATCH
    num_gpu: int = DEFAULT_NUM_GPU
    main_gpu: int | None = None
    use_mmap: bool | None = None
    num_thread: int = DEFAULT_NUM_THREAD


def runner_options(options, default_ctx: int, train_ctx: int) -> RunnerOptions:
    """A request's runner options from its `options` map (already type-checked:
    api.Options.FromMap), over api.DefaultOptions.

    num_ctx: getRunner raises it to at least 4, needsReload/load cap it at
    the training context (effectiveContext).  Numbers are truncated to int
    as FromMap does; null counts as absent."""
    def get(key, default):
        v = options.get(key) if options else None
        return default if v is None else v
    ctx = min(max(4, int(get("num_ctx", default_ctx))), train_ctx)
    main_gpu = get("main_gpu", None)
    return RunnerOptions(ctx, int(get("num_batch", DEFAULT_NUM_BATCH)), int(get("num_gpu", DEFAULT_NUM_GPU)),
                         None if main_gpu is None else int(main_gpu), get("use_mmap", None),
                         int(get("num_thread", DEFAULT_NUM_THREAD)))


def needs_reload(loaded: RunnerOptions, wanted: RunnerOptions) -> bool:
    """needsReload (server/sched.go): reflect.DeepEqual of the runner options,
    except that a request's num_gpu below 0 ("Don't reload runner if
    num_gpu=-1 was provided") matches any.  A nil main_gpu/use_mmap differs
    from a set one, as DeepEqual of nil and non-nil pointers does."""
    return (loaded.num_ctx != wanted.num_ctx or loaded.num_batch != wanted.num_batch
            or (wanted.num_gpu >= 0 and loaded.num_gpu != wanted.num_gpu)
            or loaded.main_gpu != wanted.main_gpu or loaded.use_mmap != wanted.use_mmap
            or loaded.num_thread != wanted.num_thread)


def decode_interval(token_rate: float, speed: float, decoding: int, slowdown: float) -> float:
    """Seconds between tokens of one request while `decoding` requests decode
    on the same model: 1 / r(n), r(n) = r1 / (1 + alpha (n - 1)) (see gpu.py).
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


def common_prefix(a: str, b: str) -> int:
    """Length of the common prefix of a and b (binary search on C-speed
    slice compares: O(n log n) bytes, no per-character Python loop)."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def cached_tokens(prompt_tokens: int, text: str, common: int) -> int:
    """Prompt tokens a slot already holds when `common` leading characters of
    `text` match its cache.  At least one token is always evaluated (llama.cpp
    needs the last position's logits)."""
    if not text or common <= 0 or prompt_tokens <= 1:
        return 0
    return min(prompt_tokens - 1, prompt_tokens * common // len(text))


class Slot:
    """One parallel slot's prompt cache: the text its KV cache holds."""

    __slots__ = ("text", "used", "busy")

    def __init__(self):
        self.text = ""
        self.used = 0.0
        self.busy = False


class Runner:
    """One loaded (or loading) model: its slots, FIFO waiters, keep-alive, memory."""

    __slots__ = ("model", "parallel", "busy", "waiters", "decoding", "refs", "keep_alive",
                 "expires_at", "opts", "num_ctx", "state", "size", "size_vram", "eval_rate",
                 "prompt_rate", "slots", "expire_reason", "timer")

    def __init__(self, model: Installed, parallel: int, keep_alive: float, opts: RunnerOptions):
        self.model = model
        self.parallel = parallel
        self.busy = 0
        self.waiters: deque = deque()
        self.decoding = 0
        self.refs = 0                # submitted and not yet released
        self.keep_alive = keep_alive
        self.expires_at = 0.0        # wall seconds; 0 = in use / not set
        self.opts = opts
        self.num_ctx = opts.num_ctx  # per slot: /api/ps context_length
        self.state = "ready"         # "loading" -> "ready" -> "gone"
        self.size = runner_bytes(model.spec, opts.num_ctx, parallel)
        self.size_vram = self.size
        self.eval_rate = 0.0         # GPU mode: tokens/s alone (spill included)
        self.prompt_rate = 0.0
        self.slots: list[Slot] | None = None  # GPU mode with prefix_cache: [Slot]
        self.expire_reason: str | None = None  # EVICT / RELOAD: expired by the scheduler
        self.timer = None            # keep-alive timer (GPU mode)

    @property
    def spec(self) -> ModelSpec:
        return self.model.spec

    def take_slot(self, text: str, now: float) -> tuple:
        """(slot, common prefix chars): the free slot whose cache shares the
        longest prefix with `text`, the least recently used on a tie (the
        llama.cpp/Ollama runner's cache-slot choice)."""
        best, best_common = None, -1
        slots = self.slots
        assert slots is not None  # prefix_cache mode only
        for slot in slots:
            if slot.busy:
                continue
            common = common_prefix(slot.text, text) if slot.text and text else 0
            if common > best_common or (common == best_common and slot.used < best.used):  # type: ignore[union-attr, attr-defined]  # common >= 0 > -1: best is set first
                best, best_common = slot, common
        assert best is not None  # the caller holds a slot: one is free
        best.busy = True
        best.used = now
        return best, best_common


class Pending:
    """A request waiting for the scheduler (Ollama's LlmRequest)."""

    __slots__ = ("model", "keep_alive", "opts", "then", "cancelled", "engine")

    def __init__(self, model: Installed, keep_alive, opts: RunnerOptions, then, engine=None):
        self.model = model
        self.keep_alive = keep_alive
        self.opts = opts
        self.then = then
        self.cancelled = False
        self.engine = engine

    def cancel(self) -> None:
        """The client went away: skipped when the scheduler reaches it, and
        its load aborted if it is loading now."""
        if self.cancelled:
            return
        self.cancelled = True
        if self.engine is not None:
            self.engine._abandoned(self)


class Engine:
    """The scheduler of one instance.

    Args:
        config: the instance's knobs.
        loop: the event loop (call_soon/call_later/call_at/time).
        wall_clock: seconds since the epoch, for expires_at (Clock.now).
        clock: a high-resolution monotonic clock in seconds for the GPU's
            accounting (time.perf_counter; tests pass a virtual one).
    """

    def __init__(self, config: SimConfig, loop, wall_clock, clock=time.perf_counter):
        self.config = config
        self.loop = loop
        self.wall = wall_clock
        self.clock = clock
        self.scale = config.time_scale
        self.runners: dict = {}           # model key -> Runner
        self.waiting = 0                  # jobs queued for a slot, all runners
        self._event_at = None             # the model instant of the timer running now
        self._last = 0.0                  # now() never goes back
        profile = config.gpu
        # SimConfig resolved a profile name to its GpuProfile.
        self.gpu = Gpu(profile, lambda: self.now() * self.scale) if profile is not None else None  # type: ignore[arg-type]
        self.slot_limit: int | None
        if config.slot_queue is not None:
            self.slot_limit = config.slot_queue
        else:
            self.slot_limit = None if profile is not None else config.max_queue
        self.max_loaded = config.max_loaded_models or MODELS_PER_GPU
        # The scheduler (GPU mode).
        self.pending: deque = deque()     # not yet taken (Ollama's channel buffer)
        self._current: Pending | None = None  # the Pending being served
        self._blocked: str | None = None  # None | "load" | "unload"
        self._loading: tuple | None = None  # (runner, timer handle) of the load in progress
        self._wait_since: float | None = None  # engine time the scheduler began waiting on a victim
        self._pf_timer = None
        self._streams_off: set = set()    # non-streamed jobs decoding (re-planned on step changes)
        self._timers: set = set()         # load and recovery timers, for close()
        self.loads = 0                    # loads started (aborted ones included)
        self.unloads = 0
        self.evictions = 0                # runners unloaded to make room for another model
        self.reloads = 0                  # runners unloaded because needs_reload
        self.eviction_wait = 0.0          # engine seconds the scheduler waited on victims

    def now(self) -> float:
        """The model instant, on the engine's clock: inside a timer armed by
        at()/_after(), the instant it was due (however late the loop ran
        it); otherwise the clock.  Never earlier than a previous answer."""
        t = self._event_at if self._event_at is not None else self.clock()
        if t < self._last:
            return self._last
        self._last = t
        return t

    def at(self, when: float, fn, *args):
        """Run fn(*args) at model instant `when` (engine clock): the timer
        fires then or, if the loop is late, as soon as it can, and now()
        inside reads `when`.  Returns the loop's handle."""
        return self.loop.call_later(max(0.0, when - self.clock()), self._fire, when, fn, args)

    def _fire(self, when, fn, args) -> None:
        outer, self._event_at = self._event_at, when
        try:
            fn(*args)
        finally:
            self._event_at = outer

    def _after(self, seconds: float, fn, *args):
        """A timer `seconds` of simulated time after now()."""
        return self.at(self.now() + seconds / self.scale, fn, *args)

    def close(self) -> None:
        """The instance stops: no scheduler timer fires after this."""
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        for r in self.runners.values():
            self._disarm(r)
        if self._pf_timer is not None:
            self._pf_timer.cancel()
            self._pf_timer = None

    # --- loaded models ------------------------------------------------------

    def runner(self, model: Installed, keep_alive: float | None = None) -> Runner:
        """Without a GPU: the model's runner, created ("loaded") at once if
        needed.  `keep_alive` (seconds) replaces the runner's duration when
        the request set one (server/sched.go, useLoadedRunner)."""
        key = model.name.key
        r = self.runners.get(key)
        if r is None:
            r = Runner(model, self._parallel(model.spec), self.config.keep_alive,
                       RunnerOptions(self.config.num_ctx))
            self.runners[key] = r
        if keep_alive is not None:
            r.keep_alive = keep_alive
        if r.refs == 0:
            r.expires_at = self._expiry(r.keep_alive)
        return r

    def _parallel(self, spec: ModelSpec) -> int:
        return self.config.embed_parallel if spec.embedding_only else self.config.num_parallel

    def _expiry(self, keep_alive: float) -> float:
        """Wall time keep_alive simulated seconds from now (forever stays ~2318)."""
        if keep_alive >= FOREVER_S:
            return self.wall() + FOREVER_S
        return self.wall() + keep_alive / self.scale

    def options(self, spec: ModelSpec, options=None) -> RunnerOptions:
        """The runner options a request with this `options` map asks for."""
        return runner_options(options, self.config.num_ctx, spec.context_length)

    def acquire(self, model: Installed, keep_alive, then, options=None):
        """Get the model's runner for a request and call `then(runner)`.

        Args:
            model: the installed model.
            keep_alive: seconds from the request (None: not set).
            then: called with the runner.
            options: the request's `options` map (its runner options decide
                needs_reload; GPU mode only).

        Returns:
            None: `then` already ran (no GPU, or the fast path).
            a Pending: `then` runs once the scheduler has the runner; cancel()
                it if the client goes away.
            REJECTED: the pending queue is full (Ollama's 503).
        """
        if self.gpu is None:
            then(self.runner(model, keep_alive))
            return None
        opts = self.options(model.spec, options)
        # getRunner's fast path: whatever is in `runners` and needs no
        # reload -- a victim that is draining included (sched.go getRunner).
        r = self.runners.get(model.name.key)
        if r is not None and r.state == "ready" and not needs_reload(r.opts, opts):
            self._hand(r, keep_alive, then)
            return None
        idle = self._current is None and not self.pending
        if not idle and len(self.pending) >= self.config.max_queue:
            return REJECTED
        p = Pending(model, keep_alive, opts, then, self)
        self.pending.append(p)
        self._pump()
        return p

    def unload(self, key: str) -> None:
        """expireRunner: gone now if idle, else once its requests finish.  A
        loading runner is not in Ollama's s.loaded yet: untouched."""
        r = self.runners.get(key)
        if r is None:
            return
        if self.gpu is None:
            r.keep_alive = 0.0
            if r.refs == 0:
                del self.runners[key]
            return
        if r.state != "ready":
            return
        r.keep_alive = 0.0
        self._disarm(r)
        if r.refs == 0:
            self._unload(r)

    def stats(self) -> dict:
        """The counters of GET /sim/stats (not Ollama's API): loads started,
        unloads done, evictions and needs_reload reloads (runners the
        scheduler expired, counted when they unload), the simulated seconds
        the scheduler's head waited on victims (drain, unload and VRAM
        recovery; a wait in progress counts up to now), and the requests
        waiting for the scheduler (queued, or being served), cancelled ones
        not counted."""
        wait = self.eviction_wait
        if self._wait_since is not None:
            wait += self.now() - self._wait_since
        pending = sum(1 for p in self.pending if not p.cancelled)
        if self._current is not None and not self._current.cancelled:
            pending += 1
        return {"loads": self.loads, "unloads": self.unloads, "evictions": self.evictions,
                "reloads": self.reloads, "eviction_wait_s": wait * self.scale, "pending": pending}

    def loaded(self) -> list:
        """Runners loaded or loading (without a GPU, idle ones past their
        keep-alive are dropped here; with one, timers drop them)."""
        if self.gpu is None:
            now = self.wall()
            for key, r in list(self.runners.items()):
                if r.refs == 0 and r.expires_at <= now:
                    del self.runners[key]
        return list(self.runners.values())

    def preload(self, models) -> None:
        """Start with these runners resident and idle (no load time)."""
        for model in models:
            if self.gpu is None:
                self.runner(model)
                continue
            r = self._new_runner(model, self.config.keep_alive, self.options(model.spec))
            r.state = "ready"
            self._arm(r)

    # --- the scheduler (GPU mode) ---------------------------------------------

    def _pump(self) -> None:
        """processPending: serve the head of the queue until blocked or empty."""
        while self._blocked is None:
            if self._current is None:
                if not self.pending:
                    return
                p = self.pending.popleft()
                if p.cancelled:
                    continue
                self._current = p
            if self._step(self._current):
                self._current = None

    def _step(self, p: Pending) -> bool:
        """One pass of processPending's inner loop for `p`: True when it is
        done (got its runner, or was cancelled before its load), False when
        the scheduler now waits (a load or an unload).  Cancellation is not
        re-checked between passes: like Ollama, the scheduler goes on
        evicting for a request whose client left, and only its load fails."""
        r = self.runners.get(p.model.name.key)
        if r is not None:
            if not needs_reload(r.opts, p.opts):
                # Only on a first pass, right after the dequeue's check: the
                # scheduler is the only one that loads, so after a wait p's
                # model is gone or still needs the reload.
                self._hand(r, p.keep_alive, p.then)
                return True
            self._evict(r, RELOAD)
            return False
        if len(self.runners) >= self.max_loaded or (self.runners and self._needs_room(p)):
            self._evict(self._victim(), EVICT)  # type: ignore[arg-type]  # runners is not empty here
            return False
        if p.cancelled:
            # load -> WaitUntilRunning(req.ctx) fails at once: no runner.
            return True
        self._load(p)
        return False

    def _needs_room(self, p: Pending) -> bool:
        """load's pre-flight check with other models resident: the new one
        must fit in 80 % of the free memory (server/sched.go, load)."""
        need = runner_bytes(p.model.spec, p.opts.num_ctx, self._parallel(p.model.spec))
        assert self.gpu is not None  # GPU mode only
        return need > FIT_FRACTION * self.gpu.free

    def _victim(self) -> Runner | None:
        """findRunnerToUnload: by keep-alive, then model path; idle first."""
        runners = sorted(self.runners.values(), key=lambda r: (r.keep_alive, r.model.blob_path))
        for r in runners:
            if r.refs == 0:
                return r
        return runners[0] if runners else None

    def _evict(self, victim: Runner, reason: str) -> None:
        """processPending's "resetting model to expire immediately": duration
        0, timer stopped, unloaded now if idle; then wait for an unload.  A
        busy victim stays loaded and keeps taking fast-path requests; its
        last release unloads it (_arm) unless one of them set a keep_alive."""
        self._blocked = "unload"
        if self._wait_since is None:
            self._wait_since = self.now()
        victim.expire_reason = reason
        victim.keep_alive = 0.0
        self._disarm(victim)
        if victim.refs == 0:
            self._unload(victim)

    def _new_runner(self, model: Installed, keep_alive, opts: RunnerOptions) -> Runner:
        spec = model.spec
        gpu = self.gpu
        assert gpu is not None  # GPU mode only
        r = Runner(model, self._parallel(spec), self.config.keep_alive if keep_alive is None else keep_alive,
                   opts)
        if r.size > gpu.free:
            # Only a first model gets here (others must fit, sched.go load):
            # Ollama loads it anyway with the rest in system RAM.
            r.size_vram = max(0, gpu.free - SPILL_HEADROOM)
        on_gpu = r.size_vram / r.size
        r.eval_rate = spilled_rate(gpu.profile.eval_rate(spec), on_gpu)
        r.prompt_rate = spilled_rate(gpu.profile.prompt_rate(spec), on_gpu)
        if self.config.prefix_cache:
            r.slots = [Slot() for _ in range(r.parallel)]
        r.expires_at = self._expiry(r.keep_alive)
        gpu.used += r.size_vram
        self.runners[model.name.key] = r
        return r

    def _load(self, p: Pending) -> None:
        r = self._new_runner(p.model, p.keep_alive, p.opts)
        r.state = "loading"
        self.loads += 1
        self._blocked = "load"
        assert self.gpu is not None  # GPU mode only
        handle = self._scheduler_timer(self.gpu.profile.load_seconds(p.model.spec), self._loaded, r)
        self._loading = (r, handle)

    def _scheduler_timer(self, seconds: float, fn, arg):
        def fire():
            self._timers.discard(handle)
            fn(arg)
        handle = self._after(seconds, fire)
        self._timers.add(handle)
        return handle

    def _loaded(self, r: Runner) -> None:
        r.state = "ready"
        r.expires_at = self._expiry(r.keep_alive)
        p, self._current, self._blocked, self._loading = self._current, None, None, None
        assert p is not None  # the Pending whose load this was
        self._hand(r, p.keep_alive, p.then)
        self._pump()

    def _abandoned(self, p: Pending) -> None:
        """Pending.cancel: a client that leaves while its model loads aborts
        the load (load: llama.Load -> WaitUntilRunning returns on ctx.Done;
        activeLoading.Close(), the scheduler moves on).  The killed runner's
        memory comes back after unload_s like an unload's; it was never in
        s.loaded, so nothing waits for it."""
        if p is not self._current or self._blocked != "load":
            return
        loading = self._loading
        assert loading is not None  # _blocked == "load": _load set it
        r, handle = loading
        handle.cancel()
        self._timers.discard(handle)
        key = r.model.name.key
        if self.runners.get(key) is r:
            del self.runners[key]
        r.state = "gone"
        self._current, self._blocked, self._loading = None, None, None
        assert self.gpu is not None  # GPU mode only
        self._scheduler_timer(self.gpu.profile.unload_s, self._freed, r)
        self._pump()

    def _hand(self, r: Runner, keep_alive, then) -> None:
        """useLoadedRunner: the idle timer stops; a request that sets
        keep_alive replaces the runner's -- a victim's too, which is then no
        longer expiring (its 0 is gone; processCompleted arms a timer)."""
        if keep_alive is not None:
            r.keep_alive = keep_alive
            if keep_alive > 0:
                r.expire_reason = None
        self._disarm(r)
        then(r)
        if r.refs == 0:
            self._arm(r)              # nobody took a slot (a load-only request)

    def _arm(self, r: Runner) -> None:
        """The runner went idle: start its keep-alive timer (0 = unload now)."""
        self._disarm(r)
        if r.keep_alive <= 0:
            self._unload(r)
            return
        r.expires_at = self._expiry(r.keep_alive)
        if r.keep_alive < FOREVER_S:
            r.timer = self._after(r.keep_alive, self._expired, r)

    def _disarm(self, r: Runner) -> None:
        if r.timer is not None:
            r.timer.cancel()
            r.timer = None

    def _expired(self, r: Runner) -> None:
        r.timer = None
        if r.refs == 0 and self.runners.get(r.model.name.key) is r:
            self._unload(r)

    def _unload(self, r: Runner) -> None:
        self._disarm(r)
        key = r.model.name.key
        if self.runners.get(key) is r:
            del self.runners[key]
        r.state = "gone"
        self.unloads += 1
        if r.expire_reason == EVICT:
            self.evictions += 1
        elif r.expire_reason == RELOAD:
            self.reloads += 1
        assert self.gpu is not None  # GPU mode only
        self._scheduler_timer(self.gpu.profile.unload_s, self._recovered, r)

    def _freed(self, r: Runner) -> None:
        assert self.gpu is not None  # GPU mode only
        self.gpu.used -= r.size_vram

    def _recovered(self, r: Runner) -> None:
        """waitForVRAMRecovery is over: the memory is free and, like the
        unloadedCh send after it, ANY unload wakes a scheduler waiting on a
        victim, which then re-evaluates from the top."""
        self._freed(r)
        if self._blocked == "unload":
            self._blocked = None
            self.eviction_wait += self.now() - self._wait_since  # type: ignore[operator]  # _evict set it with _blocked
            self._wait_since = None
            self._pump()

    # --- prefill and decode on the GPU ------------------------------------------

    def prefill_start(self, job, work: float) -> None:
        """`job` needs `work` simulated seconds of the GPU alone; job.prefilled()
        is called when its share of the GPU has done it."""
        assert self.gpu is not None  # GPU mode only
        self.gpu.prefill_add(job, work)
        self._prefill_rearm()

    def prefill_cancel(self, job) -> None:
        assert self.gpu is not None  # GPU mode only
        self.gpu.prefill_remove(job)
        self._prefill_rearm()

    def _prefill_rearm(self) -> None:
        if self._pf_timer is not None:
            self._pf_timer.cancel()
            self._pf_timer = None
        assert self.gpu is not None  # GPU mode only
        nxt = self.gpu.prefill_next()
        if nxt is not None:
            self._pf_timer = self._after(nxt[0], self._prefill_fire)

    def _prefill_fire(self) -> None:
        self._pf_timer = None
        assert self.gpu is not None  # GPU mode only
        done = self.gpu.prefill_done(PREFILL_SLACK_S * self.scale)
        self._prefill_rearm()
        for job, at in done:
            job.prefilled(at / self.scale)

    def decode_start(self, gen, at: float) -> None:
        """`gen` joins the GPU's decode batch at `at` (engine clock)."""
        assert self.gpu is not None  # GPU mode only
        self.gpu.decode_start(gen.runner)
        self._replan(at)
        if not gen.stream:
            self._streams_off.add(gen)

    def decode_stop(self, gen, at: float) -> None:
        """`gen` leaves the batch at `at`; a late timer does not slow the others."""
        self._streams_off.discard(gen)
        assert self.gpu is not None  # GPU mode only
        self.gpu.decode_stop(gen.runner)
        self._replan(at)

    def _replan(self, at: float) -> None:
        for gen in self._streams_off:
            gen.replan(at)

    # --- slots --------------------------------------------------------------

    def submit(self, runner: Runner, job) -> bool:
        """Ask for a slot.  False: the slot queue is full (the caller answers 503)."""
        if runner.busy < runner.parallel and not runner.waiters:
            runner.busy += 1
            runner.refs += 1
            job.granted()
            return True
        if self.slot_limit is not None and self.waiting >= self.slot_limit:
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
            if self.gpu is None:
                self.loop.call_soon(job.granted)
            else:
                self.at(self.now(), job.granted)
        else:
            runner.busy -= 1
        self._unref(runner)

    def _unref(self, runner: Runner) -> None:
        runner.refs -= 1
        if runner.refs == 0:
            if self.gpu is not None:
                self._arm(runner)
            elif runner.keep_alive <= 0:
                self.runners.pop(runner.model.name.key, None)
            else:
                runner.expires_at = self._expiry(runner.keep_alive)


class _Job:
    """What the engine's slot queue holds: a Generation or a SlotHold.

    Subclasses have the slots engine, runner, t_submit and _state, and a
    granted() the engine calls when a slot is theirs.
    """

    __slots__ = ()

    def start(self) -> bool:
        """Submit for a slot; False if the instance's queue is full."""
        self.t_submit = self.engine.now()  # type: ignore[misc, attr-defined]  # the subclass's slot
        self._state = "queued"  # type: ignore[misc]  # the subclass's slot
        if not self.engine.submit(self.runner, self):  # type: ignore[attr-defined]  # the subclass's slots
            self._state = "new"  # type: ignore[misc]  # the subclass's slot
            return False
        return True


class Generation(_Job):
    """One inference request: slot wait -> prefill -> tokens -> end.

    Reported times (t_submit, t_granted, t_first, t_end) are
    time.perf_counter() seconds: uvloop's loop.time() has millisecond
    resolution, fine for scheduling but too coarse for the ns metrics.

    GPU mode reads three more attributes, set by the caller before start():
    `prompt_tokens` (the prefill work), `prompt_text` (the prefix-cache key,
    None = no cache) and `cache_tail(n)` (text the slot holds after the
    prompt once n tokens were generated).
    """

    __slots__ = ("engine", "runner", "sink", "n_tokens", "limit", "end", "prefill",
                 "stream", "emitted", "t_submit", "t_granted", "t_first", "t_end",
                 "prompt_tokens", "prompt_text", "cache_tail", "cached", "slot", "step",
                 "pf_left", "_common", "_state", "_timer", "_next", "_paused", "_base",
                 "_alpha", "_done", "_at", "_iv")

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
        self.prompt_tokens = 0
        self.prompt_text = None
        self.cache_tail = None
        self.cached = 0               # prompt tokens found in the slot's cache
        self.slot = None
        self.step = 0.0               # GPU mode: the decode round at the end (sim s)
        self.pf_left = 0.0
        self._common = 0
        self._state = "new"
        self._timer = None
        self._next = 0.0
        self._paused = False
        # decode_interval() unrolled for the per-token path: base interval
        # and slowdown, the number decoding read at each token.
        cfg = engine.config
        self._base = decode_interval(cfg.token_rate, runner.spec.speed, 1, 0.0) / engine.scale
        self._alpha = cfg.parallel_slowdown
        self._done = 0.0              # non-streamed GPU mode: tokens past the first
        self._at = 0.0
        self._iv = 0.0

    @property
    def queued(self) -> bool:
        return self._state == "queued"

    def granted(self) -> None:
        """Called by the engine when a slot is ours."""
        if self._state != "queued":
            return
        self._state = "prefill"
        self.t_granted = self.engine.now()
        engine = self.engine
        if engine.gpu is None:
            self._timer = engine.loop.call_later(self.prefill / engine.scale, self._first)
            return
        runner = self.runner
        if runner.slots is not None and self.prompt_text is not None:
            self.slot, self._common = runner.take_slot(self.prompt_text, engine.now())
            self.cached = cached_tokens(self.prompt_tokens, self.prompt_text, self._common)
        work = max(1, self.prompt_tokens - self.cached) / runner.prompt_rate
        engine.prefill_start(self, work)

    def prefilled(self, at: float) -> None:
        """Called by the engine when the GPU finished this job's prefill, at
        `at` on the engine's clock (exact, where the timer was not)."""
        self._first(at)

    def _interval(self) -> float:
        engine = self.engine
        if engine.gpu is not None:
            return engine.gpu.step / engine.scale
        if self._alpha:
            return self._base * (1.0 + self._alpha * max(0, self.runner.decoding - 1))
        return self._base

    def _first(self, at: float | None = None) -> None:
        engine = self.engine
        self._timer = None
        self._state = "decode"
        self.runner.decoding += 1
        self.t_first = engine.now() if at is None else at
        if engine.gpu is not None:
            engine.decode_start(self, self.t_first)
        self._next = engine.loop.time()
        if not self.stream:
            # Nobody sees tokens one by one: jump to the end in one timer.
            self.emitted = self.limit
            if engine.gpu is not None:
                self.replan(self.t_first)
                return
            at = self._next + max(0, self.limit - 1) * self._interval()
            self._timer = engine.loop.call_at(at, self._finish)
            return
        self._tick()

    def replan(self, at: float) -> None:
        """Non-streamed, GPU mode: the decode round changed at `at` (engine
        clock): count the tokens decoded at the old interval until then,
        and re-arm the end timer at the new one.  The end instant is exact;
        the timer may fire a little late, and _finish reports the instant."""
        engine = self.engine
        at = max(self._at, at)
        if self._iv:
            self._done += (at - self._at) / self._iv
        self._at = at
        self._iv = self._interval()
        if self._timer is not None:
            self._timer.cancel()
        end = at + max(0.0, self.limit - 1 - self._done) * self._iv
        self._timer = engine.at(end, self._finish, end)

    def _tick(self) -> None:
        self._timer = None
        sink = self.sink
        limit = self.limit
        i = self.emitted
        interval = self._interval()
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

    def _finish(self, at: float | None = None) -> None:
        self._timer = None
        self._state = "ended"
        self.t_end = self.engine.now() if at is None else at
        self.runner.decoding -= 1
        engine = self.engine
        if engine.gpu is not None:
            self.step = engine.gpu.step
            engine.decode_stop(self, self.t_end)
            self._free_slot(self.emitted)
        engine.release(self.runner)
        if self.end == "done":
            self.sink.finish(self)
        elif self.end == "error":
            self.sink.fail(self)
        else:
            self.sink.crash()

    def _free_slot(self, tokens) -> None:
        """Leave the slot's cache holding what this request put in it:
        the prompt and `tokens` generated tokens (None: only the prefix that
        was already there, for a prefill cut short)."""
        slot = self.slot
        if slot is None:
            return
        self.slot = None
        if tokens is None:
            slot.text = slot.text[:self._common]
        elif self.cache_tail is not None and tokens:
            slot.text = self.prompt_text + self.cache_tail(tokens)
        else:
            slot.text = self.prompt_text
        slot.used = self.engine.now()
        slot.busy = False

    def cancel(self) -> None:
        """The client went away: stop, and give the slot or queue place back."""
        state = self._state
        if state in ("ended", "cancelled", "new"):
            return
        self._state = "cancelled"
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        engine = self.engine
        if state == "queued":
            if self in self.runner.waiters:
                engine.withdraw(self.runner, self)
            else:
                # Popped by release() with granted() still scheduled: the slot
                # is ours already, give it straight back.
                engine.release(self.runner)
            return
        if state == "prefill" and engine.gpu is not None:
            engine.prefill_cancel(self)
            self._free_slot(None)
        if state == "decode":
            self.runner.decoding -= 1
            if engine.gpu is not None:
                engine.decode_stop(self, engine.now())
                self._free_slot(self.emitted)
        engine.release(self.runner)


class SlotHold(_Job):
    """A request that needs a slot for a fixed amount of work (embeddings):
    `duration` simulated seconds, on the GPU's shared prompt throughput in
    GPU mode."""

    __slots__ = ("engine", "runner", "duration", "on_done", "t_submit", "t_granted",
                 "t_end", "pf_left", "_state", "_timer")

    def __init__(self, engine: Engine, runner: Runner, duration: float, on_done):
        self.engine = engine
        self.runner = runner
        self.duration = duration
        self.on_done = on_done
        self.t_submit = self.t_granted = self.t_end = 0.0
        self.pf_left = 0.0
        self._state = "new"
        self._timer = None

    def granted(self) -> None:
        if self._state != "queued":
            return
        self._state = "running"
        self.t_granted = self.engine.now()
        engine = self.engine
        if engine.gpu is None:
            self._timer = engine.loop.call_later(self.duration / engine.scale, self._done)
        else:
            engine.prefill_start(self, self.duration)

    def prefilled(self, at: float) -> None:
        self._done(at)

    def _done(self, at: float | None = None) -> None:
        self._timer = None
        self._state = "ended"
        self.t_end = self.engine.now() if at is None else at
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
        engine = self.engine
        if state == "queued" and self in self.runner.waiters:
            engine.withdraw(self.runner, self)
            return
        if state == "running" and engine.gpu is not None:
            engine.prefill_cancel(self)
        engine.release(self.runner)

# cython: annotation_typing=False, boundscheck=True, wraparound=True, cdivision=False
"""Backend choice, admission queue and backend health for one worker.

Rules for this module: decisions are made by the compiled BackendTable
(olb/_core.pyx) and, for requests that name a model, by the Router over it
(olb/routing.py); this module owns both, feeds them (health, releases,
catalogues) and keeps the queue of requests that found no backend to admit
them.

Theory of operation
-------------------
`acquire(allowed)` returns a backend index already counted as in flight, or
NO_BACKEND. On NO_BACKEND the request is either queued (some usable backend
exists but all are full) or refused with 502 (none is usable). Every release
wakes the queue, which offers the free slot to its waiters in the fair
queue's order (olb/fairqueue.py: round-robin across clients, each client's
requests in arrival order, interactive before batch; docs/scheduling.md,
"Queueing fairly"): a waiter whose mask allows that backend takes it, and
one whose model may not load there yet keeps its place (routing rule E).
With several workers the in-flight counts are shared but
the queues are not: a slot freed by another worker is seen by polling the
table every QUEUE_POLL seconds while this worker's queue is non-empty.

Health: a backend that refuses a connection is marked down at once
(passive check) and probed with exponential back-off until it answers; the
active check probes every backend every OLB_HEALTH_INTERVAL. A probe is a
`GET /`, which Ollama answers with 200 "Ollama is running" without touching
a model. A request that times out is no strike: `check` probes the backend
then, and marks it down only if the probe fails (slow is not dead; see
docs/operations.md).

Requests that run no model take no slot: `pick` gives them a healthy
backend, in turn, without counting anything.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time

from . import local
from ._core import NO_BACKEND, BackendTable
from .client import BackendClient
from .config import Config
from .errors import LocalResourceError, OlbError
from .fairqueue import FULL, QUEUED, FairQueue
from .models import ModelDirectory
from .pool import BackendPool
from .routing import ADMIT, WAIT, Router

log = logging.getLogger("olb.balancer")

#: Seconds between queue re-checks when other workers may free slots.
QUEUE_POLL = 0.02
#: Seconds between looks at the shared drain flags (several workers only).
DRAIN_POLL = 0.25
#: Back-off for probing a backend marked down: first retry, cap (seconds).
PROBE_FIRST = 0.5
PROBE_MAX = 30.0
#: Largest answer to a probe's GET / ("Ollama is running": 17 bytes).
PROBE_MAX_BODY = 64 * 1024
#: What probe() returns when olb could not even try (olb/local.py: out of
#: file descriptors...): nothing is known of the backend, and nothing changes.
UNKNOWN = "not probed: olb is out of a local resource"


class Backend:
    """What a worker knows of one backend besides the table's counters."""


    def __init__(self, index, spec, pool, client=None):
        self.index = index
        self.spec = spec
        self.url = spec.url
        #: Keep-alive connections of the data path (proxied requests).
        self.pool = pool
        #: The control-plane client (client.BackendClient): probes, model
        #: polls, fan-outs. Its own keep-alive connections, never the pool's.
        self.client = client
        #: Reachable, as far as the health checks know (draining is separate).
        self.up = True
        #: Consecutive failed exchanges (timeouts, broken connections).
        self.strikes = 0
        #: When it was last marked down (kept after it returns, for the back-off).
        self.down_since: float | None = None
        self.last_error = ""
        self.probe_delay = PROBE_FIRST
        self.probing = False


#: OLB_POLICY -> the core's selection policy. `llm` and `least-inflight` share
#: the core's least-loaded choice; they differ in what the balancer feeds it
#: (model masks, conversation keys, GPU readings: `llm` only).
CORE_POLICY = {"llm": "least_loaded", "least-inflight": "least_loaded", "round-robin": "round_robin"}


def new_table(config: Config, **shared) -> BackendTable:
    """The backend table for `config` (capacities, weights, policy); `shared`
    passes BackendTable's shared=, worker=, workers= for several workers."""
    specs = config.backends
    return BackendTable([s.max_inflight for s in specs], [s.weight for s in specs],
                        policy=CORE_POLICY[config.policy], **shared)


class Balancer:
    def __init__(self, config: Config, loop, protocol_factory, table: BackendTable | None = None,
                 drained=None):
        self.config = config
        self.loop = loop
        specs = config.backends
        self.table = table if table is not None else new_table(config)
        self.backends = [
            # Keep as many idle connections as the backend may have requests in
            # flight: fewer would close and reopen connections under full load.
            Backend(i, s, BackendPool(loop, i, s.host, s.port, s.hostport.encode(),
                                      config.connect_timeout, protocol_factory,
                                      max_idle=max(64, s.max_inflight)),
                    BackendClient(s.host, s.port, connect_timeout=config.connect_timeout))
            for i, s in enumerate(specs)
        ]
        # Only the `llm` policy routes by model and conversation; the plain
        # policies leave /api/tags and the rest to whichever backend they pick,
        # as OLB_MODELS_INTERVAL=0 does.
        llm = config.policy == "llm"
        self.models = ModelDirectory(self.backends, config.models_interval, config.connect_timeout) \
            if config.models_interval > 0 and llm else None
        self._session_bound = config.session_bound if llm else 0.0
        if self.models is not None:
            self.models.on_load = self.refresh_models
        #: Backends whose catalogue is being re-read outside the poll.
        self._refreshing: set[int] = set()
        #: One byte per backend, 1 = draining: shared by all workers (an mmap
        #: from the supervisor) so a drain asked of one worker holds in all.
        self.drained = drained if drained is not None else bytearray(len(specs))
        self._drained_seen = bytes(self.drained)
        self.queue = FairQueue(config.queue_size, config.client_queue or config.queue_size)
        #: Waiters per model, for the spread rule (see routing.Router.route).
        self.queued_models: collections.Counter = collections.Counter()
        #: The placement rules (olb/routing.py) over the table, the model
        #: directory and the queue's per-model counts.
        self.router = Router(self.table, self.models, self.queued_models, config.spread_queue,
                             self._session_bound)
        self._poll_handle = None
        self._poll_queue = config.workers > 1
        self._tasks: set[asyncio.Task] = set()
        self._closed = False
        self.rejected = 0
        #: metrics.Metrics when OLB_METRICS is on: ejections and returns are counted there.
        self.metrics = None
        #: Where pick() starts looking next (requests that take no slot go round).
        #: Probes under way after a timeout, by backend (see check()).
        self._checks: dict[int, asyncio.Task] = {}
        #: After a reload (olb/lifecycle.py): per backend index, the new
        #: balancer, its index there, and how many slots its table holds for
        #: this one's requests still running on that backend.
        self.handoff: dict[int, list] = {}
        #: Stopping (SIGTERM): nothing more is queued.
        self.stopping = False

    # --- admission -------------------------------------------------------------------

    def acquire(self, allowed=None, affinity: int | None = None) -> int:
        """A backend for a request, counted in flight, or NO_BACKEND.

        With an affinity key (a conversation), the backend the key hashes to
        is preferred while within OLB_SESSION_BOUND of the average load.
        """
        return self.router.acquire(allowed, affinity)

    def release(self, index: int) -> None:
        self.table.release(index)
        if self.handoff:
            self._hand_back(index)
        if self.queue:
            self._drain_queue()

    def _hand_back(self, index: int) -> None:
        """A request that ran across a reload ended: free the slot the new balancer held for it."""
        target = self.handoff.get(index)
        if target is not None:
            successor, new_index, held = target
            if held <= 1:
                del self.handoff[index]
            else:
                target[2] = held - 1
            successor.release(new_index)

    def pick(self, allowed=None) -> int:
        """A healthy backend for a request that runs no model, or NO_BACKEND
        (routing.Router.pick: nothing counted, never queued)."""
        return self.router.pick(allowed)

    def usable(self, allowed=None) -> bool:
        """Is any allowed backend healthy (full or not)?"""
        return self.router.usable(allowed)

    def enqueue(self, waiter, client, priority: int) -> int:
        """Queue a request until a slot frees.

        The waiter has `allowed` (its admission mask, possibly a model's live
        `loaded` mask), `model`, `runner`, `affinity`, `excluded`, and
        `admit(index)`, `queue_expired()`, `queue_evicted()`, `reroute()`
        methods.

        Returns:
            fairqueue.QUEUED, FULL (503) or OVER_SHARE (429).
        """
        if self.stopping:
            self.rejected += 1
            return FULL
        queue = self.queue
        result = queue.push(waiter, client, priority)
        if result == FULL:
            # Make room by the heaviest client's newest request when this
            # client holds fewer: a flood does not lock others out.
            victim, heaviest = queue.heaviest()
            if victim is not None and heaviest > queue.queued_by(client) + 1:
                self._unqueue(victim)
                self.rejected += 1
                victim.queue_evicted()
                result = queue.push(waiter, client, priority)
        if result != QUEUED:
            self.rejected += 1
            return result
        waiter.queue_timer = self.loop.call_later(self.config.queue_timeout, self._expire, waiter)
        if waiter.model is not None:
            self.queued_models[waiter.model] += 1
        if self._poll_queue and self._poll_handle is None:
            self._poll_handle = self.loop.call_later(QUEUE_POLL, self._poll)
        return QUEUED

    def _unqueue(self, waiter) -> bool:
        if not self.queue.remove(waiter):
            return False
        waiter.queue_timer.cancel()
        waiter.queue_timer = None
        if waiter.model is not None:
            self.queued_models[waiter.model] -= 1
        return True

    def dequeue(self, waiter) -> None:
        """Remove a waiter whose client went away."""
        self._unqueue(waiter)

    def _expire(self, waiter) -> None:
        if self._unqueue(waiter):
            self.rejected += 1
            waiter.queue_expired()

    def wake(self) -> None:
        """Re-check the queue: a mask some waiters hold has grown."""
        self._drain_queue()

    def _drain_queue(self) -> None:
        """Offer free slots to queued requests in the queue's fair order.

        Waiters carry different admission masks (one model's warm backends,
        another's); one that cannot be admitted only holds up its own
        client's line. A mask that found no room is not tried again in this
        pass.
        """
        full: set[int] = set()
        order = self.queue.service_order()
        models = self.models
        for waiter in order:
            allowed = waiter.allowed
            key = id(allowed)
            if key in full:
                continue
            held = waiter.model is not None and models is not None and models.held(waiter.model)
            if held:
                # Its model is leaving a backend for a load olb started since
                # it was queued (routing rule E): not there.
                allowed = self.router.not_leaving(waiter.model, allowed)
            index = self.acquire(allowed, waiter.affinity)
            if index == NO_BACKEND:
                if self.usable(allowed):
                    if not held:
                        full.add(key)
                    continue
                if held:
                    # It waits for that load to be seen, not routed again.
                    continue
                # Everything it may use went down (or unloaded its model)
                # while it waited: route it again from scratch.
                self._unqueue(waiter)
                waiter.reroute()
                continue
            if waiter.model is not None and models is not None and \
                    not models.warm_mask(waiter.model, waiter.runner)[index]:
                # Admitted there, it would start a load: a placement, which
                # the rules decide on the state of now, not on the mask it
                # queued with (a backend that had room for it then may hold
                # another model now, and loading there would evict it).
                self.table.release(index)
                decision = self.router.route(waiter.model, waiter.runner, waiter.affinity, waiter.excluded)
                if decision.kind == WAIT:
                    waiter.allowed = decision.mask  # keeps its place in the queue
                    continue
                self._unqueue(waiter)
                if decision.kind == ADMIT:
                    waiter.admit(decision.index)
                else:
                    waiter.reroute()  # fails it, as routing it afresh does
                continue
            self._unqueue(waiter)
            waiter.admit(index)

    def _poll(self) -> None:
        self._poll_handle = None
        self._drain_queue()
        if self.queue and not self._closed:
            self._poll_handle = self.loop.call_later(QUEUE_POLL, self._poll)

    # --- health ----------------------------------------------------------------------

    def _apply_health(self, index: int) -> None:
        """The table's health flag: reachable and not draining."""
        accepting = self.backends[index].up and not self.drained[index]
        if accepting != self.table.is_healthy(index):
            self.table.set_health(index, accepting)
            if accepting and self.queue:
                self._drain_queue()

    def mark_down(self, index: int, reason: str) -> None:
        backend = self.backends[index]
        backend.last_error = reason
        if backend.up:
            log.warning("backend %s marked down: %s", backend.url, reason)
            backend.up = False
            if self.metrics is not None:
                self.metrics.ejected(backend.url)
            now = time.time()
            # A backend that answers probes but fails requests would flap in
            # and out: back-off keeps growing while it fails again soon after
            # each return, and starts afresh after a quiet spell.
            if backend.down_since is None or now - backend.down_since > 4 * PROBE_MAX:
                backend.probe_delay = PROBE_FIRST
            else:
                backend.probe_delay = min(backend.probe_delay * 2, PROBE_MAX)
            backend.down_since = now
            self._apply_health(index)
            if self.models is not None:
                self.models.forget(index)
            # A backend that went down drops its pooled connections: they
            # lead to a process that is gone or restarting.
            backend.pool.close()
        if not backend.probing and not self._closed:
            backend.probing = True
            self._spawn(self._probe_until_up(backend))

    def strike(self, index: int, reason: str) -> None:
        """A request failed on a backend that accepted the connection.

        One such failure may be the request's own fault (a client that went
        away, a prompt that crashed the runner); OLB_EJECT_AFTER in a row
        with no success between them eject the backend like a refused
        connection does, and the back-off probe lets it back.
        """
        backend = self.backends[index]
        backend.strikes += 1
        backend.last_error = reason
        if backend.strikes >= self.config.eject_after:
            backend.strikes = 0
            self.mark_down(index, f"{self.config.eject_after} failures in a row, the last: {reason}")

    def check(self, index: int, reason: str) -> asyncio.Future:
        """Probe a backend after a request to it timed out; mark it down only if the probe fails.

        A timeout alone does not tell a slow backend from a dead one, so it
        is no strike (see docs/operations.md, Timeouts). Everyone who asks
        while a probe of that backend is under way shares it.

        Returns:
            a future: None when the backend answered the probe, else what went wrong.
        """
        task = self._checks.get(index)
        if task is None:
            if self._closed:
                task = self.loop.create_future()
                task.cancel()
                return task
            task = self._checks[index] = self.loop.create_task(self._check(index, reason))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return task

    async def _check(self, index: int, reason: str) -> str | None:
        try:
            error = await self.probe(self.backends[index])
        finally:
            self._checks.pop(index, None)
        if error is UNKNOWN:
            return None  # olb's own trouble says nothing of the backend: wait on
        if error is not None:
            self.mark_down(index, f"{reason}; then a probe failed: {error}")
        return error

    def mark_up(self, index: int) -> None:
        backend = self.backends[index]
        if not backend.up:
            log.warning("backend %s is back", backend.url)
            backend.up = True
            if self.metrics is not None:
                self.metrics.returned(backend.url)
            self._apply_health(index)

    def drain(self, index: int, draining: bool) -> None:
        """Stop (or resume) sending new requests to a backend; running ones go on."""
        self.drained[index] = 1 if draining else 0
        log.warning("backend %s %s", self.backends[index].url, "draining" if draining else "undrained")
        self._sync_drained()

    def _sync_drained(self) -> None:
        current = bytes(self.drained)
        if current != self._drained_seen:
            self._drained_seen = current
            for i in range(len(self.backends)):
                self._apply_health(i)

    def _watch_drained(self) -> None:
        # Other workers write the shared flags; look every DRAIN_POLL seconds.
        self._sync_drained()
        if not self._closed:
            self.loop.call_later(DRAIN_POLL, self._watch_drained)

    async def probe(self, backend: Backend) -> str | None:
        """GET / on the backend, connect included within OLB_CONNECT_TIMEOUT;
        None when healthy, UNKNOWN when olb could not open a connection
        for a reason of its own (olb/local.py), else what went wrong."""
        timeout = self.config.connect_timeout
        try:
            async with asyncio.timeout(timeout):
                resp = await backend.client.request("GET", "/", max_body=PROBE_MAX_BODY)
        except asyncio.TimeoutError:
            return f"GET / not answered within {timeout:g}s (OLB_CONNECT_TIMEOUT)"
        except LocalResourceError as exc:
            local.report(f"probe of {backend.url} not sent", exc.__cause__)  # type: ignore[arg-type]  # raised from an OSError
            return UNKNOWN
        except OlbError as exc:
            return exc.message
        if resp.status != 200:
            return f"GET / answered {resp.status}"
        return None

    async def _probe_until_up(self, backend: Backend) -> None:
        try:
            while not self._closed:
                await asyncio.sleep(backend.probe_delay)
                error = await self.probe(backend)
                if error is None:
                    self.mark_up(backend.index)
                    return
                if error is not UNKNOWN:
                    backend.last_error = error
                backend.probe_delay = min(backend.probe_delay * 2, PROBE_MAX)
        finally:
            backend.probing = False

    async def _active_health(self) -> None:
        interval = self.config.health_interval
        while not self._closed:
            await asyncio.sleep(interval)
            results = await asyncio.gather(*(self.probe(b) for b in self.backends))
            for backend, error in zip(self.backends, results):
                if error is None:
                    self.mark_up(backend.index)
                elif backend.up and error is not UNKNOWN:
                    self.mark_down(backend.index, error)

    def start(self) -> None:
        if self.config.workers > 1:
            self.loop.call_later(DRAIN_POLL, self._watch_drained)
        if self.config.health_interval > 0:
            self._spawn(self._active_health())
        if self.models is not None:
            self._spawn(self._poll_models())

    def refresh_models(self, index: int) -> None:
        """Re-read one backend's catalogue soon, without waiting for it (once:
        asked again while a read is under way, that read answers)."""
        if self.models is not None and not self._closed and index not in self._refreshing:
            self._refreshing.add(index)
            self._spawn(self._refresh(index))

    async def _refresh(self, index: int) -> None:
        assert self.models is not None  # refresh_models spawns this only with a directory
        try:
            await self.models.refresh(index)
        finally:
            self._refreshing.discard(index)
        if self.queue:
            self.wake()  # a load was seen: models that were leaving may be warm again

    async def _poll_models(self) -> None:
        models = self.models
        assert models is not None  # started only with a directory
        while not self._closed:
            await models.refresh_all()
            if self.queue:
                self.wake()  # a backend may have loaded a model someone waits for
            await asyncio.sleep(models.interval)

    def _spawn(self, coro) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        self._closed = True
        if self._poll_handle is not None:
            self._poll_handle.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for backend in self.backends:
            backend.pool.close()
            await backend.client.close()

    # --- admin -------------------------------------------------------------------------

    def status(self, gpu_readings=None) -> dict:
        snap = self.table.snapshot()
        backends = []
        for backend, row in zip(self.backends, snap):
            backends.append({
                "url": backend.url,
                "healthy": backend.up,
                "draining": bool(self.drained[backend.index]),
                "inflight": row["inflight"],
                "local_inflight": row["local_inflight"],
                "capacity": row["capacity"],
                "weight": row["weight"],
                "gpus": list(backend.spec.gpus),
                "gpu_util": row["gpu_util"],
                "gpu_mem_free": row["gpu_mem_free"],
                "served": row["served"],
                "idle_connections": backend.pool.idle_count,
                "last_error": backend.last_error or None,
            })
        return {
            "backends": backends,
            "queue": len(self.queue),
            "queued_clients": self.queue.clients(),
            "queue_size": self.config.queue_size,
            "rejected": self.rejected,
            "routing": {"decisions": self.router.decisions, "cold_decisions": self.router.cold_decisions},
        }

# cython: annotation_typing=False, boundscheck=True, wraparound=True, cdivision=False
"""What the dashboard (/olb/ on the admin listener) shows over time: a ring
of recent samples, and recent ejections and model loads.

Rules for this module: counters the request path bumps (a few float adds
per request, no allocation), and a once-a-second tick that turns them into
rates and notices events. No sockets, no HTTP; admin.py serves `doc()`
inside /olb/status and the page (olb/dashboard.html) polls it.

Theory of operation
-------------------
Each worker adds to its own row of cumulative counters (requests answered,
TTFT sum and count, tokens generated). With OLB_WORKERS=N the rows live in
a shared anonymous mmap, one row per worker, so every worker's tick sums all
rows and each worker's ring shows the whole process group, whichever worker
answers the dashboard's poll. A tick diffs the sums against the previous
tick: requests per second, mean TTFT over the interval, tokens per second.

Events are noticed by the tick, not pushed by the code that causes them:
a backend whose health turned false is an ejection (true again: a return),
a model newly in a backend's loaded set is a load (gone from it: an unload).
That keeps the balancer and the model directory free of dashboard hooks, at
the cost of a second's resolution.

Token counts come from a response's last bytes, read once per response by
metrics.read_tokens (Exchange.on_end); see docs/operations.md, Access control.
"""

from __future__ import annotations

import collections
import time

#: Counter row layout (float64 each).
REQUESTS, TTFT_SUM, TTFT_COUNT, TOKENS = range(4)
FIELDS = 4
#: Samples kept: 5 minutes at one a second.
RING = 300
#: Events kept.
EVENTS = 50
def shared_size(workers: int) -> int:
    """Bytes of the shared counter rows for `workers` workers (an mmap of this size)."""
    return workers * FIELDS * 8


class Samples:
    """One worker's view: its counter row, and the ring its tick fills.

    Args:
        worker: this worker's row.
        workers: how many rows there are.
        shared: a writable buffer of shared_size(workers) bytes (an mmap
            shared by the workers), or None for a private one.
    """

    def __init__(self, worker: int = 0, workers: int = 1, shared=None):
        buf = shared if shared is not None else bytearray(shared_size(workers))
        self._all = memoryview(buf).cast("d")
        self._row = worker * FIELDS
        self._rows = workers
        self.series: collections.deque = collections.deque(maxlen=RING)
        self.events: collections.deque = collections.deque(maxlen=EVENTS)
        self._last_sums = self._sums()
        self._last_at = time.monotonic()
        self._up: list[bool] | None = None
        self._loaded: list[set[str]] | None = None

    # --- the request path -------------------------------------------------------------

    def first_byte(self, seconds: float) -> None:
        """A model request's first response byte came `seconds` after it arrived."""
        row = self._row
        self._all[row + TTFT_SUM] += seconds
        self._all[row + TTFT_COUNT] += 1

    def request_done(self, tokens: int) -> None:
        """A backend's response was forwarded in full, with `tokens` generated (0: not known)."""
        row = self._row
        self._all[row + REQUESTS] += 1
        if tokens:
            self._all[row + TOKENS] += tokens

    # --- the tick --------------------------------------------------------------------------

    def _sums(self) -> list[float]:
        mv = self._all
        return [sum(mv[r * FIELDS + f] for r in range(self._rows)) for f in range(FIELDS)]

    def tick(self, balancer, now: float | None = None) -> None:
        """Take a sample (rates since the last tick) and notice events in the balancer's state."""
        now = time.monotonic() if now is None else now
        sums = self._sums()
        last, self._last_sums = self._last_sums, sums
        span = now - self._last_at
        self._last_at = now
        if span <= 0:
            return
        d = [a - b for a, b in zip(sums, last, strict=True)]
        table = balancer.table
        self.series.append({
            "t": round(time.time(), 3),
            "rps": round(d[REQUESTS] / span, 3),
            "ttft_ms": round(d[TTFT_SUM] / d[TTFT_COUNT] * 1000, 1) if d[TTFT_COUNT] else None,
            "tok_s": round(d[TOKENS] / span, 1),
            "inflight": sum(table.inflight(i) for i in range(table.n)),
            "queued": len(balancer.queue),
        })
        self._notice(balancer)

    def _notice(self, balancer) -> None:
        backends = balancer.backends
        up = [b.up for b in backends]
        models = balancer.models
        loaded = ([{m for m, mask in models.loaded.items() if mask[i]} for i in range(len(backends))]
                  if models is not None else [set() for _ in backends])
        # Before the first tick: all up, nothing loaded (a model loaded in
        # the first second is an event like any other).
        was_up = self._up if self._up is not None else [True] * len(backends)
        was_loaded = self._loaded if self._loaded is not None else [set() for _ in backends]
        self._up = up
        self._loaded = loaded
        wall = round(time.time(), 3)
        for b, was, is_up in zip(backends, was_up, up, strict=True):
            if was and not is_up:
                self.events.append({"t": wall, "kind": "ejected", "backend": b.url, "detail": b.last_error or ""})
            elif is_up and not was:
                self.events.append({"t": wall, "kind": "returned", "backend": b.url, "detail": ""})
        for b, had, has in zip(backends, was_loaded, loaded, strict=True):
            for model in sorted(has - had):
                self.events.append({"t": wall, "kind": "loaded", "backend": b.url, "model": model})
            for model in sorted(had - has):
                self.events.append({"t": wall, "kind": "unloaded", "backend": b.url, "model": model})

    def doc(self) -> dict:
        """For /olb/status: the ring (oldest first), the events (oldest first),
        and the totals since start of all workers' rows."""
        sums = self._sums()
        return {"interval_s": 1, "series": list(self.series), "events": list(self.events),
                "totals": {"requests": int(sums[REQUESTS]), "tokens": int(sums[TOKENS]),
                           "first_bytes": int(sums[TTFT_COUNT])}}

# cython: annotation_typing=False, boundscheck=True, wraparound=True, cdivision=False
"""olb's Prometheus metrics: counted on the request path, rendered at scrape time.

Rules for this module: the request path pays a few dict or list updates
per request (`Metrics.request_done` and friends, called from proxy.py);
everything else -- label names, the text format, gauges read from the
balancer -- happens when `/metrics` is scraped, in `render`, through a
custom prometheus_client collector. The names and labels are listed in
docs/operations.md, "Metrics".

Several workers (OLB_WORKERS=N): each worker publishes its counters to a
file of its own in a directory the supervisor made (`publish`, every
PUBLISH_INTERVAL seconds, written whole and renamed into place), and the
worker that answers a scrape adds its own counters, read fresh, to the
other workers' files. A worker restarted after a crash starts from its
predecessor's file, so the group's counters never go down (at most one
interval of its counts is lost). Gauges of the backends (in flight,
capacity, health, GPU) come from the answering worker alone: the in-flight
counts live in the shared table, the rest each worker knows alike.
"""

from __future__ import annotations

import logging
import os

import orjson

from ._relay import monotonic
from ._tokens import TAIL_BYTES as TAIL_BYTES
from ._tokens import read_tokens as read_tokens
from ._tokens import response_tokens as response_tokens
from .http import CHUNKED
from .models import MERGED_PATHS, MODEL_ENDPOINTS

log = logging.getLogger("olb.metrics")

#: Seconds between a worker's publications of its counters (several workers only).
PUBLISH_INTERVAL = 1.0

#: Buckets of the time histograms (seconds): a first token in milliseconds
#: to a 70B model's load in minutes (OLB_FIRST_BYTE_TIMEOUT's default is 300).
TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
#: Buckets of generation speed (tokens per second), a small CPU model to a big GPU.
TPS_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 50.0, 75.0, 100.0, 150.0, 250.0, 500.0, 1000.0)

#: Rejection reasons (olb_rejections_total's `reason`).
QUEUE_FULL = "queue_full"
QUEUE_TIMEOUT = "queue_timeout"
CLIENT_SHARE = "client_share"
NO_BACKEND = "no_backend"

#: Endpoints counted under their own path; any other is `other`, so a
#: client cannot grow the label set with made-up paths.
_ENDPOINTS = {p: p.decode() for p in (
    set(MODEL_ENDPOINTS) | set(MERGED_PATHS)
    | {b"/", b"/api/version", b"/api/show", b"/api/pull", b"/api/push", b"/api/create", b"/api/copy",
       b"/api/delete", b"/metrics"})}


def endpoint_label(path: bytes) -> str:
    """The `endpoint` label of a request path (bounded: see _ENDPOINTS)."""
    label = _ENDPOINTS.get(path)
    if label is not None:
        return label
    if path.startswith(b"/api/blobs/"):
        return "/api/blobs"
    if path.startswith(b"/v1/models/"):
        return "/v1/models/{model}"
    if path.startswith(b"/olb/"):
        return "/olb"
    return "other"


def bucket(bounds: tuple, value: float) -> int:
    """bisect.bisect_left(bounds, value): the first bucket whose bound is at
    least `value` (Prometheus buckets are `le`). Compiled, a C loop over the
    bounds: bisect_left is a Python-level call (~750 instructions), three a
    request."""
    for i in range(len(bounds)):
        bound = bounds[i]
        if not bound < value:  # (bisect_left's own test: the same answer for a NaN)
            return i
    return len(bounds)


class _Series:
    """The counts of one (endpoint, model, backend): what a request's end updates.

    One dict lookup finds all of a request's series at once; the families
    with fewer labels are sums over these, made at scrape time (Metrics.view).
    """


    def __init__(self):
        self.status: dict[int, int] = {}
        n, m = len(TIME_BUCKETS) + 1, len(TPS_BUCKETS) + 1
        self.duration, self.ttft, self.queue, self.tps = [0] * n, [0] * n, [0] * n, [0] * m
        self.duration_sum = self.ttft_sum = self.queue_sum = self.tps_sum = 0.0
        self.prompt = self.generated = 0


class Metrics:
    """One worker's counters, updated on the request path.

    Backends are kept by URL, as the page labels them (a reload may
    reorder the table). Every method here runs on the request path: dict
    and list updates, no formatting.
    """


    def __init__(self, n: int):
        self.n = n
        #: (endpoint, model, backend URL or "") -> _Series.
        self.series: dict[tuple, _Series] = {}
        # By backend URL (a reload may add, remove or reorder backends).
        self.retries: dict[str, int] = {}    # attempts given up on a backend and retried elsewhere
        self.rejections: dict[str, int] = {}
        self.ejections: dict[str, int] = {}  # taken out (marked down)
        self.returns: dict[str, int] = {}    # back after a probe found it healthy
        self.loads: dict[tuple, int] = {}         # (model, backend): loads olb triggered
        self.load_wait: dict[tuple, float] = {}   # (model, backend): seconds to the answer
        #: A predecessor's published state (a worker restarted after a crash), added to every view.
        self.base: dict | None = None
        #: The series request_done last counted, and its labels (compared by identity).
        self._last_series: _Series | None = None
        self._last_endpoint: str | None = None
        self._last_model: str | None = None
        self._last_backend: str | None = None

    def request_done(self, endpoint: str, model: str, backend: str, status: int, queue_wait: float | None,
                     ttft: float | None, duration: float, tokens, stream: bool) -> None:
        """One request answered (or given up): count it and observe its times.

        Args:
            queue_wait: seconds from arrival to a backend slot; None when it took none.
            ttft: seconds to the response's first byte from the backend; None without one.
            tokens: (prompt, generated, generation seconds or None) read from the
                response's last bytes, or None.
            stream: the response was a stream (tokens per second are observed for streams).
        """
        s = self._last_series
        if (s is None or endpoint is not self._last_endpoint or model is not self._last_model
                or backend is not self._last_backend):
            # (Most requests are counted where the one before was, with the
            # same label objects: then no key tuple, no hash, no lookup.)
            key = (endpoint, model, backend)
            s = self.series.get(key)
            if s is None:
                s = self.series[key] = _Series()
            self._last_series = s
            self._last_endpoint, self._last_model, self._last_backend = endpoint, model, backend
        st = s.status
        st[status] = st.get(status, 0) + 1
        s.duration[bucket(TIME_BUCKETS, duration)] += 1
        s.duration_sum += duration
        if queue_wait is not None:
            s.queue[bucket(TIME_BUCKETS, queue_wait)] += 1
            s.queue_sum += queue_wait
        if ttft is not None:
            s.ttft[bucket(TIME_BUCKETS, ttft)] += 1
            s.ttft_sum += ttft
        if tokens is not None:
            prompt, generated, seconds = tokens
            s.prompt += prompt
            s.generated += generated
            if stream and generated and seconds:
                speed = generated / seconds
                s.tps[bucket(TPS_BUCKETS, speed)] += 1
                s.tps_sum += speed

    def rejected(self, reason: str) -> None:
        self.rejections[reason] = self.rejections.get(reason, 0) + 1

    def retried(self, backend: str) -> None:
        self.retries[backend] = self.retries.get(backend, 0) + 1

    def ejected(self, backend: str) -> None:
        self.ejections[backend] = self.ejections.get(backend, 0) + 1

    def returned(self, backend: str) -> None:
        self.returns[backend] = self.returns.get(backend, 0) + 1

    def load_started(self, model: str, backend: str) -> None:
        key = (model, backend)
        self.loads[key] = self.loads.get(key, 0) + 1

    def load_answered(self, model: str, backend: str, seconds: float) -> None:
        key = (model, backend)
        self.load_wait[key] = self.load_wait.get(key, 0.0) + seconds

    def view(self) -> View:
        """The families as the page shows them (sums over the series), at scrape time."""
        v = View(self.n)
        for (endpoint, model, backend), s in self.series.items():
            for status, count in s.status.items():
                _add(v.requests, (endpoint, model, backend, status), count)
            _add_hist(v.duration, (endpoint, backend), s.duration, s.duration_sum)
            if s.queue_sum or any(s.queue):
                _add_hist(v.queue_wait, (model,), s.queue, s.queue_sum)
            if s.ttft_sum or any(s.ttft):
                _add_hist(v.ttft, (model, backend), s.ttft, s.ttft_sum)
            if any(s.tps):
                _add_hist(v.tps, (model, backend), s.tps, s.tps_sum)
            if s.prompt or s.generated:
                _add(v.prompt_tokens, (model, backend), s.prompt)
                _add(v.eval_tokens, (model, backend), s.generated)
        v.retries, v.ejections, v.returns = dict(self.retries), dict(self.ejections), dict(self.returns)
        v.rejections = dict(self.rejections)
        v.loads, v.load_wait = dict(self.loads), dict(self.load_wait)
        if self.base is not None:
            v.add_state(self.base)
        return v

    def state(self) -> dict:
        """The counters as JSON-able lists (what a worker publishes)."""
        return self.view().state()


class View:
    """Counters by the labels of each family: a worker's (Metrics.view), or a group's (merged)."""

    __slots__ = ("n", "requests", "retries", "rejections", "ejections", "returns", "queue_wait", "ttft",
                 "duration", "tps", "prompt_tokens", "eval_tokens", "loads", "load_wait")

    def __init__(self, n: int):
        self.n = n
        self.requests: dict[tuple, int] = {}      # (endpoint, model, backend, status)
        self.retries: dict[str, int] = {}
        self.rejections: dict[str, int] = {}
        self.ejections: dict[str, int] = {}
        self.returns: dict[str, int] = {}
        #: Histograms: label key -> [bucket counts (last: +Inf), sum].
        self.queue_wait: dict[tuple, list] = {}   # (model,)
        self.ttft: dict[tuple, list] = {}         # (model, backend)
        self.duration: dict[tuple, list] = {}     # (endpoint, backend)
        self.tps: dict[tuple, list] = {}          # (model, backend), streams with a token count
        self.prompt_tokens: dict[tuple, int] = {}  # (model, backend)
        self.eval_tokens: dict[tuple, int] = {}    # (model, backend)
        self.loads: dict[tuple, int] = {}         # (model, backend)
        self.load_wait: dict[tuple, float] = {}   # (model, backend)

    def state(self) -> dict:
        return {
            "requests": [[*k, v] for k, v in self.requests.items()],
            "retries": list(self.retries.items()), "ejections": list(self.ejections.items()),
            "returns": list(self.returns.items()),
            "rejections": self.rejections,
            "queue_wait": [[*k, v[0], v[1]] for k, v in self.queue_wait.items()],
            "ttft": [[*k, v[0], v[1]] for k, v in self.ttft.items()],
            "duration": [[*k, v[0], v[1]] for k, v in self.duration.items()],
            "tps": [[*k, v[0], v[1]] for k, v in self.tps.items()],
            "prompt_tokens": [[*k, v] for k, v in self.prompt_tokens.items()],
            "eval_tokens": [[*k, v] for k, v in self.eval_tokens.items()],
            "loads": [[*k, v] for k, v in self.loads.items()],
            "load_wait": [[*k, v] for k, v in self.load_wait.items()],
        }

    def add_state(self, doc: dict) -> None:
        """Add a published state (another worker's, or a predecessor's) to these counters."""
        for name in ("requests", "prompt_tokens", "eval_tokens", "loads", "load_wait"):
            table = getattr(self, name)
            for *k, v in doc.get(name, ()):
                _add(table, tuple(k), v)
        for name in ("retries", "ejections", "returns"):
            table = getattr(self, name)
            for i, v in doc.get(name, ()):
                _add(table, i, v)
        for reason, v in doc.get("rejections", {}).items():
            _add(self.rejections, reason, v)
        for name in ("queue_wait", "ttft", "duration", "tps"):
            table = getattr(self, name)
            for *k, counts, total in doc.get(name, ()):
                _add_hist(table, tuple(k), counts, total)


def _add(table: dict, key, value) -> None:
    table[key] = table.get(key, 0) + value


def _add_hist(table: dict, key: tuple, counts: list, total: float) -> None:
    hist = table.get(key)
    if hist is None:
        table[key] = [list(counts), total]
    elif len(hist[0]) == len(counts):
        hist[0] = [a + b for a, b in zip(hist[0], counts)]
        hist[1] += total


# --- token counts from a response's last bytes -----------------------------------------------------
# Compiled (olb/_tokens.pyx, whose docstring has the rules), and re-exported:
# Exchange.on_end reads them once per model response.

# --- publishing across workers ----------------------------------------------------------------------


def state_path(directory: str, worker: int) -> str:
    return os.path.join(directory, f"worker-{worker}.json")


def publish(ctx) -> None:
    """Write this worker's counters and queue to its file, whole (a reader
    never sees half a file: written aside, then renamed over it)."""
    doc = ctx.metrics.state()
    doc["queue"] = [[model, klass, v] for (model, klass), v in queue_depths(ctx.balancer.queue).items()]
    path = state_path(ctx.metrics_dir, ctx.worker)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(orjson.dumps(doc))
    os.replace(tmp, path)


def read_state(directory: str, worker: int) -> dict | None:
    try:
        with open(state_path(directory, worker), "rb") as f:
            return orjson.loads(f.read())
    except (OSError, orjson.JSONDecodeError):
        return None


def merged(ctx) -> View:
    """This worker's counters plus every other worker's last publication."""
    total = ctx.metrics.view()
    directory = ctx.metrics_dir
    if directory is None:
        return total
    for worker in range(ctx.config.workers):
        if worker != ctx.worker:
            doc = read_state(directory, worker)
            if doc is not None:
                total.add_state(doc)
    return total


# --- the scrape -------------------------------------------------------------------------------------


class OlbCollector:
    """A prometheus_client collector over olb's own state, read when scraped."""

    def __init__(self, ctx):
        self.ctx = ctx

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        ctx = self.ctx
        balancer = ctx.balancer
        urls = [b.url for b in balancer.backends]

        def name(backend: str) -> str:
            return backend

        m = merged(ctx)
        fam = CounterMetricFamily("olb_requests", "Requests answered, by endpoint, model, backend and status "
                                  "(499: the client went away first).",
                                  labels=("endpoint", "model", "backend", "status"))
        for (endpoint, model, backend, status), v in sorted(m.requests.items(), key=repr):
            fam.add_metric((endpoint, model, name(backend), str(status)), v)
        yield fam
        yield _per_backend(CounterMetricFamily, "olb_retries", "Attempts that failed on a backend before "
                           "the first byte and were retried on another.", urls, m.retries)
        fam = CounterMetricFamily("olb_rejections", "Requests olb refused: queue_full (503), queue_timeout "
                                  "(503), client_share (429), no_backend (502).", labels=("reason",))
        for reason in (QUEUE_FULL, QUEUE_TIMEOUT, CLIENT_SHARE, NO_BACKEND):
            fam.add_metric((reason,), m.rejections.get(reason, 0))
        yield fam
        yield _per_backend(CounterMetricFamily, "olb_backend_ejections", "Times a backend was taken out "
                           "(marked down), counted by each worker that did.", urls, m.ejections)
        yield _per_backend(CounterMetricFamily, "olb_backend_returns", "Times a backend came back after a "
                           "probe found it healthy.", urls, m.returns)
        yield _histogram("olb_queue_wait_seconds", "Time from a request's arrival to its backend slot "
                         "(0 when one was free).", ("model",), m.queue_wait, TIME_BUCKETS, name)
        yield _histogram("olb_time_to_first_byte_seconds", "Time from a request's arrival to the backend's "
                         "first response byte (the first token of a stream).", ("model", "backend"), m.ttft,
                         TIME_BUCKETS, name)
        yield _histogram("olb_request_duration_seconds", "Time from a request's arrival to its response's "
                         "end.", ("endpoint", "backend"), m.duration, TIME_BUCKETS, name)
        yield _histogram("olb_stream_tokens_per_second", "Generation speed of streamed responses: "
                         "eval_count / eval_duration, else completion tokens / time after the first byte.",
                         ("model", "backend"), m.tps, TPS_BUCKETS, name)
        for metric, doc, table in (
                ("olb_prompt_tokens", "Prompt tokens of answered requests (prompt_eval_count, "
                 "usage.prompt_tokens).", m.prompt_tokens),
                ("olb_generated_tokens", "Generated tokens of answered requests (eval_count, "
                 "usage.completion_tokens).", m.eval_tokens),
                ("olb_model_loads", "Model loads olb triggered (a request sent where its model was not "
                 "loaded, or loaded with other runner options).", m.loads),
                ("olb_model_load_wait_seconds", "Seconds the requests that triggered loads waited for "
                 "the backend's first byte.", m.load_wait)):
            fam = CounterMetricFamily(metric, doc, labels=("model", "backend"))
            for (model, backend), v in sorted(table.items(), key=repr):
                fam.add_metric((model, name(backend)), v)
            yield fam
        yield from self._gauges(urls)

    def _gauges(self, urls):
        from prometheus_client.core import GaugeMetricFamily

        ctx = self.ctx
        balancer = ctx.balancer
        snap = balancer.table.snapshot()
        rows = {
            "olb_backend_in_flight": ("Requests in flight on a backend (all workers).",
                                      [r["inflight"] for r in snap]),
            "olb_backend_capacity": ("Requests a backend takes at once (max=).", [r["capacity"] for r in snap]),
            "olb_backend_up": ("1 while the health checks find a backend reachable.",
                               [1 if b.up else 0 for b in balancer.backends]),
            "olb_backend_draining": ("1 while a backend is drained (/olb/drain).",
                                     [1 if balancer.drained[i] else 0 for i in range(len(urls))]),
        }
        for metric, (doc, values) in rows.items():
            yield _per_backend(GaugeMetricFamily, metric, doc, urls, values)
        util = GaugeMetricFamily("olb_backend_gpu_utilization_ratio", "GPU utilisation of a backend's GPUs "
                                 "(NVML or DCGM), 0-1; absent without a reading.", labels=("backend",))
        free = GaugeMetricFamily("olb_backend_gpu_free_bytes", "Free memory of a backend's GPUs; absent "
                                 "without a reading.", labels=("backend",))
        for url, row in zip(urls, snap):
            if row["gpu_util"] is not None and row["gpu_util"] >= 0:
                util.add_metric((url,), row["gpu_util"])
            if row["gpu_mem_free"] is not None and row["gpu_mem_free"] >= 0:
                free.add_metric((url,), row["gpu_mem_free"])
        yield util
        yield free
        depth = GaugeMetricFamily("olb_queue_depth", "Requests waiting in olb's queue, by model and client "
                                  "class (interactive, batch); all workers.", labels=("model", "class"))
        counts = queue_depths(balancer.queue)
        directory = ctx.metrics_dir
        if directory is not None:
            for worker in range(ctx.config.workers):
                if worker != ctx.worker:
                    doc = read_state(directory, worker)
                    for model, klass, v in (doc or {}).get("queue", ()):
                        counts[(model, klass)] = counts.get((model, klass), 0) + v
        for (model, klass), v in sorted(counts.items()):
            depth.add_metric((model, klass), v)
        yield depth
        loaded = GaugeMetricFamily("olb_backend_model_loaded", "1 for each model a backend has loaded "
                                   "(its /api/ps, and what olb placed since).", labels=("backend", "model"))
        models = balancer.models
        if models is not None:
            for model, mask in sorted(models.loaded.items()):
                for i, url in enumerate(urls):
                    if mask[i]:
                        loaded.add_metric((url, model), 1)
        yield loaded
        workers = GaugeMetricFamily("olb_workers", "Worker processes whose counters this scrape adds up.")
        workers.add_metric((), ctx.config.workers)
        yield workers


CLASS_NAMES = ("interactive", "batch")


def queue_depths(queue) -> dict:
    """(model, class) -> waiters in one worker's queue (read at scrape time)."""
    counts: dict = {}
    for priority, model in queue.waiting():
        key = (model or "", CLASS_NAMES[priority])
        counts[key] = counts.get(key, 0) + 1
    return counts


def _per_backend(kind, metric: str, doc: str, urls, values):
    """A family with a sample per backend; `values` a list by index, or a dict by URL (0 where absent)."""
    fam = kind(metric, doc, labels=("backend",))
    for i, url in enumerate(urls):
        fam.add_metric((url,), values.get(url, 0) if isinstance(values, dict) else values[i])
    return fam


def _histogram(metric: str, doc: str, labels: tuple, table: dict, bounds: tuple, name):
    from prometheus_client.core import HistogramMetricFamily

    fam = HistogramMetricFamily(metric, doc, labels=labels)
    for key, (counts, total) in sorted(table.items(), key=repr):
        values = [name(k) if label == "backend" else k for label, k in zip(labels, key)]
        running = 0
        buckets = []
        for bound, c in zip((*(repr(float(b)) for b in bounds), "+Inf"), counts):
            running += c
            buckets.append((bound, running))
        fam.add_metric(values, buckets, total)
    return fam


def render(ctx) -> bytes:
    """The Prometheus text page of `/metrics` for this worker's process group."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(OlbCollector(ctx))
    return generate_latest(registry)


#: The Content-Type of render's page (Prometheus text format 0.0.4).
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


# --- a request's end: the metrics and the access log ------------------------------------------------


class Observed:
    """What a proxied request reports when it ends: the fields observe reads
    of a proxy.Exchange, which derives from this. Declared here (metrics.pxd)
    so that observe, compiled, reads them as C fields: metrics cannot
    cimport proxy, which cimports it."""

    def __init__(self):
        self.req = None
        self.head = None
        self.name: str | None = None
        self.served = ""  # the backend's URL
        self.tokens: tuple | None = None
        self.attempts = self.sent = 0
        self.slot = False
        self.t_admit = self.t_first = 0.0


def observe(ctx, client, ex, status: int, req=None, sent: int | None = None) -> None:
    """A request ended (answered, refused, or its client left: 499): count
    it and write its access line. Called by proxy.ClientSideProtocol when
    OLB_METRICS or OLB_ACCESS_LOG is on; `ex` is the exchange that served
    it, or None for a response olb made itself (then `req` and `sent`)."""
    now = monotonic()
    t0 = client.t0
    duration = now - t0
    backend = name = model = ""  # the backend's URL: counters stay right when a reload changes the list
    queue_wait = ttft = tokens = None
    stream = False
    retries = 0
    if ex is not None:
        if isinstance(ex, Observed):  # a proxy.Exchange (others are listings and model management)
            done = ex
            req = done.req
            backend = done.served
            name = done.name or ""
            if backend and status != 404:
                model = name  # only a model some backend has: the label set stays bounded
            if done.slot and done.t_admit:
                queue_wait = done.t_admit - t0
            t_first = done.t_first
            if t_first:
                ttft = t_first - t0
            head = done.head
            stream = head is not None and head.framing == CHUNKED
            tokens = done.tokens
            if tokens is not None and tokens[2] is None and t_first:
                tokens = (tokens[0], tokens[1], now - t_first)
            retries = done.attempts
            sent = done.sent
        else:
            req = ex.req
    metrics = ctx.metrics
    if metrics is not None:
        metrics.request_done(endpoint_label(req.path) if req is not None else "other", model, backend, status,
                             queue_wait, ttft, duration, tokens, stream)
    access = ctx.access_log
    if access is not None:
        access.write(client.peer_ip, req.method if req is not None else b"-",
                     req.target if req is not None else b"-", name, backend, status, queue_wait, ttft, duration,
                     sent, tokens, retries)

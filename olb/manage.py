# cython: annotation_typing=False, boundscheck=True, wraparound=True, cdivision=False
"""Model management across the cluster: pull, push, create, copy, delete, blobs, stop.

olb must look like ONE Ollama. Inference goes to one backend; model
management goes to every backend it concerns, and the answers are combined
into the one answer a single Ollama would give. docs/management.md states
the rules for each endpoint; this module is where they live.

Rules for this module: the pure parts first (which request is what, which
backends it goes to, merging progress streams, combining answers), all
testable without sockets; then ManageExchange, the IO shell that glues one
client request to its fan-out. ManageExchange never takes an inference slot
(the balancer's acquire/queue): a pull or a delete must not wait behind a
busy GPU. It talks to backends through each backend's control-plane
client (Backend.client, an olb.client.BackendClient shared with probes and
polls), not the data-path pool.

Theory of operation
-------------------
Progress streams (/api/pull, /api/create, /api/push). Each backend streams
NDJSON `ProgressResponse` lines (api/types.go: status, digest, total,
completed). ProgressMerger keeps, per layer digest, each backend's latest
(total, completed) and emits one line per update with both summed over the
backends, so a client's progress bar shows the cluster's bytes. A status
line without a digest ("pulling manifest", "writing manifest") is emitted
the first time any backend says it. `success` is held back: the merged
stream ends with `{"status":"success"}` only when every target succeeded,
otherwise with Ollama's in-band error line naming the backends that failed
(server/routes.go streamResponse writes `{"error": ...}` after the first
byte). If no backend got as far as a first progress line, the answer is a
whole one: identical errors everywhere are passed on as they are (one
Ollama would have said the same), others become a 500 naming the backends
(streamResponse's default status).

Whole answers (/api/copy, /api/delete, stop, HEAD /api/blobs). `combine`
reads every target's status: a 404 from a backend that does not hold the
model is neutral for copy, delete and stop, so the answer is 404 only when
every backend said so.

Blob uploads (POST /api/blobs/sha256:...). The body is not buffered: the
client's request is handed out at its head (http.RequestReader streams it),
each backend that lacks the blob (HEAD first) gets its own upload, and a
Fanout puts each piece the client sends into every upload's queue. Reading
the client pauses (flow.BODY) while any queue holds more than
FANOUT_HIGH_WATER bytes and resumes when all are below a quarter of it, so
the upload goes at the pace of the slowest backend and memory stays at
about FANOUT_HIGH_WATER per backend. Each backend checks the digest itself
(server/routes.go CreateBlobHandler: 400 "digest mismatch"), and each
answer is checked here.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re

import orjson

from ._http import contains
from .client import BackendClient
from .errors import BackendProtocolError, BadRequest, OlbError
from .flow import BODY
from .http import END, NEED_DATA, error_response, simple_response
from .models import normalize

log = logging.getLogger("olb.manage")

PULL, PUSH, CREATE, COPY, DELETE, BLOB_HEAD, BLOB_POST, STOP = (
    "pull", "push", "create", "copy", "delete", "blob_head", "blob_post", "stop")

#: (method, path) -> operation. Any other method on these paths goes to one
#: backend as usual, which answers 405 as gin does.
_OPS = {
    (b"POST", b"/api/pull"): PULL,
    (b"POST", b"/api/push"): PUSH,
    (b"POST", b"/api/create"): CREATE,
    (b"POST", b"/api/copy"): COPY,
    (b"DELETE", b"/api/delete"): DELETE,
}
_OP_PATHS = frozenset(path for _, path in _OPS)
BLOB_PREFIX = b"/api/blobs/"

#: A stop request is a few hundred bytes; a bigger body is an inference
#: request and is not searched (a 20 MB image body stays off the event loop).
STOP_MAX_BODY = 64 * 1024
#: Bytes one upload may have queued before the client is paused (per backend).
FANOUT_HIGH_WATER = 256 * 1024
#: Seconds a backend may stay silent during a management request. Ollama
#: prints nothing while it hashes a downloaded layer ("verifying sha256
#: digest") or while it copies a multi-GB blob, so this is long.
MANAGE_IDLE_TIMEOUT = 600.0
#: Largest whole answer read from a backend (errors, /api/delete, unload
#: replies), and the longest progress line.
MAX_ANSWER = 1024 * 1024
#: A progress stream is read line by line as it comes, and is as long as the
#: pull (a line every few ms for minutes): no cap on its total.
STREAM_CAP = 1 << 62

JSON = b"application/json; charset=utf-8"
NDJSON = b"application/x-ndjson"


# --- pure: what a request is ------------------------------------------------------------


def classify(method: bytes, path: bytes, body: bytes = b"") -> str | None:
    """The management operation a request is, or None (an ordinary request)."""
    if path in _OP_PATHS:  # (the usual request: one set lookup, no key tuple)
        op = _OPS.get((method, path))
        if op is not None:
            return op
    if path.startswith(BLOB_PREFIX):
        if method == b"HEAD":
            return BLOB_HEAD
        if method == b"POST":
            return BLOB_POST
        return None
    if method == b"POST" and stop_model(path, body) is not None:
        return STOP
    return None


# Go's time.ParseDuration of a duration whose every number is zero ("0",
# "0s", "0.0m", "0h0m"): Duration.UnmarshalJSON (api/types.go) reads a
# JSON string that way, and 0 means "unload now".
_ZERO_DURATION = re.compile(r"[-+]?(?:(?:0+(?:\.0*)?|\.0+)(?:ns|us|µs|μs|ms|s|m|h))+|[-+]?0")


def is_zero_keep_alive(value) -> bool:
    """True when a `keep_alive` value unloads the model (api/types.go Duration.UnmarshalJSON)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        # time.Duration(t * float64(time.Second)) truncates: below 1 ns is 0.
        return 0 <= value < 1e-9
    if isinstance(value, str):
        return _ZERO_DURATION.fullmatch(value) is not None
    return False


def stop_model(path: bytes, body: bytes) -> str | None:
    """The model a stop request unloads (`ollama stop X`), or None.

    Ollama unloads when a generate request has an empty prompt, or a chat
    request no messages, and keep_alive is 0 (server/routes.go
    GenerateHandler and ChatHandler: "expire the runner").
    """
    # (_http.contains, not `in` or find: CPython's bytes.__contains__ tries
    # the needle as an int first, and the TypeError it raises and clears,
    # or find's argument parsing, costs more than the search, on every
    # generate and chat request.)
    if path not in (b"/api/generate", b"/api/chat") or len(body) > STOP_MAX_BODY or not contains(body, b"keep_alive"):
        return None
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict) or not is_zero_keep_alive(doc.get("keep_alive")):
        return None
    if doc.get("prompt" if path == b"/api/generate" else "messages"):
        return None
    model = doc.get("model")
    return model if isinstance(model, str) and model.strip() else None


def request_doc(body: bytes) -> dict:
    """A management request's JSON object; {} when it is not one (the backends answer that)."""
    try:
        doc = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return {}
    return doc if isinstance(doc, dict) else {}


def wants_stream(doc: dict) -> bool:
    """Ollama streams unless the request says `"stream": false` (routes.go: req.Stream != nil && !*req.Stream)."""
    return doc.get("stream") is not False


def model_name(op: str, doc: dict) -> str | None:
    """The model a request is about, normalised: copy's source, else model (or its alias name)."""
    name = doc.get("source") if op == COPY else (doc.get("model") or doc.get("name"))
    return normalize(name) if isinstance(name, str) and name.strip() else None


def create_needs(doc: dict) -> tuple[str | None, list[str]]:
    """(base model, blob digests) a create request needs on a backend (api/types.go CreateRequest)."""
    base = doc.get("from")
    base = normalize(base) if isinstance(base, str) and base.strip() else None
    digests = []
    for key in ("files", "adapters"):
        files = doc.get(key)
        if isinstance(files, dict):
            digests += [d for d in files.values() if isinstance(d, str) and d]
    return base, digests


# --- pure: which backends ----------------------------------------------------------------


def room_targets(healthy: list[int], size: int | None, capacity: list[int | None]) -> list[int]:
    """OLB_PULL=room: the healthy backends whose GPU memory can hold a model of `size` bytes.

    A backend whose GPU memory is not known (None) is kept, and so is every
    backend when the size is not known (no backend has the model yet).
    """
    if not size:
        return list(healthy)
    return [i for i in healthy if (room := capacity[i]) is None or room >= size]


def lacking(names: list[set[str] | None], urls: list[str]) -> dict[str, list[str]]:
    """/olb/status: for each model some backend holds, the backends that do not.

    `names[i]` is backend i's installed models, None when its catalogue is
    not known (it is then left out: neither holding nor lacking).
    """
    known = [(url, have) for url, have in zip(urls, names) if have is not None]
    every = set().union(*(have for _, have in known)) if known else set()
    out = {}
    for model in sorted(every):
        missing = [url for url, have in known if model not in have]
        if missing:
            out[model] = missing
    return out


# --- pure: merging and combining ------------------------------------------------------------


class ProgressMerger:
    """Merges the NDJSON progress streams of n backends into one (see the module docstring).

    `feed(k, doc)` takes a line from backend k and returns the merged lines
    to send (maybe none); `fail(k, message)` records a backend that failed
    outside its stream; `end(k)` marks its stream ended. Then `failures()`
    lists the backends that did not succeed.
    """

    __slots__ = ("n", "_layers", "_said", "outcome")

    def __init__(self, n: int):
        self.n = n
        self._layers: dict[str, list] = {}
        self._said: set[str] = set()
        #: Per backend: None (running), True (success), or the error text.
        self.outcome: list = [None] * n

    def feed(self, k: int, doc) -> list[dict]:
        if not isinstance(doc, dict):
            return []
        if "error" in doc:
            self.outcome[k] = str(doc["error"])
            return []
        status = doc.get("status")
        status = status if isinstance(status, str) else ""
        if status == "success":
            self.outcome[k] = True
            return []
        digest = doc.get("digest")
        if isinstance(digest, str) and digest:
            row = self._layers.get(digest)
            if row is None:
                row = self._layers[digest] = [None] * self.n
            row[k] = (_count(doc.get("total")), _count(doc.get("completed")))
            total = sum(r[0] for r in row if r)
            completed = sum(r[1] for r in row if r)
            out = {"status": status, "digest": digest}
            # ProgressResponse's total and completed are omitempty.
            if total:
                out["total"] = total
            if completed:
                out["completed"] = completed
            return [out]
        if not status or status in self._said:
            return []
        self._said.add(status)
        return [{"status": status}]

    def fail(self, k: int, message: str) -> None:
        if self.outcome[k] is None or self.outcome[k] is True:
            self.outcome[k] = message

    def end(self, k: int) -> None:
        if self.outcome[k] is None:
            self.outcome[k] = "the backend closed the stream before it finished"

    def failures(self) -> list[tuple[int, str]]:
        return [(k, o) for k, o in enumerate(self.outcome) if o is not True]


def _count(value) -> int:
    return value if type(value) is int and value > 0 else 0


class Result:
    """One backend's answer to a whole request (status None: it could not be asked)."""

    __slots__ = ("index", "url", "status", "body", "content_type", "error")

    def __init__(self, index: int, url: str, status: int | None, body: bytes = b"",
                 content_type: bytes | None = None, error: str = ""):
        self.index = index
        self.url = url
        self.status = status
        self.body = body
        self.content_type = content_type
        self.error = error or _error_text(body) or (f"status {status}" if status else "no answer")

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def _error_text(body: bytes) -> str:
    """The `error` of an Ollama error body, else the body as text (short)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:200].decode("utf-8", "replace").strip()
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        return doc["error"]
    return ""


def failure_text(op: str, failed: list[tuple[str, str]], succeeded: int = 0, total: int = 0) -> str:
    """Ollama's error text for a fan-out that failed somewhere, naming the backends."""
    parts = "; ".join(f"{url}: {message}" for url, message in failed)
    text = f"{op} failed on {len(failed)} of {total or len(failed)} backends ({parts})"
    if succeeded:
        text += f"; it succeeded on the other {succeeded}"
    return text


def combine(op: str, results: list[Result], neutral: tuple[int, ...] = ()) -> tuple[int, bytes, bytes | None]:
    """The one answer for every target's answer: (status, body, content type or None for JSON error).

    Success (the first 2xx answer) when no target failed; a status in
    `neutral` (404 for a backend that does not hold the model) is not a
    failure, and when every target answered a neutral status the first such
    answer is passed on. When every target failed alike (same status and
    text) that answer is passed on as one Ollama would have given it;
    otherwise the answer is an error naming the backends that failed, with
    status 502 when one could not be reached and 500 otherwise.
    """
    if not results:
        return 502, orjson.dumps({"error": f"{op}: no healthy backend"}), None
    failed = [r for r in results if not r.ok and r.status not in neutral]
    good = [r for r in results if r.ok]
    if not failed:
        first = good[0] if good else results[0]
        # status None (not asked) counts as failed, so first has a status.
        return first.status, first.body, first.content_type  # type: ignore[return-value]
    if len(failed) == len(results) and len({(r.status, r.error) for r in failed}) == 1:
        first = failed[0]
        if first.status is not None:
            return first.status, first.body, first.content_type
    status = 502 if any(r.status is None for r in failed) else 500
    text = failure_text(op, [(r.url, r.error) for r in failed], len(good), len(results))
    return status, orjson.dumps({"error": text}), None


# --- the body fan-out --------------------------------------------------------------------------


class Fanout:
    """One request body to n consumers, at the pace of the slowest.

    `feed(piece)` queues a piece for every open branch; `finish()` ends the
    body; `abort()` ends it with an error. `branch(k)` is the async iterator
    of pieces for consumer k (what BackendClient writes upstream), `drop(k)`
    forgets a consumer that failed. `on_pause()` is called when a branch holds
    more than `high` bytes, `on_resume()` when every open one holds at most
    `high // 4` again (flow.set_write_limits's rule, so it does not flap).
    """

    __slots__ = ("_queues", "_sizes", "_open", "_waiters", "_high", "_low", "_ended", "_aborted",
                 "paused", "on_pause", "on_resume")

    def __init__(self, n: int, high: int = FANOUT_HIGH_WATER, on_pause=None, on_resume=None):
        self._queues: list[collections.deque[bytes]] = [collections.deque() for _ in range(n)]
        self._sizes = [0] * n
        self._open = [True] * n
        self._waiters: list = [None] * n
        self._high = high
        self._low = high // 4
        self._ended = False
        self._aborted = False
        self.paused = False
        self.on_pause = on_pause
        self.on_resume = on_resume

    def feed(self, piece: bytes) -> None:
        over = False
        for k, queue in enumerate(self._queues):
            if not self._open[k]:
                continue
            queue.append(piece)
            self._sizes[k] += len(piece)
            if self._sizes[k] > self._high:
                over = True
            self._wake(k)
        if over and not self.paused:
            self.paused = True
            if self.on_pause is not None:
                self.on_pause()

    def finish(self) -> None:
        self._ended = True
        for k in range(len(self._queues)):
            self._wake(k)

    def abort(self) -> None:
        self._aborted = True
        self.finish()

    def drop(self, k: int) -> None:
        self._open[k] = False
        self._queues[k].clear()
        self._sizes[k] = 0
        self._maybe_resume()

    async def branch(self, k: int):
        queue = self._queues[k]
        while True:
            if self._aborted:
                raise ConnectionAbortedError("the client's upload broke off")
            if queue:
                piece = queue.popleft()
                self._sizes[k] -= len(piece)
                self._maybe_resume()
                yield piece
            elif self._ended:
                return
            else:
                waiter = self._waiters[k] = asyncio.get_running_loop().create_future()
                try:
                    await waiter
                finally:
                    self._waiters[k] = None

    def _wake(self, k: int) -> None:
        waiter = self._waiters[k]
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _maybe_resume(self) -> None:
        if self.paused and all(s <= self._low for s, o in zip(self._sizes, self._open) if o):
            self.paused = False
            if self.on_resume is not None:
                self.on_resume()


# --- the IO shell ------------------------------------------------------------------------------


class ManageExchange:
    """One management request, fanned out to the backends it concerns.

    Follows MergedExchange (olb/proxy.py): start() runs the fan-out as a
    task, client_gone() cancels it, and cancelling closes every backend
    connection it opened (for a pull, that stops the download on each).
    """

    __slots__ = ("client", "ctx", "req", "op", "task", "fanout", "body_done", "closing", "conn", "_head_sent")

    def __init__(self, client, req, op: str):
        self.client = client
        self.ctx = client.ctx
        self.req = req
        self.op = op
        self.task = None
        self.fanout: Fanout | None = None
        self.body_done: asyncio.Future | None = None
        self.closing = not req.keep_alive
        self.conn = None  # no data-path backend connection (ClientSideProtocol looks)
        self._head_sent = False

    # --- called by ClientSideProtocol ---

    def start(self) -> None:
        self.task = self.ctx.loop.create_task(self._run())

    def client_gone(self) -> None:
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
        if self.fanout is not None:
            self.fanout.abort()

    def body_received(self) -> None:
        """Called by ClientSideProtocol with more of a streamed body in its reader."""
        fan = self.fanout
        if fan is None or fan.paused:
            # Not ready for it yet (the HEADs are out), or a backend is behind.
            self.client.gate.pause(BODY)
        else:
            self._pump()

    # --- the fan-outs ---

    async def _run(self) -> None:
        try:
            handler = {PULL: self._progress, PUSH: self._progress, CREATE: self._progress,
                       COPY: self._whole, DELETE: self._whole, STOP: self._stop,
                       BLOB_HEAD: self._blob_head, BLOB_POST: self._blob_post}[self.op]
            await handler()
        except asyncio.CancelledError:
            raise
        except BadRequest as exc:
            self._error(exc.status_hint, exc.message)
        except Exception as exc:  # a bug: answer rather than leave the client hanging
            log.exception("%s failed", self.op)
            if self._head_sent:
                self._end_stream({"error": f"olb: {exc}"})
            else:
                self._error(500, f"olb: {exc}")

    def _healthy(self) -> list[int]:
        return [b.index for b in self.ctx.balancer.backends if b.up]

    def _url(self, index: int) -> str:
        return self.ctx.balancer.backends[index].url

    def _client(self, index: int) -> BackendClient:
        """The backend's control-plane client (shared with probes and polls: keep-alive)."""
        return self.ctx.balancer.backends[index].client

    def _holders(self, model: str | None, healthy: list[int], loaded: bool = False) -> list[int]:
        """The healthy backends that hold (or have loaded) the model, as far as
        olb knows (a backend whose catalogue is not known yet counts as
        holding it); all healthy ones when olb does not track models."""
        models = self.ctx.balancer.models
        if models is None or model is None:
            return healthy
        mask = models.loaded_mask(model) if loaded else models.installed_mask(model)
        return [i for i in healthy if mask[i]]

    async def _refresh(self, indexes) -> None:
        """Re-read these backends' catalogues now: a model pulled, created or
        copied is routable, a deleted or unloaded one gone, when the answer goes out."""
        models = self.ctx.balancer.models
        if models is not None and indexes:
            await asyncio.gather(*(models.refresh(i) for i in indexes))

    async def _ask(self, index: int, method: str, body=b"", headers=(), content_length=None,
                   path: bytes | None = None) -> Result:
        url = self._url(index)
        try:
            resp = await self._client(index).request(
                method, (path or self.req.target).decode("latin-1"), body=body, headers=headers,
                content_length=content_length, timeout=MANAGE_IDLE_TIMEOUT, max_body=MAX_ANSWER)
        except OlbError as exc:
            return Result(index, url, None, error=exc.message)
        except (ConnectionError, ValueError) as exc:
            return Result(index, url, None, error=str(exc))
        return Result(index, url, resp.status, resp.body, resp.header(b"content-type"))

    def _json_headers(self):
        ctype = self.req.header(b"content-type") or b"application/json"
        return [(b"content-type", ctype)]

    async def _whole(self) -> None:
        """/api/copy and /api/delete: every backend that holds the model; 404 only when none does."""
        doc = request_doc(self.req.body)
        healthy = self._healthy()
        targets = self._holders(model_name(self.op, doc), healthy) or healthy
        results = await asyncio.gather(*(self._ask(i, self.req.method.decode(), self.req.body,
                                                   self._json_headers()) for i in targets))
        await self._refresh([r.index for r in results if r.ok])
        self._answer_combined(*combine(self.op, results, neutral=(404,)))

    async def _stop(self) -> None:
        """keep_alive 0 with nothing to run: unload every copy (GenerateHandler/ChatHandler "expire the runner")."""
        healthy = self._healthy()
        model = normalize(stop_model(self.req.path, self.req.body) or "")
        # /api/ps may be up to OLB_MODELS_INTERVAL old: read it now.
        await self._refresh(healthy)
        targets = (self._holders(model, healthy, loaded=True) or self._holders(model, healthy)
                   or healthy)
        results = await asyncio.gather(*(self._ask(i, "POST", self.req.body, self._json_headers())
                                         for i in targets))
        await self._refresh([r.index for r in results if r.ok])
        self._answer_combined(*combine("stop", results, neutral=(404,)))

    async def _blob_head(self) -> None:
        """HEAD /api/blobs/:digest: 200 only when every healthy backend has the blob."""
        results = await asyncio.gather(*(self._ask(i, "HEAD") for i in self._healthy()))
        status, _, _ = combine("blob check", results)
        if any(r.status == 404 for r in results):
            status = 404  # some backend lacks it: the client must upload it
        # HEAD carries no body (HeadBlobHandler's JSON error is dropped by net/http for HEAD).
        self._respond(simple_response(status, b"", closing=self.closing, head_only=True), status)

    async def _blob_post(self) -> None:
        """POST /api/blobs/:digest: the body to every backend that lacks the blob, at once."""
        healthy = self._healthy()
        heads = await asyncio.gather(*(self._ask(i, "HEAD") for i in healthy))
        broken = [r for r in heads if r.status not in (200, 404)]
        if broken or not heads:
            self._answer_combined(*combine("blob upload", broken))
            return
        targets = [r.index for r in heads if r.status == 404]
        length = self.req.header(b"content-length")
        if targets and length is None:
            self._error(411, "a blob upload needs a Content-Length (olb streams it to several backends)")
            return
        loop = self.ctx.loop
        self.body_done = body_done = loop.create_future()
        self.fanout = Fanout(len(targets), on_pause=self._pause_body, on_resume=self._pump)
        self._pump()
        uploads = [self._upload(k, i, int(length)) for k, i in enumerate(targets)]
        results = (await asyncio.gather(*uploads, body_done))[:-1]
        if not results:  # every backend had it: Ollama answers 200 without reading
            self._respond(simple_response(200, b"", content_type=JSON, closing=self.closing), 200)
            return
        status, body, ctype = combine("blob upload", results)
        if all(r.ok for r in results):
            status, body, ctype = (201 if any(r.status == 201 for r in results) else 200), b"", JSON
        self._answer_combined(status, body, ctype)

    async def _upload(self, k: int, index: int, length: int) -> Result:
        fan = self.fanout
        assert fan is not None  # _upload runs only under the blob upload that made it
        result = await self._ask(index, "POST", fan.branch(k), content_length=length)
        fan.drop(k)  # done or failed: it no longer holds the client back
        return result

    def _pause_body(self) -> None:
        self.client.gate.pause(BODY)

    def _pump(self) -> None:
        """Move what the client sent into the fan-out until it is empty or a backend is behind."""
        fan = self.fanout
        reader = self.client.reader
        done = self.body_done
        if fan is None or done is None or done.done():
            return
        while not fan.paused:
            try:
                piece = reader.next_body()
            except BadRequest as exc:
                fan.abort()
                done.set_exception(exc)
                return
            if piece is NEED_DATA:
                self.client.gate.resume(BODY)
                return
            if piece is END:
                fan.finish()
                done.set_result(None)
                self.client.gate.resume(BODY)
                return
            fan.feed(piece)

    async def _progress(self) -> None:
        """/api/pull, /api/create, /api/push: one merged progress stream (see the module docstring)."""
        doc = request_doc(self.req.body)
        healthy = self._healthy()
        targets = await self._progress_targets(doc, healthy)
        if isinstance(targets, str):
            self._error(500, targets)
            return
        if not targets:
            self._error(502, f"{self.op}: no healthy backend")
            return
        streaming = wants_stream(doc) and self.req.http_version == b"1.1"
        merger = ProgressMerger(len(targets))
        whole: list[Result | None] = [None] * len(targets)  # non-stream answers
        reached = [False] * len(targets)  # answered at all (an in-band error is Ollama's 500)

        async def one(k: int, index: int) -> None:
            await read(k, index)
            if merger.outcome[k] is True and self.op != PUSH:
                await self._refresh([index])

        async def read(k: int, index: int) -> None:
            try:
                async with self._client(index).stream(
                        "POST", self.req.target.decode("latin-1"), body=self.req.body,
                        headers=self._json_headers(), timeout=MANAGE_IDLE_TIMEOUT, max_body=STREAM_CAP) as resp:
                    reached[k] = True
                    ctype = resp.header(b"content-type") or b""
                    if resp.status != 200 or not ctype.startswith(NDJSON):
                        body = b""
                        async for piece in resp:
                            body += piece
                            if len(body) > MAX_ANSWER:
                                raise BackendProtocolError(f"answer over {MAX_ANSWER} bytes")
                        whole[k] = answer = Result(index, self._url(index), resp.status, body, ctype)
                        if resp.status == 200:
                            merger.feed(k, request_doc(body))  # "stream": false
                        else:
                            merger.fail(k, answer.error)
                        return
                    pending = b""
                    async for piece in resp:
                        lines = (pending + piece).split(b"\n")
                        pending = lines.pop()
                        if len(pending) > MAX_ANSWER:
                            raise BackendProtocolError(f"a progress line over {MAX_ANSWER} bytes")
                        for line in lines:
                            if line.strip():
                                self._send_lines(merger.feed(k, request_doc(line)), streaming)
                    if pending.strip():
                        self._send_lines(merger.feed(k, request_doc(pending)), streaming)
                    merger.end(k)
            except OlbError as exc:
                merger.fail(k, exc.message)

        await asyncio.gather(*(one(k, i) for k, i in enumerate(targets)))
        failures = merger.failures()
        if self._head_sent:
            if failures:
                text = failure_text(self.op, [(self._url(targets[k]), m) for k, m in failures],
                                    len(targets) - len(failures), len(targets))
                log.warning("POST %s: %s", self.req.path.decode("latin-1"), text)
                self._end_stream({"error": text})
            else:
                self._end_stream({"status": "success"})
            return
        if not failures:
            self._respond(simple_response(200, orjson.dumps({"status": "success"}), content_type=b"application/json",
                                          closing=self.closing), 200)
            return
        results = [whole[k] or Result(targets[k], self._url(targets[k]), 500 if reached[k] else None, error=m)
                   for k, m in failures]
        if len(failures) < len(targets):
            # Some succeeded: never pass one backend's error on as the whole answer.
            results += [Result(targets[k], self._url(targets[k]), 200)
                        for k in range(len(targets)) if merger.outcome[k] is True]
        self._answer_combined(*combine(self.op, results))

    async def _progress_targets(self, doc: dict, healthy: list[int]):
        """The backends a pull, create or push goes to (a list), or why none can (a str)."""
        models = self.ctx.balancer.models
        if self.op == PUSH:
            # From one backend that holds it (any one: they hold the same
            # manifest); with none known, one that will answer Ollama's error.
            holders = [i for i in self._holders(model_name(PUSH, doc), healthy)
                       if models is None or models.known[i]]
            return (holders or healthy)[:1]
        if self.op == PULL:
            if self.ctx.config.pull == "room" and models is not None:
                name = model_name(PULL, doc)
                targets = room_targets(healthy, _model_size(models, name), _gpu_capacity(models))
                if not targets and healthy:
                    return f"no healthy backend has room for {name} (OLB_PULL=room)"
                return targets
            return healthy
        # CREATE: where the base model and every blob are (CreateHandler reads
        # both locally; a missing base it would pull, a missing blob fails).
        base, digests = create_needs(doc)
        targets = self._holders(base, healthy) if base else list(healthy)
        if digests and targets:
            checks = await asyncio.gather(*(self._ask(i, "HEAD", path=BLOB_PREFIX + d.encode("latin-1"))
                                            for i in targets for d in digests))
            have = collections.Counter(r.index for r in checks if r.status == 200)
            targets = [i for i in targets if have[i] == len(digests)]
        # Nowhere complete: every healthy backend, each answering as Ollama would.
        return targets or healthy

    # --- writing to the client ---

    def _send_lines(self, lines: list[dict], streaming: bool) -> None:
        if not lines or not streaming:
            return
        client = self.client
        if client.exchange is not self:
            return
        if not self._head_sent:
            self._head_sent = True
            client.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\n"
                                   b"transfer-encoding: chunked\r\n"
                                   + (b"connection: close\r\n" if self.closing else b"") + b"\r\n")
        elif client.write_paused:
            return  # a client that does not read gets fewer progress lines, not a growing buffer
        out = []
        for doc in lines:
            line = orjson.dumps(doc) + b"\n"
            out.append(b"%x\r\n%s\r\n" % (len(line), line))
        client.transport.write(b"".join(out))

    def _end_stream(self, last: dict) -> None:
        client = self.client
        if client.exchange is not self:
            return
        line = orjson.dumps(last) + b"\n"
        client.transport.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(line), line))
        client.response_done(200, self.closing)

    def _answer_combined(self, status: int, body: bytes, ctype: bytes | None) -> None:
        if ctype is None:  # olb's own error naming backends: worth an operator's eye
            log.warning("%s %s: %s", self.req.method.decode(), self.req.path.decode("latin-1"),
                        body.decode("utf-8", "replace"))
            ctype = JSON
        head_only = self.req.method == b"HEAD"
        self._respond(simple_response(status, body, content_type=ctype, closing=self._closing(),
                                      head_only=head_only), status)

    def _error(self, status: int, message: str) -> None:
        self._respond(error_response(self.req.target, status, message, closing=self._closing(),
                                     head_only=self.req.method == b"HEAD"), status)

    def _closing(self) -> bool:
        # A streamed body the answer did not wait for cannot be skipped: close.
        return self.closing or self.client.reader.streaming

    def _respond(self, data: bytes, status: int) -> None:
        client = self.client
        if client.exchange is not self:
            return
        client.transport.write(data)
        client.response_done(status, self._closing())


def _model_size(models, name: str | None) -> int | None:
    """A model's size in bytes from any backend's /api/tags that lists it."""
    if name is None:
        return None
    for entries in models.tags:
        for entry in entries:
            if normalize(entry.get("name") or entry.get("model") or "") == name:
                size = entry.get("size")
                if type(size) is int and size > 0:
                    return size
    return None


def _gpu_capacity(models) -> list[int | None]:
    """Per backend, its GPU memory in bytes (free + resident models), None when not known."""
    out: list[int | None] = []
    for i in range(models.n):
        free = models.vram_free[i]
        if free is None:
            out.append(None)
        else:
            out.append(free + sum(_count(e.get("size_vram")) for e in models.ps[i]))
    return out

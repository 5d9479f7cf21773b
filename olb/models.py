# cython: annotation_typing=False, boundscheck=True, wraparound=True, cdivision=False
"""What each backend has: installed models (/api/tags) and loaded ones (/api/ps).

Rules for this module: model names, per-model backend masks and what the
placement rules read from them (fits, spare, least_harm, warm_mask, evicts).
It never chooses a backend (that is olb/routing.py's Router, over the core's
acquire) and never blocks a decision: masks are read as they are, and a
backend whose catalogue has not been read yet counts as possibly having
every model. The rules themselves: docs/scheduling.md.

Theory of operation
-------------------
Each model olb has heard of has two byte masks of length n (one byte per
backend): `installed` and `loaded`. They are bytearrays updated *in place*,
so a request queued with a model's `loaded` mask as its admission filter
sees a backend that starts loading that model while it waits.

Sources, all pushed in, none waited on:
  - a poll of GET /api/tags and GET /api/ps on every backend, every
    OLB_MODELS_INTERVAL seconds (and once at start);
  - traffic: a backend that just answered 200 for model X has X loaded;
    a backend chosen for a cold model is marked as loading it, so the
    requests that follow wait for that load instead of starting another
    one elsewhere, and the models that load may evict are marked as
    leaving it (mark_placed; docs/scheduling.md, rules 1 and E).

Names are normalised the way Ollama does (`llama3` is
`registry.ollama.ai/library/llama3:latest`, displayed `llama3:latest`) and
compared case-insensitively, like Ollama's Name.EqualFold.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import urllib.parse
from typing import Callable

import orjson

from ._body import elements, members, routing_members
from .errors import OlbError

log = logging.getLogger("olb.models")

#: Ollama's defaults for what a backend holds (server/sched.go): OLLAMA_MAX_LOADED_MODELS
#: = 3 per GPU (defaultModelsPerGPU, processPending), and a model loads beside the
#: resident ones only if its predicted size is at most 80 % of free VRAM (load).
MODELS_PER_GPU = 3
FIT_FRACTION = 0.8
#: Seconds between two catalogue re-reads made because a request named a
#: model no backend listed (ModelDirectory.recheck).
RECHECK_INTERVAL = 1.0
#: How many of the latest requests (all models) "recent demand" counts: a
#: window in requests, not seconds, so that it means the same at any speed.
DEMAND_WINDOW = 500

_DEFAULT_HOST = "registry.ollama.ai"
_DEFAULT_NAMESPACE = "library"

#: Requests whose body olb reads for a `model` field, with the text Ollama
#: answers when the model is missing (server/routes.go: GenerateHandler and ChatHandler say
#: 'NAME', the scheduler-backed embed endpoints say "NAME"... try pulling, handleScheduleError;
#: at fb30760 EmbedHandler says 'NAME' first when getExistingName finds no model).
MODEL_ENDPOINTS: dict[bytes, str] = {
    b"/api/generate": "model '{name}' not found",
    b"/api/chat": "model '{name}' not found",
    b"/api/show": "model '{name}' not found",
    b"/api/embed": 'model "{name}" not found, try pulling it first',
    b"/api/embeddings": 'model "{name}" not found, try pulling it first',
    b"/v1/chat/completions": "model '{name}' not found",
    b"/v1/completions": "model '{name}' not found",
    b"/v1/embeddings": 'model "{name}" not found, try pulling it first',
    # ChatHandler's text behind the Anthropic and Responses middlewares
    # (middleware/anthropic.go AnthropicMessagesMiddleware, middleware/openai.go
    # ResponsesMiddleware); each wraps it in its own error shape (http.error_body).
    b"/v1/messages": "model '{name}' not found",
    b"/v1/responses": "model '{name}' not found",
}

#: Requests that run a model: Ollama's handlers that go through its
#: scheduler (server/routes.go GenerateHandler, ChatHandler, EmbedHandler,
#: EmbeddingsHandler, and the compatibility routes in front of them). Only
#: these take an inference slot (max=, OLB_MAX_INFLIGHT) and wait in olb's
#: queue when every slot is busy. Everything else -- /, /api/version,
#: /api/tags, /api/ps, /api/show, blobs, pull, push, create, copy, delete,
#: /v1/models -- Ollama's HTTP server answers without a runner, so olb sends
#: it to a healthy backend at once (Balancer.pick).
SLOT_ENDPOINTS = frozenset({
    b"/api/generate", b"/api/chat", b"/api/embed", b"/api/embeddings",
    b"/v1/chat/completions", b"/v1/completions", b"/v1/embeddings", b"/v1/responses",
    b"/v1/messages", b"/v1/audio/transcriptions",
})


def takes_slot(method: bytes, path: bytes) -> bool:
    """Does the request run a model (see SLOT_ENDPOINTS)? Other methods on
    those paths get Ollama's 405 at once."""
    return method == b"POST" and path in SLOT_ENDPOINTS


#: Endpoints whose answer streams unless the body says "stream": false
#: (api/types.go: `Stream *bool`, nil = stream) ...
_STREAM_UNLESS_FALSE = frozenset({b"/api/generate", b"/api/chat", b"/api/pull", b"/api/push", b"/api/create"})
#: ... and those that stream only with "stream": true (the OpenAI and
#: Anthropic request types: a plain bool, false when absent).
_STREAM_IF_TRUE = frozenset({b"/v1/chat/completions", b"/v1/completions", b"/v1/responses", b"/v1/messages"})


def streams(method: bytes, path: bytes, body: bytes) -> bool:
    """Does the backend answer this request as a stream (the first byte with
    the first token), rather than whole at the end?

    Parses the body: called when a first-byte timeout fires, never on the
    request path.
    """
    if method != b"POST":
        return False
    if path in _STREAM_UNLESS_FALSE:
        default = True
    elif path in _STREAM_IF_TRUE:
        default = False
    else:
        return False
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return default
    value = doc.get("stream") if isinstance(doc, dict) else None
    return default if value is None else value is True


#: normalize's answers; emptied when it reaches _NORMALIZED_MAX names (a
#: cluster's requests name a handful of models; a client sending endless
#: new names cannot make it grow).
_NORMALIZED: dict[str, str] = {}
_NORMALIZED_MAX = 4096
_last_name: str | None = None
_last_normalized = ""


def normalize(name: str) -> str:
    """The display-shortest form Ollama lists models under, lower-cased.

    Cached: a cluster's requests name a handful of models, and this runs
    for every request (3 µs of string work; from the cache, compiled, one
    dict lookup: a dict, not functools.lru_cache, whose call builds an
    argument tuple and whose bookkeeping costs ten times the lookup).

    `llama3.2` -> `llama3.2:latest`; `library/llama3.2:3b` -> `llama3.2:3b`;
    `registry.ollama.ai/library/x` -> `x:latest`; other hosts and namespaces
    are kept. Digest (`@sha256:...`) and build (`+Q4_0`) suffixes are dropped.
    """
    global _last_name, _last_normalized
    if name == _last_name:  # (consecutive requests mostly name one model: no hash of a new str)
        return _last_normalized
    out = _NORMALIZED.get(name)
    if out is None:
        out = display_shortest(name).lower()
        if len(_NORMALIZED) >= _NORMALIZED_MAX:
            _NORMALIZED.clear()
        _NORMALIZED[name] = out
    _last_name, _last_normalized = name, out
    return out


def display_shortest(name: str) -> str:
    """normalize() with the case kept: Ollama's Name.DisplayShortest, the
    form its not-found texts name a model by after parsing it (ShowHandler)."""
    name = name.strip()
    for scheme in ("http://", "https://"):
        if name.startswith(scheme):
            name = name[len(scheme):]
    name = name.split("@", 1)[0].split("+", 1)[0]
    slash = name.rfind("/")
    if name.rfind(":") <= slash:
        name += ":latest"
    parts = name.split("/")
    if len(parts) == 3 and parts[0].lower() == _DEFAULT_HOST:
        parts = parts[1:]
    if len(parts) == 2 and parts[0].lower() == _DEFAULT_NAMESPACE:
        parts = parts[1:]
    return "/".join(parts)


def namespace(name: str) -> str:
    """The namespace of a model name (model.ParseName(name).Namespace):
    `library` unless the name has one."""
    parts = name.split("/")
    return parts[-2] if len(parts) >= 2 and parts[-2] else _DEFAULT_NAMESPACE


def openai_model_id(path: bytes) -> str | None:
    """The model of a GET /v1/models/{id} path (gin's `:model`: one
    non-empty segment of the decoded path), or None."""
    if not path.startswith(b"/v1/models/"):
        return None
    model = urllib.parse.unquote(path[len(b"/v1/models/"):].decode("latin-1"))
    return model if model and "/" not in model else None


#: Bytes of a conversation's leading messages or prompt that identify it.
AFFINITY_PREFIX = 2048
#: A `messages` array up to this size is decoded whole for its conversation
#: bytes; a bigger one (images inline, up to tens of MB) is stepped through
#: message by message (_big_affinity), the small ones decoded.
SMALL_BODY = 64 * 1024
#: Messages _big_affinity steps through before it decodes the array whole:
#: an array of a million small messages costs one orjson parse, not a
#: million Python steps.
SCAN_BUDGET = 20_000
#: The runner options of Ollama's needsReload (server/sched.go): a request
#: whose values differ from the loaded runner's unloads and reloads the model.
#: num_gpu < 0 is ignored there ("Don't reload runner if num_gpu=-1").
RELOAD_OPTIONS = ("num_ctx", "num_batch", "num_gpu", "main_gpu", "use_mmap", "num_thread")
_RELOAD_SET = frozenset(RELOAD_OPTIONS)
#: The same names as bytes, for the body reader (_body.routing_members).
_RELOAD_KEYS = tuple(name.encode() for name in RELOAD_OPTIONS)
#: (A module global, not orjson.loads: compiled, no attribute lookup on the module a request.)
_loads = orjson.loads


#: What routing reads from a request body (parse_request), a plain tuple
#: (model, affinity, runner) -- a NamedTuple's construction and unpacking
#: cost a request ~1,400 instructions more, compiled:
#:   model     the `model` field (or `name`, its deprecated alias on
#:             /api/show), as sent, or None
#:   affinity  the bytes that identify its conversation, or None
#:   runner    its runner options: sorted (name, value) pairs of
#:             RELOAD_OPTIONS it sets; () for the server's defaults. Two
#:             requests for one model with different keys need different
#:             runners (Ollama's needsReload).
Routed = tuple[str | None, bytes | None, tuple]

NOTHING: Routed = (None, None, ())


def parse_request(body: bytes) -> Routed:
    """The `model` of a JSON request body (or `name`, its deprecated alias on
    /api/show), the bytes that identify its conversation, and its runner
    options (RELOAD_OPTIONS).

    A conversation is known by what every turn of it repeats: the chat
    messages up to and including the first user message (so one system
    prompt shared by all users does not merge their conversations). Only a follow-up chat turn — one that
    already holds an assistant or tool message — gets conversation bytes: a first turn has no cache anywhere to return
    to, and pinning every one-shot request to its hash's backend costs
    balance (measured: p99 TTFT on a one-model, no-session mix). Returns
    NOTHING when there is nothing to route by; bad JSON is left for the
    backend to answer with Ollama's 400.

    The body is not decoded: olb/_body.pyx steps through its top-level
    object in C, matching keys as Go does, and only the values that matter
    are decoded (the model's name; `options` when it names a runner option;
    `messages` when there are any).
    """
    if not body:
        return NOTHING
    if type(body) is not bytes:  # h11's chunked bodies are bytearrays
        body = bytes(body)
    try:
        model, options, messages = routing_members(body, _RELOAD_KEYS)
        if not isinstance(model, str):  # (a blank one is None)
            return NOTHING
        runner = () if options is None else runner_key(_loads(options))
        if messages is None:
            return (model, None, runner)
        return (model, _affinity(body, messages), runner)
    except ValueError:  # malformed (orjson's and UTF-8's errors are ValueErrors): Ollama answers 400
        return NOTHING


def well_formed(body: bytes) -> bool:
    """Is the body one whole JSON document? parse_request checks only what it
    steps through; Ollama binds the whole request (ShouldBindJSON) before it
    looks its model up, so olb asks this before answering for a model itself."""
    try:
        _loads(body)
    except ValueError:
        return False
    return True


def _affinity(body: bytes, span) -> bytes | None:
    """parse_request's conversation bytes of the messages array at span."""
    start, stop = span
    if stop - start > SMALL_BODY:
        try:
            return _big_affinity(body, start, stop)
        except _OverBudget:
            pass
    return _conversation(_loads(body[start:stop]))


def _conversation(messages: list) -> bytes | None:
    if not messages:
        return None
    for m in messages:  # (a loop, not any() over a generator: no closure when compiled)
        if isinstance(m, dict) and m.get("role") in ("assistant", "tool"):
            break
    else:
        return None
    lead = []
    for message in messages:
        lead.append(message)
        if isinstance(message, dict) and message.get("role") == "user":
            break
    # A generate prompt carries no sign of being a follow-up (its `context`
    # starts with the chat template's tokens, the same for every
    # conversation): generate traffic is kept together by the session
    # header alone.
    return orjson.dumps(lead)[:AFFINITY_PREFIX]


def runner_key(options) -> tuple:
    """The RELOAD_OPTIONS an `options` object sets, as sorted (name, value)
    pairs: what Ollama's needsReload compares. Values that are not plain
    scalars are left out (Ollama would answer 400 for them)."""
    if not isinstance(options, dict):
        return ()
    for name in options:  # (a loop: compiled, a dict walk and set lookups, no method call)
        if name in _RELOAD_SET:
            break
    else:
        return ()  # the usual case (num_predict, temperature...)
    key = []
    for name in RELOAD_OPTIONS:
        value = options.get(name)
        if value is None or isinstance(value, (list, dict)):
            continue
        if type(value) is float and value.is_integer():
            value = int(value)
        if name == "num_gpu" and isinstance(value, (int, float)) and value < 0:
            continue
        key.append((name, value))
    return tuple(key)


class _OverBudget(Exception):
    """A messages array of more than SCAN_BUDGET messages."""


def _big_affinity(body: bytes, start: int, stop: int) -> bytes | None:
    """_conversation's bytes for a messages array too big to decode: each
    message of at most SMALL_BODY is decoded (so the bytes are the same as a
    small body's), a bigger one (an image inline) is kept as sent."""
    follow_up = False
    lead: list[bytes] | None = []
    found = elements(body, start, stop, SCAN_BUDGET)
    if found is None:
        raise _OverBudget
    for m0, m1 in found:
        role = None
        if body[m0] == 0x7B:
            for key, v0, v1 in members(body, m0, m1):
                if key == b"role":
                    role = _loads(body[v0:v1])
        if lead is not None:
            if m1 - m0 <= SMALL_BODY:
                lead.append(orjson.dumps(_loads(body[m0:m1])))
            else:  # only the prefix counts: no copy of the image
                lead.append(body[m0:m0 + AFFINITY_PREFIX])
            if role == "user":
                lead_bytes = b"[" + b",".join(lead) + b"]"
                lead = None
        if role in ("assistant", "tool"):
            follow_up = True
            if lead is None:
                break
    if not follow_up:
        return None
    if lead is not None:
        lead_bytes = b"[" + b",".join(lead) + b"]"
    return lead_bytes[:AFFINITY_PREFIX]


def bits(mask) -> int:
    """A 0/1 byte mask as an integer (byte i is bit 8*i): whole-mask and,
    or and not in one C operation each, for the cold path (see to_mask)."""
    return int.from_bytes(mask, "little")


def any_set(mask) -> bool:
    """any(mask) for a 0/1 byte mask. Compiled, a bytearray's bytes are read
    in a C loop: the builtin's call costs more than the loop (the router
    asks it of every request's masks)."""
    if type(mask) is not bytearray:
        return any(mask)
    m = mask
    for i in range(len(m)):
        if m[i]:
            return True
    return False


def to_mask(value: int, n: int) -> bytearray:
    """The byte mask of n backends an integer from bits() stands for."""
    return bytearray((value & _ONES[n]).to_bytes(n, "little")) if n else bytearray()


class _Ones(dict):
    """n -> the integer whose n bytes are all 1 (memoised)."""

    def __missing__(self, n: int) -> int:
        value = self[n] = int.from_bytes(b"\x01" * n, "little")
        return value


_ONES = _Ones()


def positions(mask):
    """The indices of the set bytes of a mask (bytes.find runs in C)."""
    find = mask.find
    i = find(1)
    while i != -1:
        yield i
        i = find(1, i + 1)


def affinity_key(*parts: bytes) -> int:
    """A 64-bit key, the same in every worker process (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(b"\0".join(parts), digest_size=8).digest(), "little")


class ModelDirectory:
    """Per-model backend masks, kept current by polling and by traffic."""

    def __init__(self, backends, interval: float, timeout: float):
        self.backends = backends  # balancer.Backend list: .index, .spec, .url
        self.n = len(backends)
        self.interval = interval
        self.timeout = timeout
        self.installed: dict[str, bytearray] = {}
        self.loaded: dict[str, bytearray] = {}
        #: Backends whose /api/tags has been read at least once.
        self.known = bytearray(self.n)
        #: Raw entries per backend, for the merged /api/tags, /api/ps.
        self.tags: list[list[dict]] = [[] for _ in range(self.n)]
        self.ps: list[list[dict]] = [[] for _ in range(self.n)]
        #: The models of each backend's last /api/ps; None until one was read.
        self.ps_names: list[set[str] | None] = [None] * self.n
        #: Requests in flight per model and backend (this worker's), for the
        #: spread rule: a model with requests running on a backend is busy there.
        self.inflight: dict[str, list[int]] = {}
        #: (model, backend) pairs olb sent to load there, until answered.
        self.placed: set[tuple[str, int]] = set()
        #: Called with a backend's index when a model olb placed there has
        #: loaded (the balancer re-reads that backend's catalogue).
        self.on_load: Callable[[int], None] | None = None
        #: Per backend, the most models and the most VRAM (bytes) its /api/ps
        #: has shown resident at once: room it is known to have (see fits).
        self.room_models = [0] * self.n
        self.room_vram = [0] * self.n
        #: (models loaded per backend, copies per model), from the loaded
        #: masks; None when one of them has changed since (see _residents).
        self._layout: tuple[list[list[str]], dict[str, int]] | None = None
        #: Per backend, the VRAM its last /api/ps lists (bytes, all models).
        self.ps_vram = [0] * self.n
        #: Per model, the largest footprint (/api/ps "size", bytes) seen for it
        #: on any backend: what loading it again will take.
        self.footprint: dict[str, int] = {}
        #: Per model, its size on disk (/api/tags "size", bytes), and the
        #: largest footprint / disk size ratio seen for any model: a model
        #: never seen loaded is expected to take its disk size times that
        #: (see need).
        self.disk_size: dict[str, int] = {}
        self.overhead = 0.0
        #: Per backend, free GPU memory in bytes and the number of its GPUs,
        #: from NVML or a DCGM scrape (set_gpu_memory); None: not known.
        self.vram_free: list[int | None] = [None] * self.n
        self.gpu_count = [0] * self.n
        #: The catalogue re-read that precedes a 404 (see recheck): the
        #: round in progress or last done, and when it started.
        self._recheck: asyncio.Future | None = None
        self._recheck_at = 0.0
        #: The models of the last DEMAND_WINDOW requests admitted (a ring:
        #: _recent_at is where the next goes, over the oldest; None while
        #: it fills), and how many each has among them: recent demand (see
        #: spare). A list and an index, not a deque, and a dict, not a
        #: Counter (whose __delitem__ makes every `counter[key] = value` a
        #: Python-level slot call): compiled, both are C-API calls.
        self._recent: list[str | None] = [None] * DEMAND_WINDOW
        self._recent_at = 0
        self.demand: dict[str, int] = {}
        #: Per model, per backend: the runner options (parse_request's key)
        #: of the runner olb last sent there; None: not known (taken for the
        #: defaults, ()). See warm_mask. (Rows by model, not (model, backend)
        #: keys: a request reads and writes its entry without making a tuple.)
        self.runners: dict[str, list[tuple | None]] = {}
        #: Per (model, backend): the context_length its /api/ps entry lists.
        self.ps_context: dict[tuple[str, int], int] = {}
        #: Models olb has sent to some backend with options other than the
        #: defaults: only their warm masks need the per-runner check for a
        #: request with the defaults (a runner olb knows only from /api/ps is
        #: taken to have them, whatever its context_length).
        self.keyed: set[str] = set()
        #: Loads olb started that are expected to evict (see evicts):
        #: (model, backend) -> [the models that may be evicted, answered yet].
        self.evicting: dict[tuple[str, int], list] = {}
        #: Per model, per backend: how many of those loads may evict it there.
        #: A model is *leaving* a backend while its count there is above 0.
        self.leaving: dict[str, list[int]] = {}

    # --- reads (hot path: no I/O, no waiting) -----------------------------------------------

    def installed_mask(self, model: str) -> bytearray:
        """Backends that have the model, or whose catalogue is not known yet."""
        mask = self.installed.get(model)
        if mask is None:
            mask = self.installed[model] = bytearray(self.n)
            self._fill_unknown(mask)
        return mask

    def loaded_mask(self, model: str) -> bytearray:
        mask = self.loaded.get(model)
        if mask is None:
            mask = self.loaded[model] = bytearray(self.n)
        return mask

    def warm_mask(self, model: str, runner: tuple = ()):
        """Backends where a request for `model` with runner options `runner`
        (parse_request) runs without a load: the model is loaded there, with
        those options (runner_matches), and is not leaving (see evicts).

        The live loaded mask itself when neither check can remove a backend
        (the common case: no options, no eviction pending), else a snapshot.
        """
        loaded = self.loaded_mask(model)
        leaving = self.leaving.get(model)
        if leaving is None and not runner and model not in self.keyed:
            return loaded
        out = bytearray(loaded)
        for i in positions(loaded):
            if (leaving is not None and leaving[i]) or not self.runner_matches(model, i, runner):
                out[i] = 0
        return out

    def runner_matches(self, model: str, index: int, runner: tuple) -> bool:
        """Would Ollama's needsReload keep the model's runner on the backend
        for a request with these options? Known from the last request olb
        sent there; else from /api/ps's context_length; else the runner is
        taken to have the defaults."""
        row = self.runners.get(model)
        known = row[index] if row is not None else None
        if known is not None:
            return known == runner
        if not runner:
            return True
        context = self.ps_context.get((model, index))
        return context is not None and runner == (("num_ctx", context),)

    def held(self, model: str) -> bool:
        """Is `model` leaving some backend (a load olb started may evict it)?
        Its requests that wait for it are held, not routed again, until the
        load is seen (set_catalogue) or abandoned (admitted)."""
        return model in self.leaving

    def evicts(self, model: str, index: int) -> bool:
        """Will loading `model` on the backend make Ollama unload another model?

        Ollama's processPending evicts when the backend holds its
        OLLAMA_MAX_LOADED_MODELS or the new model does not fit beside the
        resident ones (see fits). olb says yes where it knows: the model's
        footprint is known and it does not fit, or the backend already holds
        as many models as it has room for (room_models, or 3 per GPU read).
        A model loaded there already is a reload of its own runner
        (needsReload), not an eviction of another.
        """
        if self.loaded_mask(model)[index]:
            return False
        count, _, _ = self._resident(index)
        if count == 0:
            return False
        only = bytearray(self.n)
        only[index] = 1
        if self.fits(model, only)[index]:
            return False
        if self.need(model) is not None:
            return True
        limit = self.room_models[index]
        if self.vram_free[index] is not None:
            limit = max(limit, MODELS_PER_GPU * self.gpu_count[index])
        return count + 1 > limit > 0

    def victims(self, model: str, index: int) -> set[str]:
        """The models Ollama may unload on the backend to load `model` there.

        findRunnerToUnload (server/sched.go) sorts the runners by session
        duration, then model path, and takes the first idle one, else the
        first: olb knows neither order, so every idle resident (no request
        of this worker in flight there) is a candidate, or every resident
        when none is idle. Models whose own load olb started there and that
        have not answered yet are still loading, not resident.
        """
        idle: set[str] = set()
        busy: set[str] = set()
        for other, loaded in self.loaded.items():
            if other == model or not loaded[index] or (other, index) in self.placed:
                continue
            counts = self.inflight.get(other)
            (busy if counts is not None and counts[index] > 0 else idle).add(other)
        return idle or busy

    def _fill_unknown(self, mask: bytearray) -> None:
        for i in range(self.n):
            if not self.known[i]:
                mask[i] = 1

    # --- writes ----------------------------------------------------------------------------------

    def mark_loaded(self, model: str, index: int) -> None:
        """Traffic says the backend has the model loaded (or is loading it)."""
        loaded = self.loaded_mask(model)
        if not loaded[index]:
            loaded[index] = 1
            self._layout = None
        installed = self.installed_mask(model)
        installed[index] = 1

    def mark_placed(self, model: str, index: int, runner: tuple = ()) -> None:
        """olb sent the model to a backend where it was not loaded (or loaded
        with other runner options): the requests that follow may count on it
        there (mark_loaded), and when it has answered, the backend's
        catalogue is read again (answered).

        When the load evicts (evicts), its victims are *leaving* the
        backend until the load is seen: Ollama keeps a victim in s.loaded
        and its getRunner fast path keeps attaching new requests to it
        (useLoadedRunner), and the load waits until its in-flight count
        reaches 0; so olb sends their requests elsewhere or holds them
        (warm_mask, held). A reload of the model's own runner needs no
        such mark: the new runner options recorded here already turn
        requests with the old ones away (runner_matches).
        """
        if (model, index) not in self.evicting and self.evicts(model, index):
            victims = self.victims(model, index)
            if victims:
                self.evicting[(model, index)] = [victims, False]
                for victim in victims:
                    counts = self.leaving.get(victim)
                    if counts is None:
                        counts = self.leaving[victim] = [0] * self.n
                    counts[index] += 1
        self.mark_loaded(model, index)
        self.placed.add((model, index))
        self._set_runner(model, index, runner)

    def _set_runner(self, model: str, index: int, runner: tuple) -> None:
        row = self.runners.get(model)
        if row is None:
            row = self.runners[model] = [None] * self.n
        row[index] = runner
        if runner:
            self.keyed.add(model)

    def _end_eviction(self, model: str, index: int) -> None:
        """The load of `model` on the backend was seen, or given up: its victims stop leaving."""
        entry = self.evicting.pop((model, index), None)
        if entry is None:
            return
        for victim in entry[0]:
            counts = self.leaving.get(victim)
            if counts is None:
                continue
            counts[index] -= 1
            if not any(counts):
                del self.leaving[victim]

    def answered(self, model: str, index: int, runner: tuple | None = None) -> None:
        """The backend answered 200 for the model: it has it loaded now.

        When olb placed the model there, the backend has just loaded it, and
        may have unloaded others to make room. Until the next poll (up to
        OLB_MODELS_INTERVAL later) olb would still count those as warm there
        and send their requests back, each reloading its model and unloading
        the other again: two models that do not fit one GPU together then
        take turns on it (measured on the 12 GiB GPUs of bench/scheduling.py).
        So the backend's catalogue is read again now (on_load), once per load.

        The same holds for any answer for a model the backend's last /api/ps
        did not list, olb's placement or not: olb took it for warm there from
        traffic, Ollama may have loaded it again (and evicted another) to
        answer. Backends whose /api/ps has never been read (not an Ollama,
        or not polled) are left to traffic alone.
        """
        # (placed and evicting are empty but while a load is under way: the
        # usual answer builds no (model, index) key for them.)
        placed = bool(self.placed) and (model, index) in self.placed
        if placed:
            self.placed.discard((model, index))
        self.mark_loaded(model, index)
        if runner is not None:
            self._set_runner(model, index, runner)
        entry = self.evicting.get((model, index)) if self.evicting else None
        if entry is not None:
            # Loaded: its victims stop leaving when the catalogue re-read
            # below shows which of them are gone (set_catalogue).
            entry[1] = True
        names = self.ps_names[index]
        if self.on_load is not None and (placed or (names is not None and model not in names)):
            self.on_load(index)

    def admitted(self, model: str, index: int, delta: int) -> None:
        """A request for `model` started (+1) or ended (-1) on a backend."""
        counts = self.inflight.get(model)
        if counts is None:
            counts = self.inflight[model] = [0] * self.n
        counts[index] += delta
        if delta < 0 and counts[index] == 0 and self.evicting:
            entry = self.evicting.get((model, index))
            if entry is not None and not entry[1]:
                # Every request behind the load ended before it answered
                # (failed, or their clients left): Ollama may never load it.
                self._end_eviction(model, index)
        if delta > 0:
            recent = self._recent
            at = self._recent_at
            gone = recent[at]
            recent[at] = model
            self._recent_at = at + 1 if at + 1 < len(recent) else 0
            demand = self.demand
            demand[model] = demand.get(model, 0) + 1
            if gone is not None:
                demand[gone] = demand.get(gone, 0) - 1

    def waiting_for_load(self, model: str) -> int:
        """Requests for `model` in flight (this worker's) on backends where
        olb placed it and it has not answered yet: they wait behind its load.

        A load takes seconds to minutes, and Ollama holds every request for
        the model until it is done; they are olb's queue as much as those in
        its own queue, and count the same toward OLB_SPREAD_QUEUE.
        """
        counts = self.inflight.get(model)
        if counts is None or not self.placed:
            return 0
        waiting = 0
        for i in range(self.n):
            if (model, i) in self.placed:
                waiting += counts[i]
        return waiting

    def spare(self, model: str, mask, waiting=None) -> bytearray:
        """The part of `mask` where loading `model` cannot evict a model in
        use: backends none of whose other resident models has a request in
        flight there (this worker's count) or waiting in olb's queue
        (`waiting`: queued requests per model).

        Ollama makes room for a load by unloading a resident model, and when
        the one it picks is serving it waits for those requests to end (all
        other requests behind the load wait too); the evicted model's next
        request loads it again. Spreading a hot model onto a backend another
        one is using trades one model's queue for two models' loads -- under
        overload it cascaded into dozens of loads on the small GPUs
        (bench/scheduling.py at 110-120 %).

        A model idle at this instant is not spare either when its recent
        demand is at least half of `model`'s (over the last DEMAND_WINDOW
        requests): it will be back soon, and evicting it only starts the
        next load. Without this, two models of similar demand took turns on
        one small GPU, each spreading onto it in the other's idle moment
        (12-16 loads of the pair per run). A model with little recent demand
        costs at most its own, rare, reload.
        """
        n = self.n
        out = bits(mask)
        demand = self.demand
        keep_at = demand.get(model, 0) / 2
        for other, loaded in self.loaded.items():
            if other == model:
                continue
            counts = self.inflight.get(other)
            wanted = bool(waiting and waiting[other] > 0) or 0 < demand.get(other, 0) >= keep_at
            if wanted:
                out &= ~bits(loaded)
            elif counts is not None:
                for i in positions(loaded):
                    if counts[i] > 0:
                        out &= ~(1 << (8 * i))
        return to_mask(out, n)

    def fits(self, model: str, mask) -> bytearray:
        """The part of `mask` where `model`, not loaded there, can load without
        evicting anything.

        Ollama evicts to load when the new model would pass
        OLLAMA_MAX_LOADED_MODELS (3 per GPU by default) or need more than
        80 % of the free VRAM (server/sched.go, load). Where olb reads the
        backend's GPUs (NVML or a DCGM scrape), it checks the same two
        limits: the model's footprint against free VRAM, the models resident
        against 3 per GPU (or more, if /api/ps has shown more). Elsewhere it
        falls back on what /api/ps has shown, as lower bounds: a backend
        that has held three models, 15 GB together, can hold them again.

        So an 80 GiB GPU serving two models takes a third one beside them,
        where counting models alone would pick a 12 GiB GPU serving one and
        evict it (under load that made cascades of loads on the small GPUs
        of bench/scheduling.py). A model never seen loaded is expected to
        take its disk size scaled as the models seen loaded were (need);
        nothing is claimed when that is not known either. Models olb has
        just placed count as resident, and as too big when their need is
        unknown, until /api/ps shows them.
        """
        out = bytearray(self.n)
        need = self.need(model)
        if need is None:
            return out
        candidates = to_mask(bits(mask) & ~bits(self.loaded_mask(model)), self.n)
        for i in positions(candidates):
            count, vram, placed = self._resident(i)
            free = self.vram_free[i]
            if free is not None:
                limit = max(self.room_models[i], MODELS_PER_GPU * self.gpu_count[i])
                ok = count + 1 <= limit and need + placed <= FIT_FRACTION * free
            else:
                ok = (count + 1 <= self.room_models[i]
                      and vram + placed + need <= self.room_vram[i])
            if ok:
                out[i] = 1
        return out

    def _resident(self, index: int) -> tuple[int, int, float]:
        """(models, VRAM bytes in /api/ps, footprint of olb's placements not in it yet)."""
        names = self.ps_names[index]
        count = len(names) if names else 0
        placed: float = 0
        for model, i in self.placed:
            if i == index and (names is None or model not in names):
                count += 1
                need = self.need(model)
                placed += need if need is not None else float("inf")
        return count, self.ps_vram[index], placed

    def need(self, model: str) -> float | None:
        """The VRAM (bytes) loading `model` is expected to take: its largest
        /api/ps footprint, else, for a model never seen loaded, its size on
        disk times the largest footprint-to-disk ratio of any model seen
        loaded (weights plus the KV cache and graph Ollama adds, as this
        cluster runs them); None when neither is known."""
        need: float | None = self.footprint.get(model)
        if need is None and self.overhead:
            disk = self.disk_size.get(model)
            if disk:
                need = disk * self.overhead
        return need

    def set_gpu_memory(self, index: int, free_bytes: int | None, gpus: int = 0) -> None:
        """A backend's free GPU memory (bytes, over its `gpus` GPUs); None: no reading."""
        self.vram_free[index] = free_bytes
        self.gpu_count[index] = gpus if free_bytes is not None else 0

    def least_harm(self, mask) -> bytearray | None:
        """The part of `mask` where a load that may evict stalls the least
        traffic and costs the least recent demand, or None when that is all
        of it.

        A backend's cost is, in order:
          - its stall: the fewest requests (this worker's) in flight of any
            model loaded there. Ollama's findRunnerToUnload takes an idle
            runner when there is one; with none it takes a busy one and the
            load, and every later load on that server, waits until its
            requests end (processPending), while its model's new requests
            keep joining it. 0 when some resident model is idle.
          - its harm: the sum, over the models loaded there, of each model's
            recent demand (see spare) divided by the number of backends it is
            loaded on: evicting one of three copies of a busy model costs a
            third of its demand, evicting the only copy of a quieter one all
            of it. Under load, counting models alone kept sending cold models
            to the small GPUs, where they evicted each other in turns while a
            hot model held copies on three backends.
          - the number of models loaded there; then the table decides.
        """
        demand = self.demand
        inflight = self.inflight
        residents, copies = self._residents()
        ranked = {}
        for i in positions(mask):
            stall = None
            harm = 0.0
            for m in residents[i]:
                harm += demand.get(m, 0) / copies[m]
                counts = inflight.get(m)
                busy = counts[i] if counts is not None else 0
                if stall is None or busy < stall:
                    stall = busy
            ranked[i] = (stall or 0, harm, len(residents[i]))
        if not ranked:
            return None
        best = min(ranked.values())
        out = bytearray(1 if ranked.get(i) == best else 0 for i in range(self.n))
        return None if out == mask else out

    def _residents(self) -> tuple[list[list[str]], dict[str, int]]:
        """The models loaded on each backend (in the order of self.loaded)
        and the number of backends each is loaded on; rebuilt only after a
        loaded mask changed (mark_loaded, mark_missing, set_catalogue,
        forget), so a decision reads a few names per backend, not every
        model's mask."""
        layout = self._layout
        if layout is None:
            residents: list[list[str]] = [[] for _ in range(self.n)]
            copies = {}
            for m, loaded in self.loaded.items():
                count = 0
                for i in positions(loaded):
                    residents[i].append(m)
                    count += 1
                if count:
                    copies[m] = count
            layout = self._layout = (residents, copies)
        return layout

    def mark_missing(self, model: str, index: int) -> None:
        """The backend answered 404 for the model: it does not have it (any more)."""
        self.installed_mask(model)[index] = 0
        self.loaded_mask(model)[index] = 0
        self._layout = None
        row = self.runners.get(model)
        if row is not None:
            row[index] = None
        self._end_eviction(model, index)

    def set_catalogue(self, index: int, tags: list[dict], ps: list[dict] | None) -> None:
        """Replace what one backend has, from its /api/tags and /api/ps."""
        self.known[index] = 1
        self.tags[index] = tags
        self._set_column(self.installed, self.installed_mask, {_entry_name(m) for m in tags}, index)
        for e in tags:
            size = _int(e.get("size"))
            if size:
                self.disk_size[_entry_name(e)] = size
        if ps is not None:
            self.ps[index] = ps
            self.ps_names[index] = names = {_entry_name(m) for m in ps}
            self._set_column(self.loaded, self.loaded_mask, names, index)
            self._learn_room(index, ps)
            self._learn_runners(index, ps, names)

    def _learn_room(self, index: int, ps: list[dict]) -> None:
        # See fits(): the room a backend has shown, and each model's footprint.
        vram = 0
        for e in ps:
            vram += _int(e.get("size_vram"))
            size = _int(e.get("size"))
            if size:
                model = _entry_name(e)
                if size > self.footprint.get(model, 0):
                    self.footprint[model] = size
                disk = self.disk_size.get(model)
                if disk:
                    self.overhead = max(self.overhead, size / disk)
        self.room_models[index] = max(self.room_models[index], len(ps))
        self.room_vram[index] = max(self.room_vram[index], vram)
        self.ps_vram[index] = vram

    def _learn_runners(self, index: int, ps: list[dict], names: set[str]) -> None:
        # A runner no longer listed is gone with its options (one olb has
        # sent to load there and not heard from yet is on its way); a load
        # olb started that has answered is over, its victims either gone
        # from this /api/ps or staying (see mark_placed).
        for model, row in self.runners.items():
            if row[index] is not None and model not in names and (model, index) not in self.placed:
                row[index] = None
        for key in [k for k in self.ps_context if k[1] == index]:
            del self.ps_context[key]
        for e in ps:
            context = _int(e.get("context_length"))
            if context:
                model = _entry_name(e)
                self.ps_context[(model, index)] = context
        for key in [k for k, entry in self.evicting.items() if k[1] == index and (entry[1] or k[0] in names)]:
            self._end_eviction(*key)

    def _set_column(self, masks: dict, make_mask, names: set[str], index: int) -> None:
        # Backend `index` has exactly the models `names`: create the masks of
        # new ones (make_mask decides their other backends), then set this
        # backend's bit in every mask.
        for model in names:
            make_mask(model)
        for model, mask in masks.items():
            mask[index] = 1 if model in names else 0
        self._layout = None

    def forget(self, index: int) -> None:
        """A backend went down: its models are unknown again until it answers."""
        self.known[index] = 0
        self.tags[index] = []
        self.ps[index] = []
        self.ps_names[index] = None
        self.ps_vram[index] = 0
        for mask in self.installed.values():
            mask[index] = 1
        for mask in self.loaded.values():
            mask[index] = 0
        self._layout = None
        for row in self.runners.values():
            row[index] = None
        for key in [k for k in self.evicting if k[1] == index]:
            self._end_eviction(*key)

    # --- polling ----------------------------------------------------------------------------------

    async def refresh(self, index: int) -> bool:
        """Read one backend's /api/tags and /api/ps; False when it did not answer."""
        backend = self.backends[index]
        try:
            tags = await _get_json(backend.client, "/api/tags", self.timeout)
            ps = await _get_json(backend.client, "/api/ps", self.timeout)
        except (OlbError, asyncio.TimeoutError, ValueError) as exc:
            log.debug("model poll of %s failed: %s", backend.url, exc or type(exc).__name__)
            return False
        self.set_catalogue(index, list(tags.get("models") or []), list(ps.get("models") or []))
        return True

    async def refresh_all(self) -> None:
        await asyncio.gather(*(self.refresh(i) for i in range(self.n)))

    async def recheck(self, indices) -> None:
        """Re-read the catalogues of `indices` before olb answers 404 for a model none lists.

        One Ollama answers 404 from its disk, which is never stale; olb's
        directory is as old as its last poll. A model pulled since then (on
        a backend directly, or through another olb worker, whose re-read
        this worker never saw) is found here instead of refused. Requests
        that miss meanwhile share the round in progress; a new round starts
        at most once every RECHECK_INTERVAL seconds, so a client asking for
        models nobody has cannot turn each request into a poll of every
        backend.
        """
        round_ = self._recheck
        now = time.monotonic()
        if round_ is None or (round_.done() and now - self._recheck_at >= RECHECK_INTERVAL):
            self._recheck_at = now
            round_ = self._recheck = asyncio.ensure_future(
                asyncio.gather(*(self.refresh(i) for i in indices)))
        await asyncio.shield(round_)

    # --- merged views -----------------------------------------------------------------------------

    def merged_tags(self) -> dict:
        """/api/tags as one Ollama would answer it: every model any backend has, once."""
        seen: dict[str, dict] = {}
        for entries in self.tags:
            for entry in entries:
                key = _entry_name(entry)
                if key not in seen or entry.get("modified_at", "") > seen[key].get("modified_at", ""):
                    seen[key] = entry
        return {"models": sorted(seen.values(), key=lambda e: e.get("modified_at", ""), reverse=True)}

    def merged_openai_models(self) -> dict:
        """/v1/models over all backends, in the shape Ollama's compat layer gives."""
        data = []
        for entry in self.merged_tags()["models"]:
            name = entry.get("name") or entry.get("model") or ""
            parts = name.split("/")
            data.append({"id": name, "object": "model", "created": _unix(entry.get("modified_at", "")),
                         "owned_by": parts[-2] if len(parts) >= 2 else "library"})
        return {"object": "list", "data": data}

    def openai_model(self, model_id: str) -> dict | None:
        """GET /v1/models/{id} over all backends, as Ollama answers it
        (middleware/openai.go RetrieveMiddleware, openai.ToModel): the id as
        asked, `created` from the newest modified_at any backend lists for
        it; None when no backend has it."""
        key = normalize(model_id)
        newest = None
        for entries in self.tags:
            for entry in entries:
                if _entry_name(entry) == key and (
                        newest is None or entry.get("modified_at", "") > newest.get("modified_at", "")):
                    newest = entry
        if newest is None:
            return None
        return {"id": model_id, "object": "model", "created": _unix(newest.get("modified_at", "")),
                "owned_by": namespace(model_id)}

    def merged_ps(self) -> dict:
        """/api/ps over all backends: a model loaded on two backends is listed twice."""
        models = [entry for entries in self.ps for entry in entries]
        models.sort(key=lambda e: e.get("expires_at", ""), reverse=True)
        return {"models": models}


def _unix(stamp: str) -> int:
    """Seconds since the epoch of a Go RFC 3339 time (nanoseconds allowed)."""
    import datetime
    import re

    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)?$", stamp)
    if not m:
        return 0
    frac = (m.group(2) or "")[:7]
    zone = m.group(3) or "Z"
    when = datetime.datetime.fromisoformat(m.group(1) + frac + ("+00:00" if zone == "Z" else zone))
    return int(when.timestamp())


#: GET paths olb answers itself by merging every backend's answer.
MERGED_PATHS = frozenset({b"/api/tags", b"/api/ps", b"/v1/models"})


def _entry_name(entry: dict) -> str:
    """The normalised model name of an /api/tags or /api/ps entry."""
    return normalize(entry.get("name") or entry.get("model") or "")


def _int(value) -> int:
    """A byte count from a backend's JSON; anything else (missing, negative, not an int) is 0."""
    return value if type(value) is int and value > 0 else 0


#: Largest /api/tags or /api/ps answer read: a few hundred models are ~100 KB.
MAX_CATALOGUE_BYTES = 8 * 1024 * 1024


async def _get_json(client, path: str, timeout: float) -> dict:
    """GET a JSON object from a backend's control-plane client (keep-alive,
    size-capped), the whole exchange within `timeout`."""
    async with asyncio.timeout(timeout):
        resp = await client.request("GET", path, headers=((b"accept", b"application/json"),),
                                    max_body=MAX_CATALOGUE_BYTES)
    if resp.status != 200:
        raise ValueError(f"GET {path} answered {resp.status}")
    doc = resp.json()
    if not isinstance(doc, dict):
        raise ValueError(f"GET {path} did not answer a JSON object")
    return doc

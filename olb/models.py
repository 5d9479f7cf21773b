"""What each backend has: installed models (/api/tags) and loaded ones (/api/ps).

Rules for this module: model names and per-model backend masks. It never
chooses a backend (that is the core's acquire over the masks kept here) and
never blocks a decision: masks are read as they are, and a backend whose
catalogue has not been read yet counts as possibly having every model.

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
    one elsewhere (see balancer.route).

Names are normalised the way Ollama does (`llama3` is
`registry.ollama.ai/library/llama3:latest`, displayed `llama3:latest`) and
compared case-insensitively, like Ollama's Name.EqualFold.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import time
import urllib.parse

import orjson

from .errors import OlbError

log = logging.getLogger("olb.models")

#: Ollama's defaults for what a backend holds (ollama-api.md §4.2, §4.4):
#: OLLAMA_MAX_LOADED_MODELS = 3 per GPU, and a model loads beside the
#: resident ones only if its predicted size is at most 80 % of free VRAM.
MODELS_PER_GPU = 3
FIT_FRACTION = 0.8
#: How many of the latest requests (all models) "recent demand" counts: a
#: window in requests, not seconds, so that it means the same at any speed.
DEMAND_WINDOW = 500

_DEFAULT_HOST = "registry.ollama.ai"
_DEFAULT_NAMESPACE = "library"

#: Requests whose body olb reads for a `model` field, with the text Ollama
#: answers when the model is missing (ollama-api.md §3: generate and chat say
#: 'NAME', the scheduler-backed embed endpoints say "NAME"... try pulling).
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


def normalize(name: str) -> str:
    """The display-shortest form Ollama lists models under, lower-cased.

    `llama3.2` -> `llama3.2:latest`; `library/llama3.2:3b` -> `llama3.2:3b`;
    `registry.ollama.ai/library/x` -> `x:latest`; other hosts and namespaces
    are kept. Digest (`@sha256:...`) and build (`+Q4_0`) suffixes are dropped.
    """
    return display_shortest(name).lower()


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


def parse_request(body: bytes) -> tuple[str | None, bytes | None]:
    """The `model` of a JSON request body (or `name`, its deprecated alias on
    /api/show) and the bytes that identify its conversation.

    A conversation is known by what every turn of it repeats: the chat
    messages up to and including the first user message (so one system
    prompt shared by all users does not merge their conversations). Only a follow-up chat turn — one that
    already holds an assistant or tool message — gets conversation bytes: a first turn has no cache anywhere to return
    to, and pinning every one-shot request to its hash's backend costs
    balance (measured: p99 TTFT on a one-model, no-session mix). Returns
    (None, None) when there is nothing to route by; bad JSON is left for the
    backend to answer with Ollama's 400.
    """
    if not body:
        return None, None
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(doc, dict):
        return None, None
    model = doc.get("model") or doc.get("name")
    if not isinstance(model, str) or not model.strip():
        return None, None
    affinity = None
    messages = doc.get("messages")
    if isinstance(messages, list) and messages:
        if any(isinstance(m, dict) and m.get("role") in ("assistant", "tool") for m in messages):
            lead = []
            for message in messages:
                lead.append(message)
                if isinstance(message, dict) and message.get("role") == "user":
                    break
            affinity = orjson.dumps(lead)[:AFFINITY_PREFIX]
    # A generate prompt carries no sign of being a follow-up (its `context`
    # starts with the chat template's tokens, the same for every
    # conversation): generate traffic is kept together by the session
    # header alone.
    return model, affinity


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
        self.polled_at: list[float | None] = [None] * self.n
        self._unknown = bytearray(b"\x01" * self.n)
        #: Requests in flight per model and backend (this worker's), for the
        #: spread rule: a model with requests running on a backend is busy there.
        self.inflight: dict[str, list[int]] = {}
        #: (model, backend) pairs olb sent to load there, until answered.
        self.placed: set[tuple[str, int]] = set()
        #: Called with a backend's index when a model olb placed there has
        #: loaded (the balancer re-reads that backend's catalogue).
        self.on_load = None
        #: Per backend, the most models and the most VRAM (bytes) its /api/ps
        #: has shown resident at once: room it is known to have (see fits).
        self.room_models = [0] * self.n
        self.room_vram = [0] * self.n
        #: Per model, the largest footprint (/api/ps "size", bytes) seen for it
        #: on any backend: what loading it again will take.
        self.footprint: dict[str, int] = {}
        #: Per backend, free GPU memory in bytes and the number of its GPUs,
        #: from NVML or a DCGM scrape (set_gpu_memory); None: not known.
        self.vram_free: list[int | None] = [None] * self.n
        self.gpu_count = [0] * self.n
        #: The models of the last DEMAND_WINDOW requests admitted, and how
        #: many each has among them: recent demand (see spare).
        self._recent: collections.deque[str] = collections.deque()
        self.demand: collections.Counter[str] = collections.Counter()

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

    def _fill_unknown(self, mask: bytearray) -> None:
        for i in range(self.n):
            if not self.known[i]:
                mask[i] = 1

    # --- writes ----------------------------------------------------------------------------------

    def mark_loaded(self, model: str, index: int) -> None:
        """Traffic says the backend has the model loaded (or is loading it)."""
        self.loaded_mask(model)[index] = 1
        self.installed_mask(model)[index] = 1

    def mark_placed(self, model: str, index: int) -> None:
        """olb sent the model to a backend where it was not loaded: the
        requests that follow may count on it there (mark_loaded), and when it
        has answered, the backend's catalogue is read again (answered)."""
        self.mark_loaded(model, index)
        self.placed.add((model, index))

    def answered(self, model: str, index: int) -> None:
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
        placed = (model, index) in self.placed
        if placed:
            self.placed.discard((model, index))
        self.mark_loaded(model, index)
        names = self.ps_names[index]
        if self.on_load is not None and (placed or (names is not None and model not in names)):
            self.on_load(index)

    def admitted(self, model: str, index: int, delta: int) -> None:
        """A request for `model` started (+1) or ended (-1) on a backend."""
        counts = self.inflight.get(model)
        if counts is None:
            counts = self.inflight[model] = [0] * self.n
        counts[index] += delta
        if delta > 0:
            recent = self._recent
            recent.append(model)
            self.demand[model] += 1
            if len(recent) > DEMAND_WINDOW:
                self.demand[recent.popleft()] -= 1

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
        return sum(counts[i] for i in range(self.n) if (model, i) in self.placed)

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
        out = bytearray(mask)
        demand = self.demand
        keep_at = demand[model] / 2
        for other, loaded in self.loaded.items():
            if other == model:
                continue
            counts = self.inflight.get(other)
            wanted = bool(waiting and waiting[other] > 0) or (demand[other] > 0 and demand[other] >= keep_at)
            if counts is None and not wanted:
                continue
            for i in range(self.n):
                if out[i] and loaded[i] and (wanted or counts[i] > 0):
                    out[i] = 0
        return out

    def fits(self, model: str, mask) -> bytearray:
        """The part of `mask` where `model`, not loaded there, can load without
        evicting anything.

        Ollama evicts to load when the new model would pass
        OLLAMA_MAX_LOADED_MODELS (3 per GPU by default) or need more than
        80 % of the free VRAM (ollama-api.md §4.4). Where olb reads the
        backend's GPUs (NVML or a DCGM scrape), it checks the same two
        limits: the model's footprint against free VRAM, the models resident
        against 3 per GPU (or more, if /api/ps has shown more). Elsewhere it
        falls back on what /api/ps has shown, as lower bounds: a backend
        that has held three models, 15 GB together, can hold them again.

        So an 80 GiB GPU serving two models takes a third one beside them,
        where counting models alone would pick a 12 GiB GPU serving one and
        evict it (under load that made cascades of loads on the small GPUs
        of bench/scheduling.py). Nothing is claimed for a model never seen
        loaded (its footprint is unknown); models olb has just placed count
        as resident, and as too big when their footprint is unknown, until
        /api/ps shows them.
        """
        out = bytearray(self.n)
        need = self.footprint.get(model)
        if need is None:
            return out
        loaded = self.loaded_mask(model)
        for i in range(self.n):
            if not mask[i] or loaded[i]:
                continue
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
        names = set(self.ps_names[index] or ())
        vram = sum(_int(e.get("size_vram")) for e in self.ps[index])
        placed: float = 0
        for model, i in self.placed:
            if i == index and model not in names:
                names.add(model)
                placed += self.footprint.get(model, float("inf"))
        return len(names), vram, placed

    def set_gpu_memory(self, index: int, free_bytes: int | None, gpus: int = 0) -> None:
        """A backend's free GPU memory (bytes, over its `gpus` GPUs); None: no reading."""
        self.vram_free[index] = free_bytes
        self.gpu_count[index] = gpus if free_bytes is not None else 0

    def least_harm(self, mask) -> bytearray | None:
        """The part of `mask` where a load that may evict costs the least
        recent demand, or None when that is all of it.

        A backend's harm is the sum, over the models loaded there, of each
        model's recent demand (see spare) divided by the number of backends
        it is loaded on: evicting one of three copies of a busy model costs
        a third of its demand, evicting the only copy of a quieter one all
        of it. Ties go to the backend with the fewest models loaded, then to
        the table. Under load, counting models alone kept sending cold
        models to the small GPUs, where they evicted each other in turns
        while a hot model held copies on three backends.
        """
        demand = self.demand
        resident = [(m, loaded, demand[m] / max(1, sum(loaded))) for m, loaded in self.loaded.items()]
        scores = {}
        for i in range(self.n):
            if mask[i]:
                here = [share for _, loaded, share in resident if loaded[i]]
                scores[i] = (sum(here), len(here))
        if not scores:
            return None
        best = min(scores.values())
        out = bytearray(1 if scores.get(i) == best else 0 for i in range(self.n))
        return None if out == mask else out

    def mark_missing(self, model: str, index: int) -> None:
        """The backend answered 404 for the model: it does not have it (any more)."""
        self.installed_mask(model)[index] = 0
        self.loaded_mask(model)[index] = 0

    def set_catalogue(self, index: int, tags: list[dict], ps: list[dict] | None) -> None:
        """Replace what one backend has, from its /api/tags and /api/ps."""
        self.known[index] = 1
        self.tags[index] = tags
        self._set_column(self.installed, self.installed_mask, {_entry_name(m) for m in tags}, index)
        if ps is not None:
            self.ps[index] = ps
            self.ps_names[index] = names = {_entry_name(m) for m in ps}
            self._set_column(self.loaded, self.loaded_mask, names, index)
            self._learn_room(index, ps)
        self.polled_at[index] = time.time()

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
        self.room_models[index] = max(self.room_models[index], len(ps))
        self.room_vram[index] = max(self.room_vram[index], vram)

    @staticmethod
    def _set_column(masks: dict, make_mask, names: set[str], index: int) -> None:
        # Backend `index` has exactly the models `names`: create the masks of
        # new ones (make_mask decides their other backends), then set this
        # backend's bit in every mask.
        for model in names:
            make_mask(model)
        for model, mask in masks.items():
            mask[index] = 1 if model in names else 0

    def forget(self, index: int) -> None:
        """A backend went down: its models are unknown again until it answers."""
        self.known[index] = 0
        self.tags[index] = []
        self.ps[index] = []
        self.ps_names[index] = None
        for mask in self.installed.values():
            mask[index] = 1
        for mask in self.loaded.values():
            mask[index] = 0

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

"""Request handlers: routing, validation, exact error texts, response bodies.

Rules for this module: no sockets and no timers.  A handler gets a parsed
Request and a ResponseWriter (server.py implements it; tests may fake it) and
either answers at once (`w.respond`) or hands a job to the engine, whose
sink -- one of the output classes at the bottom -- writes tokens as they come.
Every behaviour cites the Ollama source it mirrors (server/routes.go,
middleware/openai.go, openai/openai.go, api/types.go) or docs/api.md.

ResponseWriter contract:
    respond(status, content_type, body)  a complete response (Content-Length)
    stream_start(status, content_type)   head of a chunked response
    stream_write(data)                   one chunk, written (flushed) at once
    stream_end()                         last chunk
    crash()                              drop the TCP connection (fault knob)
    writable                             False while the transport is paused
    job                                  set by a handler whose answer is pending

Like Go's net/http under gin's c.Stream, a streamed response's head goes out
with its first line, not before: a request that waits for a slot shows no
status line yet, and an error before the first token is a real status code
(server/routes.go, streamResponse; docs/api/errors.mdx).

Order of checks per handler follows routes.go, because clients see the first
failing check: e.g. /api/generate decodes, checks top_logprobs, resolves the
model (404), handles unload, raw, thinking, then capabilities and options,
then the queue (503), then the load-only reply.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import math
import os
import random
import re
import struct
from dataclasses import replace

import orjson

from olb.sim import gguf, gojson
from olb.sim.catalogue import (
    DEFAULT_HOST,
    MEDIA_ADAPTER,
    MEDIA_CONFIG,
    MEDIA_LICENSE,
    MEDIA_MESSAGES,
    MEDIA_MODEL,
    MEDIA_PARAMS,
    MEDIA_SYSTEM,
    MEDIA_TEMPLATE,
    Blob,
    Catalogue,
    Layer,
    ModelName,
    blob_path,
    known_spec,
    manifest_digest,
    model_layer_digest,
    parse_name,
    spec_from_gguf,
)
from olb.sim.clock import Clock
from olb.sim.config import SimConfig
from olb.sim.engine import REJECTED, Engine, Generation, SlotHold, decode_interval, prefill_seconds
from olb.sim.gojson import DecodeError, EmptyBody, go_dumps, go_quote, go_string
from olb.sim.gpu import DCGM_CONTENT_TYPE, dcgm_text
from olb.sim.tokens import corpus, count_prompt_tokens, prompt_ids

JSON_UTF8 = "application/json; charset=utf-8"   # gin's c.JSON
JSON = "application/json"                       # Ollama's explicit header / the OpenAI writers
NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
TEXT = "text/plain; charset=utf-8"

QUEUE_FULL = "server busy, please try again.  maximum pending requests exceeded"
# Deterministic mode's stand-in for a warm runner hand-over (docs/api.md examples: 1-7 ms).
NOMINAL_LOAD_NS = 1_000_000
# Deterministic eval time per token when token_rate is 0 (as fast as possible).
NOMINAL_FAST_TOKEN_NS = 100_000
# Template tokens around the user's text (llama3 template with system header).
GENERATE_OVERHEAD = 20
CHAT_MESSAGE_OVERHEAD = 4

_INT_OPTIONS = frozenset({"num_keep", "seed", "num_predict", "top_k", "repeat_last_n", "mirostat",
                          "num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread"})
_FLOAT_OPTIONS = frozenset({"top_p", "min_p", "typical_p", "temperature", "repeat_penalty",
                            "presence_penalty", "frequency_penalty", "mirostat_tau", "mirostat_eta",
                            "tfs_z"})
_BOOL_OPTIONS = frozenset({"numa", "low_vram", "vocab_only", "use_mmap", "use_mlock",
                           "penalize_newline", "f16_kv", "logits_all", "embedding_only"})


def parse_version(v: str) -> tuple:
    out = []
    for part in v.lstrip("v").split(".")[:3]:
        digits = "".join(c for c in part.split("-")[0] if c.isdigit())
        out.append(int(digits or 0))
    return tuple(out + [0] * (3 - len(out)))


# manifest.BlobsPath: "only accept actual sha256 digests".
_BLOB_DIGEST = re.compile(r"^sha256[:-][0-9a-fA-F]{64}$")
# Bytes of an uploaded blob kept to read its GGUF header (the key/values
# before the tokenizer arrays; a real GGUF's general.* keys come first).
UPLOAD_HEAD = 1 << 20
# ggml.ParseFileType's accepted quantisations, and bits per weight to size
# the quantised layer (llama.cpp's figures for the K-quants).
_QUANT_TYPES = {"F32": "F32", "F16": "F16", "Q8_0": "Q8_0", "Q4_K_S": "Q4_K_S", "Q4_K_M": "Q4_K_M",
                "Q4_K": "Q4_K_M", "BF16": "BF16"}
_BITS = {"F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q4_K_S": 4.58, "Q4_K_M": 4.85}


def anthropic_error(status: int, message: str, request_id: str) -> dict:
    """anthropic.NewError: the type follows the status."""
    etype = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 429: "rate_limit_error", 503: "overloaded_error",
             529: "overloaded_error"}.get(status, "api_error")
    return {"type": "error", "error": {"type": etype, "message": message}, "request_id": request_id}


def _fail(message: str, status: int = 500) -> dict:
    """An error item of a progress stream (gin.H{"error", "status"})."""
    return {"error": message, "_status": status}


def _go_number(x):
    """json.Marshal writes a whole float64 without a fraction (1, not 1.0)."""
    return int(x) if isinstance(x, float) and x.is_integer() else x


def _go_sharp_v(x) -> str:
    """fmt's %#v for a decoded JSON value: strings quoted, whole floats bare."""
    if isinstance(x, str):
        return go_quote(x)
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e21:
        return str(int(x))
    return str(x)


def _valid_path(p: str) -> bool:
    """io/fs.ValidPath: unrooted, slash-separated, no empty, '.' or '..' element."""
    if p == ".":
        return True
    return bool(p) and all(e not in ("", ".", "..") for e in p.split("/"))


class BlobUpload:
    """A POST /api/blobs body, hashed as it arrives (manifest.NewLayer's
    io.Copy into sha256), with its first UPLOAD_HEAD bytes kept."""

    __slots__ = ("sha", "size", "head")

    def __init__(self):
        self.sha = hashlib.sha256()
        self.size = 0
        self.head = bytearray()

    def feed(self, data: bytes) -> None:
        self.sha.update(data)
        self.size += len(data)
        if len(self.head) < UPLOAD_HEAD:
            self.head += data[:UPLOAD_HEAD - len(self.head)]


def oai_error(status: int, message: str) -> dict:
    """openai.NewError: the type follows the status."""
    etype = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return {"error": {"message": message, "type": etype, "param": None, "code": None}}


class Request:
    """One parsed HTTP request, as the handlers need it."""

    __slots__ = ("method", "path", "headers", "body", "t_start", "upload")

    def __init__(self, method: str, path: str, headers: dict, body: bytes, t_start: float,
                 upload: BlobUpload | None = None):
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        self.t_start = t_start
        self.upload = upload        # body_consumer's object; then `body` is empty


class _Style:
    """How handler errors look: native Ollama or OpenAI-shaped (/v1)."""

    NATIVE = 0
    OAI = 1
    ANTHROPIC = 2


class Api:
    """The handlers of one simulated instance."""

    def __init__(self, config: SimConfig, catalogue: Catalogue, engine: Engine, clock: Clock,
                 stats, loop):
        self.config = config
        self.catalogue = catalogue
        self.engine = engine
        self.clock = clock
        self.stats = stats
        self.loop = loop
        self.version = parse_version(config.version)
        self.corpus = corpus(config.seed)
        # path -> {method: handler}; gin's router with HandleMethodNotAllowed.
        self.routes = {
            "/": {"GET": self.root, "HEAD": self.root},
            "/api/version": {"GET": self.version_, "HEAD": self.version_},
            "/api/tags": {"GET": self.tags, "HEAD": self.tags},
            "/api/ps": {"GET": self.ps},
            "/api/show": {"POST": self.show},
            "/api/generate": {"POST": self.generate},
            "/api/chat": {"POST": self.chat},
            "/api/embed": {"POST": self.embed},
            "/api/embeddings": {"POST": self.embeddings},
            "/api/pull": {"POST": self.pull},
            "/api/push": {"POST": self.push},
            "/api/create": {"POST": self.create},
            "/api/copy": {"POST": self.copy},
            "/api/delete": {"DELETE": self.delete},
            "/v1/chat/completions": {"POST": self.oai_chat},
            "/v1/completions": {"POST": self.oai_completions},
            "/v1/embeddings": {"POST": self.oai_embeddings},
            "/v1/models": {"GET": self.oai_models},
            "/v1/responses": {"POST": self.oai_responses},
            "/v1/messages": {"POST": self.anthropic_messages},
        }
        if engine.gpu is not None:
            # Not Ollama's: dcgm-exporter's endpoint, served here so one
            # instance is both the backend and its GPU telemetry.
            self.routes["/metrics"] = {"GET": self.dcgm_metrics}
        # Not Ollama's either: the scheduler's counters, for benchmarks.
        self.routes["/sim/stats"] = {"GET": self.sim_stats}
        # DCGM labels (server.py sets the instance's own).
        self.gpu_uuid = "GPU-00000000-0000-0000-0000-000000000000"
        self.hostname = "localhost"

    # --- routing ------------------------------------------------------------

    def route(self, path: str):
        """(methods dict, path parameter) for a path, or (None, None)."""
        methods = self.routes.get(path)
        if methods is not None:
            return methods, None
        # gin's `:param` matches exactly one non-empty segment.
        for prefix, table in (("/v1/models/", {"GET": self.oai_model}),
                                ("/api/blobs/", {"HEAD": self.blob_head, "POST": self.blob_post})):
            if path.startswith(prefix):
                param = path[len(prefix):]
                if param and "/" not in param:
                    return table, param
        return None, None

    def body_consumer(self, method: bytes, target: bytes):
        """An object whose feed(data) takes the request body as it arrives,
        or None to have it collected into Request.body."""
        if method == b"POST" and target.startswith(b"/api/blobs/"):
            return BlobUpload()
        return None

    def handle(self, req: Request, w) -> None:
        methods, param = self.route(req.path)
        if methods is None:
            w.respond(404, "text/plain", b"404 page not found")
            return
        handler = methods.get(req.method)
        if handler is None:
            w.respond(405, "text/plain", b"405 method not allowed")
            return
        if param is None:
            handler(req, w)
        else:
            handler(req, w, param)

    # --- helpers ------------------------------------------------------------

    def _error(self, w, style: int, status: int, message: str) -> None:
        if style == _Style.NATIVE:
            w.respond(status, JSON_UTF8, go_dumps({"error": message}))
        elif style == _Style.ANTHROPIC:
            # AnthropicWriter.writeError: explicit application/json, json.Encoder's "\n".
            w.respond(status, JSON, go_dumps(anthropic_error(status, message, self._random_id("req"))) + b"\n")
        else:
            # BaseWriter.writeError: explicit application/json, json.Encoder's "\n".
            w.respond(status, JSON, go_dumps(oai_error(status, message)) + b"\n")

    def _middleware_error(self, w, status: int, message: str) -> None:
        """An error the /v1 middleware aborts with itself (gin c.JSON)."""
        w.respond(status, JSON_UTF8, go_dumps(oai_error(status, message)))

    def _decode(self, req: Request, w, schema, style: int = _Style.NATIVE):
        """The body as a dict of known fields, or None after answering 400."""
        try:
            return gojson.decode(req.body, schema)
        except EmptyBody:
            if style == _Style.NATIVE:
                self._error(w, style, 400, "missing request body")
            else:
                self._middleware_error(w, 400, "EOF")
        except DecodeError as exc:
            if style == _Style.NATIVE:
                self._error(w, style, 400, str(exc))
            else:
                self._middleware_error(w, 400, str(exc))
        return None

    def _not_found_generate(self, name: str) -> str:
        if self.version >= (0, 4, 0):
            return f"model '{name}' not found"
        return f"model {go_quote(name)} not found, try pulling it first"

    def _not_found_chat(self, name: str) -> str:
        if self.version >= (0, 12, 0):
            return f"model '{name}' not found"
        return f"model {go_quote(name)} not found, try pulling it first"

    @staticmethod
    def _not_found_sched(name: str) -> str:
        return f"model {go_quote(name)} not found, try pulling it first"

    @staticmethod
    def _check_options(options) -> str | None:
        """api.Options.FromMap: wrong types fail the request (HTTP 500)."""
        if not options:
            return None
        for key, val in options.items():
            if val is None:
                continue
            if key in _INT_OPTIONS:
                if isinstance(val, bool) or not isinstance(val, (int, float)):
                    return f"option {go_quote(key)} must be of type integer"
            elif key in _FLOAT_OPTIONS:
                if isinstance(val, bool) or not isinstance(val, (int, float)):
                    return f"option {go_quote(key)} must be of type float32"
            elif key in _BOOL_OPTIONS:
                if not isinstance(val, bool):
                    return f"option {go_quote(key)} must be of type boolean"
            elif key == "stop":
                if not isinstance(val, list):
                    return f"option {go_quote(key)} must be of type array"
                if not all(isinstance(s, str) for s in val):
                    return f"option {go_quote(key)} must be of an array of strings"
        return None

    def _n_tokens(self, options) -> tuple:
        """(tokens to generate, done_reason) from options.num_predict."""
        n = (options or {}).get("num_predict")
        if isinstance(n, (int, float)) and not isinstance(n, bool) and n >= 0:
            return int(n), "length"
        return self.config.num_predict_default, "stop"

    def _offset(self, model: ModelName, text: str, options) -> int:
        seed = (options or {}).get("seed")
        return self.corpus.offset(self.config.seed, model.key, text, seed)

    def _request_id(self, req: Request) -> int:
        h = hashlib.blake2b(req.body, digest_size=8, key=str(self.config.seed).encode()[:64]).digest()
        return int.from_bytes(h, "little") % 999

    def _acquire(self, w, style, entry, body, then) -> None:
        """Get the model's runner (at once, or after the scheduler loads it)
        and continue with then(runner); 503 if the pending queue is full.
        The request's options carry its runner options (needsReload)."""
        pending = self.engine.acquire(entry, body.get("keep_alive"), then, body.get("options"))
        if pending is REJECTED:
            self.stats.rejected += 1
            self._error(w, style, 503, QUEUE_FULL)
        elif pending is not None and w.job is None and not w.done:
            w.job = pending

    def metrics(self, gen: Generation, t_req: float, prompt_tokens: int) -> dict:
        """The six api.Metrics fields in integer ns (api/types.go, Metrics), all > 0
        (omitempty would drop zeros).  Measured from the loop clock, or
        nominal under deterministic_time."""
        cfg = self.config
        n = gen.limit
        if self.engine.gpu is not None:
            return self._gpu_metrics(gen, t_req, prompt_tokens)
        interval = decode_interval(cfg.token_rate, gen.runner.spec.speed, 1, 0.0)
        scale = cfg.time_scale
        if cfg.deterministic_time:
            load = NOMINAL_LOAD_NS
            prompt = max(1, round(gen.prefill * 1e9))
            ev = round(n * interval * 1e9) if interval else n * NOMINAL_FAST_TOKEN_NS
            ev = max(1, ev)
            total = load + prompt + ev
        else:
            load = max(1, round((gen.t_submit - t_req) * scale * 1e9))
            prompt = max(1, round((gen.t_first - gen.t_granted) * scale * 1e9))
            ev = max(1, round(((gen.t_end - gen.t_first) * scale + interval) * 1e9))
            total = max(round((gen.t_end - t_req) * scale * 1e9), load + prompt + ev)
        out = {"total_duration": total, "load_duration": load, "prompt_eval_count": prompt_tokens,
               "prompt_eval_duration": prompt}
        if n:
            out["eval_count"] = n
            out["eval_duration"] = ev
        return out

    def _gpu_metrics(self, gen: Generation, t_req: float, prompt_tokens: int) -> dict:
        """GPU mode: measured and scaled back to simulated time.
        load_duration covers the pending queue, evictions and the load;
        prompt_eval_duration only the tokens the slot's cache lacked; the
        first token is credited one decode round (it comes out of the prefill)."""
        scale = self.config.time_scale
        n = gen.limit
        load = max(1, round((gen.t_submit - t_req) * scale * 1e9))
        prompt = max(1, round((gen.t_first - gen.t_granted) * scale * 1e9))
        ev = max(1, round(((gen.t_end - gen.t_first) * scale + gen.step) * 1e9))
        total = max(round((gen.t_end - t_req) * scale * 1e9), load + prompt + ev)
        out = {"total_duration": total, "load_duration": load, "prompt_eval_count": prompt_tokens,
               "prompt_eval_duration": prompt}
        if n:
            out["eval_count"] = n
            out["eval_duration"] = ev
        return out

    # --- plain endpoints ----------------------------------------------------

    def root(self, req, w):
        w.respond(200, TEXT, b"Ollama is running")

    def version_(self, req, w):
        w.respond(200, JSON_UTF8, go_dumps({"version": self.config.version}))

    def _tag_entry(self, e) -> dict:
        return {
            "name": e.name.display,
            "model": e.name.display,
            "modified_at": self.clock.local(int(e.modified * 1e9)),
            "size": e.size,
            "digest": e.digest,
            "details": e.spec.details(),
        }

    def tags(self, req, w):
        models = [self._tag_entry(e) for e in self.catalogue.listing()]
        w.respond(200, JSON_UTF8, go_dumps({"models": models}))

    def ps(self, req, w):
        # PsHandler: longest remaining first (stable, compared in whole
        # seconds).  Loading models are listed, expiring now + keep_alive.
        runners = sorted(self.engine.loaded(), key=lambda r: -int(r.expires_at))
        models = []
        for r in runners:
            models.append({
                "name": r.model.name.display,
                "model": r.model.name.display,
                "size": r.size,
                "digest": r.model.digest,
                "details": r.spec.details(),
                "expires_at": self.clock.local(int(r.expires_at * 1e9)),
                "size_vram": r.size_vram,
                "context_length": min(r.num_ctx, r.spec.context_length),
            })
        w.respond(200, JSON_UTF8, go_dumps({"models": models}))

    def sim_stats(self, req, w):
        """GET /sim/stats: Engine.stats() as JSON (olb-sim only)."""
        w.respond(200, JSON_UTF8, go_dumps(self.engine.stats()))

    def dcgm_metrics(self, req, w):
        """dcgm-exporter's /metrics for the simulated GPU."""
        w.respond(200, DCGM_CONTENT_TYPE, dcgm_text(self.engine.gpu, self.gpu_uuid, self.hostname))

    def show(self, req, w):
        body = self._decode(req, w, gojson.SHOW)
        if body is None:
            return
        name_in = body.get("model") or body.get("name") or ""
        if not name_in:
            return self._error(w, _Style.NATIVE, 400, "model is required")
        name = parse_name(name_in)
        if name is None:
            return self._error(w, _Style.NATIVE, 400, "invalid model name")
        entry = self.catalogue.lookup(name)
        if entry is None:
            return self._error(w, _Style.NATIVE, 404, f"model '{name_in}' not found")
        w.respond(200, JSON_UTF8, self._show_body(entry, body))

    def _layer_text(self, entry, media: str) -> str | None:
        """The content of a model's text layer (template, system, ...), if any."""
        blobs = [self.catalogue.blob(x.digest) for x in entry.layers if x.media_type == media]
        texts = [t.data.decode("utf-8", "replace") for t in blobs if t is not None and t.data is not None]
        return "\n".join(texts) if texts else None

    def _show_body(self, entry, body) -> bytes:
        spec = entry.spec
        template = self._layer_text(entry, MEDIA_TEMPLATE)
        template = spec.template if template is None else template
        system = body.get("system") or self._layer_text(entry, MEDIA_SYSTEM) or ""
        parameters = spec.parameters
        params = self._layer_text(entry, MEDIA_PARAMS)
        if params is not None:
            # GetModelInfo: `%-30s %#v` per option, a line per list element
            # (Go's map order is random; sorted here).
            lines = []
            for k, v in sorted(orjson.loads(params).items()):
                for x in (v if isinstance(v, list) else [v]):
                    lines.append(f"{k:<30} {_go_sharp_v(x)}")
            parameters = "\n".join(lines)
        modelfile = (
            '# Modelfile generated by "ollama show"\n'
            "# To build a new Modelfile based on this, replace FROM with:\n"
            f"# FROM {entry.name.display}\n\n"
            f"FROM {entry.blob_path}\n"
            f'TEMPLATE """{template}"""\n'
        )
        if system:
            modelfile += f'SYSTEM """{system}"""\n'
        if params is not None:
            modelfile += "".join(f"PARAMETER {line.split(' ', 1)[0]} {line.split(' ', 1)[1].lstrip()}\n"
                                 for line in parameters.split("\n"))
        license_ = self._layer_text(entry, MEDIA_LICENSE) or ""
        out = {
            "license": license_,
            "modelfile": modelfile,
            "parameters": parameters,
            "template": template,
        }
        if system:
            out["system"] = system
        out["details"] = spec.details()
        # model_info is a Go map: json.Marshal writes its keys sorted.
        out["model_info"] = dict(sorted(spec.model_info().items()))
        out["capabilities"] = list(spec.capabilities)
        out["modified_at"] = self.clock.local(int(entry.modified * 1e9))
        if not out["license"]:
            del out["license"]
        return go_dumps(out)

    # --- inference ------------------------------------------------------------

    def _resolve(self, w, style, model_in: str, invalid_status: int, invalid_text: str,
                 not_found_text):
        """(name, installed entry) or None after answering."""
        name = parse_name(model_in) if model_in else None
        if name is None:
            self._error(w, style, invalid_status, invalid_text)
            return None
        entry = self.catalogue.lookup(name)
        if entry is None:
            self._error(w, style, 404, not_found_text(model_in))
            return None
        return name, entry

    def generate(self, req, w):
        body = self._decode(req, w, gojson.GENERATE)
        if body is not None:
            self._generate(req, w, body, None)

    def _generate(self, req, w, body: dict, oai):
        """GenerateHandler; `oai` is the /v1/completions context or None."""
        style = _Style.OAI if oai else _Style.NATIVE
        top = body.get("top_logprobs") or 0
        if top < 0 or top > 20:
            return self._error(w, style, 400, "top_logprobs must be between 0 and 20")
        model_in = body.get("model") or ""
        found = self._resolve(w, style, model_in, 404, f"model '{model_in}' not found",
                              self._not_found_generate)
        if found is None:
            return
        name, entry = found
        prompt = body.get("prompt") or ""
        keep_alive = body.get("keep_alive")
        spec = entry.spec
        if not prompt and keep_alive == 0:
            self.engine.unload(name.key)
            return self._load_reply(w, oai, model_in, "unload", chat=False)
        raw = bool(body.get("raw"))
        if raw and (body.get("template") or body.get("system") or body.get("context")):
            return self._error(w, style, 400, "raw mode does not support template, system, or context")
        think = body.get("think")
        if think is not None and think is not False:
            return self._error(w, style, 400, f"{go_quote(model_in)} does not support thinking")
        if spec.embedding_only:
            return self._error(w, style, 400, f"{go_quote(model_in)} does not support generate")
        if body.get("suffix") and "insert" not in spec.capabilities:
            return self._error(w, style, 400, f"{name.full} does not support insert")
        options = body.get("options")
        bad = self._check_options(options)
        if bad:
            return self._error(w, style, 500, bad)
        if not prompt:
            return self._acquire(w, style, entry, body,
                                 lambda runner: self._load_reply(w, oai, model_in, "load", chat=False))
        system = body.get("system") or ""
        text = system + prompt
        prompt_tokens = count_prompt_tokens(text, 0 if raw else GENERATE_OVERHEAD)
        n, reason = self._n_tokens(options)
        offset = self._offset(name, text, options)
        stream = body.get("stream")
        sink_cls: type
        if oai:
            sink_cls = OaiCompletionStream if oai["stream"] else OaiCompletionJson
            stream = bool(oai["stream"])
        else:
            stream = stream is None or stream
            sink_cls = GenerateStream if stream else GenerateJson
        sink = sink_cls(self, w, req, model_in, offset, reason, prompt_tokens, oai)
        sink.context = None if raw or oai else (text, prompt_tokens)
        corpus_text = self.corpus.text
        self._acquire(w, style, entry, body, lambda runner: self._run(
            w, style, sink, runner, n, prompt_tokens, stream, text,
            lambda k: corpus_text(offset, k)))

    def _run(self, w, style, sink, runner, n, prompt_tokens, stream, text, cache_tail):
        """Start the generation on `runner` (a slot, or the slot queue)."""
        if w.done:
            return
        cfg = self.config
        prefill = prefill_seconds(cfg.ttft, prompt_tokens, cfg.prompt_rate)
        gen = Generation(self.engine, runner, sink, n, prefill, stream)
        gen.prompt_tokens = prompt_tokens
        gen.prompt_text = text
        gen.cache_tail = cache_tail
        if not gen.start():
            self.stats.rejected += 1
            return self._error(w, style, 503, QUEUE_FULL)
        if w.done:
            return
        w.job = gen

    def _load_reply(self, w, oai, model_in, reason, chat):
        """The load/unload answer: one object, never streamed (routes.go GenerateHandler)."""
        created = self.clock.created_at().decode()
        if oai is None:
            if chat:
                obj = {"model": model_in, "created_at": created,
                       "message": {"role": "assistant", "content": ""}, "done_reason": reason, "done": True}
            else:
                obj = {"model": model_in, "created_at": created, "response": "", "done": True,
                       "done_reason": reason}
            return w.respond(200, JSON_UTF8, go_dumps(obj))
        # The /v1/completions writer converts that object like any other.
        chunk = {"id": oai["id"], "object": "text_completion", "created": oai["created"],
                 "model": model_in, "system_fingerprint": "fp_ollama",
                 "choices": [{"text": "", "index": 0, "finish_reason": reason}],
                 "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}
        if oai["stream"]:
            del chunk["usage"]
            chunk = {k: chunk[k] for k in ("id", "object", "created", "choices", "model", "system_fingerprint")}
            w.respond(200, SSE, b"data: " + go_dumps(chunk) + b"\n\ndata: [DONE]\n\n")
        else:
            w.respond(200, JSON, go_dumps(chunk) + b"\n")

    def chat(self, req, w):
        body = self._decode(req, w, gojson.CHAT)
        if body is not None:
            self._chat(req, w, body, None)

    def _chat(self, req, w, body: dict, oai):
        """ChatHandler; `oai` is the /v1 context (/v1/chat/completions,
        /v1/responses, /v1/messages) or None."""
        style = oai.get("style", _Style.OAI) if oai else _Style.NATIVE
        top = body.get("top_logprobs") or 0
        if top < 0 or top > 20:
            return self._error(w, style, 400, "top_logprobs must be between 0 and 20")
        model_in = body.get("model") or ""
        found = self._resolve(w, style, model_in, 400, "model is required", self._not_found_chat)
        if found is None:
            return
        name, entry = found
        spec = entry.spec
        messages = body.get("messages") or []
        keep_alive = body.get("keep_alive")
        if not messages and keep_alive == 0:
            self.engine.unload(name.key)
            return self._load_reply(w, None, model_in, "unload", chat=True)
        think = body.get("think")
        if think is not None and think is not False:
            return self._error(w, style, 400, f"{go_quote(model_in)} does not support thinking")
        # CheckCapabilities tests completion before tools.
        if spec.embedding_only:
            return self._error(w, style, 400, f"{go_quote(model_in)} does not support chat")
        if body.get("tools") and "tools" not in spec.capabilities:
            return self._error(w, style, 400, f"{name.full} does not support tools")
        options = body.get("options")
        bad = self._check_options(options)
        if bad:
            return self._error(w, style, 500, bad)
        if not messages:
            return self._acquire(w, style, entry, body,
                                 lambda runner: self._load_reply(w, None, model_in, "load", chat=True))
        parts = [f"{m.get('role') or ''}\n{m.get('content') or ''}\n" if m else "" for m in messages]
        text = "".join(parts)
        prompt_tokens = count_prompt_tokens(text, GENERATE_OVERHEAD + CHAT_MESSAGE_OVERHEAD * len(messages))
        n, reason = self._n_tokens(options)
        offset = self._offset(name, text, options)
        skip = 0
        lead = len(messages)
        while lead and (messages[lead - 1] or {}).get("role") == "assistant":
            lead -= 1
        if lead < len(messages):
            # A prefill: Ollama leaves the last assistant turn open
            # (template.go Execute cuts the template after its .Response;
            # collate joins assistant messages in a row with a blank line) and
            # the model writes on from it.  The deterministic model here
            # answers the conversation before the prefill; when the prefill
            # is the start of that answer, it writes the rest, as a model at
            # temperature 0 would, and its natural end stays where it was.
            prefill = "\n\n".join((m or {}).get("content") or "" for m in messages[lead:])
            base = self._offset(name, "".join(parts[:lead]), options)
            k = self.corpus.tokens_in(base, prefill)
            if k is not None:
                offset, skip = base, k
                if reason == "stop":
                    n = max(0, n - k)
        if oai:
            stream = oai["stream"]
            sink_cls = oai.get("sinks", (OaiChatJson, OaiChatStream))[bool(stream)]
        else:
            stream = body.get("stream")
            stream = stream is None or stream
            sink_cls = ChatStream if stream else ChatJson
        sink = sink_cls(self, w, req, model_in, offset, reason, prompt_tokens, oai)
        sink.skip = skip
        corpus_text = self.corpus.text
        # The slot's cache after this turn holds the assistant's reply the
        # way the next turn's messages will render it.
        self._acquire(w, style, entry, body, lambda runner: self._run(
            w, style, sink, runner, n, prompt_tokens, stream, text,
            lambda k: f"assistant\n{corpus_text(offset, k)}\n"))

    # --- embeddings -----------------------------------------------------------

    def embed(self, req, w):
        body = self._decode(req, w, gojson.EMBED)
        if body is not None:
            self._embed(req, w, body, None)

    def _embed(self, req, w, body, oai):
        """EmbedHandler (/api/embed; /v1/embeddings with `oai` set)."""
        style = _Style.OAI if oai else _Style.NATIVE
        model_in = body.get("model") or ""
        name = parse_name(model_in) if model_in else None
        if name is None:
            return self._error(w, style, 404, f"model '{model_in}' not found")
        raw_input = body.get("input")
        if isinstance(raw_input, str):
            inputs = [raw_input] if raw_input else []
        elif isinstance(raw_input, list):
            if not all(isinstance(x, str) for x in raw_input):
                return self._error(w, style, 400, "invalid input type")
            inputs = raw_input
        elif raw_input is None:
            inputs = []
        else:
            return self._error(w, style, 400, "invalid input type")
        entry = self.catalogue.lookup(name)
        if entry is None:
            return self._error(w, style, 404, self._not_found_sched(model_in))
        bad = self._check_options(body.get("options"))
        if bad:
            return self._error(w, style, 500, bad)
        self._acquire(w, style, entry, body, lambda runner: self._embed_on(
            req, w, body, oai, style, name, entry, model_in, inputs, runner))

    def _embed_on(self, req, w, body, oai, style, name, entry, model_in, inputs, runner):
        """EmbedHandler once the scheduler has the runner."""
        if not inputs:
            if oai:
                # ToEmbeddingList with nil embeddings: an empty EmbeddingList.
                return w.respond(200, JSON, go_dumps({"object": "", "data": None, "model": "",
                                                      "usage": {"prompt_tokens": 0, "total_tokens": 0}}) + b"\n")
            return w.respond(200, JSON_UTF8, go_dumps({"model": model_in, "embeddings": []}))
        spec = entry.spec
        counts = [count_prompt_tokens(t, 2) for t in inputs]
        ctx = min(self.config.num_ctx, spec.context_length)
        if body.get("truncate") is False and max(counts) > ctx:
            return self._error(w, style, 400, "the input length exceeds the context length")
        counts = [min(c, ctx) for c in counts]
        dims = body.get("dimensions") or 0
        prompt_tokens = sum(counts)

        def done(hold):
            vecs = [embedding(self.config.seed, name.key, t, spec.embedding_length, dims) for t in inputs]
            if oai:
                fmt = oai["encoding_format"]
                data = [{"object": "embedding",
                         "embedding": _b64_floats(v) if fmt.lower() == "base64" else v,
                         "index": i} for i, v in enumerate(vecs)]
                out = {"object": "list", "data": data, "model": oai["model"],
                       "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
                return w.respond(200, JSON, go_dumps(out) + b"\n")
            scale = self.config.time_scale
            if self.config.deterministic_time and self.engine.gpu is None:
                load, total = NOMINAL_LOAD_NS, NOMINAL_LOAD_NS + max(1, round(hold.duration * 1e9))
            else:
                load = max(1, round((hold.t_submit - req.t_start) * scale * 1e9))
                total = max(load + 1, round((hold.t_end - req.t_start) * scale * 1e9))
            w.respond(200, JSON_UTF8, go_dumps({"model": model_in, "embeddings": vecs,
                                                "total_duration": total, "load_duration": load,
                                                "prompt_eval_count": prompt_tokens}))

        self._hold(w, style, runner, prompt_tokens, done)

    def _hold(self, w, style, runner, prompt_tokens, done):
        if w.done:
            return
        cfg = self.config
        if self.engine.gpu is None:
            work = prefill_seconds(cfg.ttft, prompt_tokens, cfg.prompt_rate)
        else:
            work = max(1, prompt_tokens) / runner.prompt_rate
        hold = SlotHold(self.engine, runner, work, done)
        if not hold.start():
            self.stats.rejected += 1
            return self._error(w, style, 503, QUEUE_FULL)
        if not w.done:
            w.job = hold

    def embeddings(self, req, w):
        """EmbeddingsHandler (legacy): float64 values, empty prompt loads."""
        body = self._decode(req, w, gojson.EMBEDDINGS)
        if body is None:
            return
        model_in = body.get("model") or ""
        name = parse_name(model_in) if model_in else None
        if name is None:
            return self._error(w, _Style.NATIVE, 400, "model is required")
        entry = self.catalogue.lookup(name)
        if entry is None:
            return self._error(w, _Style.NATIVE, 404, self._not_found_sched(model_in))
        bad = self._check_options(body.get("options"))
        if bad:
            return self._error(w, _Style.NATIVE, 500, bad)
        prompt = body.get("prompt") or ""
        spec = entry.spec

        def done(hold):
            vec = embedding(self.config.seed, name.key, prompt, spec.embedding_length, 0)
            # float32 values widened to float64 print with their full digits.
            w.respond(200, JSON_UTF8, go_dumps({"embedding": _widen(vec)}))

        def on_runner(runner):
            if not prompt:
                return w.respond(200, JSON_UTF8, b'{"embedding":[]}')
            self._hold(w, _Style.NATIVE, runner, count_prompt_tokens(prompt, 2), done)

        self._acquire(w, _Style.NATIVE, entry, body, on_runner)

    # --- model management -----------------------------------------------------

    def pull(self, req, w):
        """PullHandler: a cheap progress stream; known models get installed."""
        body = self._decode(req, w, gojson.PULL)
        if body is None:
            return
        model_in = body.get("model") or body.get("name") or ""
        name = parse_name(model_in) if model_in else None
        if name is None:
            return self._error(w, _Style.NATIVE, 400, "invalid model name")
        spec = known_spec(model_in)
        existing = self.catalogue.lookup(name)
        if spec is None and existing is not None and existing.config is None:
            # An installed model the registry "has" (a configured ModelSpec);
            # one made by /api/create exists only here, and the registry
            # answers for it as for any unknown name.
            spec = existing.spec
        stream = body.get("stream")
        stream = stream is None or stream
        if spec is None:
            err = "pull model manifest: file does not exist"
            if not stream:
                return w.respond(500, JSON, go_dumps({"error": err}))
            w.stream_start(200, NDJSON)
            w.stream_write(b'{"status":"pulling manifest"}\n')
            w.stream_write(go_dumps({"error": err}) + b"\n")
            return w.stream_end()
        lines = self._pull_lines(spec)
        self.catalogue.install(spec, self.clock.now(), name=parse_name(name.display))
        if not stream:
            return w.respond(200, JSON, go_dumps({"status": "success"}))
        w.stream_start(200, NDJSON)
        for line in lines:
            w.stream_write(go_dumps(line) + b"\n")
        w.stream_end()

    def _pull_lines(self, spec) -> list:
        """PullModel's progress for a model the simulated registry has."""
        digest = model_layer_digest(spec.name)
        lines = [{"status": "pulling manifest"}]
        for done in (0, spec.size // 2, spec.size):
            p = {"status": f"pulling {digest[7:19]}", "digest": digest, "total": spec.size}
            if done:
                p["completed"] = done
            lines.append(p)
        lines += [{"status": "verifying sha256 digest"}, {"status": "writing manifest"},
                  {"status": "success"}]
        return lines

    def _progress(self, w, stream: bool, items) -> None:
        """Answer a progress channel: streamResponse (NDJSON; an error before
        any line is a plain JSON status, after one an in-band line) or,
        with stream false, waitForStream (the last line, or the first error)."""
        if not stream:
            latest = {}
            for item in items:
                if "error" in item:
                    return w.respond(item["_status"], JSON, go_dumps({"error": item["error"]}))
                latest = item
            return w.respond(200, JSON, go_dumps(latest))
        started = False
        for item in items:
            if "error" in item:
                if not started:
                    return w.respond(item["_status"], JSON, go_dumps({"error": item["error"]}))
                w.stream_write(go_dumps({"error": item["error"]}) + b"\n")
                break
            if not started:
                started = True
                w.stream_start(200, NDJSON)
            w.stream_write(go_dumps(item) + b"\n")
        if not started:
            w.stream_start(200, NDJSON)
        w.stream_end()

    def create(self, req, w):
        """CreateHandler: a model from uploaded blobs (`files`) or from an
        installed one (`from`), with template/system/parameters layers."""
        body = self._decode(req, w, gojson.CREATE)
        if body is None:
            return
        for key in ("files", "draft_files"):
            for path, digest in (body.get(key) or {}).items():
                if not _valid_path(path):
                    return self._error(w, _Style.NATIVE, 400, "file path must be relative")
                if not digest:
                    return self._error(w, _Style.NATIVE, 400, "invalid digest format")
        if body.get("draft_quantize") and not body.get("draft_files"):
            return self._error(w, _Style.NATIVE, 400, "--draft-quantize requires a DRAFT model")
        for digest in (body.get("adapters") or {}).values():
            if not digest:
                return self._error(w, _Style.NATIVE, 400, "invalid digest format")
        name = parse_name(body.get("model") or body.get("name") or "")
        if name is None:
            return self._error(w, _Style.NATIVE, 400, "invalid model name")
        stream = body.get("stream")
        self._progress(w, stream is None or stream, self._create_steps(body, name))

    def _gguf_layers(self, files: dict, adapter: bool, out: list):
        """convertModelFromFiles for GGUF blobs: yields progress (or a
        failure) and appends (Layer, Blob) to `out`."""
        bad = 400 if adapter else 500
        kind = ""
        for path, digest in files.items():
            if path.endswith(".safetensors"):
                kind = "safetensors"
            elif path.endswith(".gguf"):
                kind = "gguf"
            else:
                blob = self.catalogue.blob(digest) if _BLOB_DIGEST.match(digest) else None
                kind = "gguf" if blob is not None and blob.gguf else ""
            break   # detectModelTypeFromFiles decides on the first file it sees
        if kind == "safetensors":
            # Not modelled: the simulator cannot convert tensors.
            yield _fail("olb-sim cannot convert safetensors; upload a GGUF", 400)
            return
        if kind != "gguf":
            yield _fail("unknown type", 400)
            return
        if adapter and len(files) > 1:
            yield _fail("only one adapter is currently supported", 400)
            return
        for path in sorted(files):
            digest = files[path]
            yield {"status": "parsing GGUF"}
            if not _BLOB_DIGEST.match(digest):
                yield _fail("invalid digest format", bad)
                return
            blob = self.catalogue.blob(digest)
            if blob is None:
                yield _fail(f"open {blob_path(digest)}: no such file or directory", bad)
                return
            if not blob.gguf or blob.kv is None:
                yield _fail("supplied file was not in GGUF format", 400)
                return
            media = MEDIA_ADAPTER if adapter or blob.kv.get("general.type") == "adapter" else MEDIA_MODEL
            out.append((Layer(media, digest, blob.size), blob))

    def _new_layer(self, media: str, data: bytes, statuses: list) -> Layer:
        """manifest.NewLayer: store `data` as a blob, noting whether it was new."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        state = "using existing layer" if self.catalogue.blob(digest) is not None else "creating new layer"
        self.catalogue.add_blob(digest, Blob(len(data), data=data))
        statuses.append(f"{state} {digest}")
        return Layer(media, digest, len(data))

    def _create_steps(self, body: dict, name: ModelName):
        """The CreateHandler goroutine: progress dicts, ending in success or a _fail."""
        cat = self.catalogue
        layers = []         # (Layer, status or None)
        spec = None
        from_in = body.get("from") or ""
        files = body.get("files")
        if from_in:
            from_name = parse_name(from_in)
            if from_name is None:
                yield _fail("invalid model name", 400)
                return
            base = cat.lookup(from_name)
            if base is None:
                # parseFromModel pulls a base that is not installed (from the
                # simulated registry: no network).
                known = known_spec(from_in)
                if known is None:
                    yield {"status": "pulling manifest"}
                    yield _fail("pull model manifest: file does not exist")
                    return
                yield from self._pull_lines(known)
                base = cat.install(known, self.clock.now(), name=from_name)
            spec = base.spec
            for layer in base.layers:
                layers.append((layer, f"using existing layer {layer.digest}"))
        elif files is not None:
            found: list = []
            for item in self._gguf_layers(files, False, found):
                yield item
                if "error" in item:
                    return
            models = [(la, b) for la, b in found if la.media_type == MEDIA_MODEL]
            if models:
                la, blob = max(models, key=lambda x: x[0].size)
                spec = spec_from_gguf(name.display, la.size, blob.kv)
            for la, _ in found:
                layers.append((la, f"using existing layer {la.digest}"))
        else:
            yield _fail("neither 'from' or 'files' was specified", 400)
            return
        adapters = body.get("adapters")
        if adapters is not None:
            found = []
            for item in self._gguf_layers(adapters, True, found):
                yield item
                if "error" in item:
                    return
            for la, _ in found:
                layers.append((la, f"using existing layer {la.digest}"))
        if spec is None:
            la = max((x for x, _ in layers), key=lambda x: x.size)
            spec = spec_from_gguf(name.display, la.size, {})
        # createModel: quantize the weights layer, then the text layers.
        quant = (body.get("quantize") or body.get("quantization") or "").upper()
        if quant:
            want = _QUANT_TYPES.get(quant)
            if want is None:
                yield _fail(f"unsupported quantization type {quant} - supported types are "
                            "F32, F16, Q4_K_S, Q4_K_M, Q8_0")
                return
            ft = spec.quantization_level
            if ft not in ("F16", "BF16", "F32"):
                yield _fail("quantization is only supported for F16, BF16 and F32 models")
                return
            if ft != want:
                i = next(i for i, (la, _) in enumerate(layers) if la.media_type == MEDIA_MODEL)
                old = layers[i][0]
                for frac in (0.0, 0.5, 1.0):
                    p = {"status": f"quantizing {ft} model to {want}", "digest": "0000000000000000000",
                         "total": old.size}
                    if frac:
                        p["completed"] = int(old.size * frac)
                    yield p
                yield {"status": "verifying conversion"}
                size = int(old.size * _BITS[want] / _BITS[ft])
                digest = "sha256:" + hashlib.sha256(f"{old.digest}/{want}".encode()).hexdigest()
                state = "using existing layer" if cat.blob(digest) else "creating new layer"
                cat.add_blob(digest, Blob(size, gguf=True, kv={}))
                layers[i] = (Layer(MEDIA_MODEL, digest, size), f"{state} {digest}")
                spec = replace(spec, quantization_level=want, size=size)
        statuses: list = []

        def set_layer(media, data: bytes | None):
            nonlocal layers
            layers = [x for x in layers if x[0].media_type != media]
            if data is not None:
                before = len(statuses)
                la = self._new_layer(media, data, statuses)
                layers.append((la, statuses[before]))

        if body.get("template"):
            set_layer(MEDIA_TEMPLATE, body["template"].encode())
        if body.get("system"):
            set_layer(MEDIA_SYSTEM, body["system"].encode())
        lic = body.get("license")
        for text in ([lic] if isinstance(lic, str) else lic if isinstance(lic, list) else []):
            if isinstance(text, str) and text:
                la = self._new_layer(MEDIA_LICENSE, text.encode(), statuses)
                layers.append((la, statuses[-1]))
        params = dict(body.get("parameters") or {})
        for la, _ in layers:
            if la.media_type == MEDIA_PARAMS:
                old = cat.blob(la.digest)
                if old is not None and old.data:
                    for k, v in orjson.loads(old.data).items():
                        params.setdefault(k, v)
        if params:
            # setParameters: json.Encoder of a map (sorted keys, "\n").
            set_layer(MEDIA_PARAMS, go_dumps(params, sort_keys=True) + b"\n")
        if body.get("messages"):
            set_layer(MEDIA_MESSAGES, go_dumps(body["messages"]) + b"\n")
        final = [la for la, _ in layers]
        config_data = go_dumps({
            "model_format": "gguf", "model_family": spec.architecture,
            "model_families": [spec.architecture], "model_type": spec.parameter_size,
            "file_type": spec.quantization_level, "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [la.digest for la in final]},
        })
        config = self._new_layer(MEDIA_CONFIG, config_data, [])
        for _, status in layers:
            if status:
                yield {"status": status}
        yield {"status": "writing manifest"}
        old = cat.lookup(name)
        cat.install(replace(spec, name=name.display), self.clock.now(), name=name, layers=tuple(final),
                    config=config, digest=manifest_digest(config, final))
        if old is not None:
            # The replaced manifest's layers no model uses any more (oldManifest.RemoveLayers).
            cat.prune(old.all_layers())
        yield {"status": "success"}

    def push(self, req, w):
        """PushHandler -> PushModel, without a network: a model on the
        default registry "uploads" at once; any other host is unreachable."""
        body = self._decode(req, w, gojson.PUSH)
        if body is None:
            return
        mname = body.get("model") or body.get("name") or ""
        if not mname:
            return self._error(w, _Style.NATIVE, 400, "model is required")
        stream = body.get("stream")
        self._progress(w, stream is None or stream, self._push_steps(mname, bool(body.get("insecure"))))

    def _push_steps(self, mname: str, insecure: bool):
        yield {"status": "retrieving manifest"}
        if mname.startswith("http://") and not insecure:
            yield _fail("insecure protocol http")
            return
        name = parse_name(mname)
        entry = self.catalogue.lookup(name) if name is not None else None
        if entry is None:
            yield {"status": "couldn't retrieve manifest"}
            if name is None:
                yield _fail(f"unqualified name: {mname}")
            else:
                yield _fail(f"open /root/.ollama/models/manifests/{name.host}/{name.namespace}/"
                            f"{name.model}/{name.tag}: no such file or directory")
            return
        layers = entry.all_layers()
        assert name is not None  # the entry was looked up by it
        if name.host.lower() != DEFAULT_HOST:
            host = name.host
            yield _fail(f'Head "https://{host}/v2/{name.namespace}/{name.model}/blobs/{layers[0].digest}": '
                        f"dial tcp: lookup {host}: no such host")
            return
        for layer in layers:
            for frac in (0.0, 0.5, 1.0):
                p = {"status": f"pushing {layer.digest[7:19]}", "digest": layer.digest}
                if layer.size:
                    p["total"] = layer.size
                if int(layer.size * frac):
                    p["completed"] = int(layer.size * frac)
                yield p
        yield {"status": "pushing manifest"}
        yield {"status": "success"}

    def copy(self, req, w):
        """CopyHandler -> CopyModel: a second manifest for the same layers."""
        body = self._decode(req, w, gojson.COPY)
        if body is None:
            return
        src_in = body.get("source") or ""
        dst_in = body.get("destination") or ""
        src = parse_name(src_in)
        if src is None:
            return self._error(w, _Style.NATIVE, 400, f"source {go_quote(src_in)} is invalid")
        dst = parse_name(dst_in)
        if dst is None:
            return self._error(w, _Style.NATIVE, 400, f"destination {go_quote(dst_in)} is invalid")
        entry = self.catalogue.lookup(src)
        if entry is None:
            return self._error(w, _Style.NATIVE, 404, f"model {go_quote(src_in)} not found")
        if src.key != dst.key:     # CopyModel: same file path -> nothing to do
            self.catalogue.install(entry.spec, self.clock.now(), name=dst, layers=entry.layers,
                                   config=entry.config, digest=entry.digest)
        w.respond(200, None, b"")

    def delete(self, req, w):
        """DeleteHandler: the manifest and the layers no other model uses.
        A loaded runner stays loaded, as in Ollama (it expires by keep-alive)."""
        body = self._decode(req, w, gojson.DELETE)
        if body is None:
            return
        model_in = body.get("model") or body.get("name") or ""
        name = parse_name(model_in)
        if name is None:
            return self._error(w, _Style.NATIVE, 400, f"name {go_quote(model_in)} is invalid")
        if not self.catalogue.remove(name):
            return self._error(w, _Style.NATIVE, 404, f"model '{model_in}' not found")
        w.respond(200, None, b"")

    def blob_head(self, req, w, digest):
        """HeadBlobHandler."""
        if not _BLOB_DIGEST.match(digest):
            return self._error(w, _Style.NATIVE, 400, "invalid digest format")
        if self.catalogue.blob(digest) is not None:
            return w.respond(200, None, b"")
        self._error(w, _Style.NATIVE, 404, f"blob {go_quote(digest)} not found")

    def blob_post(self, req, w, digest):
        """CreateBlobHandler: 200 if stored, else hash the body (streamed by
        the server into req.upload), 201, or 400 on a digest mismatch."""
        if not _BLOB_DIGEST.match(digest):
            return self._error(w, _Style.NATIVE, 400, "invalid digest format")
        if self.catalogue.blob(digest) is not None:
            return w.respond(200, None, b"")
        up = req.upload
        if up is None:
            up = BlobUpload()
            up.feed(req.body)
        got = "sha256:" + up.sha.hexdigest()
        if got != digest:
            return self._error(w, _Style.NATIVE, 400,
                               f"digest mismatch, expected {go_quote(digest)}, got {go_quote(got)}")
        head = bytes(up.head)
        kv = None
        if gguf.is_gguf(head):
            try:
                kv = gguf.read_kv(head)
            except ValueError:
                kv = None
        self.catalogue.add_blob(digest, Blob(up.size, gguf=gguf.is_gguf(head), kv=kv))
        w.respond(201, None, b"")

    # --- Anthropic and Responses compatibility ------------------------------------

    def _random_id(self, prefix: str, req: Request | None = None) -> str:
        """generateID: prefix + 24 hex digits (fixed per body under
        deterministic_time, so bodies repeat byte for byte)."""
        if self.config.deterministic_time and req is not None:
            raw = hashlib.blake2b(req.body, digest_size=12, key=str(self.config.seed).encode()[:64]).digest()
        else:
            raw = os.urandom(12)
        return f"{prefix}_{raw.hex()}"

    def _anthropic_error(self, w, status: int, message: str) -> None:
        """An error AnthropicMessagesMiddleware aborts with (gin c.JSON)."""
        w.respond(status, JSON_UTF8, go_dumps(anthropic_error(status, message, self._random_id("req"))))

    def anthropic_messages(self, req, w):
        """AnthropicMessagesMiddleware -> ChatHandler (anthropic.FromMessagesRequest)."""
        try:
            body = gojson.decode(req.body, gojson.ANTHROPIC_MESSAGES)
        except DecodeError as exc:
            return self._anthropic_error(w, 400, str(exc))
        model = body.get("model") or ""
        if not model:
            return self._anthropic_error(w, 400, "model is required")
        max_tokens = body.get("max_tokens") or 0
        if max_tokens <= 0:
            return self._anthropic_error(w, 400, "max_tokens is required and must be positive")
        messages = body.get("messages") or []
        if not messages:
            return self._anthropic_error(w, 400, "messages is required")
        native = []
        system = body.get("system")
        if isinstance(system, str) and system:
            native.append({"role": "system", "content": system})
        elif isinstance(system, list):
            text = "".join(b["text"] for b in system if isinstance(b, dict) and b.get("type") == "text"
                           and isinstance(b.get("text"), str))
            if text:
                native.append({"role": "system", "content": text})
        # EstimateCountTokens counts the system text, roles, contents and tools.
        chars = len(system) if isinstance(system, str) else len(native[0]["content"]) if native else 0
        for t in body.get("tools") or []:
            if isinstance(t, dict):
                chars += sum(len(t.get(k) or "") for k in ("name", "description") if isinstance(t.get(k), str))
                chars += len(go_dumps(t.get("input_schema"))) if t.get("input_schema") is not None else 0
        for m in messages:
            if not isinstance(m, dict):
                kind = gojson._json_kind(m)
                return self._anthropic_error(
                    w, 400, f"json: cannot unmarshal {kind} into Go struct field MessagesRequest.messages "
                            "of type anthropic.MessageParam")
            converted, err = _anthropic_message(m)
            if err:
                return self._anthropic_error(w, 400, err)
            native.extend(converted)
            chars += len(m.get("role") or "") + sum(len(x.get("content") or "") for x in converted)
        options = {"num_predict": max_tokens}
        for src, dst in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k")):
            if body.get(src) is not None:
                options[dst] = body[src]
        if body.get("stop_sequences"):
            options["stop"] = body["stop_sequences"]
        stream = bool(body.get("stream"))
        native_body = {"model": model, "messages": native, "options": options, "stream": stream}
        if body.get("tools"):
            native_body["tools"] = body["tools"]
        thinking = body.get("thinking") or {}
        if thinking.get("type") in ("enabled", "disabled"):
            native_body["think"] = thinking["type"] == "enabled"
        ctx = {"stream": stream, "model": model, "id": self._random_id("msg", req),
               # EstimateInputTokens: len/4, at least 1 (message_start's usage).
               "estimate": max(1, chars // 4), "style": _Style.ANTHROPIC,
               "sinks": (AnthropicJson, AnthropicStream)}
        if not native:
            return self._compat_load(req, w, native_body, ctx)
        self._chat(req, w, native_body, ctx)

    def oai_responses(self, req, w):
        """ResponsesMiddleware -> ChatHandler (openai.FromResponsesRequest)."""
        body = self._decode(req, w, gojson.RESPONSES, _Style.OAI)
        if body is None:
            return
        native = []
        if body.get("instructions"):
            native.append({"role": "system", "content": body["instructions"]})
        inp = body.get("input")
        if isinstance(inp, str):
            if inp:
                native.append({"role": "user", "content": inp})
        elif isinstance(inp, list):
            for i, item in enumerate(inp):
                msg, err = _responses_item(item)
                if err:
                    return self._middleware_error(w, 400, f"input[{i}]: {err}")
                if msg is not None:
                    native.append(msg)
        elif inp is not None:
            return self._middleware_error(
                w, 400, f"input must be a string or array: json: cannot unmarshal {gojson._json_kind(inp)} "
                        "into Go value of type []json.RawMessage")
        options = {"temperature": 1.0 if body.get("temperature") is None else body["temperature"]}
        if body.get("top_p") is not None:
            options["top_p"] = body["top_p"]
        if body.get("max_output_tokens") is not None:
            options["num_predict"] = body["max_output_tokens"]
        stream = bool(body.get("stream"))
        native_body = {"model": body.get("model") or "", "messages": native, "options": options,
                       "stream": stream}
        effort = (body.get("reasoning") or {}).get("effort") or ""
        if effort:
            # thinkFromReasoningEffort.
            think = {"none": False, "minimal": "low", "low": "low", "medium": "medium", "high": "high",
                     "max": "max", "xhigh": "max", "ultra": "max"}.get(effort)
            if think is None:
                return self._middleware_error(
                    w, 400, f"invalid reasoning value: {go_quote(effort)} (must be \"minimal\", \"low\", "
                            '"medium", "high", "xhigh", "ultra", "max", or "none")')
            native_body["think"] = think
        tools = body.get("tools")
        if tools:
            native_body["tools"] = tools
        ctx = {"stream": stream, "model": body.get("model") or "",
               "id": f"resp_{random.randrange(999999)}", "item": f"msg_{random.randrange(999999)}",
               "request": body, "created": self.clock.created_unix(),
               "sinks": (ResponsesJson, ResponsesStream)}
        if not native:
            return self._compat_load(req, w, native_body, ctx)
        self._chat(req, w, native_body, ctx)

    def _compat_load(self, req, w, body: dict, ctx: dict) -> None:
        """ChatHandler with no messages answers the load reply (done_reason
        "load", no tokens); the Anthropic and Responses writers convert it
        like any other final chunk."""
        style = ctx.get("style", _Style.OAI)
        model_in = body["model"]
        found = self._resolve(w, style, model_in, 400, "model is required", self._not_found_chat)
        if found is None:
            return
        entry = found[1]
        if entry.spec.embedding_only:
            return self._error(w, style, 400, f"{go_quote(model_in)} does not support chat")
        sink = ctx["sinks"][bool(ctx["stream"])](self, w, req, model_in, 0, "load", 0, ctx)
        self._acquire(w, style, entry, body, lambda runner: sink.finish(_LOAD_REPLY))

    # --- OpenAI compatibility ---------------------------------------------------

    def _oai_context(self, req, body, kind):
        opts = body.get("stream_options") or {}
        return {
            "id": f"{kind}-{self._request_id(req)}",
            "created": self.clock.created_unix(),
            "stream": bool(body.get("stream")),
            "include_usage": bool(opts.get("include_usage")) if isinstance(opts, dict) else False,
            "model": body.get("model") or "",
        }

    @staticmethod
    def _oai_options(body) -> dict:
        """FromChatRequest/FromCompleteRequest option mapping."""
        options: dict = {}
        stop = body.get("stop")
        if isinstance(stop, str):
            options["stop"] = [stop]
        elif isinstance(stop, list):
            options["stop"] = [s for s in stop if isinstance(s, str)]
        if body.get("max_tokens") is not None:
            options["num_predict"] = body["max_tokens"]
        temp = body.get("temperature")
        options["temperature"] = 1.0 if temp is None else temp
        if body.get("seed") is not None:
            options["seed"] = body["seed"]
        for k in ("frequency_penalty", "presence_penalty"):
            if body.get(k) is not None:
                options[k] = body[k]
        top_p = body.get("top_p")
        options["top_p"] = 1.0 if top_p is None else top_p
        return options

    def oai_chat(self, req, w):
        """ChatMiddleware -> ChatHandler."""
        body = self._decode(req, w, gojson.OAI_CHAT, _Style.OAI)
        if body is None:
            return
        messages = body.get("messages") or []
        if not messages:
            return self._middleware_error(w, 400, "[] is too short - 'messages'")
        native = []
        for m in messages:
            m = m or {}
            content = m.get("content")
            role = m.get("role") or ""
            if isinstance(content, str):
                native.append({"role": role, "content": content})
            elif isinstance(content, list):
                for part in content:
                    if not isinstance(part, dict):
                        return self._middleware_error(w, 400, "invalid message format")
                    if part.get("type") == "text":
                        if not isinstance(part.get("text"), str):
                            return self._middleware_error(w, 400, "invalid message format")
                        native.append({"role": role, "content": part["text"]})
                    elif part.get("type") == "image_url":
                        native.append({"role": role, "content": ""})
                    else:
                        return self._middleware_error(w, 400, "invalid message format")
            elif m.get("tool_calls"):
                native.append({"role": role, "content": ""})
            else:
                kind = {type(None): "<nil>", bool: "bool", int: "float64", float: "float64",
                        dict: "map[string]interface {}"}.get(type(content), "interface {}")
                return self._middleware_error(w, 400, f"invalid message content type: {kind}")
        oai = self._oai_context(req, body, "chatcmpl")
        native_body = {"model": body.get("model") or "", "messages": native,
                       "options": self._oai_options(body), "stream": oai["stream"]}
        if body.get("tools"):
            native_body["tools"] = body["tools"]
        self._chat(req, w, native_body, oai)

    def oai_completions(self, req, w):
        """CompletionsMiddleware -> GenerateHandler."""
        body = self._decode(req, w, gojson.OAI_COMPLETION, _Style.OAI)
        if body is None:
            return
        oai = self._oai_context(req, body, "cmpl")
        native_body = {"model": body.get("model") or "", "prompt": body.get("prompt") or "",
                       "options": self._oai_options(body), "stream": oai["stream"]}
        if body.get("suffix"):
            native_body["suffix"] = body["suffix"]
        self._generate(req, w, native_body, oai)

    def oai_embeddings(self, req, w):
        """EmbeddingsMiddleware -> EmbedHandler."""
        body = self._decode(req, w, gojson.OAI_EMBED, _Style.OAI)
        if body is None:
            return
        fmt = body.get("encoding_format") or ""
        if fmt and fmt.lower() not in ("float", "base64"):
            return self._middleware_error(
                w, 400, f"Invalid value for 'encoding_format' = {fmt}. Supported values: ['float', 'base64'].")
        inp = body.get("input")
        if inp == "":
            inp = [""]
        if inp is None or inp == []:
            return self._middleware_error(w, 400, "invalid input")
        native = {"model": body.get("model") or "", "input": inp}
        if body.get("dimensions"):
            native["dimensions"] = body["dimensions"]
        self._embed(req, w, native, {"model": body.get("model") or "", "encoding_format": fmt})

    def oai_models(self, req, w):
        data = [{"id": e.name.display, "object": "model", "created": int(e.modified),
                 "owned_by": e.name.namespace} for e in self.catalogue.listing()]
        # ToListCompletion appends to a nil slice: no models -> "data": null.
        w.respond(200, JSON, go_dumps({"object": "list", "data": data or None}) + b"\n")

    def oai_model(self, req, w, model):
        name = parse_name(model)
        if name is None:
            return self._error(w, _Style.OAI, 400, "invalid model name")
        entry = self.catalogue.lookup(name)
        if entry is None:
            return self._error(w, _Style.OAI, 404, f"model '{model}' not found")
        w.respond(200, JSON, go_dumps({"id": model, "object": "model", "created": int(entry.modified),
                                       "owned_by": name.namespace}) + b"\n")


# --- Anthropic and Responses request conversion ---------------------------------

def _anthropic_message(m: dict):
    """anthropic convertMessage: (native messages, error text or None)."""
    role = (m.get("role") or "").lower() if isinstance(m.get("role"), str) else ""
    content = m.get("content")
    if isinstance(content, str):
        blocks = [{"type": "text", "text": content}]
    elif isinstance(content, list):
        blocks = content
    elif content is None:
        blocks = []
    else:
        return None, (f"json: cannot unmarshal {gojson._json_kind(content)} into Go value of type "
                      "[]anthropic.ContentBlock")
    text, thinking, calls, results = [], "", [], []
    for b in blocks:
        if not isinstance(b, dict):
            return None, (f"json: cannot unmarshal {gojson._json_kind(b)} into Go value of type "
                          "anthropic.ContentBlock")
        kind = b.get("type")
        if kind == "text":
            if isinstance(b.get("text"), str):
                text.append(b["text"])
        elif kind == "image":
            src = b.get("source")
            if not isinstance(src, dict):
                return None, "invalid image source"
            if src.get("type") != "base64":
                return None, f"invalid image source type: {src.get('type') or ''}. Only base64 images are supported."
        elif kind == "tool_use":
            if not b.get("id"):
                return None, "tool_use block missing required 'id' field"
            if not b.get("name"):
                return None, "tool_use block missing required 'name' field"
            calls.append({"id": b["id"], "function": {"name": b["name"], "arguments": b.get("input") or {}}})
        elif kind == "tool_result":
            c = b.get("content")
            if isinstance(c, list):
                c = "".join(x.get("text") or "" for x in c if isinstance(x, dict) and x.get("type") == "text")
            results.append({"role": "tool", "content": c if isinstance(c, str) else "",
                            "tool_call_id": b.get("tool_use_id") or ""})
        elif kind == "thinking":
            thinking = b.get("thinking") or ""
    out = []
    if role == "user":
        out.extend(results)
    if text or calls or thinking:
        msg = {"role": role, "content": "".join(text)}
        if calls:
            msg["tool_calls"] = calls
        out.append(msg)
    if role != "user":
        out.extend(results)
    return out, None


def _responses_item(item):
    """unmarshalResponsesInputItem + convertInputMessage: (native message or
    None, error text or None)."""
    if not isinstance(item, dict):
        return None, (f"json: cannot unmarshal {gojson._json_kind(item)} into Go value of type "
                      'struct { Type string "json:\\"type\\""; Role string "json:\\"role\\"" }')
    kind = item.get("type") or ("message" if item.get("role") else "")
    if kind == "message":
        content = item.get("content")
        if isinstance(content, str):
            return {"role": item.get("role") or "", "content": content}, None
        parts = []
        for j, c in enumerate(content or []):
            t = c.get("type") if isinstance(c, dict) else None
            if t in ("input_text", "output_text"):
                parts.append(c.get("text") or "")
            elif t == "input_image":
                pass
            elif t == "input_file":
                return None, "file inputs are not currently supported"
            else:
                return None, f"content[{j}]: unknown content type: {t or ''}"
        return {"role": item.get("role") or "", "content": "".join(parts)}, None
    if kind == "function_call":
        return {"role": "assistant", "content": "",
                "tool_calls": [{"id": item.get("call_id") or "",
                                "function": {"name": item.get("name") or "", "arguments": {}}}]}, None
    if kind == "function_call_output":
        out = item.get("output")
        return {"role": "tool", "content": out if isinstance(out, str) else "",
                "tool_call_id": item.get("call_id") or ""}, None
    if kind in ("reasoning", "web_search_call"):
        return None, None
    if not kind:
        return None, "input item missing required 'type' field"
    return None, f"unknown input item type: {go_quote(kind)}"


# --- embeddings -------------------------------------------------------------

@functools.lru_cache(maxsize=2048)
def _embedding(seed: int, key: str, text: str, dim: int) -> tuple:
    h = hashlib.blake2b(f"{seed}\0{key}\0{text}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    rng = random.Random(int.from_bytes(h, "little"))
    gauss = rng.gauss
    vec = [gauss(0.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(math.fsum(v * v for v in vec)) or 1.0
    # Six significant digits: exactly what Go prints for the float32 nearest
    # to each value, so the bytes match a Go server's.
    return tuple(float(f"{v / norm:.6g}") for v in vec)


def embedding(seed: int, key: str, text: str, dim: int, dims: int) -> list:
    """A deterministic, L2-normalised vector for `text` (server/routes.go, normalize)."""
    vec = list(_embedding(seed, key, text, dim))
    if 0 < dims < len(vec):
        vec = vec[:dims]
        norm = math.sqrt(math.fsum(v * v for v in vec)) or 1.0
        vec = [float(f"{v / norm:.6g}") for v in vec]
    return vec


def _widen(vec: list) -> list:
    """float32 -> float64, as /api/embeddings does before marshalling."""
    return list(struct.unpack(f"<{len(vec)}f", struct.pack(f"<{len(vec)}f", *vec)))


def _b64_floats(vec: list) -> str:
    """openai floatsToBase64: little-endian float32, standard base64."""
    return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()


# --- output sinks (the engine's Generation drives them) ------------------------

class _Output:
    """Common state of one inference response."""

    __slots__ = ("api", "w", "req", "model", "offset", "reason", "prompt_tokens", "oai",
                 "started", "context", "skip", "_prefix", "_first", "_mid", "_tail", "_clock", "_piece")

    def __init__(self, api: Api, w, req: Request, model: str, offset: int, reason: str,
                 prompt_tokens: int, oai):
        self.api = api
        self.w = w
        self.req = req
        self.model = model
        self.offset = offset
        self.reason = reason
        self.prompt_tokens = prompt_tokens
        self.oai = oai
        self.started = False
        self.context: tuple | None = None
        #: Tokens of the window already written by a prefill: output starts after them.
        self.skip = 0
        self._clock = api.clock
        self._piece = api.corpus.piece
        self._setup()

    def _setup(self):
        pass

    @property
    def writable(self) -> bool:
        return self.w.writable

    def crash(self) -> None:
        self.api.stats.faults += 1
        self.w.crash()

    def _reason(self, gen) -> str:
        # num_predict reached -> "length"; otherwise the model "stopped".
        return self.reason if gen.limit == gen.n_tokens else "stop"

    def _text(self, gen) -> str:
        text = self.api.corpus.text
        if self.skip:
            return text(self.offset, self.skip + gen.limit)[len(text(self.offset, self.skip)):]
        return text(self.offset, gen.limit)

    def _context(self, gen):
        text, n = self.context
        return prompt_ids(text, n) + self.api.corpus.token_ids(self.offset, gen.limit)

    def token(self, i: int) -> None:
        raise NotImplementedError

    def fail(self, gen) -> None:
        """The in-band error (error_after_tokens), server/routes.go streamResponse."""
        msg = self.api.config.error_message
        if self.started:
            self.w.stream_write(go_dumps({"error": msg}) + b"\n")
            self.w.stream_end()
        else:
            self.w.respond(500, JSON, go_dumps({"error": msg}))


class _NdjsonStream(_Output):
    """A native streamed answer: one NDJSON line per token, then the final object.

    Subclasses set `_prefix`/`_mid`/`_tail` in `_setup` (the bytes around the
    timestamp and the token's text) and build the final object in `finish`.
    """

    __slots__ = ()

    def token(self, i):
        w = self.w
        if not self.started:
            self.started = True
            w.stream_start(200, NDJSON)
        w.stream_write(b"".join((self._prefix, self._clock.created_at(), self._mid,
                                 self._piece(self.offset, self.skip + i), self._tail)))

    def _end(self, gen, obj: dict) -> None:
        """Write the final object, with the metrics, and end the stream."""
        obj.update(self.api.metrics(gen, self.req.t_start, self.prompt_tokens))
        if not self.started:
            self.started = True
            self.w.stream_start(200, NDJSON)
        self.w.stream_write(go_dumps(obj) + b"\n")
        self.w.stream_end()


class _NativeJson(_Output):
    """A native answer with "stream": false: one JSON object at the end."""

    __slots__ = ()

    def token(self, i):
        pass

    def _respond(self, gen, obj: dict) -> None:
        obj.update(self.api.metrics(gen, self.req.t_start, self.prompt_tokens))
        self.w.respond(200, JSON_UTF8, go_dumps(obj))

    def fail(self, gen):
        self.w.respond(500, JSON_UTF8, go_dumps({"error": self.api.config.error_message}))


class GenerateStream(_NdjsonStream):
    """/api/generate, NDJSON: one line per token, then the final object."""

    __slots__ = ()

    def _setup(self):
        self._prefix = b'{"model":' + go_string(self.model) + b',"created_at":"'
        self._mid = b'","response":'
        self._tail = b',"done":false}\n'

    def finish(self, gen):
        obj = {"model": self.model, "created_at": self._clock.created_at().decode(), "response": "",
               "done": True, "done_reason": self._reason(gen)}
        if self.context is not None:
            obj["context"] = self._context(gen)
        self._end(gen, obj)


class GenerateJson(_NativeJson):
    """/api/generate with "stream": false."""

    __slots__ = ()

    def finish(self, gen):
        obj = {"model": self.model, "created_at": self._clock.created_at().decode(),
               "response": self._text(gen), "done": True, "done_reason": self._reason(gen)}
        if self.context is not None:
            obj["context"] = self._context(gen)
        self._respond(gen, obj)


class ChatStream(_NdjsonStream):
    """/api/chat, NDJSON."""

    __slots__ = ()

    def _setup(self):
        self._prefix = b'{"model":' + go_string(self.model) + b',"created_at":"'
        self._mid = b'","message":{"role":"assistant","content":'
        self._tail = b'},"done":false}\n'

    def finish(self, gen):
        self._end(gen, {"model": self.model, "created_at": self._clock.created_at().decode(),
                        "message": {"role": "assistant", "content": ""}, "done_reason": self._reason(gen),
                        "done": True})


class ChatJson(_NativeJson):
    """/api/chat with "stream": false."""

    __slots__ = ()

    def finish(self, gen):
        self._respond(gen, {"model": self.model, "created_at": self._clock.created_at().decode(),
                            "message": {"role": "assistant", "content": self._text(gen)},
                            "done_reason": self._reason(gen), "done": True})


def _usage(prompt_tokens: int, n: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}


class _OaiStream(_Output):
    """SSE framing shared by the /v1 streams: `data: <json>\\n\\n` events."""

    __slots__ = ()

    def _head(self) -> dict:
        raise NotImplementedError

    def fail(self, gen):
        # Deviation, on purpose: Ollama's ChatWriter mangles an error that
        # arrives mid-stream into an empty chunk; emitting OpenAI's error
        # event instead lets tests see the failure (the openai client raises
        # APIError on it).
        err = go_dumps(oai_error(500, self.api.config.error_message))
        if self.started:
            self.w.stream_write(b"data: " + err + b"\n\n")
            self.w.stream_end()
        else:
            self.w.respond(500, JSON, err + b"\n")

    def token(self, i):
        w = self.w
        if not self.started:
            self.started = True
            w.stream_start(200, SSE)
        w.stream_write(b"".join((self._first if i == 0 else self._prefix, self._piece(self.offset, self.skip + i),
                                 self._tail)))

    def finish(self, gen):
        head = self._head()
        events = [go_dumps(self._finish_chunk(head, gen))]
        if self.oai["include_usage"]:
            usage = dict(head)
            usage["choices"] = []
            usage["usage"] = _usage(self.prompt_tokens, gen.limit)
            events.append(go_dumps(usage))
        data = b"".join(b"data: " + e + b"\n\n" for e in events) + b"data: [DONE]\n\n"
        if not self.started:
            self.started = True
            self.w.stream_start(200, SSE)
        self.w.stream_write(data)
        self.w.stream_end()


class OaiChatStream(_OaiStream):
    """/v1/chat/completions, stream: role on the first delta, an empty-delta
    finish chunk, the optional usage chunk, then [DONE] (middleware/openai.go ChatWriter)."""

    __slots__ = ()

    def _head(self):
        o = self.oai
        return {"id": o["id"], "object": "chat.completion.chunk", "created": o["created"],
                "model": self.model, "system_fingerprint": "fp_ollama"}

    def _setup(self):
        head = go_dumps(self._head())[:-1]
        self._prefix = b"data: " + head + b',"choices":[{"index":0,"delta":{"content":'
        self._first = b"data: " + head + b',"choices":[{"index":0,"delta":{"role":"assistant","content":'
        self._tail = b'},"finish_reason":null}]}\n\n'

    def _finish_chunk(self, head, gen):
        chunk = dict(head)
        chunk["choices"] = [{"index": 0, "delta": {}, "finish_reason": self._reason(gen)}]
        return chunk


class OaiCompletionStream(_OaiStream):
    """/v1/completions, stream."""

    __slots__ = ()

    def _head(self):
        o = self.oai
        return {"id": o["id"], "object": "text_completion", "created": o["created"]}

    def _setup(self):
        head = go_dumps(self._head())[:-1]
        self._prefix = self._first = b"data: " + head + b',"choices":[{"text":'
        self._tail = (b',"index":0,"finish_reason":null}],"model":' + go_string(self.model)
                      + b',"system_fingerprint":"fp_ollama"}\n\n')

    def _finish_chunk(self, head, gen):
        chunk = dict(head)
        chunk["choices"] = [{"text": "", "index": 0, "finish_reason": self._reason(gen)}]
        chunk["model"] = self.model
        chunk["system_fingerprint"] = "fp_ollama"
        return chunk

    def finish(self, gen):
        head = self._head()
        chunk = self._finish_chunk(head, gen)
        events = [go_dumps(chunk)]
        if self.oai["include_usage"]:
            usage = dict(chunk)
            usage["choices"] = []
            usage["usage"] = _usage(self.prompt_tokens, gen.limit)
            events.append(go_dumps(usage))
        data = b"".join(b"data: " + e + b"\n\n" for e in events) + b"data: [DONE]\n\n"
        if not self.started:
            self.started = True
            self.w.stream_start(200, SSE)
        self.w.stream_write(data)
        self.w.stream_end()


class _OaiJson(_Output):
    __slots__ = ()

    def token(self, i):
        pass

    def fail(self, gen):
        self.w.respond(500, JSON, go_dumps(oai_error(500, self.api.config.error_message)) + b"\n")


class OaiChatJson(_OaiJson):
    """/v1/chat/completions, not streamed."""

    __slots__ = ()

    def finish(self, gen):
        o = self.oai
        obj = {"id": o["id"], "object": "chat.completion", "created": o["created"], "model": self.model,
               "system_fingerprint": "fp_ollama",
               "choices": [{"index": 0, "message": {"role": "assistant", "content": self._text(gen)},
                            "finish_reason": self._reason(gen)}],
               "usage": _usage(self.prompt_tokens, gen.limit)}
        self.w.respond(200, JSON, go_dumps(obj) + b"\n")


class OaiCompletionJson(_OaiJson):
    """/v1/completions, not streamed."""

    __slots__ = ()

    def finish(self, gen):
        o = self.oai
        obj = {"id": o["id"], "object": "text_completion", "created": o["created"], "model": self.model,
               "system_fingerprint": "fp_ollama",
               "choices": [{"text": self._text(gen), "index": 0, "finish_reason": self._reason(gen)}],
               "usage": _usage(self.prompt_tokens, gen.limit)}
        self.w.respond(200, JSON, go_dumps(obj) + b"\n")


# --- /v1/messages (anthropic.StreamConverter / ToMessagesResponse) ---------------

_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens"}


class _LoadReply:
    """The final chunk of a load reply, as the sinks read a Generation."""

    limit = 0
    n_tokens = 0


_LOAD_REPLY = _LoadReply()


def _sse(event: str, data: bytes) -> bytes:
    """writeSSE: `event: <type>\\ndata: <json>\\n\\n`, one flush per event."""
    return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"


class AnthropicStream(_Output):
    """/v1/messages, stream: message_start, one text block (start, a
    text_delta per token, stop), message_delta with the stop reason and
    usage, message_stop.  Each event is its own chunk, as writeSSE flushes."""

    __slots__ = ("_blocks",)

    def _setup(self):
        self._blocks = 0
        self._prefix = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,' \
                       b'"delta":{"type":"text_delta","text":'
        self._tail = b"}}\n\n"

    def _message_start(self, input_tokens: int) -> None:
        self.started = True
        o = self.oai
        self.w.stream_start(200, SSE)
        self.w.stream_write(_sse("message_start", go_dumps({
            "type": "message_start",
            "message": {"id": o["id"], "type": "message", "role": "assistant", "model": self.model,
                        "content": [], "usage": {"input_tokens": input_tokens, "output_tokens": 0}}})))

    def token(self, i):
        w = self.w
        if not self.started:
            # The first chunk has no prompt count yet: the request's estimate.
            self._message_start(self.oai["estimate"])
        if not self._blocks:
            self._blocks = 1
            w.stream_write(_sse("content_block_start", b'{"type":"content_block_start","index":0,'
                                                       b'"content_block":{"type":"text","text":""}}'))
        w.stream_write(b"".join((self._prefix, self._piece(self.offset, i), self._tail)))

    def finish(self, gen):
        w = self.w
        if not self.started:
            self._message_start(self.prompt_tokens)
        if self._blocks:
            w.stream_write(_sse("content_block_stop", b'{"type":"content_block_stop","index":0}'))
        delta = {}
        reason = _STOP_REASONS.get(self._reason(gen), "stop_sequence")
        delta["stop_reason"] = reason
        w.stream_write(_sse("message_delta", go_dumps({
            "type": "message_delta", "delta": delta,
            "usage": {"input_tokens": self.prompt_tokens, "output_tokens": gen.limit}})))
        w.stream_write(_sse("message_stop", b'{"type":"message_stop"}'))
        w.stream_end()

    def fail(self, gen):
        # Deviation, on purpose: Ollama's AnthropicWriter drops an in-band
        # error; Anthropic's own `error` event lets clients see it.
        msg = self.api.config.error_message
        if self.started:
            self.w.stream_write(_sse("error", go_dumps({"type": "error",
                                                        "error": {"type": "api_error", "message": msg}})))
            self.w.stream_end()
        else:
            self.w.respond(500, JSON, go_dumps(anthropic_error(500, msg, self.api._random_id("req"))) + b"\n")


class AnthropicJson(_Output):
    """/v1/messages, not streamed (ToMessagesResponse, json.Encoder)."""

    __slots__ = ()

    def token(self, i):
        pass

    def finish(self, gen):
        text = self._text(gen)
        obj = {"id": self.oai["id"], "type": "message", "role": "assistant", "model": self.model,
               # A nil slice when there is no text: "content": null.
               "content": [{"type": "text", "text": text}] if text else None,
               "stop_reason": _STOP_REASONS.get(self._reason(gen), "stop_sequence"),
               "usage": {"input_tokens": self.prompt_tokens, "output_tokens": gen.limit}}
        self.w.respond(200, JSON, go_dumps(obj) + b"\n")

    def fail(self, gen):
        msg = self.api.config.error_message
        self.w.respond(500, JSON, go_dumps(anthropic_error(500, msg, self.api._random_id("req"))) + b"\n")


# --- /v1/responses (openai.ResponsesStreamConverter / ToResponse) -----------------

def _responses_tool(t) -> dict:
    """ResponsesTool as ToResponse echoes it (struct order)."""
    t = t if isinstance(t, dict) else {}
    out = {"type": t.get("type") or "", "name": t.get("name") or "", "description": t.get("description"),
           "strict": t.get("strict"), "parameters": t.get("parameters")}
    if t.get("tools"):
        out["tools"] = [_responses_tool(x) for x in t["tools"]]
    return out


def _responses_text_format(request: dict) -> dict:
    fmt = (request.get("text") or {}).get("format")
    if not isinstance(fmt, dict):
        return {"type": "text"}
    out = {"type": fmt.get("type") or ""}
    for k in ("name", "schema", "strict"):
        if fmt.get(k) not in (None, ""):
            out[k] = fmt[k]
    return out


def _responses_reasoning(request: dict):
    r = request.get("reasoning") or {}
    effort, summary = r.get("effort") or "", r.get("summary") or ""
    if not effort and not summary:
        return None
    return {"effort": effort or None, "summary": summary or None}


def _output_message(item_id: str, text: str, status: str = "completed") -> dict:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


class ResponsesStream(_Output):
    """/v1/responses, stream: response.created, response.in_progress, the
    message item and its output_text part (added, a delta per token, done),
    response.completed.  The converter builds Go maps, so every event's keys
    are sorted (json.Marshal of a map)."""

    __slots__ = ("_seq", "_text_started")

    def _setup(self):
        self._seq = 0
        self._text_started = False

    def _event(self, kind: str, data: dict) -> None:
        data["type"] = kind
        data["sequence_number"] = self._seq
        self._seq += 1
        self.w.stream_write(_sse(kind, go_dumps(data, sort_keys=True)))

    def _response(self, status: str, output: list, usage) -> dict:
        """buildResponseObject."""
        o = self.oai
        r = o["request"]
        return {
            "id": o["id"], "object": "response", "created_at": self.api.clock.created_unix(),
            "completed_at": None, "status": status, "incomplete_details": None, "model": o["model"],
            "previous_response_id": None, "instructions": r.get("instructions") or None,
            "output": output, "error": None,
            "tools": [{k: v for k, v in _responses_tool(t).items() if k != "tools"} for t in r.get("tools") or []],
            "tool_choice": "auto", "truncation": r.get("truncation") or "disabled",
            "parallel_tool_calls": True, "text": {"format": _responses_text_format(r)},
            "top_p": _go_number(1.0 if r.get("top_p") is None else r["top_p"]),
            "presence_penalty": 0, "frequency_penalty": 0, "top_logprobs": 0,
            "temperature": _go_number(1.0 if r.get("temperature") is None else r["temperature"]),
            "reasoning": _responses_reasoning(r), "usage": usage,
            "max_output_tokens": r.get("max_output_tokens"), "max_tool_calls": None, "store": False,
            "background": bool(r.get("background")), "service_tier": "default", "metadata": {},
            "safety_identifier": None, "prompt_cache_key": None,
        }

    def _begin(self) -> None:
        self.started = True
        self.w.stream_start(200, SSE)
        self._event("response.created", {"response": self._response("in_progress", [], None)})
        self._event("response.in_progress", {"response": self._response("in_progress", [], None)})

    def token(self, i):
        if not self.started:
            self._begin()
        item = self.oai["item"]
        if not self._text_started:
            self._text_started = True
            self._event("response.output_item.added", {
                "output_index": 0, "item": {"id": item, "type": "message", "status": "in_progress",
                                            "role": "assistant", "content": []}})
            self._event("response.content_part.added", {
                "item_id": item, "output_index": 0, "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}})
        # Keys in sorted order, the token's text spliced in pre-escaped.
        self.w.stream_write(b"".join((
            b'event: response.output_text.delta\ndata: {"content_index":0,"delta":',
            self._piece(self.offset, i), b',"item_id":', go_string(item),
            b',"logprobs":[],"output_index":0,"sequence_number":%d' % self._seq,
            b',"type":"response.output_text.delta"}\n\n')))
        self._seq += 1

    def finish(self, gen):
        if not self.started:
            self._begin()
        item = self.oai["item"]
        output = []
        if self._text_started:
            text = self._text(gen)
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            self._event("response.output_text.done", {"item_id": item, "output_index": 0, "content_index": 0,
                                                      "text": text, "logprobs": []})
            self._event("response.content_part.done", {"item_id": item, "output_index": 0,
                                                       "content_index": 0, "part": part})
            self._event("response.output_item.done", {"output_index": 0, "item": _output_message(item, text)})
            output.append(_output_message(item, text))
        n, p = gen.limit, self.prompt_tokens
        usage = {"input_tokens": p, "output_tokens": n, "total_tokens": p + n,
                 "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}
        response = self._response("completed", output, usage)
        response["completed_at"] = self.api.clock.created_unix()
        self._event("response.completed", {"response": response})
        self.w.stream_end()

    def fail(self, gen):
        # Deviation, on purpose: the Responses API's `error` event, where
        # Ollama's ResponsesWriter would drop the in-band error.
        msg = self.api.config.error_message
        if self.started:
            self._event("error", {"code": "api_error", "message": msg, "param": None})
            self.w.stream_end()
        else:
            self.w.respond(500, JSON, go_dumps(oai_error(500, msg)) + b"\n")


class ResponsesJson(_OaiJson):
    """/v1/responses, not streamed: ToResponse (struct order) + completed_at."""

    __slots__ = ()

    def finish(self, gen):
        o = self.oai
        r = o["request"]
        n, p = gen.limit, self.prompt_tokens
        tools = r.get("tools")
        obj = {
            "id": o["id"], "object": "response", "created_at": o["created"],
            "completed_at": self.api.clock.created_unix(), "status": "completed",
            "incomplete_details": None, "model": o["model"], "previous_response_id": None,
            "instructions": r.get("instructions") or None,
            "output": [_output_message(o["item"], self._text(gen))], "error": None,
            "tools": [_responses_tool(t) for t in tools] if tools is not None else [],
            "tool_choice": "auto", "truncation": r.get("truncation") or "disabled",
            "parallel_tool_calls": True, "text": {"format": _responses_text_format(r)},
            "top_p": _go_number(1.0 if r.get("top_p") is None else r["top_p"]),
            "presence_penalty": 0, "frequency_penalty": 0, "top_logprobs": 0,
            "temperature": _go_number(1.0 if r.get("temperature") is None else r["temperature"]),
            "reasoning": _responses_reasoning(r),
            "usage": {"input_tokens": p, "output_tokens": n, "total_tokens": p + n,
                      "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens_details": {"reasoning_tokens": 0}},
            "max_output_tokens": r.get("max_output_tokens"), "max_tool_calls": None, "store": False,
            "background": bool(r.get("background")), "service_tier": "default", "metadata": {},
            "safety_identifier": None, "prompt_cache_key": None,
        }
        if obj["reasoning"] is not None:
            obj["reasoning"] = {k: v for k, v in obj["reasoning"].items() if v is not None}
        self.w.respond(200, JSON, go_dumps(obj) + b"\n")

"""Request handlers: routing, validation, exact error texts, response bodies.

Rules for this module: no sockets and no timers.  A handler gets a parsed
Request and a ResponseWriter (server.py implements it; tests may fake it) and
either answers at once (`w.respond`) or hands a job to the engine, whose
sink -- one of the output classes at the bottom -- writes tokens as they come.
Every behaviour cites the spec (/work/shared/ollama-api.md) or the Ollama
source it mirrors (server/routes.go, middleware/openai.go, openai/openai.go).

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
(spec §3 "Errors before the first byte").

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
import random
import struct

from olb.sim import gojson
from olb.sim.catalogue import Catalogue, ModelName, known_spec, parse_name
from olb.sim.clock import Clock
from olb.sim.config import SimConfig
from olb.sim.engine import REJECTED, Engine, Generation, SlotHold, decode_interval, prefill_seconds
from olb.sim.gpu import DCGM_CONTENT_TYPE, dcgm_text
from olb.sim.gojson import DecodeError, EmptyBody, go_dumps, go_quote, go_string
from olb.sim.tokens import corpus, count_prompt_tokens, prompt_ids

JSON_UTF8 = "application/json; charset=utf-8"   # gin's c.JSON
JSON = "application/json"                       # Ollama's explicit header / the OpenAI writers
NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
TEXT = "text/plain; charset=utf-8"

QUEUE_FULL = "server busy, please try again.  maximum pending requests exceeded"
# Deterministic mode's stand-in for a warm runner hand-over (spec §2.1: 1-7 ms).
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


def oai_error(status: int, message: str) -> dict:
    """openai.NewError: the type follows the status."""
    etype = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return {"error": {"message": message, "type": etype, "param": None, "code": None}}


class Request:
    """One parsed HTTP request, as the handlers need it."""

    __slots__ = ("method", "path", "headers", "body", "t_start")

    def __init__(self, method: str, path: str, headers: dict, body: bytes, t_start: float):
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        self.t_start = t_start


class _Style:
    """How handler errors look: native Ollama or OpenAI-shaped (/v1)."""

    NATIVE = 0
    OAI = 1


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
        self.blobs: set = set()
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
            "/api/copy": {"POST": self.copy},
            "/api/delete": {"DELETE": self.delete},
            "/v1/chat/completions": {"POST": self.oai_chat},
            "/v1/completions": {"POST": self.oai_completions},
            "/v1/embeddings": {"POST": self.oai_embeddings},
            "/v1/models": {"GET": self.oai_models},
        }
        if engine.gpu is not None:
            # Not Ollama's: dcgm-exporter's endpoint, served here so one
            # instance is both the backend and its GPU telemetry.
            self.routes["/metrics"] = {"GET": self.dcgm_metrics}
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
        for prefix, methods in (("/v1/models/", {"GET": self.oai_model}),
                                ("/api/blobs/", {"HEAD": self.blob_head, "POST": self.blob_post})):
            if path.startswith(prefix):
                param = path[len(prefix):]
                if param and "/" not in param:
                    return methods, param
        return None, None

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
        and continue with then(runner); 503 if the pending queue is full."""
        ctx = (body.get("options") or {}).get("num_ctx")
        if isinstance(ctx, bool) or not isinstance(ctx, (int, float)) or ctx <= 0:
            ctx = None
        pending = self.engine.acquire(entry, body.get("keep_alive"), then, ctx)
        if pending is REJECTED:
            self.stats.rejected += 1
            self._error(w, style, 503, QUEUE_FULL)
        elif pending is not None and w.job is None and not w.done:
            w.job = pending

    def metrics(self, gen: Generation, t_req: float, prompt_tokens: int) -> dict:
        """The six api.Metrics fields in integer ns (spec §2.1), all > 0
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
            "size": e.spec.size,
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

    def _show_body(self, entry, body) -> bytes:
        spec = entry.spec
        modelfile = (
            '# Modelfile generated by "ollama show"\n'
            "# To build a new Modelfile based on this, replace FROM with:\n"
            f"# FROM {entry.name.display}\n\n"
            f"FROM {entry.blob_path}\n"
            f'TEMPLATE """{spec.template}"""\n'
        )
        out = {
            "license": "",
            "modelfile": modelfile,
            "parameters": spec.parameters,
            "template": spec.template,
        }
        if body.get("system"):
            out["system"] = body["system"]
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
        """The load/unload answer: one object, never streamed (spec §2.1)."""
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
        """ChatHandler; `oai` is the /v1/chat/completions context or None."""
        style = _Style.OAI if oai else _Style.NATIVE
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
        parts = []
        for m in messages:
            if m:
                parts.append(f"{m.get('role') or ''}\n{m.get('content') or ''}\n")
        text = "".join(parts)
        prompt_tokens = count_prompt_tokens(text, GENERATE_OVERHEAD + CHAT_MESSAGE_OVERHEAD * len(messages))
        n, reason = self._n_tokens(options)
        offset = self._offset(name, text, options)
        if oai:
            stream = oai["stream"]
            sink_cls = OaiChatStream if stream else OaiChatJson
        else:
            stream = body.get("stream")
            stream = stream is None or stream
            sink_cls = ChatStream if stream else ChatJson
        sink = sink_cls(self, w, req, model_in, offset, reason, prompt_tokens, oai)
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
        if spec is None and existing is not None:
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
        layer = hashlib.sha256(b"olb-sim-layer/" + spec.name.encode()).hexdigest()
        lines = [{"status": "pulling manifest"}]
        for done in (0, spec.size // 2, spec.size):
            p = {"status": f"pulling {layer[:12]}", "digest": f"sha256:{layer}", "total": spec.size}
            if done:
                p["completed"] = done
            lines.append(p)
        lines += [{"status": "verifying sha256 digest"}, {"status": "writing manifest"},
                  {"status": "success"}]
        self.catalogue.install(spec, self.clock.now(), name=parse_name(name.display))
        if not stream:
            return w.respond(200, JSON, go_dumps({"status": "success"}))
        w.stream_start(200, NDJSON)
        for line in lines:
            w.stream_write(go_dumps(line) + b"\n")
        w.stream_end()

    def copy(self, req, w):
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
        copied = self.catalogue.install(entry.spec, self.clock.now(), name=dst)
        copied.digest = entry.digest
        w.respond(200, None, b"")

    def delete(self, req, w):
        body = self._decode(req, w, gojson.DELETE)
        if body is None:
            return
        model_in = body.get("model") or body.get("name") or ""
        name = parse_name(model_in)
        if name is None:
            return self._error(w, _Style.NATIVE, 400, f"name {go_quote(model_in)} is invalid")
        if not self.catalogue.remove(name):
            return self._error(w, _Style.NATIVE, 404, f"model '{model_in}' not found")
        self.engine.unload(name.key)
        w.respond(200, None, b"")

    def blob_head(self, req, w, digest):
        if digest in self.blobs:
            return w.respond(200, None, b"")
        self._error(w, _Style.NATIVE, 404, f"blob {go_quote(digest)} not found")

    def blob_post(self, req, w, digest):
        if digest in self.blobs:
            return w.respond(200, None, b"")
        got = "sha256:" + hashlib.sha256(req.body).hexdigest()
        if got != digest:
            return self._error(w, _Style.NATIVE, 400,
                               f"digest mismatch, expected {go_quote(digest)}, got {go_quote(got)}")
        self.blobs.add(digest)
        w.respond(201, None, b"")

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
        options = {}
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
    """A deterministic, L2-normalised vector for `text` (spec §2.3)."""
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
                 "started", "context", "_prefix", "_first", "_mid", "_tail", "_clock", "_piece")

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
        self.context = None
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
        return self.api.corpus.text(self.offset, gen.limit)

    def _context(self, gen):
        text, n = self.context
        return prompt_ids(text, n) + self.api.corpus.token_ids(self.offset, gen.limit)

    def token(self, i: int) -> None:
        raise NotImplementedError

    def fail(self, gen) -> None:
        """The in-band error (error_after_tokens), spec §3 / streamResponse."""
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
                                 self._piece(self.offset, i), self._tail)))

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
        w.stream_write(b"".join((self._first if i == 0 else self._prefix, self._piece(self.offset, i),
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
    finish chunk, the optional usage chunk, then [DONE] (spec §2.8)."""

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

"""olb's own endpoints under /olb/: status, health, and draining a backend; and /metrics.

POST /olb/drain?backend=URL stops new requests to a backend (for an Ollama
upgrade, a model pull, a reboot) without cutting the streams it is serving;
POST /olb/undrain lets it take requests again. With several workers the
flag lives in shared memory, so asking any worker drains it for all.

These never touch a backend. /olb/health is what an outer load balancer or
a systemd/Kubernetes probe asks: 200 while at least one backend is usable.
"""

from __future__ import annotations

import os
import time

import orjson

from . import __version__, metrics
from .http import error_response, simple_response
from .manage import lacking
from .models import normalize


def status(ctx) -> dict:
    balancer = ctx.balancer
    gpu = ctx.gpu
    doc = balancer.status()
    models = balancer.models
    if models is not None:
        # Nothing is copied to a backend that joins later or comes back:
        # this shows what it lacks (docs/management.md).
        names = [{normalize(e.get("name") or e.get("model") or "") for e in models.tags[i]}
                 if models.known[i] else None for i in range(models.n)]
        doc["lacking"] = lacking(names, [b.url for b in balancer.backends])
    else:
        doc["lacking"] = None
    doc.update({
        "version": __version__,
        "pid": os.getpid(),
        "worker": ctx.worker,
        "workers": ctx.config.workers,
        "policy": ctx.config.policy,
        "uptime_s": round(time.monotonic() - ctx.started, 3),
        "clients": len(ctx.clients),
        "resume": ctx.resumes.as_dict(),
        "telemetry": ctx.telemetry.status() if ctx.telemetry is not None else None,
        "gpu": ({"available": gpu.available,
                 "readings": {str(i): r for i, r in gpu.readings.items()}}
                if gpu is not None else None),
    })
    return doc


def _find_backend(balancer, req) -> int | str:
    """The backend a drain request names (URL, host:port or index), or an error text."""
    from urllib.parse import parse_qs

    wanted = None
    query = req.target.partition(b"?")[2]
    if query:
        wanted = parse_qs(query.decode("latin-1")).get("backend", [None])[0]
    if wanted is None and req.body:
        try:
            doc = orjson.loads(req.body)
        except orjson.JSONDecodeError:
            return "the body is not JSON: expected {\"backend\": \"http://host:port\"}"
        wanted = doc.get("backend") if isinstance(doc, dict) else None
    if wanted is None:
        return "name the backend: ?backend=http://host:port or {\"backend\": \"http://host:port\"}"
    wanted = str(wanted).rstrip("/")
    for backend in balancer.backends:
        if wanted in (backend.url, backend.spec.hostport, str(backend.index)):
            return backend.index
    return f"no backend {wanted!r}; backends: {', '.join(b.url for b in balancer.backends)}"


def metrics_page(req, ctx) -> tuple[int, bytes]:
    """GET /metrics: the Prometheus text page (olb/metrics.py), for a scraper."""
    closing = not req.keep_alive
    head_only = req.method == b"HEAD"
    if req.method not in (b"GET", b"HEAD"):
        return 405, error_response(req.target, 405, "method not allowed: use GET", closing=closing,
                                   head_only=head_only)
    if ctx.metrics is None:
        return 404, error_response(req.target, 404, "metrics are off (OLB_METRICS=off)", closing=closing,
                                   head_only=head_only)
    return 200, simple_response(200, metrics.render(ctx), content_type=metrics.CONTENT_TYPE, closing=closing,
                                head_only=head_only)


def handle(req, ctx) -> tuple[int, bytes]:
    """Answer a request under /olb/; returns (status, full response bytes)."""
    closing = not req.keep_alive
    head_only = req.method == b"HEAD"
    path = req.path
    if path == b"/metrics":
        return metrics_page(req, ctx)
    if path in (b"/olb/drain", b"/olb/undrain"):
        if req.method != b"POST":
            return 405, error_response(req.target, 405, "method not allowed: use POST", closing=closing)
        found = _find_backend(ctx.balancer, req)
        if isinstance(found, str):
            code = 404 if found.startswith("no backend") else 400
            return code, error_response(req.target, code, found, closing=closing)
        ctx.balancer.drain(found, path == b"/olb/drain")
        row = ctx.balancer.status()["backends"][found]
        return 200, simple_response(200, orjson.dumps(row), closing=closing)
    if path not in (b"/olb/status", b"/olb/health"):
        return 404, error_response(req.target, 404, f"no such olb endpoint: {path.decode('latin-1')}",
                                   closing=closing, head_only=head_only)
    if req.method not in (b"GET", b"HEAD"):
        return 405, error_response(req.target, 405, "method not allowed", closing=closing,
                                   head_only=head_only)
    if path == b"/olb/status":
        body = orjson.dumps(status(ctx), option=orjson.OPT_INDENT_2)
        return 200, simple_response(200, body, closing=closing, head_only=head_only)
    balancer = ctx.balancer
    usable = sum(1 for i in range(balancer.table.n) if balancer.table.is_healthy(i))
    code = 200 if usable else 503
    body = orjson.dumps({"status": "ok" if usable else "unavailable", "usable_backends": usable,
                         "backends": balancer.table.n})
    return code, simple_response(code, body, closing=closing, head_only=head_only)

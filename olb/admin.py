# cython: annotation_typing=False, boundscheck=True, wraparound=True, cdivision=False
"""olb's own endpoints under /olb/: status, health, draining a backend, the dashboard; and /metrics.

Where they are served (serve(), docs/operations.md "Admin listener"): on the
admin listener (OLB_ADMIN_LISTEN, loopback by default), which serves
nothing else; on the data port only with OLB_ADMIN_TOKEN, sent as
`Authorization: Bearer TOKEN`, and otherwise 404 there, as if they did not
exist. A POST that a browser could have sent from another site (an Origin
or Sec-Fetch-Site that is not this one, a form's content type) is refused,
so a web page cannot drain backends through a browser that can reach olb.

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
from importlib import resources
from urllib.parse import urlsplit

import orjson

from . import __version__, metrics
from .auth import redact, token_matches
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
    _add_dashboard_view(ctx, doc)
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


def _add_dashboard_view(ctx, doc: dict) -> None:
    """What the dashboard shows beside the balancer's status: the models
    loaded on each backend, the queue by model and by client, the recent
    samples and events (dashboard.Samples) and the API keys' usage."""
    balancer = ctx.balancer
    models = balancer.models
    for i, row in enumerate(doc["backends"]):
        row["models"] = (sorted(m for m, mask in models.loaded.items() if mask[i])
                         if models is not None else None)
    by_model: dict[str, int] = {}
    by_client: dict[str, int] = {}
    for waiter, client in balancer.queue.waiters():
        model = getattr(waiter, "model", None) or "(any)"
        by_model[model] = by_model.get(model, 0) + 1
        name = client_label(client)
        by_client[name] = by_client.get(name, 0) + 1
    doc["queue_by_model"] = by_model
    doc["queue_by_client"] = by_client
    samples = ctx.samples
    doc["recent"] = samples.doc() if samples is not None else None
    doc["api_keys"] = ctx.keys.status() if ctx.keys is not None else None


def client_label(client: bytes) -> str:
    """A fair-queue identity as shown: an API key only by its first characters."""
    if client.startswith(b"key:"):
        return "key:" + redact(client[4:])
    return client.decode("latin-1")


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


#: Paths the admin gate guards; everything under /olb/ and the Prometheus page.
def is_admin_path(path: bytes) -> bool:
    return path.startswith(b"/olb/") or path == b"/olb" or path == b"/metrics"


class Listener:
    """The admin listener a connection came in on (ClientSideProtocol.listener;
    None there means the data port).

    Attributes:
        open: no token asked (a loopback address, or no OLB_ADMIN_TOKEN set).
        host_check: hostcheck.HostCheck on a loopback address (DNS rebinding
            would otherwise let a web page read the dashboard), else None.
    """

    __slots__ = ("open", "host_check")

    def __init__(self, open: bool, host_check=None):
        self.open = open
        self.host_check = host_check


#: The dashboard page: one file, no build step, no external assets.
_PAGE: bytes | None = None


def _page() -> bytes:
    global _PAGE
    if _PAGE is None:
        _PAGE = resources.files(__package__).joinpath("dashboard.html").read_bytes()
    return _PAGE


def _unauthorized(req, closing: bool, head_only: bool) -> tuple[int, bytes]:
    body = orjson.dumps({"error": "unauthorized: send OLB_ADMIN_TOKEN as 'Authorization: Bearer TOKEN'"})
    return 401, simple_response(401, body, closing=closing, head_only=head_only,
                                extra=[(b"www-authenticate", b'Bearer realm="olb admin"')])


def cross_site(req) -> str | None:
    """Why a POST looks sent by a browser on behalf of another site, or None.

    A browser marks what it sends: Sec-Fetch-Site (anything but same-origin,
    or none for a typed URL) and Origin (another host:port than the Host it
    was sent to) tell a cross-site request; and an HTML form can only send
    a form or text/plain content type, never application/json without a
    CORS preflight, which olb never grants. curl and scripts send neither
    Origin nor a form type.
    """
    site = req.header(b"sec-fetch-site")
    if site is not None and site.strip().lower() not in (b"same-origin", b"none"):
        return f"cross-site request refused (Sec-Fetch-Site: {site.decode('latin-1')})"
    origin = req.header(b"origin")
    if origin is not None:
        host = (req.header(b"host") or b"").decode("latin-1").lower()
        try:
            parts = urlsplit(origin.decode("latin-1"))
            netloc = parts.netloc.lower()
        except ValueError:
            netloc = ""
        if not netloc or netloc != host:
            return f"cross-site request refused (Origin {origin.decode('latin-1')} is not {host})"
    ctype = req.header(b"content-type")
    if ctype is not None and ctype.split(b";")[0].strip().lower() != b"application/json":
        return "send JSON (Content-Type: application/json) or no body: a form post is refused"
    return None


def serve(req, ctx, listener: Listener | None) -> tuple[int, bytes]:
    """Answer a request that reached the admin gate: one on the admin
    listener, or one for an admin path (is_admin_path) on the data port.
    Returns (status, full response bytes)."""
    closing = not req.keep_alive
    head_only = req.method == b"HEAD"
    path = req.path
    token = ctx.config.admin_token
    page = path in (b"/olb", b"/olb/")
    if listener is None:
        if not token:
            # Never open on the data port by default; 404, as for a path
            # that does not exist: nothing here to authenticate against.
            return 404, error_response(req.target, 404, "not found: olb's admin endpoints are served on "
                                       "the admin listener (OLB_ADMIN_LISTEN)", closing=closing,
                                       head_only=head_only)
        asks = True
    else:
        if not is_admin_path(path):
            return 404, error_response(req.target, 404, "not found: this is olb's admin listener "
                                       "(/olb/status, /olb/health, /olb/drain, the dashboard at /olb/)",
                                       closing=closing, head_only=head_only)
        asks = not listener.open
    # The page holds no data: a browser loads it without a header, and it
    # asks /olb/status with the token its URL fragment gives it.
    if asks and not page and not token_matches(token.encode(), req.header(b"authorization")):
        return _unauthorized(req, closing, head_only)
    if req.method == b"POST":
        why = cross_site(req)
        if why is not None:
            code = 415 if why.startswith("send JSON") else 403
            return code, error_response(req.target, code, why, closing=closing)
    if page:
        if req.method not in (b"GET", b"HEAD"):
            return 405, error_response(req.target, 405, "method not allowed", closing=closing,
                                       head_only=head_only)
        return 200, simple_response(200, _page(), content_type=b"text/html; charset=utf-8", closing=closing,
                                    head_only=head_only, extra=_PAGE_HEADERS)
    return handle(req, ctx)


#: The page's headers: no framing by other sites, no scripts or styles but its own inline ones.
_PAGE_HEADERS = [
    (b"cache-control", b"no-store"),
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy",
     b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
     b"img-src data:; frame-ancestors 'none'"),
]


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

"""Configuration: OLB_* environment variables, with command-line flags that mirror them.

One table (`SETTINGS`) is the single source of truth: it drives the
environment parser, the argparse flags, the defaults of `Config` and the
README's table (`python -m olb.config README.md` regenerates it). A flag wins
over its variable, a variable over the default. Any bad value raises
ConfigError naming the variable and what it expected; `olb-fast` turns that
into exit status 2.

Backends (OLB_BACKENDS) are comma-separated URLs; per-backend settings follow
the URL after `;`, so the whole cluster fits in one variable:

    http://127.0.0.1:11435;max=4;weight=2;gpus=0+1, http://10.0.0.7:11434;max=2

    max=N      concurrent requests this backend takes (default OLB_MAX_INFLIGHT)
    weight=W   relative share of traffic, W > 0 (default 1)
    gpus=I+J   NVML indices of the GPUs behind it, joined by '+' (default none)
    metrics=URL  a Prometheus endpoint with the DCGM exporter's GPU metrics for
               a remote host (dcgm-exporter or olb-agent), e.g.
               http://10.0.0.7:9400/metrics, or :9400 for the backend's own
               host; with it, gpus= selects the endpoint's `gpu` labels (default
               all of them) and NVML is not asked about this backend
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import urlsplit

from . import __version__
from .errors import ConfigError

DEMO_HINT = (
    "no backends: set OLB_BACKENDS (or --backends) to your Ollama URLs, e.g. "
    "OLB_BACKENDS=http://127.0.0.1:11435,http://127.0.0.1:11436 olb-fast; "
    "or try `olb-fast --demo` to run in front of a simulated cluster"
)


@dataclasses.dataclass(frozen=True)
class BackendSpec:
    url: str
    host: str
    port: int
    max_inflight: int
    weight: float = 1.0
    gpus: tuple[int, ...] = ()
    metrics: str = ""  # DCGM-format /metrics URL of a remote host's GPUs; "" = none

    @property
    def hostport(self) -> str:
        # The Host header we send: Ollama bound to 127.0.0.1 answers 403 to a
        # non-local Host, so a request must carry the backend's own address.
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


# --- value parsers: each takes the raw string and returns the value or raises
# ValueError with what it expected (the caller adds the variable's name).


def _listen(raw: str) -> tuple[str, int]:
    host, sep, port = raw.rpartition(":")
    if not sep:
        raise ValueError("HOST:PORT, e.g. 127.0.0.1:11434")
    host = host.strip("[]") or "127.0.0.1"
    return host, _port(port)


def _port(raw: str) -> int:
    try:
        port = int(raw)
    except ValueError:
        raise ValueError(f"a port number 0-65535, got {raw!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"a port number 0-65535, got {raw!r}")
    return port


def _seconds(zero_is_off: bool) -> Callable[[str], float]:
    """A parser of a finite number of seconds: > 0, or >= 0 where 0 turns the thing off."""
    what = "a number of seconds >= 0 (0 = off)" if zero_is_off else "a number of seconds > 0"

    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{what}, got {raw!r}") from None
        # The comparisons are false for NaN, so NaN is refused with the rest.
        if not (value >= 0 if zero_is_off else value > 0) or value == float("inf"):
            raise ValueError(f"{what}, got {raw!r}")
        return value

    return parse


_positive_float = _seconds(zero_is_off=False)
_non_negative_float = _seconds(zero_is_off=True)


#: The largest count or size a setting may hold: the compiled modules keep
#: them in 64-bit C integers (docs/performance.md), so a larger one must be
#: refused here, not overflow when the first connection arrives.
LARGEST = 2**62


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"an integer >= {low}, got {raw!r}") from None
        if value < low:
            raise ValueError(f"an integer >= {low}, got {raw!r}")
        if value > LARGEST:
            raise ValueError(f"an integer >= {low} and at most 2^62, got {raw!r}")
        return value

    return parse


_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def _size(raw: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)(?:i?[bB])?\s*", raw)
    if not m or int(m.group(1)) == 0:
        raise ValueError(f"a size in bytes > 0, optionally with K, M or G (e.g. 64M), got {raw!r}")
    size = int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    if size > LARGEST:
        raise ValueError(f"a size in bytes of at most 2^62, got {raw!r}")
    return size


def _size_or_off(raw: str) -> int:
    if re.fullmatch(r"\s*0+\s*([kKmMgG]?)(?:i?[bB])?\s*", raw):
        return 0
    try:
        return _size(raw)
    except ValueError:
        raise ValueError(f"0 (off) or a size in bytes, optionally with K, M or G (e.g. 512K), got {raw!r}") from None


def _one_of(values: tuple[str, ...]):
    """A parser for a setting that takes one of `values` (case-insensitive)."""
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in values:
            raise ValueError(f"one of {', '.join(values)}, got {raw!r}")
        return value

    return parse


_LOG_LEVELS = ("debug", "info", "warning", "error")
_log_level = _one_of(_LOG_LEVELS)


def _bound(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"0 (off) or a factor >= 1, got {raw!r}") from None
    if not (value == 0 or 1 <= value < float("inf")):
        raise ValueError(f"0 (off) or a factor >= 1, got {raw!r}")
    return value


#: OLB_POLICY's values: what each routes by (docs/scheduling.md, "Plain policies").
POLICIES = ("llm", "least-inflight", "round-robin")

_policy = _one_of(POLICIES)


#: OLB_PULL's values: which healthy backends /api/pull goes to (docs/management.md).
PULL_TARGETS = ("all", "room")

_pull = _one_of(PULL_TARGETS)


def _raw(raw: str) -> str:
    return raw


def _admin_listen(raw: str) -> tuple[str, int] | None:
    """OLB_ADMIN_LISTEN: HOST:PORT, or `off` (admin endpoints only on the data port, behind the token)."""
    if raw.strip().lower() in ("off", ""):
        return None
    try:
        return _listen(raw)
    except ValueError:
        raise ValueError(f"HOST:PORT (e.g. 127.0.0.1:11433) or off, got {raw!r}") from None


def _token(raw: str) -> str:
    """OLB_ADMIN_TOKEN: empty (no token), or one of at least 16 printable characters."""
    value = raw.strip()
    if value and (len(value) < 16 or not value.isprintable() or " " in value):
        raise ValueError("a token of at least 16 printable characters without spaces "
                         "(e.g. from `openssl rand -hex 24`), or empty")
    return value


def _keys_file(raw: str) -> str:
    """OLB_API_KEYS: a keys file's path, read and checked now so a bad one exits 2 (olb/auth.py)."""
    path = raw.strip()
    if path:
        from .auth import load_keys

        try:
            load_keys(path, source="")
        except ConfigError as exc:
            raise ValueError(f"a keys file (docs/operations.md, Access control): {exc}") from None
    return path


#: OLB_LOG_FORMAT's values (olb/accesslog.py).
LOG_FORMATS = ("text", "json")

_log_format = _one_of(LOG_FORMATS)


def _access_log(raw: str) -> str:
    """`off`, `stderr`, or a file path whose directory exists."""
    value = raw.strip()
    if value.lower() in ("off", "stderr"):
        return value.lower()
    import os

    if not value or os.path.isdir(value) or not os.path.isdir(os.path.dirname(os.path.abspath(value))):
        raise ValueError(f"off, stderr or a file path in an existing directory, got {raw!r}")
    return value


def _on_off(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("on", "1", "true", "yes"):
        return True
    if value in ("off", "0", "false", "no"):
        return False
    raise ValueError(f"on or off, got {raw!r}")


_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def _header_name(raw: str) -> str:
    """An HTTP field name (RFC 9110 token), or "" for none."""
    value = raw.strip()
    if value and not _TOKEN.match(value):
        raise ValueError(f"an HTTP header name such as X-Olb-Backend, or empty for none, got {raw!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Setting:
    env: str
    field: str
    default: str
    parse: Callable[[str], object]
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.env[4:].lower().replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    Setting("OLB_LISTEN", "listen", "127.0.0.1:11434", _listen,
            "Address to listen on, HOST:PORT (Ollama's own default port). On a loopback address a "
            "foreign `Host` gets 403, as from Ollama (docs/operations.md)."),
    Setting("OLB_BACKENDS", "backends", "", _raw,
            "Comma-separated backend URLs, each optionally followed by "
            ";max=N;weight=W;gpus=I+J;metrics=URL."),
    Setting("OLB_MAX_INFLIGHT", "max_inflight", "8", _int_at_least(1),
            "Default concurrent requests per backend (a backend's `max=` overrides it); "
            "beyond it requests wait in olb's queue. Only requests that run a model count."),
    Setting("OLB_CONNECT_TIMEOUT", "connect_timeout", "3", _positive_float,
            "Seconds to open a TCP connection to a backend before trying another; also bounds a "
            "whole health probe."),
    Setting("OLB_FIRST_BYTE_TIMEOUT", "first_byte_timeout", "300", _positive_float,
            "Seconds a backend may take before its first response byte (a 70B model load takes "
            "minutes): a streamed request then gets 504; a non-streamed one waits on while its backend "
            "answers a probe, checked every this many seconds. Never a failure strike by itself."),
    Setting("OLB_IDLE_TIMEOUT", "idle_timeout", "300", _positive_float,
            "Seconds a backend may stay silent in the middle of a response; then the stream ends "
            "with Ollama's in-band error line and the backend is probed."),
    Setting("OLB_KEEPALIVE_TIMEOUT", "keepalive_timeout", "75", _positive_float,
            "Seconds an idle client connection is kept open."),
    Setting("OLB_MAX_BODY", "max_body", "64M", _size,
            "Largest request body (images in chat make them megabytes); 413 beyond it."),
    Setting("OLB_MAX_BODY_HELD", "max_body_held", "0", _size_or_off,
            "Request body bytes one worker holds across all its clients (0: OLB_MAX_BODY); a request "
            "still being read gets 503 beyond it (docs/operations.md, \"Slow and hostile clients\")."),
    Setting("OLB_HEADER_TIMEOUT", "header_timeout", "10", _positive_float,
            "Seconds a client may take to send a whole request head once it has begun; then 408 and close."),
    Setting("OLB_BODY_TIMEOUT", "body_timeout", "10", _positive_float,
            "Seconds a client may take to send a request body, plus one second per OLB_BODY_MIN_RATE "
            "bytes it sent; then 408 and close."),
    Setting("OLB_BODY_MIN_RATE", "body_min_rate", "1K", _size,
            "Bytes per second that earn a request body one more second (Apache mod_reqtimeout's MinRate)."),
    Setting("OLB_QUEUE_SIZE", "queue_size", "1024", _int_at_least(0),
            "Requests that may wait when every backend is at capacity; 503 beyond it."),
    Setting("OLB_QUEUE_TIMEOUT", "queue_timeout", "30", _positive_float,
            "Seconds a request may wait in the queue; 503 with Retry-After after it."),
    Setting("OLB_RETRIES", "retries", "2", _int_at_least(0),
            "Extra attempts on other backends when one fails before its first response byte."),
    Setting("OLB_RESUME_MAX_BYTES", "resume_max_bytes", "512K", _size_or_off,
            "A chat stream (/api/chat, /v1/chat/completions) whose backend dies is continued on another "
            "backend; olb keeps up to this much of each stream to do it (a longer one ends with an error "
            "line, as before); 0 = off (docs/operations.md)."),
    Setting("OLB_EJECT_AFTER", "eject_after", "3", _int_at_least(1),
            "Failed requests in a row (broken connections, malformed responses; a timeout ejects only "
            "if the probe after it fails) after which a backend is taken out until a probe finds it "
            "healthy; a refused connection takes it out at once."),
    Setting("OLB_WORKERS", "workers", "1", _int_at_least(1),
            "Worker processes sharing the port (SO_REUSEPORT) and the in-flight counts."),
    Setting("OLB_HEALTH_INTERVAL", "health_interval", "5", _non_negative_float,
            "Seconds between active health checks (GET /) of each backend; 0 = off."),
    Setting("OLB_GPU_POLL", "gpu_poll", "1", _non_negative_float,
            "Seconds between NVML polls of the GPUs named by `gpus=` and scrapes of `metrics=` "
            "endpoints; 0 = off."),
    Setting("OLB_MODELS_INTERVAL", "models_interval", "10", _non_negative_float,
            "Seconds between reads of each backend's /api/tags and /api/ps (what it has installed "
            "and loaded); 0 = route without knowing models."),
    Setting("OLB_POLICY", "policy", "llm", _policy,
            "How a backend is chosen: `llm` (models, conversations, GPU load and in-flight counts), "
            "`least-inflight` (the fewest requests in flight for their capacity and weight, nothing "
            "else) or `round-robin` (each healthy backend with room in turn)."),
    Setting("OLB_SPREAD_QUEUE", "spread_queue", "4", _int_at_least(1),
            "Requests waiting for a model (in olb's queue, or behind a load olb started) beyond which "
            "another backend loads it (hot models spread, cold ones stay on one GPU): one with room for it, "
            "else one where no model in use or in demand would be unloaded."),
    Setting("OLB_CLIENT_HEADER", "client_header", "", lambda raw: raw.strip().lower(),
            "Request header that names the client for fair queuing; unset: the API key "
            "(Authorization: Bearer), else the client's address."),
    Setting("OLB_CLIENT_QUEUE", "client_queue", "0", _int_at_least(0),
            "Requests one client may have waiting (429 beyond it); 0 = only the fair share of a full queue."),
    Setting("OLB_PRIORITY_HEADER", "priority_header", "X-Priority", lambda raw: raw.strip().lower(),
            "Request header whose value `batch` (or `low`) queues a request behind interactive ones "
            "(4 interactive admissions per batch one while both wait)."),
    Setting("OLB_SESSION_HEADER", "session_header", "X-Session-Id", lambda raw: raw.strip().lower(),
            "Request header naming a conversation; without it a conversation is known by its model "
            "and leading messages (or prompt prefix)."),
    Setting("OLB_SESSION_BOUND", "session_bound", "1.25", _bound,
            "Keep a conversation on the backend holding its prompt cache while that backend's load is "
            "within this factor of the average (consistent hashing with bounded loads); 0 = off."),
    Setting("OLB_PULL", "pull", "all", _pull,
            "Where /api/pull goes: `all` healthy backends, or only those with `room` (whose known GPU "
            "memory can hold the model, when its size is known from a backend that has it)."),
    Setting("OLB_CONFIG", "config", "", _raw,
            "A file of `OLB_*=value` lines (a systemd `EnvironmentFile`) whose values override the "
            "environment; SIGHUP re-reads it (docs/operations.md, Configuration file and reload)."),
    Setting("OLB_SHUTDOWN_TIMEOUT", "shutdown_timeout", "30", _positive_float,
            "Seconds running streams get to finish after SIGTERM; those still running then are cut "
            "and logged. Queued requests get 503 with Retry-After at once."),
    Setting("OLB_API_KEYS", "api_keys", "", _keys_file,
            "File of API keys, one a line, each optionally with limits "
            "(`sk-team-a;concurrent=8;rpm=600;tpm=200000`); set, every request needs "
            "`Authorization: Bearer KEY` (401 without, 429 over a limit). Re-read on SIGHUP."),
    Setting("OLB_ADMIN_LISTEN", "admin_listen", "127.0.0.1:11433", _admin_listen,
            "Address of the admin listener (`/olb/*`, `/metrics`, the dashboard at `/olb/`), HOST:PORT "
            "or `off`. The data port serves them only with `OLB_ADMIN_TOKEN` (docs/operations.md)."),
    Setting("OLB_ADMIN_TOKEN", "admin_token", "", _token,
            "Bearer token for the admin endpoints: with it they are served on the data port too, "
            "and a non-loopback admin listener asks for it."),
    Setting("OLB_LOG_LEVEL", "log_level", "info", _log_level,
            "debug, info, warning or error."),
    Setting("OLB_LOG_FORMAT", "log_format", "text", _log_format,
            "How log lines are written, the access log's and all others: `text` or `json` "
            "(one object a line; docs/operations.md)."),
    Setting("OLB_ACCESS_LOG", "access_log", "off", _access_log,
            "Where the access log (a line per request: client, model, backend, status, times, bytes, "
            "tokens) goes: `stderr`, a file path (reopened on SIGUSR1, for logrotate) or `off`."),
    Setting("OLB_METRICS", "metrics", "on", _on_off,
            "Prometheus metrics at `GET /metrics` (docs/operations.md, Metrics): `on` or `off`."),
    Setting("OLB_BACKEND_HEADER", "backend_header", "", _header_name,
            "Response header naming the backend that served the request, e.g. `X-Olb-Backend`; "
            "empty = none."),
    Setting("OLB_DEMO", "demo", "0", _int_at_least(0),
            "Start this many simulated Ollama instances and balance over them (`--demo` = 3)."),
)


def _default(field: str) -> Any:
    """The parsed default of the setting for `field`: Config's defaults come from SETTINGS."""
    for s in SETTINGS:
        if s.field == field:
            return s.parse(s.default)
    raise KeyError(field)


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting, parsed. The defaults are SETTINGS' (one source), so a
    Config() built by a test runs on the defaults a user gets."""

    listen_host: str = _default("listen")[0]
    listen_port: int = _default("listen")[1]
    backends: tuple[BackendSpec, ...] = ()  # OLB_BACKENDS has no default
    max_inflight: int = _default("max_inflight")
    connect_timeout: float = _default("connect_timeout")
    first_byte_timeout: float = _default("first_byte_timeout")
    idle_timeout: float = _default("idle_timeout")
    keepalive_timeout: float = _default("keepalive_timeout")
    max_body: int = _default("max_body")
    max_body_held: int = _default("max_body_held")
    header_timeout: float = _default("header_timeout")
    body_timeout: float = _default("body_timeout")
    body_min_rate: int = _default("body_min_rate")
    queue_size: int = _default("queue_size")
    queue_timeout: float = _default("queue_timeout")
    retries: int = _default("retries")
    resume_max_bytes: int = _default("resume_max_bytes")
    eject_after: int = _default("eject_after")
    workers: int = _default("workers")
    health_interval: float = _default("health_interval")
    gpu_poll: float = _default("gpu_poll")
    models_interval: float = _default("models_interval")
    spread_queue: int = _default("spread_queue")
    policy: str = _default("policy")
    client_header: str = _default("client_header")
    client_queue: int = _default("client_queue")
    priority_header: str = _default("priority_header")
    session_header: str = _default("session_header")
    session_bound: float = _default("session_bound")
    config: str = _default("config")
    shutdown_timeout: float = _default("shutdown_timeout")
    log_level: str = _default("log_level")
    api_keys: str = _default("api_keys")
    admin_listen: tuple[str, int] | None = _default("admin_listen")
    admin_token: str = _default("admin_token")
    demo: int = _default("demo")
    log_format: str = _default("log_format")
    access_log: str = _default("access_log")
    metrics: bool = _default("metrics")
    backend_header: str = _default("backend_header")
    pull: str = _default("pull")


def parse_backends(raw: str, default_max: int, var: str = "OLB_BACKENDS") -> tuple[BackendSpec, ...]:
    """Parse the OLB_BACKENDS syntax (see the module docstring).

    Raises:
        ConfigError: naming `var` and the entry that is wrong.
    """
    specs = []
    seen = set()
    for entry in (e.strip() for e in raw.split(",")):
        if not entry:
            continue
        url, *opts = (p.strip() for p in entry.split(";"))
        if "://" not in url:
            url = "http://" + url
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme != "http" or not parts.hostname or port == -1 or parts.path not in ("", "/"):
            raise ConfigError(
                f"{var}: expected backend URLs like http://127.0.0.1:11435, got {entry!r}"
                + (" (https backends are not supported)" if parts.scheme == "https" else "")
            )
        port = 11434 if port is None else port
        fields: dict[str, Any] = {"max_inflight": default_max}
        for opt in opts:
            key, sep, value = opt.partition("=")
            key = key.strip().lower()
            try:
                if not sep:
                    raise ValueError("key=value")
                if key == "max":
                    fields["max_inflight"] = _int_at_least(1)(value)
                elif key == "weight":
                    weight = float(value)
                    if not 0 < weight < float("inf"):
                        raise ValueError(f"a weight > 0, got {value!r}")
                    fields["weight"] = weight
                elif key == "gpus":
                    fields["gpus"] = tuple(_int_at_least(0)(g) for g in value.split("+"))
                elif key == "metrics":
                    fields["metrics"] = _metrics_url(value, parts.hostname)
                else:
                    raise ValueError("one of max=, weight=, gpus=, metrics=")
            except ValueError as exc:
                raise ConfigError(f"{var}: bad option {opt!r} for {url}: expected {exc}") from None
        address = (parts.hostname, port)
        if address in seen:
            raise ConfigError(f"{var}: backend {parts.hostname}:{port} is listed twice")
        seen.add(address)
        specs.append(BackendSpec(url=f"http://{parts.netloc}", host=parts.hostname, port=port, **fields))
    return tuple(specs)


def _metrics_url(raw: str, backend_host: str) -> str:
    """metrics=: `http://HOST:PORT/PATH` (path default /metrics) or `:PORT[/PATH]` on the backend's host."""
    expected = f"an http URL like http://10.0.0.7:9400/metrics, or :9400 for the backend's host, got {raw!r}"
    raw = raw.strip()
    if raw.startswith(":"):
        host = f"[{backend_host}]" if ":" in backend_host else backend_host
        raw = f"http://{host}{raw}"
    elif "://" not in raw:
        raw = "http://" + raw
    parts = urlsplit(raw)
    try:
        _ = parts.port  # raises ValueError for a port that is out of range or not a number
    except ValueError:
        raise ValueError(expected) from None
    if parts.scheme != "http" or not parts.hostname or parts.fragment:
        raise ValueError(expected)
    path = parts.path or "/metrics"
    return f"http://{parts.netloc}{path}" + (f"?{parts.query}" if parts.query else "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="olb-fast",
        description="Load balancer for Ollama: one endpoint in front of several `ollama serve` instances.",
        epilog="Every flag mirrors an OLB_* environment variable; a flag wins over its variable.",
    )
    parser.add_argument("--version", action="version", version=f"olb-fast {__version__}")
    for s in SETTINGS:
        if s.env == "OLB_DEMO":
            parser.add_argument("--demo", nargs="?", const="3", default=None, metavar="N",
                                help=f"{s.help} [{s.env}]")
            continue
        parser.add_argument(s.flag, dest=s.field, default=None, metavar="VALUE",
                            help=f"{s.help} [{s.env}, default {s.default or 'none'}]")
    return parser


def load(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Build the Config from flags and environment.

    Raises:
        ConfigError: a value is malformed, or there is no backend and no demo.
    """
    import os
    import sys

    environ = os.environ if environ is None else environ
    parser = build_parser()
    # argparse exits with status 2 on unknown flags itself, which is what we want.
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    path = args.config if args.config is not None else environ.get("OLB_CONFIG", "")
    if path:
        # The file's values override the environment; a flag still wins over both.
        environ = {**environ, **read_env_file(path)}
    values: dict[str, Any] = {}
    for s in SETTINGS:
        flag_value = getattr(args, s.field)
        if flag_value is not None:
            raw, source = flag_value, s.flag
        elif s.env in environ:
            raw, source = environ[s.env], s.env
        else:
            raw, source = s.default, s.env
        try:
            values[s.field] = s.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{source}: expected {exc}") from None
        values[s.field + "__source"] = source

    host, port = values["listen"]
    backends = parse_backends(values["backends"], values["max_inflight"],
                              var=values["backends__source"])
    if not backends and not values["demo"]:
        raise ConfigError(f"{values['backends__source']}: {DEMO_HINT}")
    return Config(
        listen_host=host,
        listen_port=port,
        backends=backends,
        **{s.field: values[s.field] for s in SETTINGS if s.field not in ("listen", "backends")},
    )


#: Settings a reload cannot change: they shape the listening socket and the
#: processes, which a running olb keeps (docs/operations.md).
FIXED_ON_RELOAD = ("listen", "workers", "demo", "config", "admin_listen")


def read_env_file(path: str) -> dict[str, str]:
    """The `OLB_*=value` lines of a file in systemd's EnvironmentFile format.

    As systemd reads it (systemd.exec(5), EnvironmentFile=): blank lines and
    lines starting with `#` or `;` are ignored; a value may be enclosed in
    single or double quotes, which are removed; whitespace around the key and
    the value is dropped. Every key must be a known OLB_* variable (a typo
    would otherwise be silently ignored), and OLB_CONFIG may not name another file.

    Raises:
        ConfigError: the file cannot be read, or a line is malformed, naming
            the file, the line and the variable.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"OLB_CONFIG: cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    return parse_env_file(text, path)


_KNOWN = {s.env for s in SETTINGS}


def parse_env_file(text: str, path: str = "OLB_CONFIG") -> dict[str, str]:
    """read_env_file's parser, on the file's text (see there)."""
    values: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        where = f"{path}:{lineno}"
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError(f"{where}: expected VARIABLE=value, got {line!r}")
        if key not in _KNOWN:
            raise ConfigError(f"{key}: unknown variable ({where}); known: OLB_* settings in the README")
        if key == "OLB_CONFIG":
            raise ConfigError(f"OLB_CONFIG: cannot be set in the file it names ({where})")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key] = value
    return values


def log_level_number(name: str) -> int:
    return getattr(logging, name.upper())


def settings_markdown() -> str:
    """The README's configuration table, generated from SETTINGS."""
    rows = ["| variable | flag | default | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        flag = "--demo [N]" if s.env == "OLB_DEMO" else f"{s.flag} VALUE"
        default = f"`{s.default}`" if s.default else "none"
        rows.append(f"| `{s.env}` | `{flag}` | {default} | {s.help} |")
    return "\n".join(rows)


#: The README's settings table is what lies between these two lines.
TABLE_BEGIN = "<!-- settings:begin (generated: python -m olb.config README.md) -->"
TABLE_END = "<!-- settings:end -->"


def _table_span(text: str) -> tuple[int, int]:
    begin = text.find(TABLE_BEGIN)
    end = text.find(TABLE_END)
    if begin < 0 or end < begin or text.count(TABLE_BEGIN) != 1 or text.count(TABLE_END) != 1:
        raise ValueError(f"expected one {TABLE_BEGIN} line, then one {TABLE_END} line")
    return begin + len(TABLE_BEGIN), end


def readme_table(text: str) -> str:
    """The settings table in a README's text (between TABLE_BEGIN and TABLE_END).

    Raises:
        ValueError: the markers are missing, repeated or out of order.
    """
    start, end = _table_span(text)
    return text[start:end].strip("\n")


def with_table(text: str) -> str:
    """A README's text with its settings table regenerated from SETTINGS."""
    start, end = _table_span(text)
    return f"{text[:start]}\n\n{settings_markdown()}\n\n{text[end:]}"


if __name__ == "__main__":
    # `python -m olb.config` prints the table; `python -m olb.config README.md`
    # rewrites it in that file.
    import sys

    if len(sys.argv) > 1:
        with open(sys.argv[1], encoding="utf-8") as f:
            readme = f.read()
        with open(sys.argv[1], "w", encoding="utf-8") as f:
            f.write(with_table(readme))
    else:
        print(settings_markdown())

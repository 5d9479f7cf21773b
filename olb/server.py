"""One worker: the listening socket, the balancer and its background tasks.

`start_proxy` is also what the integration tests use: it takes a socket
already bound to 127.0.0.1:0 (or binds one) and returns once it listens, so
no test ever sleeps waiting for readiness.

Two listeners: the data port (OLB_LISTEN), and the admin listener
(OLB_ADMIN_LISTEN) that serves /olb/*, /metrics and the dashboard and
nothing else (docs/operations.md, "Admin listener").
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time

from . import auth, metrics
from .accesslog import AccessLog
from .admin import Listener
from .balancer import Balancer
from .config import Config
from .dashboard import Samples
from .hostcheck import HostCheck, listens_on_loopback
from .proxy import BackendSideProtocol, ClientSideProtocol, ProxyContext

log = logging.getLogger("olb.server")


class ProxyServer:
    def __init__(self, config: Config, loop, table=None, worker: int = 0, drained=None, samples=None,
                 metrics_dir: str | None = None):
        self.config = config
        self.loop = loop
        self.worker = worker
        # With several workers, `samples` is the shared buffer of their counter rows.
        self._samples = Samples(worker, config.workers, samples)
        self._observe(metrics_dir)
        #: Set by the first new_context, shared by every later one (see there).
        self._bodies = self._resumes = None
        self._keys: auth.KeyRing | None = None
        self.ctx = self.new_context(config, table=table, drained=drained)
        self.balancer = self.ctx.balancer
        self._server = None
        self._admin_server = None
        self._tick = None
        self.port = 0
        self._host = ""
        #: The admin listener's port (0: none).
        self.admin_port = 0
        self.telemetry = None  # telemetry.TelemetryScraper when a backend has metrics=

    def new_context(self, config: Config, table=None, drained=None) -> ProxyContext:
        """A context (balancer included) for `config`; olb/lifecycle.py makes
        a new one on reload and moves the connections to it."""
        ctx = ProxyContext(config, self.loop, worker=self.worker)
        ctx.balancer = Balancer(config, self.loop, BackendSideProtocol, table=table, drained=drained)
        # What belongs to the worker, not to one generation of settings: a
        # reload (olb/lifecycle.py) makes a new context, and these carry over.
        # One ring of dashboard samples per worker.
        ctx.samples = self._samples
        # One body budget: a connection keeps counting its held bytes in the
        # budget it started with (slowclient.RequestClock), which must be the
        # one its new context checks; the cap is the new settings'. One
        # resume tally.
        if self._bodies is None:
            self._bodies, self._resumes = ctx.bodies, ctx.resumes
        ctx.bodies, ctx.resumes = self._bodies, self._resumes
        ctx.bodies.cap = config.max_body_held or config.max_body
        # One key ring per key file: the requests each key has running still
        # count against its limits after a reload, which reads the file again.
        keys = self._keys
        if not config.api_keys:
            keys = None
        elif keys is not None and keys.path == config.api_keys:
            _reload_keys(keys)
        else:
            keys = auth.KeyRing(auth.load_keys(config.api_keys), config.api_keys, workers=config.workers)
        self._keys = ctx.keys = keys
        # The counters and the access log outlive a reload: every context shares the server's.
        ctx.metrics = ctx.balancer.metrics = self.metrics
        ctx.metrics_dir = self.metrics_dir
        ctx.access_log = self.access_log
        ctx.observing = ctx.metrics is not None or ctx.access_log is not None
        if config.backend_header:
            ctx.backend_header = config.backend_header.encode("latin-1")
        return ctx

    def _observe(self, metrics_dir: str | None) -> None:
        """OLB_METRICS and OLB_ACCESS_LOG (docs/operations.md): made once per worker."""
        cfg = self.config
        self._publish_handle = None
        self.metrics = self.metrics_dir = self.access_log = None
        if cfg.metrics:
            self.metrics = metrics.Metrics(len(cfg.backends))
            if metrics_dir is not None:
                self.metrics_dir = metrics_dir
                # A worker restarted after a crash goes on from its predecessor's
                # counters: the group's totals never go down.
                self.metrics.base = metrics.read_state(metrics_dir, self.worker)
        if cfg.access_log != "off":
            self.access_log = AccessLog(cfg.access_log, cfg.log_format, self.loop)

    def _publish(self) -> None:
        self._publish_handle = self.loop.call_later(metrics.PUBLISH_INTERVAL, self._publish)
        try:
            metrics.publish(self.ctx)
        except OSError as exc:
            log.error("cannot publish this worker's metrics to %s: %s", self.metrics_dir, exc)

    def reopen_logs(self) -> None:
        """SIGUSR1: reopen the access log file (logrotate moved it)."""
        if self.access_log is not None:
            self.access_log.reopen()

    @property
    def url(self) -> str:
        return f"http://{self.config.listen_host}:{self.port}"

    async def start(self, sock: socket.socket | None = None, admin_sock: socket.socket | None = None) -> None:
        cfg = self.config
        self.ctx.started = time.monotonic()
        if sock is None:
            sock = bind_socket(cfg.listen_host, cfg.listen_port, reuse_port=cfg.workers > 1)
        if admin_sock is None and cfg.admin_listen is not None:
            # SO_REUSEPORT: every worker serves the admin port too, and a new
            # olb (or a new generation of workers) can bind it beside the old.
            admin_sock = bind_socket(*cfg.admin_listen, reuse_port=True)
        self._server = await self.loop.create_server(
            lambda: ClientSideProtocol(self.ctx), sock=sock, backlog=2048)
        self.port = sock.getsockname()[1]
        self._host = sock.getsockname()[0]
        if admin_sock is not None:
            loopback = listens_on_loopback(admin_sock.getsockname()[0])
            listener = Listener(open=loopback or not cfg.admin_token,
                                host_check=HostCheck() if loopback else None)
            if not loopback and not cfg.admin_token:
                log.warning("the admin listener %s is not on loopback and OLB_ADMIN_TOKEN is not set: "
                            "anyone who reaches it can drain backends", admin_sock.getsockname()[:2])
            # self.ctx read per connection: a reload (olb/lifecycle.py) replaces it.
            self._admin_server = await self.loop.create_server(
                lambda: ClientSideProtocol(self.ctx, listener), sock=admin_sock)
            self.admin_port = admin_sock.getsockname()[1]
        self._tick = self.loop.call_later(1.0, self._sample)
        self.start_context(self.ctx)
        self.telemetry = self.ctx.telemetry
        if self.metrics_dir is not None:
            self._publish()

    def start_context(self, ctx: ProxyContext) -> None:
        """Start a context's background work: health checks, model polls, GPU readings."""
        cfg = ctx.config
        if listens_on_loopback(self._host):
            # What Ollama does on a loopback bind (hostcheck.py); olb's own
            # Host rewrite would otherwise remove it.
            ctx.host_check = HostCheck()
        ctx.balancer.start()
        # A backend with metrics= is remote: its gpus= are the scraped page's
        # `gpu` labels, not this machine's NVML indices.  Only the `llm`
        # policy scores GPU load; the plain ones do not read it.
        gpu_map = [() if b.metrics else b.gpus for b in cfg.backends]
        poll = cfg.gpu_poll if cfg.policy == "llm" else 0
        # Free GPU memory tells the model directory where a model fits.
        models = ctx.balancer.models
        memory = models.set_gpu_memory if models is not None else None
        if poll > 0 and any(gpu_map):
            from .gpu import GpuMonitor

            ctx.gpu = GpuMonitor(ctx.balancer.table, gpu_map, interval=poll, memory=memory)
            ctx.gpu.start()
        if poll > 0 and any(b.metrics for b in cfg.backends):
            from .telemetry import TelemetryScraper

            ctx.telemetry = TelemetryScraper(ctx.balancer.table, cfg.backends, interval=poll,
                                             loop=self.loop, memory=memory)
            ctx.telemetry.start()

    @staticmethod
    async def close_context(ctx: ProxyContext) -> None:
        """Stop a context's background work and close its backend connections."""
        await ctx.balancer.close()
        if ctx.gpu is not None:
            ctx.gpu.stop()
        if ctx.telemetry is not None:
            await ctx.telemetry.close()

    def _sample(self) -> None:
        # The dashboard's ring: one sample a second (dashboard.Samples.tick).
        self._tick = self.loop.call_later(1.0, self._sample)
        self.ctx.samples.tick(self.balancer)

    async def close(self) -> None:
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        if self._admin_server is not None:
            self._admin_server.close()
        if self._server is not None:
            self._server.close()
        if self._publish_handle is not None:
            self._publish_handle.cancel()
            self._publish_handle = None
        for client in list(self.ctx.clients):
            client.transport.close()
        await self.close_context(self.ctx)
        if self._server is not None:
            await self._server.wait_closed()
        if self._admin_server is not None:
            await self._admin_server.wait_closed()
        if self.access_log is not None:
            self.access_log.close()


def _reload_keys(keys) -> None:
    """Read OLB_API_KEYS's file again (a reload); a bad file is refused
    whole, logged, and the old keys stay."""
    error = keys.reload()
    if error is None:
        log.info("API keys reloaded: %d key(s) from %s", len(keys.keys), keys.path)
    else:
        log.error("API keys not reloaded, the old ones stay: %s", error)


def bind_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket; with reuse_port, one of several workers' sockets on the port."""
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(info[4])
        sock.listen(2048)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def start_proxy(config: Config, *, sock: socket.socket | None = None, table=None,
                      worker: int = 0, drained=None, admin_sock: socket.socket | None = None,
                      samples=None, metrics_dir: str | None = None) -> ProxyServer:
    server = ProxyServer(config, asyncio.get_running_loop(), table=table, worker=worker, drained=drained,
                         samples=samples, metrics_dir=metrics_dir)
    await server.start(sock, admin_sock)
    return server

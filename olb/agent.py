"""olb-agent: a small NVML exporter serving the DCGM exporter's GPU metrics.

For GPU hosts without NVIDIA's dcgm-exporter.  It serves, on /metrics in the
Prometheus text format, the three gauges olb reads (telemetry.DCGM_FIELDS)
with dcgm-exporter's HELP/TYPE lines and labels (gpu, UUID, pci_bus_id,
device, modelName, Hostname), so olb -- or a Grafana dashboard written for
dcgm-exporter -- reads it the same way:

    olb-agent [--listen 127.0.0.1:9400] [--interval 1] [--allow-no-gpu]

and in olb: OLB_BACKENDS="http://gpu-host:11434;metrics=:9400".  The default
address is local only; --listen 0.0.0.0:9400 exposes it to the network.

Theory of operation: a daemon thread reads NVML every --interval seconds
through gpu.GpuMonitor (the same reads, handle caching and once-per-streak
warnings as olb's local polling) and renders the page once; a request gets
the last page, so scrapers cost NVML nothing and never wait on the driver.
A GPU whose read fails is left off the page (olb clears that GPU's backends
at once); a page older than STALE_INTERVALS intervals (NVML hung) is served
without samples, so nobody steers with frozen numbers.

Exit status: 0 after SIGINT or SIGTERM; 2 for a bad flag, a port already
taken, or no NVML (pynvml missing, no driver) unless --allow-no-gpu.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from . import __version__
from .config import _listen
from .gpu import GpuMonitor, GpuReading, NvmlUnavailable, open_nvml
from .telemetry import DCGM_FIELDS, MIB, STALE_INTERVALS

__all__ = ["Exporter", "main", "make_server", "render"]

log = logging.getLogger("olb.agent")

#: dcgm-exporter's address; a host running both needs --listen for one of them.
DEFAULT_LISTEN = "127.0.0.1:9400"
#: promhttp's content type for the text format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Seconds an idle keep-alive connection holds its thread (Prometheus keeps
#: its connection open between scrapes; olb reconnects each time).
IDLE_TIMEOUT = 60.0


def render(gpus: Sequence[tuple[str, GpuReading]]) -> bytes:
    """The page: for each DCGM field its HELP and TYPE lines, then one sample per GPU.

    Args:
        gpus: (label text without braces, reading) per GPU, in index order.
    """
    out = []
    for field, (name, help_text) in enumerate(DCGM_FIELDS):
        out.append(f"# HELP {name} {help_text}\n# TYPE {name} gauge\n")
        for labels, r in gpus:
            free = r["mem_free_bytes"] // MIB
            value = (round(r["util"] * 100), free, r["mem_total"] // MIB - free)[field]
            out.append(f"{name}{{{labels}}} {value}\n")
    return "".join(out).encode()


class _NoTable:
    """GpuMonitor pushes loads into a backend table; the agent only wants its readings."""

    def __init__(self, n: int) -> None:
        self.n = n

    def set_gpu_load(self, index: int, util: float, mem_free: float) -> None:
        pass

    def clear_gpu_load(self, index: int) -> None:
        pass


class Exporter:
    """Reads NVML on an interval and keeps the rendered page."""

    def __init__(self, nvml: Any = None, count: int = 0, interval: float = 1.0,
                 hostname: str | None = None) -> None:
        """An exporter of `count` GPUs through an initialised `nvml`; count 0 serves no GPU.

        Use Exporter.open() to initialise NVML; this constructor reads each
        GPU's identity labels once, and start() or poll_once() its load.

        Raises:
            ValueError: interval <= 0.
        """
        if not interval > 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval}")
        self.interval = float(interval)
        self.count = count
        self._nvml = nvml
        hostname = hostname if hostname is not None else socket.gethostname()
        self._labels = [_labels(nvml, i, hostname) for i in range(count)]
        self._monitor = (GpuMonitor(_NoTable(count), [[i] for i in range(count)], interval=interval,
                                    nvml=nvml, logger=log) if count else None)
        self._empty = render([])
        self._page: tuple[bytes, float] = (self._empty, time.monotonic())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._crashed = False

    @classmethod
    def open(cls, interval: float = 1.0, nvml: Any = None, hostname: str | None = None) -> "Exporter":
        """Initialise NVML (importing pynvml unless `nvml` is given) and export every GPU it sees.

        Raises:
            NvmlUnavailable: pynvml is missing or NVML failed to initialise.
        """
        nvml, count = open_nvml(nvml)
        try:
            return cls(nvml, count, interval, hostname)
        except BaseException:
            nvml.nvmlShutdown()
            raise

    def poll_once(self) -> bytes:
        """Read every GPU once and render the page (GPUs that failed to read left off)."""
        if self._monitor is None:
            page = self._empty
        else:
            readings = self._monitor.poll_once()
            page = render([(self._labels[i], readings[i]) for i in sorted(readings)])
        self._page = (page, time.monotonic())
        return page

    def page(self) -> bytes:
        """The last page, or one without samples once it is STALE_INTERVALS intervals old."""
        page, at = self._page
        if time.monotonic() - at > STALE_INTERVALS * self.interval:
            return self._empty
        return page

    def start(self) -> None:
        """Poll in a daemon thread every interval; no-op without GPUs."""
        if self._monitor is None or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="olb-agent-poll", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling and shut NVML down."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(5.0)
        if self._monitor is not None:
            self._monitor.stop()
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()  # Exporter.open's nvmlInit; the monitor had its own
            except self._nvml.NVMLError as exc:
                log.warning("nvmlShutdown failed: %s", exc)
            self._nvml = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll_once()
                self._crashed = False
            except Exception:
                # A bug or an unexpected exception: the page goes stale and
                # empties itself; log once, keep polling.
                if not self._crashed:
                    self._crashed = True
                    log.exception("GPU poll failed unexpectedly")


def _labels(nvml: Any, index: int, hostname: str) -> str:
    """dcgm-exporter's label set for one GPU, in its order; labels NVML cannot tell are left out."""
    labels = [("gpu", str(index))]
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
    except nvml.NVMLError as exc:
        log.warning("GPU %d: no handle (%s); exporting it without UUID and model", index, exc)
        handle = None
    if handle is not None:
        for label, read in (("UUID", lambda: nvml.nvmlDeviceGetUUID(handle)),
                            ("pci_bus_id", lambda: nvml.nvmlDeviceGetPciInfo(handle).busId)):
            try:
                labels.append((label, _text(read())))
            except nvml.NVMLError:
                pass
    labels.append(("device", f"nvidia{index}"))
    if handle is not None:
        try:
            labels.append(("modelName", _text(nvml.nvmlDeviceGetName(handle))))
        except nvml.NVMLError:
            pass
    labels.append(("Hostname", hostname))
    return ",".join(f'{k}="{_escape(v)}"' for k, v in labels)


def _text(value: Any) -> str:
    # pynvml returns bytes before nvidia-ml-py 11.515, str after.
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# --- HTTP -----------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server_version = f"olb-agent/{__version__}"
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._answer(head_only=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(head_only=True)

    def _answer(self, head_only: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            status, ctype, body = 200, CONTENT_TYPE, self.server.exporter.page()  # type: ignore[attr-defined]
        elif path == "/":
            status, ctype, body = 200, "text/plain; charset=utf-8", (
                b"olb-agent: GPU metrics in the DCGM exporter's format on /metrics\n")
        else:
            status, ctype, body = 404, "text/plain; charset=utf-8", b"404 page not found\n"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head_only:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's signature)
        # http.server writes every request to stderr; a scrape a second is noise.
        log.debug("%s " + format, self.address_string(), *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], exporter: Exporter) -> None:
        self.exporter = exporter
        super().__init__(address, _Handler)


class _Server6(_Server):
    address_family = socket.AF_INET6


def make_server(host: str, port: int, exporter: Exporter) -> ThreadingHTTPServer:
    """An HTTP server bound and listening on host:port (0 = any free port); serve_forever() runs it.

    Raises:
        OSError: the address cannot be bound (in use, not local, no permission).
    """
    return (_Server6 if ":" in host else _Server)((host, port), exporter)


# --- command line ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="olb-agent",
        description="Serve this host's GPU utilisation and memory on /metrics with the DCGM "
                    "exporter's metric names, for olb's `metrics=` backend option.")
    parser.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                        help=f"address to serve on (default {DEFAULT_LISTEN}, dcgm-exporter's port; "
                             "0.0.0.0:9400 for every interface)")
    parser.add_argument("--interval", default="1", metavar="SECONDS",
                        help="seconds between NVML reads (default 1)")
    parser.add_argument("--allow-no-gpu", action="store_true",
                        help="without NVML (no driver, no pynvml) serve a page without GPUs "
                             "instead of exiting with status 2")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run olb-agent until SIGINT or SIGTERM; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        host, port = _listen(args.listen)
    except ValueError as exc:
        parser.error(f"--listen: expected {exc}")
    try:
        interval = float(args.interval)
    except ValueError:
        interval = float("nan")
    if not 0 < interval < float("inf"):
        parser.error(f"--interval: expected seconds > 0, got {args.interval!r}")
    logging.basicConfig(level=args.log_level.upper(), format="olb-agent: %(levelname)s %(message)s")

    try:
        exporter = Exporter.open(interval)
    except NvmlUnavailable as exc:
        if not args.allow_no_gpu:
            print(f"olb-agent: no GPU to export: NVML is unavailable ({exc}).\n"
                  "Run it on a host with the NVIDIA driver and nvidia-ml-py, or pass --allow-no-gpu "
                  "to serve a page without GPUs.", file=sys.stderr)
            return 2
        log.warning("NVML is unavailable (%s); serving a page without GPUs (--allow-no-gpu)", exc)
        exporter = Exporter(interval=interval)
    try:
        server = make_server(host, port, exporter)
    except OSError as exc:
        exporter.stop()
        print(f"olb-agent: cannot listen on {args.listen}: {exc.strerror or exc} (dcgm-exporter "
              "or another olb-agent on the port? choose another with --listen)", file=sys.stderr)
        return 2

    exporter.poll_once()  # the first scrape finds data
    exporter.start()
    bound_host, bound_port = server.socket.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(f"olb-agent serving {exporter.count} GPU(s) on http://{shown}:{bound_port}/metrics "
          f"every {interval:g} s", flush=True)
    # shutdown() waits for serve_forever() to return, so it must run on
    # another thread than the one serving (this one, which gets the signal).
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        exporter.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

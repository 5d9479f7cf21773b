"""Remote GPU telemetry: DCGM exporter metrics scraped and pushed into the table.

Rules for this module: it scrapes the Prometheus endpoints named by the
backends' `metrics=` option and pushes what it reads into
`BackendTable.set_gpu_load` / `clear_gpu_load`, exactly as gpu.py does for
local NVML readings.  The request path never waits on a scrape: it reads
whatever was pushed last.  Nothing here raises into the caller or ends a
scrape loop: every failure degrades to "load unknown", which the table
scores as an idle GPU, so choice falls back to in-flight counts.

Theory of operation
-------------------
GPU clusters already run NVIDIA's dcgm-exporter (port 9400); hosts without
it can run `olb-agent` (olb/agent.py), which serves the same names.  Of the
exporter's page olb reads three gauges per GPU, keyed by the `gpu` label:

    DCGM_FI_DEV_GPU_UTIL   percent          -> util     = value / 100
    DCGM_FI_DEV_FB_FREE    MiB              -> mem_free = free / (free + used)
    DCGM_FI_DEV_FB_USED    MiB

A backend's `gpus=` selects which `gpu` labels are its GPUs (default: every
GPU on the endpoint); they are combined like local ones (gpu.combine: mean
utilisation, pooled memory).  Backends sharing one endpoint (two Ollama
instances on one host) share one scrape per interval.

Each endpoint is scraped every OLB_GPU_POLL seconds by its own task:

    scrape ok, GPUs complete    set_gpu_load; the expiry timer is re-armed
    scrape ok, a GPU missing    that GPU's backends are cleared at once
      or incomplete (a series   (missing data), one warning per streak
      absent, NaN, ambiguous)
    scrape failed (refused,     nothing changes yet: the last reading holds
      timeout, not 200, not     until it is STALE_INTERVALS intervals old,
      the text format)          then the expiry timer clears it; one warning
                                per failure streak, one info line on recovery

Why the event loop and not a thread (gpu.py uses one): NVML calls block in
the driver, so they must stay off the loop; a scrape is plain network I/O,
which the loop does without blocking, beside the health and model polls
(balancer.py, models.py), and pushing from the loop's own thread needs no
hand-off.  The only CPU work is parsing, bounded by MAX_SCRAPE_BYTES and
cheap for a real page: dcgm-exporter's default counters for 8 GPUs (~60 KiB)
parse in ~0.4 ms (tests/unit/test_telemetry.py bounds it), once per interval.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import math
import re
from collections.abc import Collection, Iterable, Sequence
from typing import Any, Callable
from urllib.parse import urlsplit

from . import __version__
from .client import BackendClient
from .errors import OlbError
from .gpu import GpuReading, make_reading, publish, unpublish

__all__ = ["DCGM_FIELDS", "DCGM_NAMES", "MetricsParseError", "Sample", "ScrapeError",
           "TelemetryScraper", "dcgm_readings", "parse_text"]

#: The DCGM exporter's names and HELP texts (its default-counters.csv), in its
#: order; olb-agent serves exactly these.
DCGM_FIELDS = (
    ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %)."),
    ("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB)."),
    ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB)."),
)
DCGM_NAMES = tuple(name for name, _ in DCGM_FIELDS)

MIB = 1 << 20

#: Readings older than this many intervals are cleared: one lost scrape (a
#: dropped packet, a GC pause in the exporter) should not flap the loads, but
#: a host that stopped answering must not steer traffic with old numbers.
STALE_INTERVALS = 3

#: Seconds a scrape may take: one interval, as Prometheus requires of its
#: scrape_timeout, but at least 1 s (a sub-second OLB_GPU_POLL must not turn a
#: slow WAN answer into a failure) and at most Prometheus' default of 10 s.
TIMEOUT_FLOOR = 1.0
TIMEOUT_CEILING = 10.0

#: Largest page read.  dcgm-exporter's default counters are ~8 KiB per GPU,
#: so 8 GPUs make ~60 KiB (parsed in ~0.4 ms); 1 MiB leaves room for
#: Kubernetes pod labels and more counters while bounding the parse, which
#: runs on the event loop, to ~15 ms.
MAX_SCRAPE_BYTES = 1 * MIB

# Prometheus requests text format 0.0.4 this way; promhttp then never answers
# protobuf or OpenMetrics.
_ACCEPT = "text/plain;version=0.0.4;q=1,*/*;q=0.1"


# --- the text format ----------------------------------------------------------------------------
#
# The Prometheus text exposition format 0.0.4 (prometheus.io/docs/instrumenting/
# exposition_formats): "Lines are separated by a line feed character (\n). The
# last line must end with a line feed character. Empty lines are ignored."
# "Tokens on a line may be separated by any number of blanks and/or tabs (they
# have to be separated by at least one if they would otherwise merge with the
# previous token)."  Label values escape only backslash, double-quote and line
# feed.  Values are Go ParseFloat numbers, NaN, +Inf and -Inf; the optional
# timestamp is an int64 of milliseconds.
#
# Strategy, for the event loop's sake: a Python loop over lines costs ~1 us a
# line before any checking, and Python's re ~2 us per pass over a dcgm-exporter
# label set (7 labels, 190 characters), so checking an 8-GPU page (~350 lines)
# line by line took ~0.6 ms; this takes ~0.35 ms.  One regex checks the whole
# page in C (every line a comment or NAME[{...}] VALUE [TIMESTAMP]), a second
# finds the wanted samples, whose label sets are then checked in full and
# decoded -- through a cache, as an exporter repeats the same label sets on
# every scrape -- and a third finds the wanted metrics' HELP/TYPE lines.

class MetricsParseError(ValueError):
    """The page is not the Prometheus text format; str() names the line."""


@dataclasses.dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float
    timestamp: int | None = None  # ms since the epoch, when the exporter sends one


_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
# A label value, the loop unrolled ("normal* (special normal*)*") so a
# character costs one class test rather than an alternation.
_LABEL_VALUE = r'"[^"\\\n]*(?:\\[\\"n][^"\\\n]*)*"'
_LABEL = rf"[a-zA-Z_][a-zA-Z0-9_]*[ \t]*=[ \t]*{_LABEL_VALUE}"
_LABELS_RE = re.compile(rf"\{{[ \t]*(?:{_LABEL}[ \t]*(?:,[ \t]*{_LABEL}[ \t]*)*(?:,[ \t]*)?)?\}}")
_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)[ \t]*=[ \t]*"([^"\\\n]*(?:\\[\\"n][^"\\\n]*)*)"')
_VALUE = r"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|(?i:inf(?:inity)?|nan))"
# The tail of a sample line after its name; the label set "{...}" is unchecked here.
_TAIL = rf"(?:[ \t]*(\{{[^\n]*\}})[ \t]*|[ \t]+)({_VALUE})(?:[ \t]+(-?[0-9]+))?[ \t]*"
# The whole page.  Without groups and with a possessive repeat (each line
# matches whole or not at all; nothing to backtrack into), re keeps no
# per-line state: 0.3 us a line, linear, instead of 1.7 us.
_PAGE_RE = re.compile(rf"(?:[ \t]*(?:#[^\n]*|{_NAME}{re.sub(r'[(](?![?])', '(?:', _TAIL)})?\n)*+")
_ESCAPE_RE = re.compile(r"\\(.)")
_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}
_TYPES = frozenset({"counter", "gauge", "histogram", "summary", "untyped"})


@functools.lru_cache(maxsize=16)
def _line_res(names: tuple[str, ...] | None) -> tuple[re.Pattern, re.Pattern]:
    """For `names` (None: any name), in "\\n" + page: their sample lines (groups:
    name, labels, value, timestamp) and HELP/TYPE lines (kind, name, rest)."""
    name = "|".join(map(re.escape, names)) if names is not None else _NAME
    return (re.compile(rf"\n[ \t]*({name}){_TAIL}(?=\n)"),
            re.compile(rf"\n[ \t]*#[ \t]*(HELP|TYPE)[ \t]+({name})(?:[ \t]+([^\n]*?))?[ \t]*(?=\n)"))


def parse_text(text: str, names: Collection[str] | None = None) -> list[Sample]:
    """Parse a page in the Prometheus text format.

    Args:
        text: the whole page.
        names: metric names to return samples of; None for all.

    Returns:
        The samples of the wanted metrics, in page order.

    Raises:
        MetricsParseError: naming the line: a line that is neither a comment
            nor a sample, a missing final newline (a truncated page), or, for
            a wanted metric, a malformed or repeated label, a second HELP or
            TYPE line, an unknown TYPE or a TYPE line after its samples.
            Every line's shape is checked; the wanted metrics in full.
    """
    if not text:
        return []
    if not text.endswith("\n"):
        raise MetricsParseError("the page does not end with a line feed (truncated?)")
    if _PAGE_RE.fullmatch(text) is None:
        end = _PAGE_RE.match(text).end()  # type: ignore[union-attr]  # the first bad line
        line = text[end:text.index("\n", end)]
        raise MetricsParseError(f"line {_line_number(text, end)}: {_what(line)}: {line[:120]!r}")
    page = "\n" + text  # every line, the first included, starts after a "\n"
    samples_re, directives_re = _line_res(None if names is None else tuple(sorted(names)))
    samples: list[Sample] = []
    first: dict[str, int] = {}  # wanted name -> position of its first sample
    for m in samples_re.finditer(page):
        first.setdefault(m.group(1), m.start())
        samples.append(_sample(m, page))
    helped: set[str] = set()
    typed: set[str] = set()
    for d in directives_re.finditer(page):
        kind, name, rest = d.groups()
        if kind == "HELP":
            if name in helped:
                raise MetricsParseError(
                    f"line {_line_number(page, d.start())}: a second HELP line for {name}")
            helped.add(name)
            continue
        if name in typed:
            raise MetricsParseError(f"line {_line_number(page, d.start())}: a second TYPE line for {name}")
        if rest not in _TYPES:
            raise MetricsParseError(f"line {_line_number(page, d.start())}: TYPE of {name} must be one of "
                                    f"{', '.join(sorted(_TYPES))}, got {rest!r}")
        if first.get(name, d.start()) < d.start():
            raise MetricsParseError(f"line {_line_number(page, d.start())}: TYPE line for {name} "
                                    "after its samples")
        typed.add(name)
    return samples


def _sample(m: re.Match, page: str) -> Sample:
    name, labels_text, value, timestamp = m.groups()
    try:
        labels = dict(_labels(labels_text)) if labels_text else {}
    except ValueError as exc:
        raise MetricsParseError(f"line {_line_number(page, m.start())}: {exc}: "
                                f"{m.group(0).strip()[:120]!r}") from None
    return Sample(name, labels, float(value), int(timestamp) if timestamp is not None else None)


@functools.lru_cache(maxsize=1024)
def _labels(text: str) -> tuple[tuple[str, str], ...]:
    """A label set "{...}" checked and decoded; ValueError says what is wrong."""
    if _LABELS_RE.fullmatch(text) is None:
        raise ValueError('malformed labels (name="value", escaping only \\\\, \\" and \\n)')
    labels: dict[str, str] = {}
    for label, raw in _LABEL_RE.findall(text):
        if label in labels:
            raise ValueError(f"label {label} given twice")
        labels[label] = _ESCAPE_RE.sub(lambda e: _ESCAPES[e.group(1)], raw) if "\\" in raw else raw
    return tuple(labels.items())


def _line_number(text: str, pos: int) -> int:
    """The 1-based number of the line starting at `pos` of the page, or, in
    "\\n" + page, of the line after the "\\n" at `pos`: the same count."""
    return text.count("\n", 0, pos) + 1


def _what(line: str) -> str:
    start = line.lstrip(" \t")[:1]
    if start in ("<", "{", "["):
        return "not the Prometheus text format (an HTML or JSON page?)"
    if not re.match(rf"[ \t]*{_NAME}", line):
        return "a metric name must start the line"
    return "not a valid sample (NAME{label=\"value\",...} VALUE [TIMESTAMP])"


# --- DCGM semantics -----------------------------------------------------------------------------


class ScrapeError(Exception):
    """A scrape failed: unreachable, not 200, too big, not the text format, not DCGM-shaped."""


def dcgm_readings(samples: Iterable[Sample]) -> tuple[dict[int, GpuReading], dict[int, str]]:
    """Per GPU (the `gpu` label), a reading from the three DCGM gauges.

    Args:
        samples: parsed samples; names other than DCGM_NAMES are ignored.

    Returns:
        (readings, problems): readings of the GPUs with all three gauges,
        and for every other GPU seen, why it has none (a gauge missing, a
        NaN, infinite or negative value, or several series for one gauge,
        as MIG instances or a page merging several hosts produce).

    Raises:
        ScrapeError: a DCGM sample without a numeric `gpu` label.
    """
    values: dict[int, dict[str, list[float]]] = {}
    for s in samples:
        if s.name not in DCGM_NAMES:
            continue
        label = s.labels.get("gpu", "")
        if not (label.isascii() and label.isdigit()):
            raise ScrapeError(f"{s.name} sample without a numeric gpu label: {s.labels}")
        values.setdefault(int(label), {}).setdefault(s.name, []).append(s.value)
    readings: dict[int, GpuReading] = {}
    problems: dict[int, str] = {}
    for gpu, series in sorted(values.items()):
        missing = [n for n in DCGM_NAMES if n not in series]
        several = [n for n in DCGM_NAMES if len(series.get(n, ())) > 1]
        if missing:
            problems[gpu] = "no " + ", ".join(missing)
        elif several:
            problems[gpu] = (f"several {several[0]} series for gpu=\"{gpu}\" "
                             "(MIG instances, or several hosts on one page?)")
        else:
            util, free, used = (series[n][0] for n in DCGM_NAMES)
            if not all(math.isfinite(v) and v >= 0 for v in (util, free, used)):
                problems[gpu] = f"a NaN, infinite or negative value ({util}, {free}, {used})"
            else:
                readings[gpu] = make_reading(util, free * MIB, (free + used) * MIB)
    return readings, problems


# --- scraping -----------------------------------------------------------------------------------


class _Target:
    """One metrics endpoint and the backends that read it."""

    __slots__ = ("url", "host", "port", "path", "hostport", "backends", "readings", "problems",
                 "ok", "error", "expiry", "client")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.url = url
        self.host = parts.hostname or ""
        self.port = parts.port or 80
        self.path = (parts.path or "/metrics") + (f"?{parts.query}" if parts.query else "")
        self.hostport = parts.netloc
        self.backends: list[tuple[int, tuple[int, ...]]] = []  # (index, gpus=; () = all)
        self.readings: dict[int, GpuReading] = {}
        self.problems: dict[int, str] = {}
        self.ok: float | None = None  # loop time of the last good scrape
        self.error: str | None = None  # why the last scrape failed; None after a good one
        self.expiry: asyncio.TimerHandle | None = None
        #: The control-plane client for this page (set by TelemetryScraper).
        self.client: BackendClient | None = None


class TelemetryScraper:
    """Scrapes the backends' `metrics=` endpoints and feeds the table."""

    def __init__(
        self,
        table: Any,
        backends: Sequence[Any],
        interval: float = 1.0,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        timeout: float | None = None,
        logger: logging.Logger | None = None,
        memory: Callable[[int, int | None, int], None] | None = None,
    ) -> None:
        """Configure the scraper; nothing is scraped until start() or scrape_once().

        Args:
            table: the BackendTable (anything with set_gpu_load, clear_gpu_load, n).
            backends: per table index, an object with `metrics` (a URL, or ""
                for none) and `gpus` (the `gpu` labels to count; () = all):
                config.BackendSpec.
            interval: seconds between scrapes of each endpoint (OLB_GPU_POLL).
            loop: the loop the tasks and expiry timers run on; default the
                running loop when start() or scrape_once() is first called.
            timeout: seconds one scrape may take; default the interval,
                within [TIMEOUT_FLOOR, TIMEOUT_CEILING].
            logger: where warnings go; default the "olb.telemetry" logger.
            memory: called with each backend's free GPU memory, as
                gpu.GpuMonitor's `memory` is.

        Raises:
            ValueError: len(backends) != table.n, interval <= 0 or timeout <= 0.
        """
        if len(backends) != table.n:
            raise ValueError(f"{len(backends)} backends for a table of {table.n}")
        if not interval > 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval}")
        if timeout is None:
            timeout = min(max(interval, TIMEOUT_FLOOR), TIMEOUT_CEILING)
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self._table = table
        self._memory = memory
        self._interval = float(interval)
        self._timeout = float(timeout)
        self.stale_after = STALE_INTERVALS * self._interval
        self._loop = loop
        self._log = logger if logger is not None else logging.getLogger("olb.telemetry")
        self._targets: dict[str, _Target] = {}
        # For log lines: the backend's URL (BackendSpec.url), else its index.
        self._names = [getattr(spec, "url", f"backend {i}") for i, spec in enumerate(backends)]
        for i, spec in enumerate(backends):
            if spec.metrics:
                self._targets.setdefault(spec.metrics, _Target(spec.metrics)).backends.append(
                    (i, tuple(spec.gpus)))
        for target in self._targets.values():
            # One keep-alive connection per page, re-used every interval.
            target.client = BackendClient(target.host, target.port, connect_timeout=self._timeout,
                                          read_timeout=self._timeout, max_body=MAX_SCRAPE_BYTES, max_idle=1)
        self._unread: set[int] = set()  # backends warned about: a GPU missing from a good page
        self._crashed: set[str] = set()  # endpoints whose scrape hit a bug (logged once)
        self._tasks: list[asyncio.Task] = []

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        """Start one scrape task per endpoint on the loop; no-op without endpoints."""
        if self._tasks or not self._targets:
            return
        loop = self._running_loop()
        self._tasks = [loop.create_task(self._run(t), name=f"olb-telemetry {t.url}")
                       for t in self._targets.values()]

    async def close(self) -> None:
        """Stop the scrape tasks and the expiry timers; the loads stay as they are."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for target in self._targets.values():
            if target.expiry is not None:
                target.expiry.cancel()
                target.expiry = None
            if target.client is not None:
                await target.client.close()

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    async def _run(self, target: _Target) -> None:
        loop = self._running_loop()
        while True:
            started = loop.time()
            await self._scrape(target)
            await asyncio.sleep(max(0.0, self._interval - (loop.time() - started)))

    # -- scraping -------------------------------------------------------------

    async def scrape_once(self) -> dict[str, str | None]:
        """Scrape every endpoint once, concurrently, and push the loads.

        Never raises for scrape failures: they are logged and handled as in
        the module docstring.

        Returns:
            Per endpoint URL, None when the scrape succeeded, else why not.
        """
        self._running_loop()
        targets = list(self._targets.values())
        await asyncio.gather(*(self._scrape(t) for t in targets))
        return {t.url: t.error for t in targets}

    async def _scrape(self, target: _Target) -> None:
        try:
            try:
                async with asyncio.timeout(self._timeout):
                    page = await _fetch(target)
                samples = parse_text(page.decode("utf-8"), DCGM_NAMES)
                readings, problems = dcgm_readings(samples)
            except asyncio.TimeoutError:
                self._failed(target, f"no answer within {self._timeout:g} s")
            except UnicodeDecodeError as exc:
                self._failed(target, f"the page is not UTF-8 ({exc.reason} at byte {exc.start})")
            except (OSError, OlbError, MetricsParseError, ScrapeError) as exc:
                self._failed(target, str(exc) or type(exc).__name__)
            else:
                self._succeeded(target, readings, problems)
            self._crashed.discard(target.url)
        except Exception:
            # A bug: clear this endpoint's loads (they would go stale), log
            # once per streak, keep scraping.
            if target.url not in self._crashed:
                self._crashed.add(target.url)
                self._log.exception("scraping %s failed unexpectedly; its GPU loads cleared", target.url)
            target.error = "internal error"
            self._expire(target)

    def _succeeded(self, target: _Target, readings: dict[int, GpuReading],
                   problems: dict[int, str]) -> None:
        if target.error is not None:
            self._log.info("GPU metrics at %s read again", target.url)
        target.readings, target.problems = readings, problems
        loop = self._running_loop()
        target.ok = loop.time()
        target.error = None
        if target.expiry is not None:
            target.expiry.cancel()
        target.expiry = loop.call_later(self.stale_after, self._expire, target)
        table = self._table
        for i, gpus in target.backends:
            # gpus= () counts every GPU on the page, the incomplete ones too.
            wanted = gpus or sorted(readings.keys() | problems.keys())
            missing = [g for g in wanted if g not in readings]
            if wanted and not missing:
                publish(table, self._memory, i, [readings[g] for g in wanted])
                if i in self._unread:
                    self._unread.discard(i)
                    self._log.info("GPUs of %s read again at %s", self._names[i], target.url)
                continue
            unpublish(table, self._memory, i)
            if i not in self._unread:
                self._unread.add(i)
                why = ("; ".join(f"gpu {g}: {problems.get(g, 'not on the page')}" for g in missing)
                       if wanted else "the page lists no GPU")
                self._log.warning("GPU metrics at %s incomplete for %s (%s); it falls back "
                                  "to in-flight counts", target.url, self._names[i], why)

    def _failed(self, target: _Target, why: str) -> None:
        if target.error is None:
            self._log.warning("scraping GPU metrics at %s failed (%s); its backends fall back to "
                              "in-flight counts once their reading is %g s old",
                              target.url, why, self.stale_after)
        target.error = why
        if target.ok is None:  # never read: nothing to keep until it expires
            self._expire(target)

    def _expire(self, target: _Target) -> None:
        """Called by the expiry timer when the last good page is stale_after old."""
        if target.expiry is not None:
            target.expiry.cancel()
            target.expiry = None
        target.readings, target.problems = {}, {}
        for i, _ in target.backends:
            unpublish(self._table, self._memory, i)

    # -- introspection --------------------------------------------------------

    def status(self) -> dict[str, dict]:
        """Per endpoint URL: its backends, the last page's age, the last error, the readings."""
        now = self._loop.time() if self._loop is not None else None
        return {
            t.url: {
                "backends": [i for i, _ in t.backends],
                "age_s": (round(now - t.ok, 3) if now is not None and t.ok is not None else None),
                "error": t.error,
                "readings": {str(g): r for g, r in t.readings.items()},
                "problems": {str(g): why for g, why in t.problems.items()},
            }
            for t in self._targets.values()
        }


async def _fetch(target: _Target) -> bytes:
    """GET the page through the target's control-plane client (keep-alive;
    h11 frames it, so a truncated answer is an error rather than half a
    page; the body is capped at MAX_SCRAPE_BYTES)."""
    assert target.client is not None  # set by add() before any scrape
    resp = await target.client.request("GET", target.path, headers=(
        (b"accept", _ACCEPT), (b"accept-encoding", b"identity"), (b"user-agent", f"olb/{__version__}")))
    if resp.status != 200:
        raise ScrapeError(f"GET {target.path} answered {resp.status}")
    encoding = resp.header(b"content-encoding")
    if encoding is not None and encoding.lower() != b"identity":
        raise ScrapeError(f"the page came {encoding.decode('latin-1')}-encoded")
    return resp.body

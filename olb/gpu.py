"""NVML polling: GPU loads pushed into the backend table.

Rules for this module: it reads NVML from a daemon thread and pushes
readings into `BackendTable.set_gpu_load`; the request path never waits on
NVML, it reads whatever was pushed last.  Nothing here may raise into the
caller or kill the thread: every NVML failure degrades to "load unknown",
which the table scores as an idle GPU, so choice falls back to in-flight
counts.

Theory of operation
-------------------
Each backend names the NVML indices of its GPUs (`gpu_map[i]`, empty for a
backend without GPU information).  A poll reads every named GPU once:

    util      = nvmlDeviceGetUtilizationRates(h).gpu / 100
    mem_free  = nvmlDeviceGetMemoryInfo(h).free / .total

and combines them per backend: utilisation is the mean over its GPUs (a
model split across GPUs is as busy as its average card), free memory is
sum(free) / sum(total) (the pool the backend can place models in).

Failures, each logged as one warning rather than one per poll:

    no GPU configured anywhere   nothing happens; pynvml is not even imported
    pynvml missing / no driver   one warning; loads stay unknown; thread ends
    GPU index beyond the count   one warning per index; that GPU is ignored
    a read fails during a poll   the backends using that GPU are cleared
                                 (stale data is worse than none); one warning
                                 per failure streak per GPU, one info line
                                 when it reads again
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Iterable, Sequence
from typing import Any, Callable, TypedDict

__all__ = ["GpuMonitor", "GpuReading", "NvmlUnavailable", "combine", "make_reading", "open_nvml",
           "publish", "read_gpu", "unpublish"]

#: Seconds stop() waits for the polling thread; a poll is a handful of NVML
#: calls (microseconds to milliseconds), so this only matters for a hung driver.
STOP_TIMEOUT = 5.0


class GpuReading(TypedDict):
    """One GPU's reading, as poll_once() returns it and `readings` keeps it."""

    util: float  # 0.0 idle .. 1.0 busy
    mem_free: float  # free fraction of the GPU's memory, 0.0 .. 1.0
    mem_free_bytes: int
    mem_total: int  # bytes


class GpuMonitor:
    """Polls NVML for the GPUs behind each backend and feeds the table."""

    def __init__(
        self,
        table: Any,
        gpu_map: Sequence[Sequence[int]],
        interval: float = 1.0,
        nvml: Any = None,
        logger: logging.Logger | None = None,
        memory: Callable[[int, int | None, int], None] | None = None,
    ) -> None:
        """Configure the monitor; nothing is polled until start() or poll_once().

        Args:
            table: the BackendTable (anything with set_gpu_load, clear_gpu_load
                and n).
            gpu_map: gpu_map[i] is the NVML indices behind backend i; empty
                for a backend without GPU information.
            interval: seconds between polls of the background thread.
            nvml: a module with pynvml's API (tests pass a fake); None imports
                pynvml (package nvidia-ml-py) on first use.
            logger: where warnings go; default the "olb.gpu" logger.
            memory: called as memory(i, free_bytes, gpus) with each backend's
                free GPU memory when the table gets its load, and with None
                when the table's reading is cleared
                (models.ModelDirectory.set_gpu_memory: where a model fits).

        Raises:
            ValueError: len(gpu_map) != table.n, a negative GPU index, or
                interval <= 0.
        """
        gpus = [tuple(int(g) for g in entry) for entry in gpu_map]
        if len(gpus) != table.n:
            raise ValueError(f"gpu_map has {len(gpus)} entries for {table.n} backends")
        if any(g < 0 for entry in gpus for g in entry):
            raise ValueError(f"GPU indices must be >= 0, got {gpus}")
        if not interval > 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval}")
        self._table = table
        self._memory = memory
        self._gpu_map = gpus
        self._all_gpus = sorted({g for entry in gpus for g in entry})
        self._interval = float(interval)
        self._nvml = nvml
        self._log = logger if logger is not None else logging.getLogger("olb.gpu")

        #: Last poll's readings per GPU index (GPUs read successfully):
        #: {"util", "mem_free"} as fractions, {"mem_free_bytes", "mem_total"}.
        self.readings: dict[int, GpuReading] = {}
        #: True once NVML initialised; False before, and for good after it failed.
        self.available = False

        self._lock = threading.Lock()  # one NVML conversation at a time
        self._state = "new"  # -> "ready" (-> "new" on stop) | "unavailable"
        self._handles: dict[int, Any] = {}
        self._missing: set[int] = set()  # warned: index beyond the GPU count
        self._failing: set[int] = set()  # warned: in a failure streak
        self._crashed = False  # logged an unexpected poll failure
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        """Start the polling thread (a daemon); no-op if no backend has GPUs.

        The thread initialises NVML, then polls every `interval` seconds until
        stop().  If NVML cannot be initialised it logs one warning and ends.
        """
        if not self._all_gpus or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="olb-gpu-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (waiting up to STOP_TIMEOUT) and shut NVML down."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(STOP_TIMEOUT)
        if not self._lock.acquire(timeout=STOP_TIMEOUT):
            self._log.warning("a GPU poll is stuck in NVML; not shutting NVML down")
            return
        try:
            if self._state == "ready":
                try:
                    self._nvml.nvmlShutdown()
                except self._nvml.NVMLError as exc:
                    self._log.warning("nvmlShutdown failed: %s", exc)
                self._handles.clear()
                self._state = "new"  # start() or poll_once() initialises again
                self.available = False
        finally:
            self._lock.release()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
                self._crashed = False
            except Exception:
                # A bug, or an exception NVML was not expected to raise: clear
                # every load (it would go stale), log once, keep polling.
                if not self._crashed:
                    self._crashed = True
                    self._log.exception("GPU poll failed unexpectedly; GPU loads cleared")
                self._clear_backends(range(len(self._gpu_map)))
            if self._state != "ready":
                return  # no NVML (warned once), or stop() ran
            self._stop.wait(self._interval)

    # -- polling ----------------------------------------------------------------

    def poll_once(self) -> dict[int, GpuReading]:
        """Read every configured GPU once and push the loads into the table.

        Initialises NVML on first use.  Never raises for NVML failures: they
        clear the affected backends' loads and are logged.

        Returns:
            This poll's readings per GPU index (only the GPUs read
            successfully): "util" and "mem_free" as fractions in [0, 1],
            "mem_free_bytes" and "mem_total" in bytes.
            Empty when no GPU is configured or NVML is unavailable.
        """
        if not self._all_gpus:
            return {}
        with self._lock:
            if self._state == "new":
                self._initialise()
            if self._state != "ready":
                return {}
            readings, failed = self._read_gpus()
            self.readings = readings
        self._push(readings, failed)
        return readings

    def _initialise(self) -> None:
        try:
            nvml, count = open_nvml(self._nvml)
        except NvmlUnavailable as exc:
            self._unavailable(str(exc))
            return
        self._nvml = nvml
        self._state = "ready"
        self.available = True
        for g in self._all_gpus:
            if g >= count:
                self._missing.add(g)
                self._log.warning(
                    "GPU %d is configured but NVML sees only %d GPU(s); ignoring it", g, count)

    def _unavailable(self, why: str) -> None:
        self._state = "unavailable"
        self.available = False
        self._log.warning(
            "NVML unavailable, GPU loads stay unknown (balancing on in-flight counts only): %s",
            why,
        )

    def _read_gpus(self) -> tuple[dict[int, GpuReading], set[int]]:
        nvml = self._nvml
        readings: dict[int, GpuReading] = {}
        failed: set[int] = set()
        for g in self._all_gpus:
            if g in self._missing:
                continue
            try:
                handle = self._handles.get(g)
                if handle is None:
                    handle = self._handles[g] = nvml.nvmlDeviceGetHandleByIndex(g)
                readings[g] = read_gpu(nvml, handle)
            except nvml.NVMLError as exc:
                failed.add(g)
                # A lost GPU ("GPU is lost", a driver reload) invalidates the
                # handle; fetch a fresh one next time.
                self._handles.pop(g, None)
                if g not in self._failing:
                    self._failing.add(g)
                    self._log.warning(
                        "reading GPU %d failed (%s); its backends fall back to in-flight counts",
                        g, exc)
                continue
            if g in self._failing:
                self._failing.discard(g)
                self._log.info("GPU %d reads again", g)
        return readings, failed

    def _push(self, readings: dict[int, GpuReading], failed: set[int]) -> None:
        stale = []
        for i, gpus in enumerate(self._gpu_map):
            present = [g for g in gpus if g not in self._missing]
            if not present:
                continue  # no GPU information: the table keeps "unknown"
            if any(g in failed for g in present):
                stale.append(i)
                continue
            publish(self._table, self._memory, i, [readings[g] for g in present])
        self._clear_backends(stale)

    def _clear_backends(self, backends: Iterable[int]) -> None:
        for i in backends:
            unpublish(self._table, self._memory, i)


# -- shared with olb.telemetry (DCGM scrapes) and olb.agent (the exporter) -------


class NvmlUnavailable(Exception):
    """NVML cannot be used on this machine; str() says why."""


def open_nvml(nvml: Any = None) -> tuple[Any, int]:
    """Import pynvml (unless a module is given), initialise NVML, count the GPUs.

    The import and nvmlInit happen here, never at module import: a machine
    without a driver (CI, a CPU-only proxy host) must not pay or fail.

    Returns:
        (the pynvml module, the number of GPUs NVML sees).

    Raises:
        NvmlUnavailable: pynvml is missing, or NVML failed to initialise
            (LibraryNotFound = no driver, DriverNotLoaded, NoPermission...).
    """
    if nvml is None:
        try:
            nvml = importlib.import_module("pynvml")
        except ImportError as exc:
            raise NvmlUnavailable(f"pynvml is not installed ({exc})") from None
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        raise NvmlUnavailable(f"{type(exc).__name__}: {exc}") from None
    try:
        count = nvml.nvmlDeviceGetCount()
    except nvml.NVMLError as exc:
        nvml.nvmlShutdown()
        raise NvmlUnavailable(f"nvmlDeviceGetCount: {type(exc).__name__}: {exc}") from None
    return nvml, count


def read_gpu(nvml: Any, handle: Any) -> GpuReading:
    """One GPU's utilisation and memory through NVML; raises nvml.NVMLError."""
    util = nvml.nvmlDeviceGetUtilizationRates(handle)
    mem = nvml.nvmlDeviceGetMemoryInfo(handle)
    return make_reading(util.gpu, mem.free, mem.total)


def make_reading(util_percent: float, free_bytes: float, total_bytes: float) -> GpuReading:
    """A GpuReading from raw figures, clamped into the table's ranges."""
    total = int(total_bytes)
    free = min(max(int(free_bytes), 0), total)
    return {
        "util": min(max(util_percent / 100.0, 0.0), 1.0),
        "mem_free": free / total if total > 0 else 0.0,
        "mem_free_bytes": free,
        "mem_total": total,
    }


def publish(table: Any, memory: Any, index: int, readings: Sequence[GpuReading]) -> None:
    """Push one backend's readings: its load to the table, its free memory to `memory`."""
    table.set_gpu_load(index, *combine(readings))
    if memory is not None:
        memory(index, sum(r["mem_free_bytes"] for r in readings), len(readings))


def unpublish(table: Any, memory: Any, index: int) -> None:
    """The backend's readings are gone: back to "unknown" in both places."""
    table.clear_gpu_load(index)
    if memory is not None:
        memory(index, None, 0)


def combine(readings: Sequence[GpuReading]) -> tuple[float, float]:
    """One backend's (util, mem_free) over its GPUs, for set_gpu_load.

    Utilisation is the mean (a model split across GPUs is as busy as its
    average card); free memory is sum(free) / sum(total), the pool the
    backend can place models in.  `readings` must not be empty.
    """
    util = sum(r["util"] for r in readings) / len(readings)
    total = sum(r["mem_total"] for r in readings)
    free = sum(r["mem_free_bytes"] for r in readings)
    return util, (free / total if total > 0 else 0.0)

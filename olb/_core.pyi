"""Type stubs for olb._core (the compiled backend table).

The docstrings in _core.pyx are the reference; these stubs carry the
signatures and a one-line summary each.
"""

from collections.abc import Sequence
from typing import Final, TypedDict

from typing_extensions import Buffer

NO_BACKEND: Final[int]  # == -1: acquire() found no eligible backend

def shared_size(n_backends: int, n_workers: int) -> int:
    """Bytes of the shared counter buffer: 8 * n_backends * (2 + n_workers)."""

class BackendSnapshot(TypedDict):
    inflight: int
    local_inflight: int
    capacity: int
    weight: float
    healthy: bool
    gpu_util: float | None
    gpu_mem_free: float | None
    served: int

class BackendTable:
    """Backends, their health and GPU load, and the shared in-flight counters."""

    @property
    def n(self) -> int:
        """Number of backends."""

    def __init__(
        self,
        capacities: Sequence[int],
        weights: Sequence[float] | None = None,
        *,
        shared: Buffer | None = None,
        worker: int = 0,
        workers: int = 1,
        seed: int | None = None,
        policy: str = "least_loaded",
    ) -> None:
        """policy: "least_loaded" or "round_robin". Raises ValueError on a bad capacity/weight/buffer/worker/policy."""

    def acquire(self, allowed: Buffer | None = None) -> int:
        """Pick a backend and count one request on it; NO_BACKEND if none fits."""

    def acquire_affine(self, key: int, allowed: Buffer | None = None, bound: float = 1.25) -> int:
        """Prefer the backend `key` hashes to while within the load bound; else acquire()."""

    def release(self, index: int) -> None:
        """Count one request as finished; ValueError if this worker holds none there."""

    def set_health(self, index: int, healthy: bool) -> None: ...
    def is_healthy(self, index: int) -> bool: ...
    def set_gpu_load(self, index: int, util: float, mem_free: float) -> None:
        """Record a GPU reading; util and mem_free in [0, 1], else ValueError."""

    def clear_gpu_load(self, index: int) -> None:
        """Forget the GPU reading: scored as an idle GPU again."""

    def inflight(self, index: int) -> int:
        """Requests in flight on the backend, all workers."""

    def served(self, index: int) -> int:
        """Requests completed on the backend, all workers."""

    def reclaim_worker(self, worker: int) -> int:
        """Zero a dead worker's shares, subtract them from the totals; returns the sum."""

    def snapshot(self) -> list[BackendSnapshot]:
        """One dict per backend, for the admin status endpoint."""

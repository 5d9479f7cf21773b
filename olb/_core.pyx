# cython: language_level=3, embedsignature=True
"""olb's compiled core: the backend table (who gets the next request).

Theory of operation
===================

What may live here: per-request decisions that must cost well under a
microsecond and touch no Python objects.  No IO, no logging, no clocks.

BackendTable
------------
One slot per backend.  Per-process state lives in plain C arrays inside the
object: capacity, weight, health and the last GPU reading pushed by
olb/gpu.py.  The in-flight counters live in a buffer shared by every worker
process (an anonymous MAP_SHARED mmap the supervisor creates before forking),
laid out as int64 words:

    totals[n]              in flight on backend i, summed over all workers
    served[n]              requests completed on backend i, all workers
    per_worker[workers][n] worker w's share of totals[i]

All three are touched only with GCC __atomic builtins.

Invariants, for every backend i:

    0 <= totals[i] <= capacity[i]
    0 <= per_worker[w][i], and totals[i] == sum over w of per_worker[w][i]
        (except for the instants between the two atomic steps below)

How each operation keeps them:

    acquire   Score the eligible backends on the counts just read, then
              compare-and-swap totals[i] from the count we scored (which was
              below capacity) to count + 1.  The CAS fails if any worker moved
              totals[i] in between; we then rescore, up to MAX_CAS_ATTEMPTS
              times.  After a successful CAS, per_worker[me][i] += 1.
    release   per_worker[me][i] -= 1 by CAS, refusing to go below zero (that
              is the "released an idle backend" error: every acquire is
              released exactly once, by the worker that acquired), then
              totals[i] -= 1 and served[i] += 1.
    reclaim   When the supervisor sees worker w die, it swaps each
              per_worker[w][i] to 0 and subtracts what it took from
              totals[i].  Only a dead worker may be reclaimed: a live one
              would find its later releases refused.

In both acquire and release the shared total moves on the side that errs
safe: a worker killed between the two steps leaks one slot (the total stays
one too high, so that backend runs one below capacity until the supervisor
creates a fresh buffer); it can never drive a total negative or above
capacity.

The default policy ranks backends by (inflight + 1) / (capacity * weight *
headroom) where headroom comes from the GPU utilisation; see
_pick_least_loaded.  The round_robin policy rotates over the eligible
backends instead (OLB_POLICY=round-robin); see _pick_round_robin.

The HTTP byte scanners (request heads, response body ends) live in
olb/_http.pyx: this module decides, that one frames.
"""

cimport cython
from cpython.buffer cimport (
    PyBUF_SIMPLE,
    PyBUF_WRITABLE,
    PyBuffer_Release,
    PyObject_GetBuffer,
)
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.math cimport NAN, ceil, isfinite, isnan
from libc.stdint cimport int64_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free

import operator
import os

cdef extern from *:
    """
    #include <stdint.h>

    /* The counters are shared between processes through a MAP_SHARED
       mapping.  That is only sound when 8-byte atomics are lock-free: a
       libatomic fallback would take a lock private to each process.  True on
       x86-64 and aarch64; refuse to build anywhere it is not. */
    _Static_assert(__atomic_always_lock_free(sizeof(int64_t), 0),
                   "olb needs lock-free 64-bit atomics");

    /* Loads used for scoring are hints (the CAS re-checks), hence relaxed.
       Read-modify-writes are acq_rel: cheap on x86 (every lock-prefixed
       instruction is a full barrier) and correct on weaker machines. */
    static inline int64_t olb_load(int64_t *p) {
        return __atomic_load_n(p, __ATOMIC_RELAXED);
    }
    static inline int olb_cas(int64_t *p, int64_t *expected, int64_t desired) {
        return __atomic_compare_exchange_n(p, expected, desired, 0,
                                           __ATOMIC_ACQ_REL, __ATOMIC_RELAXED);
    }
    static inline int64_t olb_add(int64_t *p, int64_t delta) {
        return __atomic_fetch_add(p, delta, __ATOMIC_ACQ_REL);
    }
    static inline int64_t olb_swap(int64_t *p, int64_t value) {
        return __atomic_exchange_n(p, value, __ATOMIC_ACQ_REL);
    }
    """
    int64_t olb_load(int64_t* p) noexcept nogil
    bint olb_cas(int64_t* p, int64_t* expected, int64_t desired) noexcept nogil
    int64_t olb_add(int64_t* p, int64_t delta) noexcept nogil
    int64_t olb_swap(int64_t* p, int64_t value) noexcept nogil


NO_BACKEND = -1

cdef enum:
    _NO_BACKEND = -1
    # A CAS on totals[i] fails only when another worker moved that counter
    # between our read and our swap (a ~100 ns window per scan at 64
    # backends).  64 consecutive losses means the table is churning faster
    # than we can scan it; answering "none" then is honest, and the caller
    # queues the request rather than spinning here with the GIL held.
    MAX_CAS_ATTEMPTS = 64
    _WORD = 8  # bytes per shared counter (int64)

cdef enum _Policy:
    POLICY_LEAST_LOADED = 0
    POLICY_ROUND_ROBIN = 1

_POLICIES = {"least_loaded": POLICY_LEAST_LOADED, "round_robin": POLICY_ROUND_ROBIN}

# A GPU at 100% utilisation still serves requests: NVML's "utilization" is the
# fraction of the last sample period (1/6 s to 1 s) in which any kernel ran,
# so one decode stream can read 100%.  The floor caps the penalty at 2x: a
# reading is up to a poll interval old (NVML 1 s, dcgm-exporter up to 30 s),
# and a steeper penalty (a 0.05 floor, 20x, was measured) herds every request
# of an interval onto the one GPU that happened to read idle -- on a one-model
# mix it doubled p99 TTFT against plain least-in-flight (bench/scheduling.py,
# control mix).  At 2x, in-flight counts stay the main signal and a busy GPU
# is still passed over while others have room.
cdef double GPU_HEADROOM_FLOOR = 0.5  # fraction of the GPU, dimensionless


cdef inline uint64_t _splitmix64(uint64_t x) noexcept:
    # Seeds the xorshift state from any 64-bit value, including 0 and small
    # consecutive seeds (Vigna, "splitmix64.c").
    x += <uint64_t>0x9E3779B97F4A7C15
    x = (x ^ (x >> 30)) * <uint64_t>0xBF58476D1CE4E5B9
    x = (x ^ (x >> 27)) * <uint64_t>0x94D049BB133111EB
    return x ^ (x >> 31)


def shared_size(Py_ssize_t n_backends, Py_ssize_t n_workers):
    """Size of the shared counter buffer for a table.

    Args:
        n_backends: number of backends (>= 1).
        n_workers: number of worker processes sharing the table (>= 1).

    Returns:
        Bytes needed: 8 * n_backends * (2 + n_workers).

    Raises:
        ValueError: a count is below 1.
    """
    if n_backends < 1:
        raise ValueError(f"n_backends must be >= 1, got {n_backends}")
    if n_workers < 1:
        raise ValueError(f"n_workers must be >= 1, got {n_workers}")
    return _WORD * n_backends * (2 + n_workers)


@cython.final
cdef class BackendTable:
    """The backends, their health and load, and the shared in-flight counters.

    Every method runs with the GIL held and never releases it, so one table is
    safe to use from several threads of one process (the event loop and
    olb/gpu.py's poller).  Across processes only the shared counters are
    common; health and GPU loads are per process.

    Create the table in each worker *after* fork: the tie-breaking generator
    is seeded at construction, and forked copies would break ties in step.
    """

    def __init__(self, capacities, weights=None, *, shared=None,
                 Py_ssize_t worker=0, Py_ssize_t workers=1, seed=None,
                 str policy="least_loaded"):
        """Build the table.

        Args:
            capacities: per backend, the most requests it may hold at once
                (ints >= 1).
            weights: per backend, a relative speed (floats > 0, finite);
                None means all 1.0.
            shared: a writable, 8-byte aligned buffer of at least
                shared_size(n, workers) bytes, zeroed before first use (an
                anonymous mmap is); the table holds a buffer export on it for
                its whole life, so an mmap cannot be closed underneath it.
                None allocates a private zeroed buffer (one process only).
            worker: this process's index in the shared buffer.
            workers: how many worker slots the shared buffer has.
            seed: seeds the tie-breaking generator; None draws from
                os.urandom.
            policy: the selection policy's name: "least_loaded" (the
                lowest load fraction, see _pick_least_loaded) or
                "round_robin" (the next eligible backend after the last
                one chosen; weights and GPU readings are not used).

        Raises:
            ValueError: a capacity < 1, a weight not > 0 or not finite, no
                backends, len(weights) != len(capacities), a shared buffer
                that is read-only, too small or misaligned, worker not in
                range(workers), or an unknown policy.
            TypeError: shared does not support the buffer protocol.
        """
        cdef Py_ssize_t i, n, size
        cdef int64_t* base
        cdef double w

        if self._capacity != NULL or self._private != NULL or self._has_view:
            raise RuntimeError("BackendTable.__init__ called twice")
        caps = [operator.index(c) for c in capacities]
        n = len(caps)
        if n < 1:
            raise ValueError("a BackendTable needs at least one backend")
        if weights is None:
            ws = [1.0] * n
        else:
            ws = [float(x) for x in weights]
            if len(ws) != n:
                raise ValueError(
                    f"{len(ws)} weights for {n} backends; pass one per backend")
        for i in range(n):
            if caps[i] < 1:
                raise ValueError(f"backend {i}: capacity must be >= 1, got {caps[i]}")
            w = ws[i]
            if not (w > 0 and isfinite(w)):
                raise ValueError(f"backend {i}: weight must be finite and > 0, got {w}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not 0 <= worker < workers:
            raise ValueError(f"worker must be in range({workers}), got {worker}")
        try:
            self._policy = _POLICIES[policy]
        except KeyError:
            raise ValueError(
                f"unknown policy {policy!r}; known: {', '.join(_POLICIES)}") from None
        size = shared_size(n, workers)

        if shared is None:
            self._private = <int64_t*>calloc(size // _WORD, _WORD)
            if self._private == NULL:
                raise MemoryError()
            base = self._private
        else:
            try:
                PyObject_GetBuffer(shared, &self._view, PyBUF_WRITABLE)
            except BufferError as exc:
                raise ValueError(f"shared buffer must be writable: {exc}") from None
            self._has_view = True
            if self._view.len < size:
                raise ValueError(
                    f"shared buffer is {self._view.len} bytes; {n} backends "
                    f"and {workers} workers need {size}")
            if (<uintptr_t>self._view.buf) % _WORD:
                raise ValueError("shared buffer must be 8-byte aligned")
            base = <int64_t*>self._view.buf

        self._capacity = <int64_t*>PyMem_Malloc(n * sizeof(int64_t))
        self._weight = <double*>PyMem_Malloc(n * sizeof(double))
        self._denom = <double*>PyMem_Malloc(n * sizeof(double))
        self._healthy = <unsigned char*>PyMem_Malloc(n)
        self._gpu_util = <double*>PyMem_Malloc(n * sizeof(double))
        self._gpu_mem_free = <double*>PyMem_Malloc(n * sizeof(double))
        if (self._capacity == NULL or self._weight == NULL or self._denom == NULL
                or self._healthy == NULL or self._gpu_util == NULL
                or self._gpu_mem_free == NULL):
            raise MemoryError()

        self.n = n
        self._worker = worker
        self._workers = workers
        self._totals = base
        self._served = base + n
        self._per_worker = base + 2 * n
        self._mine = self._per_worker + worker * n
        for i in range(n):
            self._capacity[i] = caps[i]
            self._weight[i] = ws[i]
            self._healthy[i] = 1
            self._gpu_util[i] = NAN
            self._gpu_mem_free[i] = NAN
            self._update_denom(i)

        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        self._rng = _splitmix64(<uint64_t>(seed & 0xFFFFFFFFFFFFFFFF))
        if self._rng == 0:  # the one state xorshift cannot leave
            self._rng = <uint64_t>0x9E3779B97F4A7C15

    def __dealloc__(self):
        if self._has_view:
            PyBuffer_Release(&self._view)
            self._has_view = False
        free(self._private)
        PyMem_Free(self._capacity)
        PyMem_Free(self._weight)
        PyMem_Free(self._denom)
        PyMem_Free(self._healthy)
        PyMem_Free(self._gpu_util)
        PyMem_Free(self._gpu_mem_free)

    # -- the hot path --------------------------------------------------------

    cpdef acquire(self, allowed=None):
        """Pick a backend and count one request on it.

        Args:
            allowed: None (every backend eligible) or a bytes-like object of
                length n whose nonzero bytes mark the eligible backends (to
                retry without a failed backend, or to filter by model).

        Returns:
            The backend's index, or NO_BACKEND (-1) when no healthy, allowed
            backend is below its capacity.  Each index returned must be
            passed to release() exactly once.

        Raises:
            ValueError: allowed does not have length n.
        """
        cdef Py_buffer view
        cdef Py_ssize_t index
        if allowed is None:
            return self._acquire(NULL)
        PyObject_GetBuffer(allowed, &view, PyBUF_SIMPLE)
        try:
            if view.len != self.n:
                raise ValueError(
                    f"allowed has {view.len} bytes for {self.n} backends")
            index = self._acquire(<const unsigned char*>view.buf)
        finally:
            PyBuffer_Release(&view)
        return index

    cpdef acquire_affine(self, uint64_t key, allowed=None, double bound=1.25):
        """Like acquire(), but prefer the backend a key hashes to.

        Consistent hashing with bounded loads (Mirrokni, Thorup and
        Zadimoghaddam, SODA 2018), in its rendezvous form: every eligible
        backend ranks by hash(key, index) and the highest-ranked one takes
        the request, unless its in-flight count would pass
        ceil(bound * (in flight in total + 1) * its share of the capacity);
        then the next one does. A conversation keeps returning to the
        backend that holds its prompt cache while that backend is not
        overloaded, and a backend joining or leaving moves only the keys
        it wins or held. When no backend is within the bound, the plain
        least-loaded choice is made.

        Args:
            key: 64-bit hash of the affinity key (the same in every worker:
                not Python's salted hash()).
            allowed: as for acquire().
            bound: the load bound c >= 1 (1.25 in the paper's experiments).

        Returns:
            The backend's index, or NO_BACKEND; release() it exactly once.

        Raises:
            ValueError: allowed does not have length n, or bound < 1.
        """
        cdef Py_buffer view
        cdef Py_ssize_t index
        if not bound >= 1.0:
            raise ValueError(f"bound must be >= 1, got {bound}")
        if allowed is None:
            return self._acquire_affine(NULL, key, bound)
        PyObject_GetBuffer(allowed, &view, PyBUF_SIMPLE)
        try:
            if view.len != self.n:
                raise ValueError(
                    f"allowed has {view.len} bytes for {self.n} backends")
            index = self._acquire_affine(<const unsigned char*>view.buf, key, bound)
        finally:
            PyBuffer_Release(&view)
        return index

    cpdef release(self, Py_ssize_t index):
        """Count one request on backend `index` as finished.

        Args:
            index: a value acquire() returned in this worker.

        Raises:
            IndexError: index is not a backend.
            ValueError: this worker holds no request in flight on that
                backend (a double release, or a release without acquire).
        """
        self._release(index)

    cdef Py_ssize_t _acquire(self, const unsigned char* allowed) noexcept:
        cdef int attempt
        cdef Py_ssize_t index
        cdef int64_t seen = 0
        for attempt in range(MAX_CAS_ATTEMPTS):
            index = self._pick(allowed, &seen)
            if index < 0:
                return _NO_BACKEND
            if self._claim(index, &seen):
                return index
        return _NO_BACKEND

    cdef inline bint _claim(self, Py_ssize_t index, int64_t* seen) noexcept:
        # The policy scored *seen, which was below capacity; the CAS
        # succeeds only if the count is still *seen, so capacity holds
        # whatever other workers did meanwhile.  When it fails, *seen is the
        # count now and the caller scores again.
        if olb_cas(&self._totals[index], seen, seen[0] + 1):
            olb_add(&self._mine[index], 1)
            return True
        return False

    cdef Py_ssize_t _acquire_affine(self, const unsigned char* allowed, uint64_t key,
                                    double bound) noexcept:
        cdef int attempt
        cdef Py_ssize_t index
        cdef int64_t seen = 0
        for attempt in range(MAX_CAS_ATTEMPTS):
            index = self._pick_affine(allowed, key, bound, &seen)
            if index < 0:
                index = self._pick(allowed, &seen)
                if index < 0:
                    return _NO_BACKEND
            if self._claim(index, &seen):
                return index
        return _NO_BACKEND

    cdef Py_ssize_t _pick_affine(self, const unsigned char* allowed, uint64_t key,
                                 double bound, int64_t* seen) noexcept:
        # Two passes over the eligible backends: the first sums their load
        # and capacity (weights and GPU headroom included, as _denom has
        # them), the second ranks by hash among those within the bound.
        # The ceil() is the paper's: with an idle fleet every backend may
        # take one request, so the top-ranked one always can.
        cdef Py_ssize_t i
        cdef Py_ssize_t best = _NO_BACKEND
        cdef int64_t count
        cdef int64_t best_count = 0
        cdef int64_t total = 0
        cdef double denom_sum = 0.0
        cdef double share
        cdef uint64_t h
        cdef uint64_t best_h = 0
        for i in range(self.n):
            if not self._healthy[i] or (allowed != NULL and not allowed[i]):
                continue
            total += olb_load(&self._totals[i])
            denom_sum += self._denom[i]
        if denom_sum <= 0.0:
            seen[0] = 0
            return _NO_BACKEND
        share = bound * <double>(total + 1) / denom_sum
        for i in range(self.n):
            if not self._healthy[i] or (allowed != NULL and not allowed[i]):
                continue
            count = olb_load(&self._totals[i])
            if count >= self._capacity[i]:
                continue
            if <double>(count + 1) > ceil(share * self._denom[i]):
                continue
            h = _splitmix64(key ^ _splitmix64(<uint64_t>(i + 1)))
            if best < 0 or h > best_h:
                best = i
                best_h = h
                best_count = count
        seen[0] = best_count
        return best

    cdef inline int64_t _eligible_count(self, const unsigned char* allowed,
                                        Py_ssize_t i) noexcept:
        # Backend i's in-flight count when it may take a request (healthy,
        # allowed, below capacity), else -1.
        cdef int64_t count
        if not self._healthy[i] or (allowed != NULL and not allowed[i]):
            return -1
        count = olb_load(&self._totals[i])
        return count if count < self._capacity[i] else -1

    cdef inline Py_ssize_t _pick(self, const unsigned char* allowed, int64_t* seen) noexcept:
        # The policy chosen at construction; each is a cdef method with this
        # signature: pick an eligible backend below capacity and set *seen
        # to its count as read, for _acquire's CAS.
        if self._policy == POLICY_ROUND_ROBIN:
            return self._pick_round_robin(allowed, seen)
        return self._pick_least_loaded(allowed, seen)

    cdef Py_ssize_t _pick_round_robin(self, const unsigned char* allowed,
                                      int64_t* seen) noexcept:
        # The first healthy, allowed backend below capacity at or after the
        # cursor, wrapping around; the cursor moves past it.  A backend that
        # is full, unhealthy or not allowed loses its turn (nginx's
        # round-robin skips such peers the same way).  The cursor is this
        # process's: with several workers each rotates on its own, and each
        # still spreads evenly.  It moves at the pick, before the CAS: when
        # the CAS loses, the retry tries the next backend, which is what a
        # rotation would do next anyway.
        cdef Py_ssize_t k, i
        cdef int64_t count
        for k in range(self.n):
            i = self._cursor + k
            if i >= self.n:
                i -= self.n
            count = self._eligible_count(allowed, i)
            if count < 0:
                continue
            self._cursor = i + 1 if i + 1 < self.n else 0
            seen[0] = count
            return i
        seen[0] = 0
        return _NO_BACKEND

    cdef Py_ssize_t _pick_least_loaded(self, const unsigned char* allowed,
                                       int64_t* seen) noexcept:
        # Among healthy, allowed backends below capacity, the minimum of
        #
        #     (inflight + 1) / (capacity * weight * headroom)
        #
        # i.e. the load fraction the backend would have after taking this
        # request (so idle big backends beat idle small ones, and a 1:2:4
        # capacity fleet fills 1:2:4).  headroom = max(FLOOR, 1 - gpu_util)
        # when a GPU reading is known, else 1.  GPU free memory is recorded
        # but deliberately not scored: Ollama keeps models resident, so low
        # free memory usually means "the model is warm here", which is a
        # reason to send more, not less.
        #
        # Ties (equal doubles) are broken uniformly at random by reservoir
        # sampling: the k-th equal-best replaces the pick with probability
        # 1/k.  Sets *seen to the chosen backend's count as scored.
        cdef Py_ssize_t i
        cdef Py_ssize_t best = _NO_BACKEND
        cdef uint64_t ties = 0
        cdef int64_t count
        cdef int64_t best_count = 0
        cdef double score
        cdef double best_score = 0.0
        for i in range(self.n):
            count = self._eligible_count(allowed, i)
            if count < 0:
                continue
            score = <double>(count + 1) / self._denom[i]
            if best < 0 or score < best_score:
                best = i
                best_score = score
                best_count = count
                ties = 1
            elif score == best_score:
                ties += 1
                # High half of xorshift64*'s output (its low bits are the
                # weak ones); modulo bias is ties / 2**32, negligible.
                if (self._next_random() >> 32) % ties == 0:
                    best = i
                    best_count = count
        seen[0] = best_count
        return best

    cdef int _release(self, Py_ssize_t index) except -1:
        cdef int64_t mine
        self._check_index(index)
        mine = olb_load(&self._mine[index])
        while True:
            if mine <= 0:
                raise ValueError(
                    f"release({index}): this worker has no request in flight "
                    f"on backend {index}")
            if olb_cas(&self._mine[index], &mine, mine - 1):
                break
        olb_add(&self._totals[index], -1)
        olb_add(&self._served[index], 1)
        return 0

    cdef uint64_t _next_random(self) noexcept:
        # xorshift64* (Vigna 2016): three shifts and a multiply, period 2**64-1.
        cdef uint64_t x = self._rng
        x ^= x >> 12
        x ^= x << 25
        x ^= x >> 27
        self._rng = x
        return x * <uint64_t>0x2545F4914F6CDD1D

    # -- health and load, pushed in ------------------------------------------

    def set_health(self, Py_ssize_t index, bint healthy):
        """Mark backend `index` healthy (eligible) or not.

        Raises:
            IndexError: index is not a backend.
        """
        self._check_index(index)
        self._healthy[index] = healthy

    cpdef is_healthy(self, Py_ssize_t index):
        """Returns: whether backend `index` is marked healthy.

        Raises:
            IndexError: index is not a backend.
        """
        self._check_index(index)
        return bool(self._healthy[index])

    def set_gpu_load(self, Py_ssize_t index, double util, double mem_free):
        """Record backend `index`'s latest GPU reading.

        Args:
            index: the backend.
            util: GPU utilisation, 0.0 (idle) to 1.0 (busy).
            mem_free: free fraction of GPU memory, 0.0 to 1.0 (recorded and
                reported; not scored, see _pick_least_loaded).

        Raises:
            IndexError: index is not a backend.
            ValueError: util or mem_free is outside [0, 1] (or NaN).
        """
        self._check_index(index)
        if not 0.0 <= util <= 1.0:
            raise ValueError(f"util must be in [0, 1], got {util}")
        if not 0.0 <= mem_free <= 1.0:
            raise ValueError(f"mem_free must be in [0, 1], got {mem_free}")
        self._gpu_util[index] = util
        self._gpu_mem_free[index] = mem_free
        self._update_denom(index)

    def clear_gpu_load(self, Py_ssize_t index):
        """Forget backend `index`'s GPU reading: it is scored as idle GPU.

        Raises:
            IndexError: index is not a backend.
        """
        self._check_index(index)
        self._gpu_util[index] = NAN
        self._gpu_mem_free[index] = NAN
        self._update_denom(index)

    cdef void _update_denom(self, Py_ssize_t index) noexcept:
        # Kept current on every change so the scan does one division.  The
        # order of the products is part of the contract: the reference
        # selector in tests/ multiplies in the same order, so equal real
        # scores are equal doubles in both.
        cdef double headroom = 1.0
        cdef double util = self._gpu_util[index]
        if not isnan(util):
            headroom = 1.0 - util
            if headroom < GPU_HEADROOM_FLOOR:
                headroom = GPU_HEADROOM_FLOOR
        self._denom[index] = (<double>self._capacity[index] * self._weight[index]) * headroom

    cdef int _check_index(self, Py_ssize_t index) except -1:
        if not 0 <= index < self.n:
            raise IndexError(f"backend index {index} out of range({self.n})")
        return 0

    # -- reading the counters -------------------------------------------------

    def inflight(self, Py_ssize_t index):
        """Returns: requests in flight on backend `index`, all workers.

        Raises:
            IndexError: index is not a backend.
        """
        self._check_index(index)
        return olb_load(&self._totals[index])

    def served(self, Py_ssize_t index):
        """Returns: requests completed on backend `index`, all workers.

        Raises:
            IndexError: index is not a backend.
        """
        self._check_index(index)
        return olb_load(&self._served[index])

    def reclaim_worker(self, Py_ssize_t worker):
        """Take back the requests a dead worker had in flight.

        For the supervisor, after it reaped worker `worker`: that worker's
        share of every backend's count goes to zero and is subtracted from
        the totals.  Never call it for a live worker: its later releases
        would be refused.

        Args:
            worker: index of the dead worker.

        Returns:
            How many in-flight requests were reclaimed, over all backends.

        Raises:
            ValueError: worker is not in range(workers).
        """
        cdef Py_ssize_t i
        cdef int64_t taken
        cdef int64_t total = 0
        cdef int64_t* share
        if not 0 <= worker < self._workers:
            raise ValueError(f"worker must be in range({self._workers}), got {worker}")
        share = self._per_worker + worker * self.n
        for i in range(self.n):
            taken = olb_swap(&share[i], 0)
            if taken:
                olb_add(&self._totals[i], -taken)
                total += taken
        return total

    def snapshot(self):
        """The table as plain data, for the admin status endpoint.

        Returns:
            One dict per backend: inflight (all workers), local_inflight
            (this worker), capacity, weight, healthy, gpu_util and
            gpu_mem_free (None when unknown), served.
        """
        cdef Py_ssize_t i
        out = []
        for i in range(self.n):
            util = self._gpu_util[i]
            mem = self._gpu_mem_free[i]
            out.append({
                "inflight": olb_load(&self._totals[i]),
                "local_inflight": olb_load(&self._mine[i]),
                "capacity": self._capacity[i],
                "weight": self._weight[i],
                "healthy": bool(self._healthy[i]),
                "gpu_util": None if isnan(util) else util,
                "gpu_mem_free": None if isnan(mem) else mem,
                "served": olb_load(&self._served[i]),
            })
        return out

# cython: language_level=3
#
# Typed layout of olb's compiled core (see the theory of operation at the top
# of _core.pyx).  Declared here, as uvloop does for its handles, so that other
# Cython modules may `cimport` the tables and call the cdef methods directly.

cimport cython
from cpython.buffer cimport Py_buffer
from libc.stdint cimport int64_t, uint64_t


@cython.final
cdef class BackendTable:
    # Geometry.
    cdef readonly Py_ssize_t n
    cdef Py_ssize_t _worker
    cdef Py_ssize_t _workers

    # Shared counters: pointers into the caller's buffer (or _private).
    cdef int64_t* _totals        # [n]            in flight, all workers
    cdef int64_t* _served        # [n]            completed, all workers
    cdef int64_t* _per_worker    # [workers][n]   each worker's share of _totals
    cdef int64_t* _mine          # _per_worker + worker * n
    cdef Py_buffer _view         # held for our lifetime: pins the mmap
    cdef bint _has_view
    cdef int64_t* _private       # calloc'ed when no shared buffer was given

    # Per-process state (plain C arrays, one slot per backend).
    cdef int64_t* _capacity
    cdef double* _weight
    cdef double* _denom          # capacity * weight * headroom, kept current
    cdef unsigned char* _healthy
    cdef double* _gpu_util       # NaN = unknown
    cdef double* _gpu_mem_free   # NaN = unknown

    cdef uint64_t _rng           # xorshift64* state, never 0

    cdef int _policy             # _Policy
    cdef Py_ssize_t _cursor      # round_robin: where the next scan starts

    cdef inline int64_t _eligible_count(self, const unsigned char* allowed, Py_ssize_t i) noexcept
    cdef inline Py_ssize_t _pick(self, const unsigned char* allowed, int64_t* seen) noexcept
    cdef Py_ssize_t _pick_round_robin(self, const unsigned char* allowed, int64_t* seen) noexcept
    cdef Py_ssize_t _pick_least_loaded(self, const unsigned char* allowed, int64_t* seen) noexcept
    cdef Py_ssize_t _acquire(self, const unsigned char* allowed) noexcept
    cdef inline bint _claim(self, Py_ssize_t index, int64_t* seen) noexcept
    cdef Py_ssize_t _acquire_affine(self, const unsigned char* allowed, uint64_t key, double bound) noexcept
    cdef Py_ssize_t _pick_affine(self, const unsigned char* allowed, uint64_t key, double bound, int64_t* seen) noexcept
    # The hot path, C calls from routing.py and balancer.py compiled.
    cpdef acquire(self, allowed=*)
    cpdef acquire_affine(self, uint64_t key, allowed=*, double bound=*)
    cpdef release(self, Py_ssize_t index)
    cpdef is_healthy(self, Py_ssize_t index)
    cdef int _release(self, Py_ssize_t index) except -1
    cdef int _check_index(self, Py_ssize_t index) except -1
    cdef void _update_denom(self, Py_ssize_t index) noexcept
    cdef uint64_t _next_random(self) noexcept

# cython: language_level=3
#
# The typed layout of models.py's ModelDirectory when it is compiled
# (Cython's pure-Python mode, as proxy.pxd; see docs/performance.md): its
# per-request reads and writes are C calls.

cimport cython

from olb._body cimport elements, members, routing_members


cdef class ModelDirectory:
    # Containers typed by kind, so that their lookups are C-API calls.
    cdef public dict installed, loaded, inflight, runners, ps_context, evicting, leaving, footprint, disk_size
    cdef public set placed, keyed
    cdef public list tags, ps, ps_names, room_models, room_vram, ps_vram, vram_free, gpu_count
    cdef public bytearray known
    cdef public object backends, interval, timeout, on_load, _layout, overhead, _recheck, _recheck_at
    cdef public list _recent
    cdef public Py_ssize_t _recent_at
    cdef public dict demand
    cdef public Py_ssize_t n

    cpdef installed_mask(self, model)
    cpdef loaded_mask(self, model)
    cpdef warm_mask(self, model, runner=*)
    @cython.locals(row=list)
    cpdef runner_matches(self, model, Py_ssize_t index, runner)
    cpdef held(self, model)
    @cython.locals(loaded=bytearray, installed=bytearray)
    cpdef mark_loaded(self, model, Py_ssize_t index)
    cpdef mark_placed(self, model, Py_ssize_t index, runner=*)
    @cython.locals(row=list)
    cpdef _set_runner(self, model, Py_ssize_t index, runner)
    cpdef answered(self, model, Py_ssize_t index, runner=*)
    @cython.locals(recent=list, demand=dict, at=Py_ssize_t)
    cpdef admitted(self, model, Py_ssize_t index, Py_ssize_t delta)
    cpdef waiting_for_load(self, model)


cpdef bint takes_slot(bytes method, bytes path)
cpdef parse_request(body)
cpdef bint well_formed(body) except -1
cpdef runner_key(options)
cpdef normalize(name)
@cython.locals(m=bytearray, i=Py_ssize_t)
cpdef bint any_set(mask) except -1

# Private module globals, typed: their lookups and .get() are C-API calls.
cdef dict _NORMALIZED
cdef object _last_name, _last_normalized
cdef frozenset _RELOAD_SET
cdef tuple _RELOAD_KEYS

# cython: language_level=3
#
# The typed layout of models.py's ModelDirectory when it is compiled
# (Cython's pure-Python mode, as proxy.pxd; see docs/performance.md): its
# per-request reads and writes are C calls.

cimport cython


cdef class ModelDirectory:
    cdef public object backends, interval, timeout, installed, loaded, known, tags, ps, ps_names
    cdef public object inflight, placed, on_load, room_models, room_vram, _layout, ps_vram
    cdef public object footprint, disk_size, overhead, vram_free, gpu_count, _recheck, _recheck_at
    cdef public object _recent, demand, runners, ps_context, keyed, evicting, leaving
    cdef public Py_ssize_t n

    cpdef installed_mask(self, model)
    cpdef loaded_mask(self, model)
    cpdef warm_mask(self, model, runner=*)
    cpdef runner_matches(self, model, Py_ssize_t index, runner)
    cpdef held(self, model)
    cpdef mark_loaded(self, model, Py_ssize_t index)
    cpdef mark_placed(self, model, Py_ssize_t index, runner=*)
    cpdef _set_runner(self, model, Py_ssize_t index, runner)
    cpdef answered(self, model, Py_ssize_t index, runner=*)
    cpdef admitted(self, model, Py_ssize_t index, Py_ssize_t delta)
    cpdef waiting_for_load(self, model)


cpdef bint takes_slot(bytes method, bytes path)
cpdef parse_request(body)
cpdef parse_request_whole(body)
cpdef _routed(model, messages, options)
cpdef runner_key(options)

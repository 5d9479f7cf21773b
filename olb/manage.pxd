# cython: language_level=3
#
# manage.py compiled (Cython's pure-Python mode, as proxy.pxd; see
# docs/performance.md): every request is classified, and every generate and
# chat request looked at as a possible `ollama stop`.

from olb._http cimport contains


cpdef classify(bytes method, bytes path, body=*)
cpdef stop_model(bytes path, body)

# Private module globals, typed: a request's lookups are C-API calls.
cdef dict _OPS
cdef frozenset _OP_PATHS

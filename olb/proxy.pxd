# cython: language_level=3
#
# The typed layout of proxy.py's classes when it is compiled (Cython's
# pure-Python mode: proxy.py stays plain Python, and runs as such when it is
# not compiled). With it, a request's path through these classes reads
# fields from C structs and calls the cpdef methods below as C functions,
# not through Python frames and attribute dictionaries. See docs/performance.md.

cimport cython

from olb._http cimport BodyScanner, ResponseHead
from olb._relay cimport Relay
from olb.balancer cimport Backend, Balancer
from olb.dashboard cimport Samples
from olb.hostcheck cimport HostCheck
from olb.http cimport ProxyRequest, RequestReader
from olb.models cimport ModelDirectory
from olb.pool cimport BackendPool
from olb.routing cimport Decision, Router
from olb.slowclient cimport RequestClock

# Functions of other compiled modules that a request calls: cimported, they
# are C calls (proxy.py's own imports of the same names serve it uncompiled).
from olb._http cimport parse_response_head, upstream_head_parts
from olb._relay cimport monotonic
from olb._tokens cimport response_tokens
from olb.admin cimport is_admin_path
from olb.http cimport downstream_head
from olb.manage cimport classify
from olb.metrics cimport Observed, observe
from olb.models cimport normalize, parse_request, takes_slot


cdef class Exchange  # (declared below; ClientSideProtocol's methods name it)


@cython.final
cdef class ProxyContext:
    cdef public object config, loop, clients, gpu, telemetry, worker, host_check, bodies
    cdef Balancer _balancer
    cdef public ModelDirectory models
    cdef public Router router
    cdef public list backends
    cdef public bytes session_header
    cdef public double session_bound, first_byte_timeout, idle_timeout
    cdef public Py_ssize_t resume_max_bytes
    cdef public Samples samples
    cdef public object resumes, keys, metrics, metrics_dir, access_log, backend_header
    cdef public double started
    cdef public bint closing, observing


@cython.final
cdef class ClientSideProtocol:
    cdef public ProxyContext ctx
    cdef public RequestReader reader
    cdef public RequestClock clock
    cdef public object transport, gate, exchange, peer_ip, _timer, listener, key
    cdef public bint write_paused, _closed
    cdef public double _last_active, _timer_at, t0

    cpdef _process(self)
    @cython.locals(exchange=Exchange, check=HostCheck)
    cpdef bint _request(self, ProxyRequest req) except -1
    cpdef _write_pending(self, reader)
    cpdef _reply(self, data, int status, bint closing, req=*, int logged=*)
    cpdef response_done(self, int status, bint closing)
    cpdef _partial(self, double now)
    cpdef _release_key(self)
    cpdef charge_tokens(self, tokens)
    cpdef abort(self)


@cython.final
cdef class Exchange(Observed):
    # (req, head, name, served, tokens, attempts, sent, slot, t_admit and
    # t_first are Observed's: metrics.pxd.)
    cdef public ClientSideProtocol client
    cdef public ProxyContext ctx
    cdef public BackendSideProtocol conn
    cdef public object allowed, queue_timer, queue_key, connect_task, model, excluded
    cdef public object affinity, runner, probing, kept, resumed
    cdef public Py_ssize_t index, state
    cdef public bint closing, reused_retry, rechecked
    cdef public double started, t_load
    cdef object __weakref__

    cpdef start(self)
    # (Typed locals: the directory's and the router's methods are C calls.)
    @cython.locals(router=Router, decision=Decision)
    cpdef _route(self)
    @cython.locals(models=ModelDirectory, backend=Backend)
    cpdef admit(self, Py_ssize_t index)
    cpdef _send(self, BackendSideProtocol conn, bint reused)
    @cython.locals(models=ModelDirectory)
    cpdef on_head(self, ResponseHead head, raw)
    @cython.locals(head=ResponseHead)
    cpdef on_end(self, bint reusable, last=*)
    cpdef _abort_conn(self)
    @cython.locals(models=ModelDirectory)
    cpdef _release(self)
    cpdef _fail(self, error)
    cpdef client_gone(self)


@cython.final
cdef class Continuation:
    cdef public object kind, body, splice, cause
    cdef public Py_ssize_t budget


@cython.final
cdef class MergedExchange:
    cdef public ClientSideProtocol client
    cdef public ProxyContext ctx
    cdef public object req, conn, task


# Not final: it overrides Relay's cpdef callbacks (_read_head, _end,
# _protocol_error), which Cython refuses in a final class.
cdef class BackendSideProtocol(Relay):
    cdef public BackendPool pool
    cdef public object loop, transport, gate, _buf, _timer
    cdef public Exchange exchange
    cdef public bint write_paused, _got_bytes, _reused, _closed, _head_request
    cdef public double _attached_at, _timer_at

    cpdef reusable(self)
    cpdef attach(self, Exchange exchange, bint reused)
    cpdef _arm(self, double deadline, double now)
    cpdef detach(self)
    cpdef close(self)
    cpdef abort(self)
    @cython.locals(head=ResponseHead)
    cpdef _finish(self, data, Py_ssize_t end)
    # Relay's callbacks (olb/_relay.pxd): C calls from its data_received.
    @cython.locals(ex=Exchange, head=ResponseHead, scanner=BodyScanner, size=Py_ssize_t, end=Py_ssize_t,
                   framing=int)
    cpdef _read_head(self, data)

# cython: language_level=3, embedsignature=True
"""olb's compiled relay: the per-chunk path of a proxied response.

Theory of operation
===================

What may live here: the work olb does for every read from a backend once the
response head is through -- forward the bytes, find the body's end, and for
a chat stream keep a reference to what went out (olb/resume.py reads it if
the backend dies: one list append per read, no copy) -- and nothing else.
Everything that happens once per request (heads, errors, timers, the pool)
stays in proxy.BackendSideProtocol (Python source, compiled as an extension
type that subclasses this one: docs/performance.md).

Why compiled: a streamed token is one read from the backend and one write to
the client, and at 1,000 open streams that is 50,000 reads a second.  With
data_received written in Python each read paid for an interpreter frame, a
loop.time() call and the attribute lookups: 236 ns per chunk against 80 ns
for this one (`pytest bench/test_bench_core.py -k relay --benchmark-only`,
200 NDJSON chunks a round).  uvloop calls it straight into C, and it reaches
the scanner and the clock without a Python call.

Relay is the base class of proxy.BackendSideProtocol.  It owns the fields
the per-chunk path reads, which the subclass also reads and writes (their
declarations are in _relay.pxd, so that the subclass can cimport them):

    head      the backend's response head once parsed (http.ResponseHead);
              None while it is being read, and data_received then hands the
              bytes to the subclass's _read_head
    scanner   the BodyScanner that finds where the body ends
    forward   the client transport's write while attached to an exchange,
              else None
    last_io   when the backend last sent bytes, in monotonic() seconds (the
              backend idle timer reads it)
    tail1, tail2  the last two reads forwarded whole (tail1 the newer), or
              None: with the read that ends the body they hold a response's
              last bytes, where Ollama's final line carries its token counts
              (read once per request, by metrics.read_tokens; here it costs
              two reference moves a chunk, no Python call)
    keep      a list that gets a reference to every bytes object forwarded
              (the body as it went to the client, for olb/resume.py to read
              if the stream breaks), or None: nothing kept
    keep_left bytes keep may still take (OLB_RESUME_MAX_BYTES); past it
              the list is emptied to [None] and keep set to None

and calls three methods the subclass defines:

    _read_head(data)          bytes that arrived while head is None
    _end(data, end)           the body ended: data[:end] is its tail
    _protocol_error(message)  the chunked framing is malformed

State machine, per response (the subclass drives every transition but the
last one, which the scanner reports):

    head is None --_read_head parses a head--> head set, scanner expecting
    head set     --each read-->                 forward(data)
    head set     --scanner finds the end-->     _end(data, end); the
                                                subclass resets head to None
                                                when it detaches
"""

cimport cython
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from ._http cimport BodyScanner


cdef inline double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cpdef double monotonic() noexcept:
    """Seconds on the relay's clock (CLOCK_MONOTONIC): the clock of Relay.last_io.

    The idle timer compares last_io with this, so both sides read one clock.
    """
    return _now()


cdef class Relay:
    """The body-forwarding half of a backend connection's protocol (see the module doc)."""


    def __cinit__(self, *args, **kwargs):
        # __cinit__ so that a subclass's __init__ need not call ours.
        self.head = None
        self.scanner = BodyScanner()
        self.forward = None
        self.last_io = 0.0
        self.tail1 = None
        self.tail2 = None
        self.keep = None
        self.keep_left = 0

    cdef int _keep(self, object data) except -1:
        # A reference, not a copy: the bytes object is the one forwarded.
        cdef list keep = <list?>self.keep
        cdef Py_ssize_t n = len(data)
        if n > self.keep_left:
            # Over the bound: let go of it all. [None] tells the exchange,
            # which holds the same list, that the stream was not kept whole.
            del keep[:]
            keep.append(None)
            self.keep = None
            return 0
        self.keep_left -= n
        keep.append(data)
        return 0

    cpdef _read_head(self, data):
        """Bytes that arrived while head is None (the subclass parses the head)."""
        raise NotImplementedError

    cpdef _end(self, data, Py_ssize_t end):
        """The body ended: data[:end] is its tail."""
        raise NotImplementedError

    cpdef _protocol_error(self, message):
        """The chunked framing is malformed."""
        raise NotImplementedError

    def keep_data(self, data):
        """Keep `data` as data_received keeps what it forwards (for body bytes
        forwarded from Python: those that arrive with the head)."""
        if self.keep is not None:
            self._keep(data)

    def data_received(self, data):
        """Called by the transport with bytes from the backend: forward them as they are."""
        cdef Py_ssize_t end
        if self.head is None:
            self._read_head(data)
            return
        self.last_io = _now()
        try:
            end = self.scanner.feed(data)
        except ValueError as exc:
            self._protocol_error(f"backend sent a malformed chunked body: {exc}")
            return
        if end < 0:
            self.tail2 = self.tail1
            self.tail1 = data
            if self.keep is not None:
                self._keep(data)
            self.forward(data)
        else:
            self._end(data, end)

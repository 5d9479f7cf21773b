# cython: annotation_typing=False, boundscheck=True, wraparound=True, cdivision=False
"""Limits on what a client may cost while it sends a request: time and held bytes.

Rules for this module: no sockets and no timers; the IO shell
(proxy.ClientSideProtocol) asks it when a partial request must end and
whether the worker holds too many body bytes, and does the IO itself. The
rules are in docs/operations.md, "Slow and hostile clients".

Theory of operation
-------------------
A request that has begun but is not complete (http.RequestReader.waiting is
HEAD or BODY) is timed from its first byte, not from its last: a keep-alive
timer that restarts on every byte lets a client that sends one byte a second
hold a connection forever.

    HEAD  the whole head within OLB_HEADER_TIMEOUT of its first byte (a head
          is at most 16 KiB, so a total time suffices)
    BODY  OLB_BODY_TIMEOUT from the end of the head, plus one second for each
          OLB_BODY_MIN_RATE bytes received (Apache mod_reqtimeout's
          `body=10,MinRate=1024`): a large body on a slow link gets the time
          it needs, a drip does not, and the total is bounded by
          OLB_MAX_BODY / OLB_BODY_MIN_RATE

Past either, the client gets 408 and the connection closes: no exchange
exists yet, so a response can still be written.

A streamed body (a blob upload, olb/manage.py) is timed by the BODY rule
too, while its exchange runs: no response is written before its body has
ended. Time during which olb itself holds the client back (flow.BODY: a
backend is behind) is not the client's: the clock restarts after it
(`restart_body`, looked at every quarter of OLB_BODY_TIMEOUT).

Request bodies are held whole before a backend is chosen (the model field
routes the request, and a complete body is what lets a request be retried on
another backend), so each worker counts the bytes of the requests it holds,
from their first byte until their response is done, in one BodyBudget. A
request still being read when the count is over OLB_MAX_BODY_HELD gets 503
and its connection closes: the memory of a worker stays under its baseline
plus that cap (plus one read, at most 256 KiB, per connection). Blob uploads
are not counted: their body is streamed (olb/manage.py) under flow control.
"""

from __future__ import annotations

from .http import BODY, HEAD


class BodyBudget:
    """Request body bytes held by one worker, against its cap (OLB_MAX_BODY_HELD)."""


    def __init__(self, cap: int):
        self.cap = cap
        self.held = 0

    @property
    def over(self) -> bool:
        return self.held > self.cap


class RequestClock:
    """One client connection's request in progress: when it began, what it holds.

    `received` and `done` bracket a request; `deadline` says when the request
    being read must be complete.
    """


    def __init__(self, budget: BodyBudget):
        self.budget = budget
        self.began: float | None = None       # the request's first byte
        self.body_began: float | None = None  # the first read that found its head complete
        self.body_base = 0                    # body bytes before body_began (restart_body)
        self.held = 0                         # bytes counted in budget for it

    def received(self, n: int, now: float) -> None:
        """Bytes of a request arrived (the request is not dispatched yet)."""
        if self.began is None:
            self.began = now
        self.held += n
        self.budget.held += n

    def done(self) -> None:
        """The request's response is finished (or the connection is gone): give its bytes back."""
        self.budget.held -= self.held
        self.held = 0
        self.began = None
        self.body_began = None
        self.body_base = 0

    def restart_body(self, now: float, body_bytes: int) -> None:
        """Time the body afresh from `now` (olb held the client back until then)."""
        self.body_began = now
        self.body_base = body_bytes

    def deadline(self, waiting: int, body_bytes: int, now: float, header_timeout: float,
                 body_timeout: float, min_rate: int) -> float:
        """When the request being read must be complete.

        Args:
            waiting: http.RequestReader.waiting (HEAD or BODY; IDLE has no deadline here).
            body_bytes: body bytes received so far (RequestReader.body_bytes).
            now: the loop's time, used as the start of what has not started.

        Returns:
            the loop time past which the client gets 408, or +inf for IDLE.
        """
        if self.began is None:
            self.began = now
        if waiting == HEAD:
            return self.began + header_timeout
        if waiting == BODY:
            if self.body_began is None:
                self.body_began = now
            return self.body_began + body_timeout + (body_bytes - self.body_base) / min_rate
        return float("inf")

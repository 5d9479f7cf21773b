"""Error types: flat, each carrying the HTTP status it turns into.

Expected failures (a full queue, an unreachable backend, a malformed request)
are handled inside the protocols: they become a response with `status_hint`
and Ollama's error shape, then the connection goes on or closes. Anything
else is a bug and reaches the loop's exception handler, where tests fail on
it. "No backend free right now" is not an exception at all: it leaves the
core as the value NO_BACKEND and the balancer queues the request.
"""


class OlbError(Exception):
    """Base class: a failure that becomes an HTTP error response."""

    status_hint = 500
    #: Seconds for a Retry-After header, or None for no header.
    retry_after: int | None = None

    def __init__(self, message: str, *, retry_after: int | None = None):
        super().__init__(message)
        self.message = message
        if retry_after is not None:
            self.retry_after = retry_after


class BadRequest(OlbError):
    """The client sent something that is not valid HTTP (h11's hint: 400 or 431)."""

    status_hint = 400

    def __init__(self, message: str, status_hint: int = 400):
        super().__init__(message)
        self.status_hint = status_hint


class PayloadTooLarge(OlbError):
    """The request body is over OLB_MAX_BODY."""

    status_hint = 413


class NotFound(OlbError):
    status_hint = 404


class NoBackendAvailable(OlbError):
    """Every backend is at capacity and the queue is full or the wait ran out."""

    status_hint = 503
    retry_after = 1


class TooManyRequests(OlbError):
    """This client holds more than its share of the queue."""

    status_hint = 429
    retry_after = 1


class BackendConnectError(OlbError):
    """No backend could be reached (refused, unreachable, reset before the first byte)."""

    status_hint = 502


class BackendProtocolError(OlbError):
    """A backend answered with something that is not a valid HTTP/1.1 response."""

    status_hint = 502


class BackendTimeout(OlbError):
    """A backend did not answer within OLB_FIRST_BYTE_TIMEOUT or went quiet mid-response."""

    status_hint = 504


class LocalResourceError(OlbError):
    """olb itself ran out of something (file descriptors, memory) before reaching a backend
    (olb/local.py): the backend is not to blame, the client may try again."""

    status_hint = 503
    retry_after = 1


class ConfigError(Exception):
    """Bad configuration: `olb-fast` prints it and exits with status 2.

    The message names the variable (or flag) and what it expected.
    """

    exit_status = 2

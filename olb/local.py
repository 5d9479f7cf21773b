"""Errors of the machine olb runs on: olb's fault, never a backend's.

Rules for this module: how to tell a local resource error from a backend's
failure, how to report it, and the start-up step that makes it rarer.
Nothing here decides a backend's health; the callers (proxy.Exchange._connect,
balancer.Balancer.probe, client.BackendClient) use `is_local` to keep such an
error from counting against the backend (docs/operations.md, "Failures and
retries").

A connect() that fails with EMFILE (this process is at its RLIMIT_NOFILE),
ENFILE (the system's file table is full), ENOBUFS or ENOMEM never reached
the backend: marking the backend down for it would take healthy backends out
exactly when olb is busiest. The request is refused with 503 and
Retry-After instead, and the error is logged once per LOG_EVERY seconds
however many requests hit it.
"""

from __future__ import annotations

import errno
import logging
import resource
import time

log = logging.getLogger("olb.local")

#: errno values that say this machine is out of something, not that the peer failed.
LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: Seconds between two log lines about local resource errors.
LOG_EVERY = 60.0

_last_logged = float("-inf")
_suppressed = 0


def is_local(exc: BaseException | None) -> bool:
    """Is `exc` (or the OSError behind it) a resource error of this machine?"""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in LOCAL_ERRNOS:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def describe(exc: OSError) -> str:
    """What a client is told: olb's own resource ran out (the backend was not reached)."""
    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    hint = " (raise RLIMIT_NOFILE: ulimit -n)" if exc.errno == errno.EMFILE else ""
    return f"olb is out of a local resource, {name}: {exc.strerror}{hint}; the backend was not reached"


def report(what: str, exc: OSError) -> None:
    """Log a local resource error, once per LOG_EVERY seconds."""
    global _last_logged, _suppressed
    now = time.monotonic()
    if now - _last_logged < LOG_EVERY:
        _suppressed += 1
        return
    more = f" ({_suppressed} more since the last report)" if _suppressed else ""
    log.error("%s: %s%s", what, describe(exc), more)
    _last_logged = now
    _suppressed = 0


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit, as nginx's worker_rlimit_nofile lets one do.

    Each client and each backend connection is a descriptor; distributions
    start processes with a soft limit of 1,024, a few hundred streams' worth.

    Returns:
        (the soft limit before, the soft limit now).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning("could not raise RLIMIT_NOFILE from %d to %d: %s", soft, hard, exc)
        return soft, soft
    return soft, hard

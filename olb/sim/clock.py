"""Wall-clock timestamps in Go's formats, real or frozen.

Go marshals time.Time as RFC 3339 with nanoseconds and trailing zeros
trimmed (time.Time.MarshalJSON): `created_at` is UTC ("2023-08-04T19:22:45.499127Z"),
`expires_at`/`modified_at` are in the local zone ("...31.83753-07:00", or
"...Z" where the zone's offset is 0).  A line is built per token, so the
formatting caches the per-second part.

With `deterministic_time` every timestamp is frozen at FIXED_TIME, so two
fetches of the same request are byte-identical (durations are made nominal
by the API layer).
"""

from __future__ import annotations

import time

_time_ns = time.time_ns

# 2024-06-01T12:00:00Z: an arbitrary, recognisable instant.
FIXED_TIME_NS = 1717243200 * 1_000_000_000


def _frac(ns: int) -> str:
    if not ns:
        return ""
    return "." + f"{ns:09d}".rstrip("0")


def _offset(tm: time.struct_time) -> str:
    off = tm.tm_gmtoff or 0
    if off == 0:
        return "Z"
    sign = "+" if off > 0 else "-"
    off = abs(off)
    return f"{sign}{off // 3600:02d}:{off % 3600 // 60:02d}"


def format_utc(ns: int) -> str:
    """RFC 3339 nano, UTC, as Go's time.Time JSON."""
    sec, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + _frac(frac) + "Z"


def format_local(ns: int) -> str:
    """RFC 3339 nano in the local zone."""
    sec, frac = divmod(ns, 1_000_000_000)
    # Go's MaxInt64 duration lands ~292 years ahead, past time_t on some
    # platforms' localtime; cap at year 9999 like a sane formatter.
    sec = min(sec, 253402300799)
    tm = time.localtime(sec)
    return time.strftime("%Y-%m-%dT%H:%M:%S", tm) + _frac(frac) + _offset(tm)


class Clock:
    """The instance's wall clock: created_at bytes per token, fast."""

    __slots__ = ("frozen", "_sec", "_sec_text", "_fixed_utc")

    def __init__(self, frozen: bool = False):
        self.frozen = frozen
        self._sec = -1
        self._sec_text = b""
        self._fixed_utc = format_utc(FIXED_TIME_NS).encode()

    def now_ns(self) -> int:
        return FIXED_TIME_NS if self.frozen else time.time_ns()

    def now(self) -> float:
        return self.now_ns() / 1e9

    def created_at(self) -> bytes:
        """Now as UTC RFC 3339 nano (what goes inside the JSON quotes)."""
        if self.frozen:
            return self._fixed_utc
        ns = _time_ns()
        sec = ns // 1_000_000_000
        if sec != self._sec:
            self._sec = sec
            self._sec_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)).encode()
        frac = ns - sec * 1_000_000_000
        if frac:
            return (b"%b.%09d" % (self._sec_text, frac)).rstrip(b"0") + b"Z"
        return self._sec_text + b"Z"

    def created_unix(self) -> int:
        """Seconds, for the OpenAI `created` field."""
        return self.now_ns() // 1_000_000_000

    def local(self, ns: int) -> str:
        return format_local(ns)

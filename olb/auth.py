"""Access control: API keys with limits (OLB_API_KEYS) and the admin token (OLB_ADMIN_TOKEN).

Rules for this module: what a key may do, decided from the request's
Authorization header and the key's own counters; no sockets, no timers.
The design is in docs/operations.md, "Access control" and "Admin listener".

Theory of operation
-------------------
OLB_API_KEYS names a file of keys, one a line, each optionally followed by
limits in the OLB_BACKENDS style:

    # team A: 8 at a time, 600 requests and 200,000 tokens a minute
    sk-team-a;concurrent=8;rpm=600;tpm=200000
    sk-team-b

A client sends its key as `Authorization: Bearer KEY` (what the `ollama` and
`openai` clients send when given one). Each request is checked before it is
routed: no key or an unknown one is 401; a key over a limit is 429 with
Retry-After (when the oldest request or token in the window leaves it, for
the per-minute limits). A key's requests count against `concurrent` from the
check until their response ends or the client leaves; `rpm` counts requests
started in the last 60 s and `tpm` tokens charged in the last 60 s (charged
when a response's token counts are known: Ollama's `prompt_eval_count` plus
`eval_count`, OpenAI's `usage`).

With OLB_WORKERS=N each worker keeps its own counters and enforces its share
of each limit, ceil(limit / N): requests spread over the workers by the
kernel (SO_REUSEPORT), so the group as a whole holds close to the limit.

The file is re-read by reload() (SIGHUP); a key that stays keeps its counters,
and a bad file is refused whole with the old keys kept.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import math
import time
from dataclasses import dataclass

from .errors import ConfigError

#: Seconds the per-minute limits look back.
WINDOW = 60.0

#: check() results besides a key: why a request is refused.
MISSING = "missing"
UNKNOWN = "unknown"


@dataclass(frozen=True)
class KeyLimits:
    """One line of the keys file; 0 = no limit."""

    key: bytes
    concurrent: int = 0
    rpm: int = 0
    tpm: int = 0


def parse_keys(text: str, source: str = "OLB_API_KEYS") -> dict[bytes, KeyLimits]:
    """The keys of a keys file's text, by key.

    Raises:
        ConfigError: naming `source`, the line and what it expected.
    """
    keys: dict[bytes, KeyLimits] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key, *opts = (p.strip() for p in line.split(";"))
        where = f"{source} line {number}"
        if not key or any(c.isspace() or ord(c) < 0x21 or ord(c) > 0x7e for c in key):
            raise ConfigError(f"{where}: expected a key of printable ASCII without spaces, got {key!r}")
        limits: dict[str, int] = {}
        for opt in opts:
            name, sep, value = opt.partition("=")
            name = name.strip().lower()
            if not sep or name not in ("concurrent", "rpm", "tpm"):
                raise ConfigError(f"{where}: bad option {opt!r}: expected concurrent=N, rpm=N or tpm=N")
            try:
                limits[name] = int(value)
            except ValueError:
                limits[name] = -1
            if limits[name] < 1:
                raise ConfigError(f"{where}: bad option {opt!r}: expected an integer >= 1")
        raw = key.encode()
        if raw in keys:
            raise ConfigError(f"{where}: key {key[:6]}... is listed twice")
        keys[raw] = KeyLimits(raw, **limits)
    return keys


def load_keys(path: str, source: str = "OLB_API_KEYS") -> dict[bytes, KeyLimits]:
    """parse_keys() of a file.

    Raises:
        ConfigError: the file cannot be read or a line is wrong.
    """
    where = f"{source} ({path})" if source else path
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: cannot read it: {getattr(exc, 'strerror', None) or exc}") from None
    return parse_keys(text, where)


def bearer(value: bytes | None) -> bytes | None:
    """The token of an `Authorization: Bearer TOKEN` value, or None."""
    if value is None or value[:7].lower() != b"bearer ":
        return None
    token = value[7:].strip()
    return token or None


class _Usage:
    """One key's counters in this worker."""

    __slots__ = ("inflight", "starts", "tokens", "token_sum")

    def __init__(self):
        self.inflight = 0
        self.starts: collections.deque = collections.deque()   # monotonic start times
        self.tokens: collections.deque = collections.deque()   # (monotonic time, tokens)
        self.token_sum = 0


class Refusal:
    """Why check() refused a request: the status, the message and Retry-After."""

    __slots__ = ("status", "message", "retry_after")

    def __init__(self, status: int, message: str, retry_after: int | None = None):
        self.status = status
        self.message = message
        self.retry_after = retry_after


class KeyRing:
    """The keys of one worker and each key's usage.

    Args:
        keys: parse_keys()'s result.
        path: the file they came from (reload() reads it again), or None.
        workers: OLB_WORKERS: each limit is shared out over them.
        clock: a monotonic clock (tests pass their own).
    """

    def __init__(self, keys: dict[bytes, KeyLimits], path: str | None = None, workers: int = 1,
                 clock=time.monotonic):
        self.keys = keys
        self.path = path
        self.workers = max(1, workers)
        self.clock = clock
        self._usage: dict[bytes, _Usage] = {}
        #: Refusals so far, by reason (missing, unknown, concurrent, rpm, tpm).
        self.refused: collections.Counter = collections.Counter()

    def reload(self) -> str | None:
        """Read the keys file again; None on success, else why it was refused
        (the old keys stay). Counters of keys that stay are kept."""
        if self.path is None:
            return "no keys file"
        try:
            keys = load_keys(self.path)
        except ConfigError as exc:
            return str(exc)
        self.keys = keys
        for key in [k for k in self._usage if k not in keys]:
            del self._usage[key]
        return None

    def _share(self, limit: int) -> int:
        return limit if self.workers == 1 else max(1, math.ceil(limit / self.workers))

    def check(self, authorization: bytes | None) -> bytes | Refusal:
        """The key of a request about to start, counted as started and in
        flight (release() it when its response ends), or a Refusal (401, 429)."""
        token = bearer(authorization)
        if token is None:
            self.refused[MISSING] += 1
            return Refusal(401, "unauthorized: send an API key as 'Authorization: Bearer KEY'")
        # A dict lookup: its time depends on the token's hash, not on how
        # much of a guess matches a key (hash first, then one comparison).
        limits = self.keys.get(token)
        if limits is None:
            self.refused[UNKNOWN] += 1
            return Refusal(401, "unauthorized: unknown API key")
        key = limits.key
        usage = self._usage.get(key)
        if usage is None:
            usage = self._usage[key] = _Usage()
        now = self.clock()
        self._expire(usage, now)
        if limits.concurrent and usage.inflight >= self._share(limits.concurrent):
            self.refused["concurrent"] += 1
            return Refusal(429, f"too many requests: this API key has {limits.concurrent} running "
                                f"(its concurrent= limit)", 1)
        if limits.rpm and len(usage.starts) >= self._share(limits.rpm):
            self.refused["rpm"] += 1
            wait = usage.starts[0] + WINDOW - now
            return Refusal(429, f"too many requests: this API key has made {limits.rpm} requests in the "
                                f"last minute (its rpm= limit)", max(1, math.ceil(wait)))
        if limits.tpm and usage.token_sum >= self._share(limits.tpm):
            self.refused["tpm"] += 1
            wait = self._tokens_free_at(usage, self._share(limits.tpm)) - now
            return Refusal(429, f"too many tokens: this API key has used {limits.tpm} tokens in the "
                                f"last minute (its tpm= limit)", max(1, math.ceil(wait)))
        usage.inflight += 1
        usage.starts.append(now)
        return key

    def release(self, key: bytes) -> None:
        """A request check() let through has ended (its response, or its client, is gone)."""
        usage = self._usage.get(key)
        if usage is not None and usage.inflight > 0:
            usage.inflight -= 1

    def charge(self, key: bytes, tokens: int) -> None:
        """Count `tokens` (prompt and generated) against the key's tpm= limit."""
        if tokens <= 0:
            return
        usage = self._usage.get(key)
        if usage is None:
            return  # a key removed by a reload while its request ran
        usage.tokens.append((self.clock(), tokens))
        usage.token_sum += tokens

    def _expire(self, usage: _Usage, now: float) -> None:
        horizon = now - WINDOW
        starts = usage.starts
        while starts and starts[0] <= horizon:
            starts.popleft()
        tokens = usage.tokens
        while tokens and tokens[0][0] <= horizon:
            usage.token_sum -= tokens.popleft()[1]

    @staticmethod
    def _tokens_free_at(usage: _Usage, limit: int) -> float:
        """When enough charged tokens have left the window for the sum to be under `limit`."""
        left = usage.token_sum
        for at, n in usage.tokens:
            left -= n
            if left < limit:
                return at + WINDOW
        return usage.tokens[-1][0] + WINDOW if usage.tokens else 0.0

    def status(self) -> dict:
        """For /olb/status: per key (its first characters only), in flight and the window's counts."""
        now = self.clock()
        rows = []
        for key, limits in self.keys.items():
            usage = self._usage.get(key)
            if usage is not None:
                self._expire(usage, now)
            rows.append({"key": redact(key), "concurrent": limits.concurrent, "rpm": limits.rpm,
                         "tpm": limits.tpm, "inflight": usage.inflight if usage else 0,
                         "requests_last_minute": len(usage.starts) if usage else 0,
                         "tokens_last_minute": usage.token_sum if usage else 0})
        return {"keys": rows, "refused": dict(self.refused)}


def redact(key: bytes) -> str:
    """What of a key may be shown (status pages, the dashboard): its first
    characters and a short fingerprint, to tell keys with one prefix apart."""
    text = key.decode("ascii", "replace")
    return (text[:6] if len(text) > 8 else text[:2]) + "..." + hashlib.sha256(key).hexdigest()[:4]


def token_matches(expected: bytes, authorization: bytes | None) -> bool:
    """Whether an Authorization header carries the admin token (constant time)."""
    token = bearer(authorization)
    return token is not None and hmac.compare_digest(expected, token)


def refusal_response(req, refusal: Refusal) -> bytes:
    """The response to a request check() refused: Ollama's error shape (OpenAI's
    under /v1), WWW-Authenticate with a 401, Retry-After with a 429."""
    from .http import error_body, simple_response

    extra = []
    if refusal.status == 401:
        extra.append((b"www-authenticate", b'Bearer realm="olb"'))
    if refusal.retry_after is not None:
        extra.append((b"retry-after", b"%d" % refusal.retry_after))
    return simple_response(refusal.status, error_body(req.target, refusal.message, refusal.status),
                           closing=not req.keep_alive, extra=extra, head_only=req.method == b"HEAD")

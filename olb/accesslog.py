# cython: annotation_typing=False, boundscheck=True, wraparound=True, cdivision=False
"""The access log (one line per request) and the format of all of olb's logs.

OLB_ACCESS_LOG says where access lines go: `stderr`, a file path (opened
for appending; reopened on SIGUSR1, for logrotate), or `off`.
OLB_LOG_FORMAT says how every log line is written: `text` or `json` (one
object a line). The fields are listed in docs/operations.md, "Access log".

Lines are not written one syscall each: a request appends its line to a
buffer, and the buffer is written out LOG_FLUSH seconds after the first
line in it (or at once past LOG_BUFFER bytes), in whole lines, so workers
appending to one file (O_APPEND) never interleave within a line.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import orjson

#: Seconds an access line may wait in the buffer before it is written.
LOG_FLUSH = 0.1
#: Bytes of buffered lines that are written at once.
LOG_BUFFER = 64 * 1024

log = logging.getLogger("olb.accesslog")


_second = [-1, ""]


def _iso(t: float) -> str:
    """RFC 3339 UTC time with milliseconds (what log shippers parse without a pattern)."""
    sec = int(t)
    if sec != _second[0]:  # strftime once a second, not once a line
        _second[0], _second[1] = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"{_second[1]}.{int(t * 1000) % 1000:03d}Z"


def _ms(seconds: float | None):
    return None if seconds is None else round(seconds * 1000, 1)


class AccessLog:
    """One worker's access log writer (see the module doc)."""

    def __init__(self, target: str, fmt: str, loop):
        self.target = target
        self.json = fmt == "json"
        self.loop = loop
        self._fd = -1
        self._own = False
        self._buf: list[bytes] = []
        self._size = 0
        self._timer = None
        self._second, self._prefix = -1, b""
        self.open()

    def open(self) -> None:
        if self.target == "stderr":
            self._fd, self._own = sys.stderr.fileno(), False
        else:
            self._fd = os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            self._own = True

    def reopen(self) -> None:
        """SIGUSR1: write what is buffered, then open the path again (logrotate moved the old file)."""
        self.flush()
        if self._own:
            old = self._fd
            try:
                self.open()
            except OSError as exc:
                log.error("OLB_ACCESS_LOG: cannot reopen %s: %s; still writing to the old file",
                          self.target, exc.strerror or exc)
                return
            os.close(old)
        log.info("access log reopened")

    def close(self) -> None:
        self.flush()
        if self._own and self._fd >= 0:
            os.close(self._fd)
        self._fd = -1

    def write(self, client: bytes, method: bytes, target: bytes, model: str, backend: str, status: int,
              queue_wait: float | None, ttft: float | None, duration: float, sent: int, tokens,
              retries: int) -> None:
        """Append one request's line (the request path: a format and a list append)."""
        now = time.time()
        prompt, generated = (tokens[0], tokens[1]) if tokens is not None else (None, None)
        if self.json:
            line = orjson.dumps({
                "time": _iso(now), "type": "access", "client": client.decode("latin-1"),
                "method": method.decode("latin-1"), "path": target.decode("latin-1"), "model": model or None,
                "backend": backend or None, "status": status, "queue_ms": _ms(queue_wait), "ttft_ms": _ms(ttft),
                "duration_ms": _ms(duration), "bytes": sent, "prompt_tokens": prompt,
                "eval_tokens": generated, "retries": retries}) + b"\n"
        else:
            # One field per column, `-` for none: what awk and grep expect of
            # an access log. The path is quoted (it may hold spaces, %-encoded or not).
            sec = int(now)
            if sec != self._second:  # strftime once a second, not once a line
                self._second = sec
                self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)).encode()
            line = b'%s.%03dZ %s "%s %s" %s %s %d %s %s %.3f %s %s %s %d\n' % (
                self._prefix, int((now - sec) * 1000), client, method, target, model.encode() if model else b"-",
                backend.encode() if backend else b"-", status, _fmt(queue_wait), _fmt(ttft), duration,
                _num(sent), _num(prompt), _num(generated), retries)
        self._buf.append(line)
        self._size += len(line)
        if self._size >= LOG_BUFFER:
            self.flush()
        elif self._timer is None:
            self._timer = self.loop.call_later(LOG_FLUSH, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._buf or self._fd < 0:
            return
        data = b"".join(self._buf)
        self._buf.clear()
        self._size = 0
        try:
            while data:
                n = os.write(self._fd, data)
                data = data[n:]
        except OSError as exc:
            # A full disk must not take the proxy down: the lines are lost, said once per flush.
            log.error("OLB_ACCESS_LOG: cannot write to %s: %s", self.target, exc.strerror or exc)


def _fmt(seconds: float | None) -> bytes:
    return b"-" if seconds is None else b"%.3f" % seconds


def _num(value) -> bytes:
    return b"-" if value is None else b"%d" % value


class JsonFormatter(logging.Formatter):
    """OLB_LOG_FORMAT=json for olb's other logs: one object a line."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {"time": _iso(record.created), "level": record.levelname.lower(), "logger": record.name,
               "pid": record.process, "message": record.getMessage()}
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(doc).decode()


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


def configure_logging(level: int, fmt: str) -> None:
    """The root logger on stderr, in OLB_LOG_FORMAT."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)

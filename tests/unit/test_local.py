"""olb/local.py: which errors are this machine's, and how often they are logged."""

import errno
import logging

import pytest

from olb import local
from olb.errors import LocalResourceError


def _chained() -> BaseException:
    try:
        try:
            raise OSError(errno.EMFILE, "Too many open files")
        except OSError as exc:
            raise LocalResourceError("wrapped") from exc
    except LocalResourceError as exc:
        return exc


@pytest.mark.parametrize("exc, expected", [
    (OSError(errno.EMFILE, "Too many open files"), True),
    (OSError(errno.ENFILE, "Too many open files in system"), True),
    (OSError(errno.ENOBUFS, "No buffer space available"), True),
    (OSError(errno.ENOMEM, "Cannot allocate memory"), True),
    (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), False),
    (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), False),
    (OSError(errno.EHOSTUNREACH, "No route to host"), False),
    (TimeoutError(), False),
    (None, False),
])
def test_is_local(exc, expected):
    assert local.is_local(exc) is expected


def test_is_local_follows_the_cause():
    assert local.is_local(_chained())


def test_describe_names_the_errno_and_the_limit():
    text = local.describe(OSError(errno.EMFILE, "Too many open files"))
    assert "EMFILE" in text and "RLIMIT_NOFILE" in text and "not reached" in text


def test_report_logs_once_per_interval(monkeypatch, caplog):
    now = [1000.0]
    monkeypatch.setattr(local.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(local, "_last_logged", float("-inf"))
    monkeypatch.setattr(local, "_suppressed", 0)
    exc = OSError(errno.EMFILE, "Too many open files")
    with caplog.at_level(logging.ERROR, logger="olb.local"):
        for _ in range(5):
            local.report("connect", exc)
        now[0] += local.LOG_EVERY
        local.report("connect", exc)
    assert len(caplog.records) == 2
    assert "4 more since the last report" in caplog.records[1].getMessage()


@pytest.mark.parametrize("soft, hard, expected, calls", [
    (1024, 65536, (1024, 65536), [(65536, 65536)]),
    (65536, 65536, (65536, 65536), []),
])
def test_raise_nofile_limit(monkeypatch, soft, hard, expected, calls):
    seen = []
    monkeypatch.setattr(local.resource, "getrlimit", lambda _: (soft, hard))
    monkeypatch.setattr(local.resource, "setrlimit", lambda _, lim: seen.append(lim))
    assert local.raise_nofile_limit() == expected
    assert seen == calls

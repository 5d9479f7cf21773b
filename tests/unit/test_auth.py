"""olb/auth.py and the admin gate's pure parts: the keys file, the limits
on a fake clock, the cross-site check, and the token counts of a final line."""

import pytest

from olb import admin, auth
from olb.dashboard import Samples
from olb.metrics import read_tokens
from olb.errors import ConfigError
from olb.http import ProxyRequest


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


@pytest.mark.parametrize("text, expected", [
    ("", {}),
    ("# only a comment\n\n", {}),
    ("sk-a\n", {b"sk-a": auth.KeyLimits(b"sk-a")}),
    ("sk-team-a;concurrent=8;rpm=600;tpm=200000  # team A\nsk-b;rpm=5",
     {b"sk-team-a": auth.KeyLimits(b"sk-team-a", 8, 600, 200000), b"sk-b": auth.KeyLimits(b"sk-b", rpm=5)}),
    ("  sk-c ; CONCURRENT = 2 \n", {b"sk-c": auth.KeyLimits(b"sk-c", concurrent=2)}),
])
def test_parse_keys(text, expected):
    assert auth.parse_keys(text) == expected


@pytest.mark.parametrize("text, complaint", [
    ("sk-a;max=3", "line 1: bad option 'max=3'"),
    ("ok\nsk-a;rpm=0", "line 2: bad option 'rpm=0': expected an integer >= 1"),
    ("sk-a;rpm=x", "expected an integer >= 1"),
    ("sk-a;rpm", "bad option 'rpm'"),
    ("sk-a\nsk-a", "line 2: key sk-a... is listed twice"),
    ("sk\u00e9", "printable ASCII"),
    (";rpm=3", "printable ASCII"),
])
def test_parse_keys_refuses(text, complaint):
    with pytest.raises(ConfigError, match="OLB_API_KEYS") as err:
        auth.parse_keys(text)
    assert complaint in str(err.value)


@pytest.mark.parametrize("header, token", [
    (None, None), (b"", None), (b"Basic abc", None), (b"Bearer ", None),
    (b"Bearer sk-a", b"sk-a"), (b"bearer  sk-a ", b"sk-a"), (b"BEARER sk-a", b"sk-a"),
])
def test_bearer(header, token):
    assert auth.bearer(header) == token


def ring(text, workers=1):
    clock = Clock()
    return auth.KeyRing(auth.parse_keys(text), workers=workers, clock=clock), clock


def test_missing_and_unknown_keys_are_401():
    keys, _ = ring("sk-a")
    for header, reason in ((None, auth.MISSING), (b"Bearer sk-b", auth.UNKNOWN), (b"Bearer sk-", auth.UNKNOWN)):
        refusal = keys.check(header)
        assert isinstance(refusal, auth.Refusal) and refusal.status == 401 and refusal.retry_after is None
        assert keys.refused[reason] >= 1
    assert keys.refused == {auth.MISSING: 1, auth.UNKNOWN: 2}
    assert keys.check(b"Bearer sk-a") == b"sk-a"


def test_concurrent_limit_until_released():
    keys, _ = ring("sk-a;concurrent=2")
    assert keys.check(b"Bearer sk-a") == b"sk-a"
    assert keys.check(b"Bearer sk-a") == b"sk-a"
    over = keys.check(b"Bearer sk-a")
    assert over.status == 429 and over.retry_after == 1 and "concurrent" in over.message
    keys.release(b"sk-a")
    assert keys.check(b"Bearer sk-a") == b"sk-a"


def test_rpm_window_slides_and_retry_after_says_when():
    keys, clock = ring("sk-a;rpm=3")
    for dt in (0, 10, 20):
        clock.t += dt
        assert keys.check(b"Bearer sk-a") == b"sk-a"
        keys.release(b"sk-a")
    # Started at t=1000, 1010, 1030; at 1040 the first leaves the window at 1060.
    clock.t = 1040.0
    over = keys.check(b"Bearer sk-a")
    assert over.status == 429 and over.retry_after == 20 and "rpm" in over.message
    clock.t = 1060.0
    assert keys.check(b"Bearer sk-a") == b"sk-a"


def test_tpm_counts_charged_tokens():
    keys, clock = ring("sk-a;tpm=100")
    assert keys.check(b"Bearer sk-a") == b"sk-a"
    keys.charge(b"sk-a", 60)
    keys.release(b"sk-a")
    clock.t += 30
    assert keys.check(b"Bearer sk-a") == b"sk-a"  # 60 < 100
    keys.charge(b"sk-a", 50)
    keys.release(b"sk-a")
    over = keys.check(b"Bearer sk-a")
    # 110 tokens; under 100 again once the first 60 leave, at 1060 (now 1030).
    assert over.status == 429 and over.retry_after == 30 and "tpm" in over.message
    clock.t = 1060.0
    assert keys.check(b"Bearer sk-a") == b"sk-a"


def test_limits_are_shared_out_over_workers():
    keys, _ = ring("sk-a;concurrent=3", workers=2)  # ceil(3 / 2) = 2 in this worker
    assert keys.check(b"Bearer sk-a") == b"sk-a"
    assert keys.check(b"Bearer sk-a") == b"sk-a"
    assert keys.check(b"Bearer sk-a").status == 429


def test_reload_keeps_counters_of_keys_that_stay_and_refuses_a_bad_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text("sk-a;concurrent=1\nsk-b\n")
    keys = auth.KeyRing(auth.load_keys(str(path)), str(path))
    assert keys.check(b"Bearer sk-a") == b"sk-a"
    path.write_text("sk-a;concurrent=1\nsk-c\n")
    assert keys.reload() is None
    assert keys.check(b"Bearer sk-a").status == 429  # still one in flight
    assert keys.check(b"Bearer sk-b").status == 401
    assert keys.check(b"Bearer sk-c") == b"sk-c"
    path.write_text("sk-a;bogus=1\n")
    error = keys.reload()
    assert "line 1" in error and "bogus" in error
    assert keys.check(b"Bearer sk-c") == b"sk-c"  # the old keys stay


def test_status_shows_keys_redacted():
    keys, _ = ring("sk-team-a-0123456789;rpm=10\nab")
    keys.check(b"Bearer sk-team-a-0123456789")
    doc = keys.status()
    assert [k["key"] for k in doc["keys"]] == ["sk-tea...c07f", "ab...fb8e"]
    assert doc["keys"][0]["inflight"] == 1 and doc["keys"][0]["requests_last_minute"] == 1
    assert "0123456789" not in repr(doc)


def request(method=b"POST", headers=()):
    return ProxyRequest(method, b"/olb/drain", b"1.1", list(headers), b"", True, False)


@pytest.mark.parametrize("headers, refused", [
    ([], None),                                                           # curl -X POST
    ([(b"host", b"127.0.0.1:11433"), (b"content-type", b"application/json")], None),
    ([(b"host", b"127.0.0.1:11433"), (b"origin", b"http://127.0.0.1:11433")], None),
    ([(b"sec-fetch-site", b"same-origin")], None),
    ([(b"host", b"127.0.0.1:11433"), (b"origin", b"http://evil.example")], "Origin"),
    ([(b"host", b"127.0.0.1:11433"), (b"origin", b"null")], "Origin"),
    ([(b"sec-fetch-site", b"cross-site")], "Sec-Fetch-Site"),
    ([(b"sec-fetch-site", b"same-site")], "Sec-Fetch-Site"),               # another port on localhost
    ([(b"content-type", b"application/x-www-form-urlencoded")], "form"),
    ([(b"content-type", b"text/plain")], "form"),
    ([(b"content-type", b"multipart/form-data; boundary=x")], "form"),
])
def test_cross_site(headers, refused):
    why = admin.cross_site(request(headers=headers))
    if refused is None:
        assert why is None
    else:
        assert refused in why


@pytest.mark.parametrize("tail, counts", [
    (b"", (0, 0)),
    (b'{"model":"m","done":true,"prompt_eval_count":26,"eval_count":290,"eval_duration":4709}\n', (26, 290)),
    (b'41\r\n{"done":true,"prompt_eval_count":3,"eval_count":12}\n\r\n0\r\n\r\n', (3, 12)),
    (b'"usage":{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21}}', (9, 12)),
    (b'{"done":false,"response":"eval_count"}', (0, 0)),
])
def test_the_counts_charged_to_a_key(tail, counts):
    """What on_end charges (the dashboard's tokens/s, a key's tpm=): read_tokens's
    prompt and generated counts, (0, 0) where it finds none."""
    found = read_tokens(tail)
    assert ((found[0], found[1]) if found is not None else (0, 0)) == counts


def test_samples_rates_from_counter_rows_of_all_workers():
    class Table:
        n = 1

        def inflight(self, i):
            return 2

    class Backend:
        def __init__(self):
            self.up = True
            self.url = "http://b"
            self.last_error = "refused"

    class Balancer:
        table = Table()
        queue = ()
        backends = [Backend()]
        models = None

    shared = bytearray(2 * 4 * 8)
    a, b = Samples(0, 2, shared), Samples(1, 2, shared)
    bal = Balancer()
    a.tick(bal, now=a._last_at + 1)
    a.first_byte(0.2)
    a.request_done(100)
    b.first_byte(0.4)
    b.request_done(0)
    bal.backends[0].up = False
    a.tick(bal, now=a._last_at + 2)
    last = a.series[-1]
    assert last["rps"] == 1.0 and last["ttft_ms"] == 300.0 and last["tok_s"] == 50.0 and last["inflight"] == 2
    assert [(e["kind"], e["detail"]) for e in a.events] == [("ejected", "refused")]


@pytest.mark.parametrize("env, complaint", [
    ({"OLB_ADMIN_LISTEN": "nowhere"}, "OLB_ADMIN_LISTEN: expected HOST:PORT"),
    ({"OLB_ADMIN_LISTEN": "127.0.0.1:99999"}, "OLB_ADMIN_LISTEN: expected HOST:PORT"),
    ({"OLB_ADMIN_TOKEN": "short"}, "OLB_ADMIN_TOKEN: expected a token of at least 16"),
    ({"OLB_API_KEYS": "/nonexistent/keys"}, "OLB_API_KEYS: expected a keys file"),
])
def test_bad_settings_name_their_variable(env, complaint):
    from olb import config

    with pytest.raises(ConfigError) as err:
        config.load([], {"OLB_BACKENDS": "http://127.0.0.1:1", **env})
    assert str(err.value).startswith(complaint)


def test_settings_parse(tmp_path):
    from olb import config

    keys = tmp_path / "keys"
    keys.write_text("sk-a\n")
    cfg = config.load([], {"OLB_BACKENDS": "http://127.0.0.1:1", "OLB_ADMIN_LISTEN": "off",
                           "OLB_ADMIN_TOKEN": "t" * 16, "OLB_API_KEYS": str(keys)})
    assert cfg.admin_listen is None and cfg.admin_token == "t" * 16 and cfg.api_keys == str(keys)
    assert config.Config().admin_listen == ("127.0.0.1", 11433)
    keys.write_text("sk-a;rpm=-1\n")
    with pytest.raises(ConfigError, match=r"OLB_API_KEYS: expected a keys file .*line 1: bad option 'rpm=-1'"):
        config.load([], {"OLB_BACKENDS": "http://127.0.0.1:1", "OLB_API_KEYS": str(keys)})

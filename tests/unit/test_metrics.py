"""olb/metrics.py and olb/accesslog.py without sockets: token counts, buckets, merging, lines."""


import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from olb import config as config_mod
from olb import metrics
from olb.accesslog import AccessLog
from olb.errors import ConfigError


@pytest.mark.parametrize("tail,expected", [
    # Ollama's last NDJSON line (api/types.go Metrics), alone or after other lines.
    (b'{"model":"m","done":true,"total_duration":9,"prompt_eval_count":12,"prompt_eval_duration":5,'
     b'"eval_count":34,"eval_duration":2000000000}\n', (12, 34, 2.0)),
    (b'{"response":"a","done":false}\n{"done":true,"prompt_eval_count":1,"eval_count":2}\n', (1, 2, None)),
    # Chunk framing around it, a space after the colon.
    (b'5a\r\n{"done":true,"prompt_eval_count": 7,"eval_count": 8,"eval_duration": 500000000}\n\r\n0\r\n\r\n',
     (7, 8, 0.5)),
    # Generated text that quotes the field names is escaped: not a match.
    (b'{"response":"\\"eval_count\\": 99","done":false}\n', None),
    # OpenAI usage: a non-streamed answer, or the usage chunk of a stream before [DONE].
    (b'{"id":"x","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":6,"total_tokens":11}}\n',
     (5, 6, None)),
    (b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}\n\n'
     b'data: [DONE]\n\n', (3, 4, None)),
    # /api/embed: prompt tokens only.
    (b'{"model":"e","embeddings":[[0.1]],"total_duration":1,"prompt_eval_count":9}', (9, 0, None)),
    # Nothing to read.
    (b'{"status":"success"}\n', None),
    (b'', None),
])
def test_read_tokens(tail, expected):
    assert metrics.read_tokens(tail) == expected


@pytest.mark.parametrize("path,label", [
    (b"/api/generate", "/api/generate"), (b"/api/chat", "/api/chat"),
    (b"/v1/chat/completions", "/v1/chat/completions"),
    (b"/api/tags", "/api/tags"), (b"/api/blobs/sha256:ab", "/api/blobs"),
    (b"/v1/models/llama3.2", "/v1/models/{model}"),
    (b"/olb/status", "/olb"), (b"/metrics", "/metrics"), (b"/made/up/path", "other"), (b"/", "/"),
])
def test_endpoint_label_is_bounded(path, label):
    assert metrics.endpoint_label(path) == label


@pytest.mark.parametrize("value,bucket", [
    (0.0, 0), (0.005, 0), (0.0051, 1), (1.0, 7), (300.0, 14), (300.1, 15), (1e9, 15),
])
def test_time_buckets_are_le(value, bucket):
    m = metrics.Metrics(1)
    m.request_done("/api/generate", "m", "http://a:1", 200, None, None, value, None, False)
    counts, total = m.view().duration[("/api/generate", "http://a:1")]
    assert counts[bucket] == 1 and sum(counts) == 1 and total == value


def test_request_done_counts_tokens_and_speed_of_streams_only():
    m = metrics.Metrics(2)
    m.request_done("/api/generate", "m", "http://b:2", 200, 0.5, 0.1, 2.0, (10, 40, 2.0), True)
    m.request_done("/api/generate", "m", "http://b:2", 200, 0.0, 0.1, 1.0, (5, 20, 1.0), False)
    v = m.view()
    assert v.requests[("/api/generate", "m", "http://b:2", 200)] == 2
    assert v.prompt_tokens[("m", "http://b:2")] == 15 and v.eval_tokens[("m", "http://b:2")] == 60
    counts, total = v.tps[("m", "http://b:2")]
    assert sum(counts) == 1 and total == 20.0
    assert sum(v.queue_wait[("m",)][0]) == 2


def test_state_round_trips_and_adds_up():
    """What one worker publishes, added to another's counters, sums every series."""
    a, b = metrics.Metrics(2), metrics.Metrics(2)
    a.request_done("/api/chat", "m", "http://a:1", 200, 0.01, 0.02, 0.3, (1, 2, None), False)
    b.request_done("/api/chat", "m", "http://a:1", 200, 0.01, 0.02, 0.3, (1, 2, None), False)
    b.request_done("/api/chat", "m", "http://b:2", 500, None, None, 0.1, None, False)
    a.rejected(metrics.QUEUE_FULL)
    b.rejected(metrics.QUEUE_FULL)
    b.retried("http://b:2")
    a.ejected("http://a:1")
    a.load_started("m", "http://a:1")
    a.load_answered("m", "http://a:1", 2.5)
    total = metrics.View(2)
    for m in (a, b):
        total.add_state(orjson.loads(orjson.dumps(m.state())))
    assert total.requests == {("/api/chat", "m", "http://a:1", 200): 2, ("/api/chat", "m", "http://b:2", 500): 1}
    assert total.rejections == {metrics.QUEUE_FULL: 2}
    assert total.retries == {"http://b:2": 1} and total.ejections == {"http://a:1": 1}
    assert total.loads == {("m", "http://a:1"): 1} and total.load_wait == {("m", "http://a:1"): 2.5}
    assert sum(total.duration[("/api/chat", "http://a:1")][0]) == 2
    assert total.eval_tokens == {("m", "http://a:1"): 4}
    # A worker restarted after a crash goes on from its predecessor's state.
    c = metrics.Metrics(2)
    c.base = orjson.loads(orjson.dumps(total.state()))
    c.request_done("/api/chat", "m", "http://b:2", 500, None, None, 0.1, None, False)
    assert c.view().requests == {("/api/chat", "m", "http://a:1", 200): 2, ("/api/chat", "m", "http://b:2", 500): 2}


class _Table:
    def snapshot(self):
        return [{"inflight": 2, "capacity": 4, "gpu_util": 0.5, "gpu_mem_free": 1 << 30},
                {"inflight": 0, "capacity": 8, "gpu_util": None, "gpu_mem_free": None}]


class _Backend:
    def __init__(self, url, up):
        self.url, self.up = url, up


class _Queue:
    def waiting(self):
        yield 0, "m"
        yield 1, "m"
        yield 1, None


class _Balancer:
    table = _Table()
    backends = [_Backend("http://a:1", True), _Backend("http://b:2", False)]
    drained = bytearray(b"\x00\x01")
    queue = _Queue()
    models = None


class _Config:
    workers = 1


class _Ctx:
    def __init__(self, m):
        self.metrics = m
        self.metrics_dir = None
        self.balancer = _Balancer()
        self.config = _Config()
        self.worker = 0


def test_render_parses_back():
    m = metrics.Metrics(2)
    m.request_done("/api/generate", "m", "http://a:1", 200, 0.0, 0.05, 1.0, (3, 4, None), True)
    m.request_done("/api/generate", "", "", 404, None, None, 0.001, None, False)
    page = metrics.render(_Ctx(m)).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(page) for s in f.samples}
    assert samples[("olb_requests_total", (("backend", "http://a:1"), ("endpoint", "/api/generate"),
                                           ("model", "m"), ("status", "200")))] == 1
    assert samples[("olb_requests_total", (("backend", ""), ("endpoint", "/api/generate"), ("model", ""),
                                           ("status", "404")))] == 1
    assert samples[("olb_backend_in_flight", (("backend", "http://a:1"),))] == 2
    assert samples[("olb_backend_up", (("backend", "http://b:2"),))] == 0
    assert samples[("olb_backend_draining", (("backend", "http://b:2"),))] == 1
    assert samples[("olb_backend_gpu_utilization_ratio", (("backend", "http://a:1"),))] == 0.5
    assert ("olb_backend_gpu_utilization_ratio", (("backend", "http://b:2"),)) not in samples
    assert samples[("olb_queue_depth", (("class", "batch"), ("model", "m")))] == 1
    assert samples[("olb_queue_depth", (("class", "batch"), ("model", "")))] == 1
    assert samples[("olb_time_to_first_byte_seconds_bucket", (("backend", "http://a:1"), ("le", "0.05"),
                                                              ("model", "m")))] == 1
    assert samples[("olb_rejections_total", (("reason", "queue_timeout"),))] == 0


class _Handle:
    def cancel(self):
        pass


class _Loop:
    """call_later recorded, not run: the test flushes by closing."""

    def __init__(self):
        self.timers = []

    def call_later(self, delay, fn):
        self.timers.append((delay, fn))
        return _Handle()


def test_access_log_text_and_json(tmp_path):
    loop = _Loop()
    for fmt in ("text", "json"):
        path = tmp_path / f"{fmt}.log"
        log = AccessLog(str(path), fmt, loop)
        log.write(b"10.0.0.1", b"POST", b"/api/chat", "m:latest", "http://a:1", 200, 0.0015, 0.25, 1.5,
                  1234, (10, 20, 1.0), 1)
        log.write(b"10.0.0.2", b"GET", b"/api/version", "", "", 502, None, None, 0.01, 99, None, 2)
        assert not path.read_bytes()  # buffered until the flush
        log.close()
        lines = path.read_text().splitlines()
        if fmt == "text":
            assert lines[0].split(" ")[1:] == ["10.0.0.1", '"POST', '/api/chat"', "m:latest", "http://a:1", "200",
                                               "0.002", "0.250", "1.500", "1234", "10", "20", "1"]
            assert lines[1].split(" ")[1:] == ["10.0.0.2", '"GET', '/api/version"', "-", "-", "502", "-", "-",
                                               "0.010", "99", "-", "-", "2"]
        else:
            doc = orjson.loads(lines[0])
            assert doc["queue_ms"] == 1.5 and doc["ttft_ms"] == 250.0 and doc["duration_ms"] == 1500.0
            assert (doc["prompt_tokens"], doc["eval_tokens"], doc["retries"]) == (10, 20, 1)
            doc = orjson.loads(lines[1])
            assert doc["model"] is None and doc["backend"] is None and doc["ttft_ms"] is None
    # One flush timer per buffer, not one per line.
    assert [d for d, _ in loop.timers] == [0.1, 0.1]


@pytest.mark.parametrize("env,field,value", [
    ({"OLB_ACCESS_LOG": "stderr"}, "access_log", "stderr"),
    ({"OLB_ACCESS_LOG": "OFF"}, "access_log", "off"),
    ({"OLB_LOG_FORMAT": "JSON"}, "log_format", "json"),
    ({"OLB_METRICS": "off"}, "metrics", False),
    ({"OLB_BACKEND_HEADER": "X-Olb-Backend"}, "backend_header", "X-Olb-Backend"),
])
def test_settings(env, field, value):
    cfg = config_mod.load([], {"OLB_BACKENDS": "http://127.0.0.1:1", **env})
    assert getattr(cfg, field) == value


@pytest.mark.parametrize("env,needle", [
    ({"OLB_ACCESS_LOG": "/no/such/dir/access.log"}, "OLB_ACCESS_LOG"),
    ({"OLB_LOG_FORMAT": "xml"}, "OLB_LOG_FORMAT"),
    ({"OLB_METRICS": "maybe"}, "OLB_METRICS"),
    ({"OLB_BACKEND_HEADER": "X Olb"}, "OLB_BACKEND_HEADER"),
])
def test_bad_settings_name_the_variable(env, needle):
    with pytest.raises(ConfigError, match=needle):
        config_mod.load([], {"OLB_BACKENDS": "http://127.0.0.1:1", **env})


def test_grafana_dashboard_uses_only_names_olb_exports():
    """packaging/grafana/olb.json queries the names the page has (a renamed metric fails here)."""
    import pathlib
    import re

    page = metrics.render(_Ctx(metrics.Metrics(2))).decode()
    exported = set()
    for f in text_string_to_metric_families(page):
        if f.type == "counter":
            exported.add(f.name + "_total")
        elif f.type == "histogram":
            exported |= {f.name + "_bucket", f.name + "_count", f.name + "_sum"}
        else:
            exported.add(f.name)
    doc = orjson.loads((pathlib.Path(__file__).parents[2] / "packaging/grafana/olb.json").read_bytes())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", ())]
    exprs.append(doc["templating"]["list"][0]["query"]["query"])
    used = {name for e in exprs for name in re.findall(r"\bolb_[a-z_]+", e)}
    assert len(exprs) > 20 and used
    assert used <= exported, used - exported


@pytest.mark.parametrize("tail2,tail1,last,expected", [
    # The final line in the read before the terminating chunk.
    (None, b'{"done":true,"prompt_eval_count":4,"eval_count":5}\n', b"0\r\n\r\n", (4, 5, None)),
    # An OpenAI stream: usage, then [DONE], then the end, in three reads.
    (b'data: {"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\n', b"data: [DONE]\n\n", b"0\r\n\r\n",
     (1, 2, None)),
    # A large answer: only its end is searched (its count is there).
    (None, None, b"[" + b"0.123," * 100000 + b'0],"prompt_eval_count":8}', (8, 0, None)),
    # A count far from the end is not looked for.
    (None, None, b'{"eval_count":5}' + b" " * 2000, None),
])
def test_response_tokens(tail2, tail1, last, expected):
    assert metrics.response_tokens(tail2, tail1, last) == expected


def test_bucket_is_bisect_left():
    """metrics.bucket, the compiled loop that places an observation, answers as bisect.bisect_left did."""
    import bisect
    import math
    import random
    rng = random.Random(20261202)
    for bounds in (metrics.TIME_BUCKETS, metrics.TPS_BUCKETS, (), (1.0,)):
        values = list(bounds) + [-1.0, 0.0, math.inf, -math.inf, math.nan, 1e-12, 1e12]
        values += [b * (1 + rng.uniform(-1e-9, 1e-9)) for b in bounds] + [rng.uniform(0, 400) for _ in range(500)]
        for v in values:
            assert metrics.bucket(bounds, v) == bisect.bisect_left(bounds, v), (bounds, v)


def test_request_done_counts_each_series_whatever_came_before():
    """request_done remembers the series it counted last (its labels compared by identity):
    an equal label of another object, and another label set, are each counted where they belong."""
    m = metrics.Metrics(1)
    a, b = "http://a:1", "http://b:1"
    same_as_a = "".join(["http://a", ":1"])
    assert same_as_a == a and same_as_a is not a
    for endpoint, backend, status in [("/api/generate", a, 200), ("/api/generate", a, 200),
                                      ("/api/generate", b, 500), ("/api/generate", same_as_a, 200),
                                      ("/api/chat", a, 200), ("/api/generate", a, 404)]:
        m.request_done(endpoint, "m:latest", backend, status, None, None, 0.01, None, False)
    assert {k: dict(s.status) for k, s in m.series.items()} == {
        ("/api/generate", "m:latest", a): {200: 3, 404: 1},
        ("/api/generate", "m:latest", b): {500: 1},
        ("/api/chat", "m:latest", a): {200: 1},
    }

"""olb.telemetry without sockets: the Prometheus text parser (whole, cut at
every byte, malformed), DCGM semantics, and the scraper's push / clear /
expiry rules with the fetch replaced by a fake.  Also olb.agent's page."""

import asyncio
import dataclasses
import logging
import math
import time

import pytest

from olb import telemetry
from olb._core import BackendTable
from olb.agent import Exporter, render
from olb.telemetry import (DCGM_NAMES, MetricsParseError, Sample, ScrapeError, TelemetryScraper,
                           dcgm_readings, parse_text)

from fake_pynvml import FakeNvml, FakeNVMLError

MIB = 1 << 20
GiB = 1 << 30


def dcgm_page(*gpus, hostname="gpu-node-07", extra=""):
    """dcgm-exporter's text for GPUs given as (util %, free MiB, used MiB)."""
    out = []
    helps = ("GPU utilization (in %).", "Framebuffer memory free (in MiB).",
             "Framebuffer memory used (in MiB).")
    for field, (name, help_text) in enumerate(zip(DCGM_NAMES, helps)):
        out.append(f"# HELP {name} {help_text}\n# TYPE {name} gauge\n")
        for i, values in enumerate(gpus):
            out.append(f'{name}{{gpu="{i}",UUID="GPU-{i:08d}-aaaa-bbbb-cccc-000000000000",'
                       f'pci_bus_id="00000000:{i + 1:02X}:00.0",device="nvidia{i}",'
                       f'modelName="NVIDIA H100 80GB HBM3",Hostname="{hostname}"}} {values[field]}\n')
    return "".join(out) + extra


# -- the text format ---------------------------------------------------------------


GOOD = (
    "# A comment, then directives\n"
    "#HELPER is a comment too\n"
    "# HELP up 1 if \\\\ up \\n\n"
    "# TYPE up gauge\n"
    "up 1\n"
    "\n"
    '  temp{room="a \\"b\\" \\\\ c\\nd",} -1.5e3 1700000000000\n'
    "\ttemp{room=\"}\"}\t+Inf\n"
    "temp{} NaN\n"
    'temp{ x = "1" , y="2" } .5\n'
    "empty{} -inf\n"
    "hist_bucket{le=\"+Inf\"} 3 -12\n"
)


def test_parses_every_kind_of_line():
    samples = parse_text(GOOD)
    assert [s.name for s in samples] == ["up", "temp", "temp", "temp", "temp", "empty", "hist_bucket"]
    up, t1, t2, t3, t4, empty, hist = samples
    assert up == Sample("up", {}, 1.0)
    assert t1.labels == {"room": 'a "b" \\ c\nd'} and t1.value == -1500.0
    assert t1.timestamp == 1700000000000
    assert t2.labels == {"room": "}"} and t2.value == math.inf
    assert t3.labels == {} and math.isnan(t3.value)
    assert t4.labels == {"x": "1", "y": "2"} and t4.value == 0.5
    assert empty.value == -math.inf
    assert hist.timestamp == -12


def test_names_filter_returns_only_those_but_checks_every_line():
    assert [s.name for s in parse_text(GOOD, {"up", "empty"})] == ["up", "empty"]
    assert parse_text(GOOD, ()) == []
    with pytest.raises(MetricsParseError, match="line 2"):
        parse_text("up 1\nnot a sample line\n", {"up"})


def test_empty_page_has_no_samples():
    assert parse_text("") == []
    assert parse_text("\n\n# just comments\n") == []


def test_cut_at_every_byte_is_a_prefix_or_an_error():
    """h11's habit: feed every truncation.  A page cut anywhere either fails
    or (cut at a line end) yields a prefix of the full page's samples."""
    page = dcgm_page((37, 1000, 3000), (0, 4000, 0))
    full = parse_text(page, DCGM_NAMES)
    assert len(full) == 6
    for cut in range(len(page)):
        try:
            got = parse_text(page[:cut], DCGM_NAMES)
        except MetricsParseError:
            assert not page[:cut].endswith("\n") or cut == 0
            continue
        assert page[:cut].endswith("\n") or cut == 0
        assert got == full[:len(got)]


def test_trailing_garbage_is_an_error():
    page = dcgm_page((37, 1000, 3000))
    with pytest.raises(MetricsParseError, match="line 10"):
        parse_text(page + "<html>oops</html>\n")


@pytest.mark.parametrize("text,needle", [
    ("up 1", "does not end with a line feed"),
    ("up\n", "line 1: not a valid sample"),
    ("up 1 2 3\n", "line 1: not a valid sample"),
    ("up 1_000\n", "line 1: not a valid sample"),
    ("up 0x10\n", "line 1: not a valid sample"),
    ("up 1\r\n", "line 1: not a valid sample"),
    ("ok 1\n<!DOCTYPE html>\n", "line 2: not the Prometheus text format"),
    ('{"json": 1}\n', "line 1: not the Prometheus text format"),
    ("9lives 1\n", "line 1: a metric name must start the line"),
    ('up{a="1",a="2"} 1\n', "line 1: label a given twice"),
    ('up{a="\\x"} 1\n', "line 1: malformed labels"),
    ("up{a=1} 1\n", "line 1: malformed labels"),
    ('up{a="1" b="2"} 1\n', "line 1: malformed labels"),
    ('up{a="1"}} 1\n', "line 1: malformed labels"),
    ('up{a="1"\n', "line 1: not a valid sample"),
    ("# HELP up x\n# HELP up y\n", "line 2: a second HELP line for up"),
    ("# TYPE up gauge\n# TYPE up gauge\n", "line 2: a second TYPE line for up"),
    ("# TYPE up bogus\n", "line 1: TYPE of up must be one of"),
    ("# TYPE up\n", "line 1: TYPE of up must be one of"),
    ("\nup 1\n# TYPE up gauge\n", "line 3: TYPE line for up after its samples"),
])
def test_malformed_pages_name_the_line(text, needle):
    with pytest.raises(MetricsParseError, match=needle.replace("(", r"\(")):
        parse_text(text, {"up"} if "up" in text else None)


def test_bad_label_sets_of_unwanted_metrics_are_only_shape_checked():
    """Documented trade-off: full label checks cost ~2 us per sample, so only
    the wanted families get them; the shape of every line is still checked."""
    assert parse_text("other{a=1} 1\nup 2\n", {"up"}) == [Sample("up", {}, 2.0)]
    with pytest.raises(MetricsParseError):
        parse_text("other{a=1} 1\nup 2\n")


def test_parsing_a_big_dcgm_page_is_cheap():
    """The scrape parses on the event loop: an 8-GPU dcgm-exporter page with
    its ~35 default counters (~60 KiB) must stay well under a few ms."""
    names = list(DCGM_NAMES) + [f"DCGM_FI_DEV_OTHER_{i}" for i in range(32)]
    out = []
    for name in names:
        out.append(f"# HELP {name} Some counter.\n# TYPE {name} gauge\n")
        for g in range(8):
            out.append(f'{name}{{gpu="{g}",UUID="GPU-6a6d4b7e-0f3c-4a51-9d2b-{g:012d}",'
                       f'pci_bus_id="00000000:{g + 1:02X}:00.0",device="nvidia{g}",'
                       f'modelName="NVIDIA H100 80GB HBM3",Hostname="gpu-node-07",'
                       f'DCGM_FI_DRIVER_VERSION="550.54.15"}} {g * 10}\n')
    page = "".join(out)
    assert len(page) > 50_000
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        readings, problems = dcgm_readings(parse_text(page, DCGM_NAMES))
        best = min(best, time.perf_counter() - start)
    assert len(readings) == 8 and not problems
    assert best < 0.005, f"{best * 1e3:.2f} ms"


def test_linear_in_page_size():
    line = 'x{a="0123456789"} 1\n'
    start = time.perf_counter()
    parse_text(line * 40_000, {"y"})  # ~800 KiB, under MAX_SCRAPE_BYTES
    assert time.perf_counter() - start < 0.5


# -- DCGM semantics ----------------------------------------------------------------


def test_dcgm_readings_per_gpu_label():
    readings, problems = dcgm_readings(parse_text(dcgm_page((37, 1000, 3000), (100, 0, 80000))))
    assert problems == {}
    assert readings[0] == {"util": 0.37, "mem_free": 0.25, "mem_free_bytes": 1000 * MIB,
                           "mem_total": 4000 * MIB}
    assert readings[1]["util"] == 1.0 and readings[1]["mem_free"] == 0.0


def test_dcgm_util_over_100_is_clamped():
    readings, _ = dcgm_readings(parse_text(dcgm_page((130, 10, 10))))
    assert readings[0]["util"] == 1.0


@pytest.mark.parametrize("page,why", [
    ('DCGM_FI_DEV_GPU_UTIL{gpu="0"} 5\nDCGM_FI_DEV_FB_FREE{gpu="0"} 5\n', "no DCGM_FI_DEV_FB_USED"),
    ('DCGM_FI_DEV_GPU_UTIL{gpu="0"} NaN\nDCGM_FI_DEV_FB_FREE{gpu="0"} 5\nDCGM_FI_DEV_FB_USED{gpu="0"} 5\n',
     "NaN"),
    ('DCGM_FI_DEV_GPU_UTIL{gpu="0"} 1\nDCGM_FI_DEV_FB_FREE{gpu="0"} -5\nDCGM_FI_DEV_FB_USED{gpu="0"} 5\n',
     "negative"),
    ('DCGM_FI_DEV_GPU_UTIL{gpu="0",GPU_I_ID="1"} 1\nDCGM_FI_DEV_GPU_UTIL{gpu="0",GPU_I_ID="2"} 1\n'
     'DCGM_FI_DEV_FB_FREE{gpu="0"} 5\nDCGM_FI_DEV_FB_USED{gpu="0"} 5\n', "several DCGM_FI_DEV_GPU_UTIL"),
])
def test_incomplete_gpus_are_problems_not_readings(page, why):
    readings, problems = dcgm_readings(parse_text(page))
    assert readings == {}
    assert why in problems[0]


@pytest.mark.parametrize("labels", ['', 'gpu="x"', 'gpu="٣"', 'GPU="0"'])
def test_dcgm_sample_without_numeric_gpu_label_fails_the_scrape(labels):
    with pytest.raises(ScrapeError, match="gpu label"):
        dcgm_readings(parse_text(f"DCGM_FI_DEV_GPU_UTIL{{{labels}}} 1\n"))


def test_other_metrics_are_ignored():
    page = dcgm_page((10, 1, 1), extra='DCGM_FI_DEV_GPU_TEMP{gpu="5"} 40\n')
    readings, problems = dcgm_readings(parse_text(page))
    assert list(readings) == [0] and problems == {}


# -- the scraper, fetch faked -----------------------------------------------------


@dataclasses.dataclass
class Spec:
    metrics: str = ""
    gpus: tuple = ()


class FakeEndpoints:
    """Stands in for telemetry._fetch: url -> page text or an exception."""

    def __init__(self, monkeypatch):
        self.pages = {}
        self.fetches = []
        monkeypatch.setattr(telemetry, "_fetch", self.fetch)

    async def fetch(self, target):
        self.fetches.append(target.url)
        page = self.pages[target.url]
        if isinstance(page, BaseException):
            raise page
        return page.encode() if isinstance(page, str) else page


def run(loop, coro, timeout=10):
    return loop.run_until_complete(asyncio.wait_for(coro, timeout))


def log_of(caplog, level=logging.WARNING):
    return [r.getMessage() for r in caplog.records if r.name == "olb.telemetry" and r.levelno == level]


A = "http://10.0.0.7:9400/metrics"
B = "http://10.0.0.8:9400/metrics"


def test_busy_remote_gpu_backend_is_avoided(loop, monkeypatch):
    eps = FakeEndpoints(monkeypatch)
    eps.pages[A] = dcgm_page((90, 8000, 72000), (0, 70000, 10000))
    table = BackendTable([4, 4], seed=1)
    scraper = TelemetryScraper(table, [Spec(A, (0,)), Spec(A, (1,))], interval=1.0)
    assert run(loop, scraper.scrape_once()) == {A: None}
    assert eps.fetches == [A]  # two backends, one endpoint: one scrape
    rows = table.snapshot()
    assert rows[0]["gpu_util"] == pytest.approx(0.9)
    assert rows[1]["gpu_mem_free"] == pytest.approx(0.875)
    # The busy GPU's backend scores as if half its size (the 2x headroom
    # cap): the idle one goes first and ends with twice the share.
    picks = [table.acquire() for _ in range(6)]
    assert picks[0] == 1 and (picks.count(0), picks.count(1)) == (2, 4)
    status = scraper.status()[A]
    assert status["backends"] == [0, 1] and status["error"] is None and status["age_s"] >= 0
    run(loop, scraper.close())


def test_gpus_default_to_every_gpu_on_the_page_combined_like_local_ones(loop, monkeypatch):
    eps = FakeEndpoints(monkeypatch)
    eps.pages[A] = dcgm_page((20, 1000, 3000), (60, 3000, 1000))
    table = BackendTable([1, 1, 1])
    scraper = TelemetryScraper(table, [Spec(A), Spec(A, (1,)), Spec()], interval=1.0)
    run(loop, scraper.scrape_once())
    rows = table.snapshot()
    assert rows[0]["gpu_util"] == pytest.approx(0.4)  # mean
    assert rows[0]["gpu_mem_free"] == pytest.approx(0.5)  # pooled: 4000 of 8000 MiB
    assert rows[1]["gpu_util"] == pytest.approx(0.6)
    assert rows[2]["gpu_util"] is None  # no metrics=: untouched
    run(loop, scraper.close())


def test_free_memory_of_remote_gpus_goes_to_the_memory_sink(loop, monkeypatch):
    eps = FakeEndpoints(monkeypatch)
    eps.pages[A] = dcgm_page((20, 1000, 3000), (60, 3000, 1000))
    table = BackendTable([1, 1])
    seen = {}
    scraper = TelemetryScraper(table, [Spec(A), Spec(A, (1,))], interval=1.0,
                               memory=lambda i, free, n: seen.update({i: (free, n)}))
    run(loop, scraper.scrape_once())
    MiB = 1 << 20
    assert seen == {0: (4000 * MiB, 2), 1: (3000 * MiB, 1)}
    eps.pages[A] = dcgm_page((20, 1000, 3000))  # gpu 1 gone: backend 1 unknown again
    run(loop, scraper.scrape_once())
    assert seen[1] == (None, 0) and seen[0] is not None
    run(loop, scraper.close())


def test_missing_gpu_clears_at_once_and_warns_once_per_streak(loop, monkeypatch, caplog):
    caplog.set_level(logging.INFO, "olb.telemetry")
    eps = FakeEndpoints(monkeypatch)
    eps.pages[A] = dcgm_page((50, 10, 10), (50, 10, 10))
    table = BackendTable([1, 1])
    scraper = TelemetryScraper(table, [Spec(A, (0,)), Spec(A, (1,))], interval=1.0)
    run(loop, scraper.scrape_once())
    assert [r["gpu_util"] for r in table.snapshot()] == [0.5, 0.5]
    eps.pages[A] = dcgm_page((50, 10, 10))  # gpu 1 gone from the page
    run(loop, scraper.scrape_once())
    run(loop, scraper.scrape_once())
    assert [r["gpu_util"] for r in table.snapshot()] == [0.5, None]
    [warning] = log_of(caplog)
    assert "backend 1" in warning and "gpu 1: not on the page" in warning
    eps.pages[A] = dcgm_page((50, 10, 10), (30, 10, 10))
    run(loop, scraper.scrape_once())
    assert [r["gpu_util"] for r in table.snapshot()] == [0.5, 0.3]
    assert any("read again" in m for m in log_of(caplog, logging.INFO))
    run(loop, scraper.close())


def test_page_without_gpus_clears(loop, monkeypatch, caplog):
    eps = FakeEndpoints(monkeypatch)
    eps.pages[A] = render([])  # olb-agent --allow-no-gpu
    table = BackendTable([1])
    table.set_gpu_load(0, 0.5, 0.5)
    scraper = TelemetryScraper(table, [Spec(A)], interval=1.0)
    assert run(loop, scraper.scrape_once()) == {A: None}
    assert table.snapshot()[0]["gpu_util"] is None
    assert "the page lists no GPU" in log_of(caplog)[0]
    run(loop, scraper.close())


@pytest.mark.parametrize("failure,needle", [
    (ConnectionRefusedError(111, "Connection refused"), "Connection refused"),
    (ScrapeError("GET /metrics answered 500 Internal Server Error"), "answered 500"),
    ("<html>dashboard</html>\n", "not the Prometheus text format"),
    (b"\xff\xfe up 1\n", "not UTF-8"),
    ('DCGM_FI_DEV_GPU_UTIL{gpu="zero"} 1\n', "gpu label"),
])
def test_failed_scrape_keeps_the_reading_until_stale_then_clears(loop, monkeypatch, caplog, failure, needle):
    eps = FakeEndpoints(monkeypatch)
    eps.pages[A] = dcgm_page((70, 10, 10))
    table = BackendTable([1])
    cleared = asyncio.Event()

    class Table:
        n = 1
        set_gpu_load = table.set_gpu_load

        def clear_gpu_load(self, i):
            table.clear_gpu_load(i)
            cleared.set()

    scraper = TelemetryScraper(Table(), [Spec(A)], interval=0.02)

    async def main():
        await scraper.scrape_once()
        eps.pages[A] = failure
        errors = await scraper.scrape_once()
        kept = table.snapshot()[0]["gpu_util"]
        await scraper.scrape_once()
        started = loop.time()
        await asyncio.wait_for(cleared.wait(), 5)  # the expiry timer fires
        return errors, kept, loop.time() - started

    errors, kept, waited = run(loop, main())
    assert needle in errors[A]
    assert kept == pytest.approx(0.7)  # one failed scrape: still the last reading
    assert table.snapshot()[0]["gpu_util"] is None
    assert waited < 1.0
    [warning] = log_of(caplog)  # one per streak, not one per scrape
    assert needle in warning and "0.06 s old" in warning
    run(loop, scraper.close())


def test_first_scrape_failing_leaves_loads_unknown(loop, monkeypatch):
    eps = FakeEndpoints(monkeypatch)
    eps.pages[A] = ConnectionRefusedError(111, "Connection refused")
    table = BackendTable([1])
    scraper = TelemetryScraper(table, [Spec(A)], interval=1.0)
    run(loop, scraper.scrape_once())
    assert table.snapshot()[0]["gpu_util"] is None
    assert scraper.status()[A]["age_s"] is None
    run(loop, scraper.close())


def test_a_bug_in_a_scrape_is_logged_once_and_clears(loop, monkeypatch, caplog):
    eps = FakeEndpoints(monkeypatch)
    eps.pages[A] = dcgm_page((70, 10, 10))
    table = BackendTable([1])
    scraper = TelemetryScraper(table, [Spec(A)], interval=1.0)
    run(loop, scraper.scrape_once())
    eps.pages[A] = RuntimeError("bug")
    run(loop, scraper.scrape_once())
    run(loop, scraper.scrape_once())
    assert table.snapshot()[0]["gpu_util"] is None
    assert len([r for r in caplog.records if r.exc_info]) == 1
    eps.pages[A] = dcgm_page((70, 10, 10))
    assert run(loop, scraper.scrape_once()) == {A: None}
    assert table.snapshot()[0]["gpu_util"] == pytest.approx(0.7)
    run(loop, scraper.close())


def test_endpoints_are_scraped_concurrently_by_the_background_tasks(loop, monkeypatch):
    eps = FakeEndpoints(monkeypatch)
    eps.pages[A] = dcgm_page((10, 1, 1))
    eps.pages[B] = dcgm_page((20, 1, 1))
    table = BackendTable([1, 1])
    scraper = TelemetryScraper(table, [Spec(A), Spec(B)], interval=0.01)

    async def main():
        scraper.start()
        scraper.start()  # idempotent
        while eps.fetches.count(A) < 3 or eps.fetches.count(B) < 3:
            await asyncio.sleep(0.005)
        await scraper.close()
        return len(eps.fetches)

    fetches = run(loop, main())
    assert [r["gpu_util"] for r in table.snapshot()] == [0.1, 0.2]
    run(loop, asyncio.sleep(0.05))
    assert len(eps.fetches) == fetches  # closed: no more scrapes


def test_no_endpoints_starts_nothing(loop):
    scraper = TelemetryScraper(BackendTable([1]), [Spec()], interval=1.0)
    scraper.start()
    assert scraper._tasks == []
    assert run(loop, scraper.scrape_once()) == {}


def test_constructor_validates():
    table = BackendTable([1, 1])
    with pytest.raises(ValueError, match="2 backends"):
        TelemetryScraper(BackendTable([1]), [Spec(A), Spec()])
    with pytest.raises(ValueError, match="interval"):
        TelemetryScraper(table, [Spec(A), Spec()], interval=0)
    with pytest.raises(ValueError, match="timeout"):
        TelemetryScraper(table, [Spec(A), Spec()], timeout=-1)
    assert TelemetryScraper(table, [Spec(A), Spec()], interval=0.05)._timeout == telemetry.TIMEOUT_FLOOR
    assert TelemetryScraper(table, [Spec(A), Spec()], interval=60)._timeout == telemetry.TIMEOUT_CEILING


# -- olb-agent's page ---------------------------------------------------------------


class FakeNvmlWithIdentity(FakeNvml):
    """The fake plus the identity calls olb-agent makes once per GPU."""

    def nvmlDeviceGetUUID(self, handle):
        return f"GPU-{handle[1]:08d}-0000-0000-0000-000000000000"

    def nvmlDeviceGetName(self, handle):
        return b"NVIDIA H100 80GB HBM3"  # old pynvml returns bytes

    def nvmlDeviceGetPciInfo(self, handle):
        raise FakeNVMLError(3)  # NOT_SUPPORTED: the label is left out


def test_agent_page_round_trips_through_the_parser():
    fake = FakeNvmlWithIdentity([{"util": 95, "total": 80 * GiB, "free": 10 * GiB},
                                 {"util": 0, "total": 80 * GiB, "free": 70 * GiB}])
    exporter = Exporter.open(interval=1.0, nvml=fake, hostname='odd "host"')
    try:
        page = exporter.poll_once()
        samples = parse_text(page.decode(), DCGM_NAMES)
        assert samples[0].labels == {"gpu": "0", "UUID": "GPU-00000000-0000-0000-0000-000000000000",
                                     "device": "nvidia0", "modelName": "NVIDIA H100 80GB HBM3",
                                     "Hostname": 'odd "host"'}
        readings, problems = dcgm_readings(samples)
        assert problems == {}
        assert readings[0]["util"] == 0.95 and readings[0]["mem_free"] == 0.125
        assert readings[1]["mem_free_bytes"] == 70 * GiB and readings[1]["mem_total"] == 80 * GiB
        text = page.decode()
        assert text.startswith("# HELP DCGM_FI_DEV_GPU_UTIL GPU utilization (in %).\n"
                               "# TYPE DCGM_FI_DEV_GPU_UTIL gauge\n")
        assert 'DCGM_FI_DEV_FB_USED{gpu="1",' in text and text.endswith(" 10240\n")
        assert exporter.page() == page
    finally:
        exporter.stop()
    assert fake.init_calls == fake.shutdown_calls == 2  # its own and the monitor's


def test_agent_leaves_a_failing_gpu_off_the_page():
    fake = FakeNvmlWithIdentity([{"util": 5, "total": 8 * GiB, "free": 4 * GiB}] * 2)
    exporter = Exporter.open(interval=1.0, nvml=fake, hostname="h")
    try:
        exporter.poll_once()
        fake.failing.add(1)
        readings, _ = dcgm_readings(parse_text(exporter.poll_once().decode()))
        assert list(readings) == [0]
    finally:
        exporter.stop()


def test_agent_page_goes_empty_when_polls_stop():
    fake = FakeNvmlWithIdentity([{"util": 5, "total": 8 * GiB, "free": 4 * GiB}])
    exporter = Exporter.open(interval=0.01, nvml=fake, hostname="h")
    try:
        page = exporter.poll_once()
        assert b"DCGM_FI_DEV_GPU_UTIL{" in page
        exporter._page = (page, time.monotonic() - 1.0)  # NVML hung for 100 intervals
        assert exporter.page() == render([])
    finally:
        exporter.stop()


def test_agent_without_gpus_serves_headers_only():
    exporter = Exporter(interval=1.0)
    assert exporter.poll_once() == exporter.page() == render([])
    assert parse_text(render([]).decode()) == []
    exporter.start()  # nothing to poll: no thread
    assert exporter._thread is None
    exporter.stop()


# -- configuration: the metrics= backend option ---------------------------------------


def test_metrics_option_is_parsed_per_backend():
    from olb.config import parse_backends

    a, b, c, d = parse_backends(
        "http://10.0.0.7:11434;metrics=:9400;gpus=0+1, [::1]:5;metrics=:9400/m?x=1,"
        " gpu-box;metrics=exporter.lan:9400, other:1", 4)
    assert (a.metrics, a.gpus) == ("http://10.0.0.7:9400/metrics", (0, 1))
    assert b.metrics == "http://[::1]:9400/m?x=1"
    assert c.metrics == "http://exporter.lan:9400/metrics"
    assert d.metrics == ""


@pytest.mark.parametrize("value", ["ftp://x:1/metrics", "http://x:99999/metrics", "", "http://:9",
                                   "http://x:9/m#frag"])
def test_bad_metrics_option_names_the_variable(value):
    from olb.config import load
    from olb.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        load([], {"OLB_BACKENDS": f"http://a:1;metrics={value}"})
    message = str(info.value)
    assert message.startswith("OLB_BACKENDS: bad option")
    assert "http://10.0.0.7:9400/metrics" in message and repr(value) in message

"""olb.gpu: NVML readings reach the table; every NVML failure degrades to
"load unknown" with one warning.  A fake pynvml stands in for the driver;
one test marked `gpu` uses the real one."""

import logging
import sys

import pytest

from olb._core import BackendTable
from olb.gpu import GpuMonitor

from fake_pynvml import FakeNvml, FakeNVMLError

GiB = 1 << 30


def gpu(util, free_gib=40, total_gib=80):
    return {"util": util, "total": total_gib * GiB, "free": free_gib * GiB}


def warnings_of(caplog):
    return [r for r in caplog.records if r.name == "olb.gpu" and r.levelno >= logging.WARNING]


@pytest.fixture
def monitors():
    started = []

    def make(*args, **kwargs):
        monitor = GpuMonitor(*args, **kwargs)
        started.append(monitor)
        return monitor

    yield make
    for monitor in started:
        monitor.stop()


# -- readings reach the table ---------------------------------------------------


def test_busy_gpu_backend_is_avoided(monitors):
    table = BackendTable([4, 4], seed=1)
    fake = FakeNvml([gpu(90), gpu(0)])
    monitor = monitors(table, [[0], [1]], nvml=fake)
    readings = monitor.poll_once()
    assert readings[0]["util"] == pytest.approx(0.9)
    assert readings[1]["mem_free"] == pytest.approx(0.5)
    assert monitor.readings == readings
    assert monitor.available
    # The busy GPU's backend scores as if half its size (the 2x headroom
    # cap): the idle one goes first and ends with twice the share.
    picks = [table.acquire() for _ in range(6)]
    assert picks[0] == 1 and (picks.count(0), picks.count(1)) == (2, 4)
    rows = table.snapshot()
    assert rows[0]["gpu_util"] == pytest.approx(0.9)
    assert rows[1]["gpu_util"] == 0.0


def test_backend_over_several_gpus_averages_util_and_pools_memory(monitors):
    table = BackendTable([1, 1])
    fake = FakeNvml([gpu(20, free_gib=10, total_gib=40), gpu(60, free_gib=30, total_gib=40)])
    monitors(table, [[0, 1], []], nvml=fake).poll_once()
    rows = table.snapshot()
    assert rows[0]["gpu_util"] == pytest.approx(0.4)
    assert rows[0]["gpu_mem_free"] == pytest.approx(0.5)
    assert rows[1]["gpu_util"] is None  # no GPUs named: left unknown


def test_readings_are_clamped_to_the_tables_range(monitors):
    table = BackendTable([1])
    fake = FakeNvml([{"util": 130, "total": 0, "free": 5}])
    monitors(table, [[0]], nvml=fake).poll_once()
    assert table.snapshot()[0]["gpu_util"] == 1.0
    assert table.snapshot()[0]["gpu_mem_free"] == 0.0


# -- no GPUs, no driver -----------------------------------------------------------


def test_no_gpus_configured_does_nothing_at_all(monitors, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # any import would fail loudly
    table = BackendTable([1, 1])
    monitor = monitors(table, [[], []])
    monitor.start()
    assert monitor.poll_once() == {}
    monitor.stop()
    assert monitor._thread is None
    assert not monitor.available
    assert warnings_of(caplog) == []


def test_pynvml_missing_warns_once(monitors, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    table = BackendTable([1])
    monitor = monitors(table, [[0]])
    assert monitor.poll_once() == {}
    assert monitor.poll_once() == {}
    [warning] = warnings_of(caplog)
    assert "pynvml" in warning.getMessage()
    assert not monitor.available
    assert table.snapshot()[0]["gpu_util"] is None


def test_no_driver_warns_once_and_leaves_weights_neutral(monitors, caplog):
    table = BackendTable([2, 2], seed=3)
    fake = FakeNvml([gpu(50)], init_error=FakeNVMLError(12))  # LIBRARY_NOT_FOUND
    monitor = monitors(table, [[0], [0]], nvml=fake)
    assert monitor.poll_once() == {}
    monitor.start()
    monitor._thread.join(5)  # ends on its own after the failed init
    assert not monitor._thread.is_alive()
    assert monitor.poll_once() == {}
    [warning] = warnings_of(caplog)
    assert "NVML unavailable" in warning.getMessage()
    assert fake.init_calls == 1
    assert not monitor.available
    assert all(row["gpu_util"] is None for row in table.snapshot())
    assert sorted(table.acquire() for _ in range(4)) == [0, 0, 1, 1]
    monitor.stop()
    assert fake.shutdown_calls == 0  # never initialised


def test_missing_gpu_index_warns_once_and_is_ignored(monitors, caplog):
    table = BackendTable([1, 1, 1])
    fake = FakeNvml([gpu(10), gpu(30)])
    monitor = monitors(table, [[0], [7], [1, 9]], nvml=fake)
    monitor.poll_once()
    monitor.poll_once()
    messages = sorted(w.getMessage() for w in warnings_of(caplog))
    assert len(messages) == 2
    assert "GPU 7" in messages[0] and "GPU 9" in messages[1]
    rows = table.snapshot()
    assert rows[0]["gpu_util"] == pytest.approx(0.1)
    assert rows[1]["gpu_util"] is None
    assert rows[2]["gpu_util"] == pytest.approx(0.3)  # GPU 9 ignored


def test_free_memory_goes_to_the_memory_sink_and_is_withdrawn_with_the_reading(monitors):
    table = BackendTable([1, 1])
    fake = FakeNvml([gpu(20, free_gib=10, total_gib=40), gpu(60, free_gib=30, total_gib=40)])
    seen = {}
    monitor = monitors(table, [[0, 1], []], nvml=fake, memory=lambda i, free, n: seen.update({i: (free, n)}))
    monitor.poll_once()
    assert seen == {0: (40 * GiB, 2)}          # pooled over the backend's two GPUs; 1 has none
    fake.failing = {1}
    monitor.poll_once()
    assert seen == {0: (None, 0)}              # a stale reading is withdrawn from both


# -- failures after a good start ------------------------------------------------


def test_failing_poll_clears_loads_and_warns_once_per_streak(monitors, caplog):
    table = BackendTable([1, 1])
    fake = FakeNvml([gpu(80), gpu(20)])
    monitor = monitors(table, [[0], [1]], nvml=fake)
    monitor.poll_once()
    assert table.snapshot()[0]["gpu_util"] == pytest.approx(0.8)

    fake.failing = {0}
    readings = monitor.poll_once()
    assert 0 not in readings and 1 in readings
    assert table.snapshot()[0]["gpu_util"] is None       # stale -> unknown
    assert table.snapshot()[1]["gpu_util"] == pytest.approx(0.2)
    monitor.poll_once()
    assert len(warnings_of(caplog)) == 1                  # one per streak

    fake.failing = set()
    monitor.poll_once()
    assert table.snapshot()[0]["gpu_util"] == pytest.approx(0.8)
    fake.failing = {0}
    monitor.poll_once()
    assert len(warnings_of(caplog)) == 2                  # a new streak


# -- the thread ------------------------------------------------------------------


def test_thread_polls_until_stopped(monitors):
    table = BackendTable([1])
    fake = FakeNvml([gpu(70)])
    fake.reads_wanted = 3  # more than one poll: the loop really loops
    monitor = monitors(table, [[0]], interval=0.001, nvml=fake)
    monitor.start()
    assert fake.read_event.wait(10)
    assert table.snapshot()[0]["gpu_util"] == pytest.approx(0.7)
    thread = monitor._thread
    monitor.stop()
    assert not thread.is_alive()
    assert fake.init_calls == 1 and fake.shutdown_calls == 1
    assert not monitor.available


def test_unexpected_exception_in_thread_is_logged_once_and_polling_goes_on(monitors, caplog):
    table = BackendTable([1])
    fake = FakeNvml([gpu(70)])
    monitor = monitors(table, [[0]], interval=0.001, nvml=fake)
    monitor.poll_once()
    fake.crashing = True
    fake.read_event.clear()
    monitor.start()
    # The second crash means the first one was fully handled: logged,
    # loads cleared, and the loop went round again.
    assert fake.crash_event.wait(10)
    assert table.snapshot()[0]["gpu_util"] is None
    fake.crashing = False
    assert fake.read_event.wait(10)  # it kept polling and recovered
    monitor.stop()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "GPU poll failed unexpectedly" in errors[0].getMessage()


def test_constructor_validates():
    table = BackendTable([1, 1])
    with pytest.raises(ValueError, match="2 backends"):
        GpuMonitor(table, [[0]])
    with pytest.raises(ValueError, match="interval"):
        GpuMonitor(table, [[0], []], interval=0)
    with pytest.raises(ValueError, match=">= 0"):
        GpuMonitor(table, [[-1], []])


# -- the real driver -------------------------------------------------------------


@pytest.mark.gpu
def test_real_nvml_reading_reaches_the_table():
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        pytest.skip(f"no NVIDIA driver: {exc}")
    try:
        count = pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()
    if count == 0:
        pytest.skip("NVML sees no GPU")
    table = BackendTable([1])
    monitor = GpuMonitor(table, [[0]])  # nvml=None: the lazy import path
    try:
        readings = monitor.poll_once()
        assert monitor.available
        assert 0.0 <= readings[0]["util"] <= 1.0
        assert 0.0 < readings[0]["mem_free"] <= 1.0
        assert readings[0]["mem_total"] > 0
        assert table.snapshot()[0]["gpu_util"] == readings[0]["util"]
    finally:
        monitor.stop()

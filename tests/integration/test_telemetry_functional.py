"""Remote GPU telemetry over real sockets: olb scrapes a DCGM-format /metrics
endpoint per backend (a stand-in dcgm-exporter, olb-agent, a simulated
Ollama's own page) and a busy remote GPU steers requests away."""

import asyncio
import os
import pathlib
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from olb import agent
from olb.server import start_proxy
from olb.sim import SimConfig, start_sim

from harness import RawClient, fetch, proxy_config, run

GiB = 1 << 30
ROOT = pathlib.Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
SLOW = SimConfig(token_rate=20, ttft=0, seed=3, num_parallel=8, num_predict_default=100)



def dcgm_page(*gpus):
    """dcgm-exporter's text for GPUs given as (util %, free MiB, used MiB)."""
    fields = (("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %)."),
              ("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB)."),
              ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB)."))
    out = []
    for f, (name, help_text) in enumerate(fields):
        out.append(f"# HELP {name} {help_text}\n# TYPE {name} gauge\n")
        for i, values in enumerate(gpus):
            out.append(f'{name}{{gpu="{i}",UUID="GPU-{i}",device="nvidia{i}",'
                       f'modelName="NVIDIA H100 80GB HBM3",Hostname="remote"}} {values[f]}\n')
    return "".join(out)


class DcgmEndpoint:
    """A remote host's dcgm-exporter: serves `page` on /metrics at 127.0.0.1, port 0.

    framing: "length" (Content-Length), "chunked" (Go's promhttp without a
    length) or "close" (body ends with the connection).  status != 200 answers
    that status instead.
    """

    def __init__(self, page: str, framing: str = "length"):
        self.page = page
        self.framing = framing
        self.status = 200
        self.requests: list[bytes] = []
        self.server = None
        self.port = 0

    async def start(self) -> "DcgmEndpoint":
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        self.server = await asyncio.start_server(self._handle, sock=sock)
        self.port = sock.getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    async def _handle(self, reader, writer):
        try:
            self.requests.append(await reader.readuntil(b"\r\n\r\n"))
            body = self.page.encode()
            if self.status != 200:
                writer.write(b"HTTP/1.1 %d Oops\r\ncontent-length: 0\r\n\r\n" % self.status)
            elif self.framing == "length":
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(body), body))
            elif self.framing == "chunked":
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                for i in range(0, len(body), 100):
                    piece = body[i:i + 100]
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                writer.write(b"0\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n" + body)
            await writer.drain()
        finally:
            writer.close()

    async def close(self):
        self.server.close()
        await self.server.wait_closed()


async def steer(proxy, sims, n=6):
    """Open n streaming generations through the proxy; where did they land?"""
    before = sum(s.stats.active for s in sims)
    clients = [await RawClient.connect(proxy.port) for _ in range(n)]
    for c in clients:
        c.send("POST", "/api/generate", {"model": "llama3.2", "prompt": "x"})
    for _ in range(500):
        if sum(s.stats.active for s in sims) == before + n:
            break
        await asyncio.sleep(0.01)
    active = [s.stats.active for s in sims]
    for c in clients:
        c.writer.transport.abort()
    return active


def test_busy_remote_gpu_steers_requests_away(loop, monkeypatch):
    """A remote host's dcgm-exporter says GPU 0 is 95% busy and GPU 1 idle;
    backend i is behind gpu i: olb scrapes it and the idle GPU takes all."""
    monkeypatch.setitem(sys.modules, "pynvml", None)  # remote GPUs: local NVML never asked

    async def main():
        endpoint = await DcgmEndpoint(dcgm_page((95, 8192, 73728), (0, 71680, 10240))).start()
        sims = [await start_sim(SLOW) for _ in range(2)]
        opts = [f";metrics={endpoint.url};gpus={i}" for i in range(2)]
        # A long interval: the test drives the scrape itself.
        proxy = await start_proxy(proxy_config([s.url for s in sims], backend_opts=opts, gpu_poll=30,
                                               session_bound=0, models_interval=0))
        try:
            assert proxy.ctx.gpu is None
            assert await proxy.telemetry.scrape_once() == {endpoint.url: None}
            status = (await fetch(proxy.admin_port, "GET", "/olb/status")).json()
            return status, await steer(proxy, sims), endpoint.requests
        finally:
            await proxy.close()
            for s in sims:
                await s.close()
            await endpoint.close()

    status, active, requests = run(loop, main())
    assert [b["gpu_util"] for b in status["backends"]] == [0.95, 0.0]
    assert [b["gpu_mem_free"] for b in status["backends"]] == [0.1, 0.875]
    # A busy GPU counts as half its size: the idle one takes twice the share.
    assert active == [2, 4]
    head = requests[0].decode().lower()
    assert head.startswith("get /metrics http/1.1\r\n") and "accept: text/plain;version=0.0.4" in head


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
def test_every_http_framing_is_read(loop, framing):
    async def main():
        endpoint = await DcgmEndpoint(dcgm_page((40, 100, 300)), framing).start()
        sim = await start_sim(SLOW)
        proxy = await start_proxy(proxy_config([sim.url], backend_opts=[f";metrics={endpoint.url}"],
                                               gpu_poll=30,
                                               session_bound=0, models_interval=0))
        try:
            errors = await proxy.telemetry.scrape_once()
            return errors, proxy.balancer.table.snapshot()[0]
        finally:
            await proxy.close()
            await sim.close()
            await endpoint.close()

    errors, row = run(loop, main())
    assert list(errors.values()) == [None]
    assert row["gpu_util"] == 0.4 and row["gpu_mem_free"] == 0.25


def test_silent_remote_host_falls_back_to_inflight_counts(loop, caplog):
    """The exporter starts failing: the last reading holds for a few
    intervals, then is cleared, and requests spread by in-flight counts."""
    async def main():
        endpoint = await DcgmEndpoint(dcgm_page((95, 100, 100), (0, 100, 100))).start()
        sims = [await start_sim(SLOW) for _ in range(2)]
        opts = [f";metrics={endpoint.url};gpus={i}" for i in range(2)]
        proxy = await start_proxy(proxy_config([s.url for s in sims], backend_opts=opts, gpu_poll=0.05,
                                               session_bound=0, models_interval=0))
        table = proxy.balancer.table
        try:
            while table.snapshot()[0]["gpu_util"] is None:  # the background task's first scrape
                await asyncio.sleep(0.01)
            endpoint.status = 500
            while table.snapshot()[0]["gpu_util"] is not None:  # stale after 3 intervals
                await asyncio.sleep(0.01)
            status = proxy.telemetry.status()[endpoint.url]
            return status, await steer(proxy, sims)
        finally:
            await proxy.close()
            for s in sims:
                await s.close()
            await endpoint.close()

    status, active = run(loop, main())
    assert "answered 500" in status["error"]
    assert active == [3, 3]
    assert any("answered 500" in r.getMessage() for r in caplog.records if r.name == "olb.telemetry")


def test_unreachable_endpoint_never_delays_requests(loop):
    """Nothing listens at the metrics URL: requests are served at once, on
    in-flight counts, while the scrapes fail in the background."""
    async def main():
        dead = socket.socket()
        dead.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        sim = await start_sim(SimConfig(token_rate=0, ttft=0, seed=7))
        url = f"http://127.0.0.1:{dead.getsockname()[1]}/metrics"
        proxy = await start_proxy(proxy_config([sim.url], backend_opts=[f";metrics={url}"], gpu_poll=0.05,
                                               session_bound=0, models_interval=0))
        try:
            start = time.monotonic()
            resp = await fetch(proxy.port, "POST", "/api/generate",
                               {"model": "llama3.2", "prompt": "x", "stream": False})
            took = time.monotonic() - start
            errors = await proxy.telemetry.scrape_once()
            return resp.status, took, errors[url], proxy.balancer.table.snapshot()[0]["gpu_util"]
        finally:
            await proxy.close()
            await sim.close()
            dead.close()

    status, took, error, util = run(loop, main())
    assert status == 200 and took < 1.0
    assert "refused" in error.lower() or "connect" in error.lower()
    assert util is None


# -- olb-agent -----------------------------------------------------------------------


class FakeNvmlWithIdentity:
    """tests/fake_pynvml's FakeNvml plus the identity calls olb-agent makes."""

    @staticmethod
    def make(gpus):
        from fake_pynvml import FakeNvml

        class Fake(FakeNvml):
            def nvmlDeviceGetUUID(self, handle):
                return f"GPU-{handle[1]:08d}-0000-0000-0000-000000000000"

            def nvmlDeviceGetName(self, handle):
                return "NVIDIA H100 80GB HBM3"

            def nvmlDeviceGetPciInfo(self, handle):
                from types import SimpleNamespace
                return SimpleNamespace(busId=f"00000000:{handle[1] + 1:02X}:00.0")

        return Fake(gpus)


def test_olb_agent_steers_requests_away_from_a_busy_gpu(loop, monkeypatch):
    """olb-agent on a "remote" host (the fake pynvml injected as pynvml)
    exports GPU 0 busy and GPU 1 idle; olb scrapes the agent."""
    fake = FakeNvmlWithIdentity.make([{"util": 95, "total": 80 * GiB, "free": 10 * GiB},
                                      {"util": 0, "total": 80 * GiB, "free": 70 * GiB}])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    exporter = agent.Exporter.open(interval=0.05)  # nvml=None: the lazy import finds the fake
    exporter.poll_once()
    exporter.start()
    server = agent.make_server("127.0.0.1", 0, exporter)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/metrics"

    async def main():
        sims = [await start_sim(SLOW) for _ in range(2)]
        opts = [f";metrics={url};gpus={i}" for i in range(2)]
        proxy = await start_proxy(proxy_config([s.url for s in sims], backend_opts=opts, gpu_poll=30,
                                               session_bound=0, models_interval=0))
        try:
            assert await proxy.telemetry.scrape_once() == {url: None}
            status = (await fetch(proxy.admin_port, "GET", "/olb/status")).json()
            readings = proxy.telemetry.status()[url]["readings"]
            return status, readings, await steer(proxy, sims)
        finally:
            await proxy.close()
            for s in sims:
                await s.close()

    try:
        status, readings, active = run(loop, main())
    finally:
        server.shutdown()
        server.server_close()
        exporter.stop()
    assert [b["gpu_util"] for b in status["backends"]] == [0.95, 0.0]
    assert readings["1"]["mem_free_bytes"] == 70 * GiB
    # A busy GPU counts as half its size: the idle one takes twice the share.
    assert active == [2, 4]
    assert fake.init_calls == fake.shutdown_calls


def agent_process(*args, fake_gpus=None):
    """`python -m olb.agent ARGS` with pynvml replaced: by the fake with
    `fake_gpus`, or, with None, by nothing (import fails, as without nvidia-ml-py)."""
    if fake_gpus is None:
        inject = "import sys\nsys.modules['pynvml'] = None\n"
    else:
        inject = (f"import sys\nsys.path.insert(0, {str(TESTS)!r})\n"
                  "from fake_pynvml import FakeNvml\n"
                  "class Fake(FakeNvml):\n"
                  "    def nvmlDeviceGetUUID(self, h): return 'GPU-%08d' % h[1]\n"
                  "    def nvmlDeviceGetName(self, h): return 'NVIDIA H100 80GB HBM3'\n"
                  "    def nvmlDeviceGetPciInfo(self, h): raise self.NVMLError(3)\n"
                  f"sys.modules['pynvml'] = Fake({fake_gpus!r})\n")
    code = f"{inject}from olb.agent import main\nsys.exit(main({list(args)!r}))\n"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def read_line(proc, pattern, timeout=20.0):
    """Read proc's stdout until a line matches; no sleeping, bounded in time."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and sel.select(deadline - time.monotonic()):
        line = proc.stdout.readline()
        if not line:
            break
        m = re.search(pattern, line)
        if m:
            return m
    proc.kill()
    raise AssertionError(f"no line matching {pattern!r}; stderr: {proc.communicate()[1]!r}")


def test_agent_command_serves_and_stops_on_sigterm():
    import httpx

    gpus = [{"util": 42, "total": 16 * GiB, "free": 4 * GiB}]
    proc = agent_process("--listen", "127.0.0.1:0", "--interval", "0.1", fake_gpus=gpus)
    try:
        port = int(read_line(proc, r"serving 1 GPU\(s\) on http://127\.0\.0\.1:(\d+)/metrics").group(1))
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        missing = httpx.get(f"http://127.0.0.1:{port}/nope", timeout=5)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 0, stderr
    assert metrics.status_code == 200
    assert metrics.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert re.search(r'^DCGM_FI_DEV_GPU_UTIL\{gpu="0",.*Hostname="[^"]+"\} 42$', metrics.text, re.M)
    assert "\nDCGM_FI_DEV_FB_FREE{" in metrics.text and "} 4096\n" in metrics.text
    assert "} 12288\n" in metrics.text  # FB_USED
    assert missing.status_code == 404


def test_agent_without_driver_exits_2_with_a_clear_message():
    proc = agent_process("--listen", "127.0.0.1:0")
    _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 2
    assert "NVML is unavailable (pynvml is not installed" in stderr
    assert "--allow-no-gpu" in stderr


def test_agent_allow_no_gpu_serves_a_page_without_gpus():
    import httpx

    proc = agent_process("--listen", "127.0.0.1:0", "--allow-no-gpu")
    try:
        port = int(read_line(proc, r"serving 0 GPU\(s\) on http://127\.0\.0\.1:(\d+)/").group(1))
        page = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert "--allow-no-gpu" in stderr
    assert page == agent.render([]).decode()


def test_agent_in_process_errors(monkeypatch, capsys):
    from fake_pynvml import FakeNvml, FakeNVMLError

    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([], init_error=FakeNVMLError(12)))
    assert agent.main(["--listen", "127.0.0.1:0"]) == 2
    assert "NVML is unavailable (FakeNVMLError: NVML error 12)" in capsys.readouterr().err

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        port = taken.getsockname()[1]
        assert agent.main(["--listen", f"127.0.0.1:{port}", "--allow-no-gpu"]) == 2
        assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    finally:
        taken.close()

    for bad in (["--interval", "0"], ["--interval", "soon"], ["--listen", "nowhere"]):
        with pytest.raises(SystemExit) as info:
            agent.main(bad)
        assert info.value.code == 2
    assert "--listen: expected HOST:PORT" in capsys.readouterr().err


# -- the simulated Ollama's own /metrics -------------------------------------------------


def test_scraping_a_simulated_ollamas_gpu(loop):
    """olb.sim serves its simulated GPU in the DCGM format on /metrics; a busy
    instance (a long generation sent to it directly) steers requests away."""
    pytest.importorskip("olb.sim.gpu", reason="olb.sim has no simulated GPU yet")

    async def main():
        gpu_sim = SimConfig(gpu="default", num_parallel=8, preload=("llama3.2",), time_scale=10, seed=5)
        sims = [await start_sim(gpu_sim) for _ in range(2)]
        # metrics=:PORT: the backend's own host, the simulated instance's port.
        opts = [f";metrics=:{s.port}" for s in sims]
        proxy = await start_proxy(proxy_config([s.url for s in sims], backend_opts=opts, gpu_poll=30,
                                               session_bound=0, models_interval=0))
        table = proxy.balancer.table
        try:
            await proxy.telemetry.scrape_once()
            idle = table.snapshot()
            busy = await RawClient.connect(sims[0].port)  # straight to sim 0, not through olb
            busy.send("POST", "/api/generate", {"model": "llama3.2", "prompt": "x",
                                                "options": {"num_predict": 1_000_000}})
            while table.snapshot()[0]["gpu_util"] < 0.95:
                await asyncio.sleep(0.02)
                await proxy.telemetry.scrape_once()
            rows = table.snapshot()
            active = await steer(proxy, sims, n=4)
            busy.writer.transport.abort()
            return idle, rows, active
        finally:
            await proxy.close()
            for s in sims:
                await s.close()

    idle, rows, active = run(loop, main())
    assert [r["gpu_util"] for r in idle] == [0.0, 0.0]
    assert all(0.0 < r["gpu_mem_free"] < 1.0 for r in idle)  # llama3.2 resident
    assert rows[0]["gpu_util"] >= 0.95 and rows[1]["gpu_util"] == 0.0
    # The busy GPU counts as half its size, so the idle one takes 3 of 4
    # (sim 0 also runs the direct generation, which olb does not count).
    assert active[1] == 3 and active[0] == 2

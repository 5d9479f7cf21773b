"""`olb-sim` as a process: URLs on stdout, SIGTERM -> exit 0, bad flags -> 2.

Runs `sys.executable -m olb.sim` (the package need not be pip-installed).
Readiness is the printed URL line, read with a deadline; nothing sleeps.
"""

import os
import selectors
import signal
import subprocess
import sys
import time

import httpx
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def spawn(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "olb.sim", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=ROOT)


def read_lines(proc, count, timeout=20):
    """The first `count` stdout lines, read from the raw pipe (a buffered
    readline could swallow the second line where select() cannot see it)."""
    fd = proc.stdout.fileno()
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    buf, deadline = b"", time.monotonic() + timeout
    while buf.count(b"\n") < count:
        left = deadline - time.monotonic()
        assert left > 0 and sel.select(left), "olb-sim printed no URL in time"
        data = os.read(fd, 4096)
        assert data, "olb-sim exited: " + proc.stderr.read().decode()
        buf += data
    sel.close()
    return [line.decode() for line in buf.split(b"\n")[:count]]


def test_serves_count_instances_until_sigterm():
    proc = spawn("--host", "127.0.0.1", "--port", "0", "--count", "2", "--token-rate", "0", "--ttft", "0",
                 "--parallel", "2")
    try:
        urls = read_lines(proc, 2)
        assert len(set(urls)) == 2 and all(u.startswith("http://127.0.0.1:") for u in urls)
        for url in urls:
            assert httpx.get(url + "/", timeout=10).text == "Ollama is running"
            r = httpx.post(url + "/api/generate", json={"model": "llama3.2", "prompt": "hi", "stream": False},
                           timeout=10)
            assert r.status_code == 200 and r.json()["done"]
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(20)
        proc.stdout.close()
        proc.stderr.close()
    assert rc == 0


def test_sigint_also_exits_cleanly():
    proc = spawn("--port", "0")
    try:
        read_lines(proc, 1)
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(20)
        proc.stdout.close()
        proc.stderr.close()
    assert rc == 0


@pytest.mark.parametrize("args", [
    ["--nope"], ["--count", "0"], ["--parallel", "0"], ["--token-rate", "-1"], ["--models", "nope"],
    ["--port", "70000"], ["--keep-alive", "5d"], ["--gpu", "tpu"], ["--vram", "24"],
    ["--time-scale", "0"], ["--preload", "llama3.2:1b"], ["--gpu", "default", "--max-loaded", "-1"],
])
def test_bad_flags_exit_2(args):
    proc = spawn(*args)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 2 and out == b"" and err.startswith(b"usage: olb-sim")


def test_gpu_flags():
    proc = spawn("--port", "0", "--gpu", "rtx4090", "--vram", "16", "--time-scale", "100",
                 "--preload", "llama3.2", "--max-loaded", "2", "--parallel", "1")
    try:
        (url,) = read_lines(proc, 1)
        ps = httpx.get(url + "/api/ps", timeout=10).json()["models"]
        metrics = httpx.get(url + "/metrics", timeout=10).text
        r = httpx.post(url + "/api/generate", json={"model": "llama3.1:8b", "prompt": "hi", "stream": False},
                       timeout=10).json()
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(20)
        err = proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
    assert rc == 0 and b"gpu rtx4090 16 GiB, time scale 100" in err
    assert [m["name"] for m in ps] == ["llama3.2:latest"]
    assert 'DCGM_FI_DEV_FB_FREE{gpu="0",' in metrics and 'modelName="NVIDIA GeForce RTX 4090"' in metrics
    used = int(metrics.split("DCGM_FI_DEV_FB_USED{")[1].split("} ")[1].split()[0])
    free = int(metrics.split("DCGM_FI_DEV_FB_FREE{")[1].split("} ")[1].split()[0])
    assert used == ps[0]["size_vram"] // (1 << 20) and used + free == 16 * 1024
    # A cold 8B: ~3.3 simulated seconds of load, 33 ms of real time.
    assert 3.0e9 < r["load_duration"] < 3.8e9

"""`olb-fast` as a user runs it: a separate process, configured by OLB_* variables."""

import os
import pathlib
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import time

import httpx
import pytest

from olb.sim import SimConfig, start_sim

ROOT = pathlib.Path(__file__).resolve().parents[2]


def olb_env(**env):
    base = {k: v for k, v in os.environ.items() if not k.startswith("OLB_")}
    base["PYTHONPATH"] = str(ROOT) + os.pathsep + base.get("PYTHONPATH", "")
    base["PYTHONUNBUFFERED"] = "1"
    # Port 0: the default admin port (127.0.0.1:11433) may be another run's.
    base["OLB_ADMIN_LISTEN"] = "127.0.0.1:0"
    base.update(env)
    return base


def start_olb(args=(), **env):
    # stderr goes to a file, not a pipe nobody drains: a worker that logs
    # must never block on a full pipe.
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "olb", *args], env=olb_env(**env),
                            stdout=subprocess.PIPE, stderr=log, text=True)
    proc.log = log
    return proc


def olb_log(proc) -> str:
    proc.log.seek(0)
    return proc.log.read()


def read_line_matching(proc, pattern, timeout=20.0):
    """Read proc's stdout until a line matches; no sleeping, bounded in time."""
    return read_lines_matching(proc, pattern, timeout=timeout)[0]


def read_lines_matching(proc, *patterns, timeout=20.0):
    """Read proc's stdout until a line matches each pattern in turn; the matches.

    One call for lines that come together: select() cannot see what an
    earlier readline() has already buffered."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    seen = []
    found = []
    while time.monotonic() < deadline:
        if not sel.select(deadline - time.monotonic()):
            break
        while len(found) < len(patterns):
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            m = re.search(patterns[len(found)], line)
            if m:
                found.append(m)
        if len(found) == len(patterns) or not line:
            break
    if len(found) == len(patterns):
        return found
    proc.kill()
    proc.wait()
    raise AssertionError(f"no lines matching {patterns!r}; stdout: {seen!r}; stderr: {olb_log(proc)!r}")


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(20)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"olb did not stop on SIGTERM; its log: {olb_log(proc)}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.log.close()


@pytest.mark.parametrize("env,needle", [
    ({"OLB_BACKENDS": "http://127.0.0.1:1;max=zero"}, "OLB_BACKENDS"),
    ({"OLB_BACKENDS": "http://127.0.0.1:1", "OLB_QUEUE_TIMEOUT": "soon"}, "OLB_QUEUE_TIMEOUT"),
    ({"OLB_BACKENDS": "http://127.0.0.1:1", "OLB_PULL": "everywhere"}, "OLB_PULL"),
    ({}, "--demo"),
])
def test_bad_configuration_exits_2(env, needle):
    proc = subprocess.run([sys.executable, "-m", "olb"], env=olb_env(**env), capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2
    assert needle in proc.stderr and proc.stderr.startswith("olb-fast: ")


def test_listen_address_in_use_exits_2():
    import socket
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        proc = subprocess.run([sys.executable, "-m", "olb"], capture_output=True, text=True, timeout=30,
                              env=olb_env(OLB_BACKENDS="http://127.0.0.1:1",
                                          OLB_LISTEN=f"127.0.0.1:{taken.getsockname()[1]}"))
    finally:
        taken.close()
    assert proc.returncode == 2 and "OLB_LISTEN" in proc.stderr


def test_demo_serves_a_simulated_cluster():
    proc = start_olb(["--demo", "2", "--listen", "127.0.0.1:0"])
    try:
        url, admin = (m.group(1) for m in read_lines_matching(proc, r"listening on (http://\S+)",
                                                               r"admin on (http://\S+)"))
        tags = httpx.get(url + "/api/tags", timeout=10)
        assert tags.status_code == 200 and tags.json()["models"]
        reply = httpx.post(url + "/api/generate", json={"model": "llama3.2", "prompt": "hi", "stream": False},
                           timeout=30)
        assert reply.status_code == 200 and reply.json()["done"]
        status = httpx.get(admin + "/olb/status", timeout=10).json()
        assert len(status["backends"]) == 2
        assert httpx.get(url + "/olb/status", timeout=10).status_code == 404  # not on the data port
    finally:
        assert stop(proc) == 0


@pytest.mark.parametrize("policy", ["least-inflight", "round-robin"])
def test_workers_share_counts_and_are_restarted(loop_thread, policy):
    sims = [loop_thread.run(start_sim(SimConfig(token_rate=50, ttft=0, seed=1, num_parallel=8,
                                                num_predict_default=5000))) for _ in range(2)]
    backends = ",".join(f"{s.url};max=3" for s in sims)
    # A plain policy (no model or conversation affinity): the test is about
    # counts shared across workers, which both plain policies must respect.
    proc = start_olb(OLB_BACKENDS=backends, OLB_LISTEN="127.0.0.1:0", OLB_WORKERS="2",
                     OLB_HEALTH_INTERVAL="0", OLB_POLICY=policy)
    try:
        url, admin = (m.group(1) for m in read_lines_matching(proc, r"listening on (http://\S+)",
                                                               r"admin on (http://\S+)"))
        # Six streams (capacity 2 x 3) opened on separate connections, which
        # SO_REUSEPORT spreads over both workers.
        streams = []
        for i in range(6):
            client = httpx.Client(timeout=30)
            resp = client.send(client.build_request("POST", url + "/api/generate",
                                                    json={"model": "llama3.2", "prompt": str(i)}), stream=True)
            # Keep the iterator: dropping a half-read httpx iterator closes the stream.
            chunks = resp.iter_raw()
            assert b'"done":false' in next(chunks)
            streams.append((client, resp, chunks))
        pids = set()
        for _ in range(20):
            with httpx.Client(timeout=10) as c:
                doc = c.get(admin + "/olb/status").json()
            pids.add(doc["pid"])
            inflight = [b["inflight"] for b in doc["backends"]]
            assert inflight == [3, 3]  # shared counts: every worker sees all six
        assert doc["workers"] == 2 and doc["policy"] == policy
        # Kill a worker that holds some of the streams: they die with it, and
        # the supervisor reclaims their counts from the shared table.
        for _ in range(50):
            with httpx.Client(timeout=10) as c:
                doc = c.get(admin + "/olb/status").json()
            held = sum(b["local_inflight"] for b in doc["backends"])
            if held:
                break
        assert held, doc
        victim = doc["pid"]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with httpx.Client(timeout=10) as c:
                doc = c.get(admin + "/olb/status").json()
            if sum(b["inflight"] for b in doc["backends"]) == 6 - held:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"counts never reclaimed: {doc}")
        for client, resp, _ in streams:
            resp.close()
            client.close()
        # Everything released: counts back to zero, whichever worker answers.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with httpx.Client(timeout=10) as c:
                doc = c.get(admin + "/olb/status").json()
            if sum(b["inflight"] for b in doc["backends"]) == 0:
                break
            time.sleep(0.05)
        assert sum(b["inflight"] for b in doc["backends"]) == 0
        assert len(pids) == 2
    finally:
        assert stop(proc) == 0
        for s in sims:
            loop_thread.run(s.close())

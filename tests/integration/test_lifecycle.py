"""olb's lifecycle as an operator drives it: OLB_CONFIG, SIGHUP reloads, SIGTERM,
a new olb taking over the port, --version (docs/operations.md). olb-fast runs
as a subprocess in front of olb-sim backends, as in test_cli.py."""

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from test_cli import olb_env, olb_log, read_line_matching, start_olb, stop

from olb import __version__
from olb.sim import SimConfig, start_sim

#: A simulated backend whose streams last about a second (60 tokens at 50/s).
SLOW = {"token_rate": 50, "ttft": 0, "seed": 1, "num_parallel": 4}
STREAM = {"model": "llama3.2", "prompt": "tell me a story", "options": {"num_predict": 60}}
#: A short answer (5 tokens), not streamed.
SHORT = {"model": "llama3.2", "prompt": "hi", "options": {"num_predict": 5}, "stream": False}


def wait_for_log(proc, needle: str, timeout: float = 15.0, count: int = 1) -> str:
    """Poll olb's stderr until `needle` is in it `count` times (bounded in time); the log so far."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = olb_log(proc)
        if text.count(needle) >= count:
            return text
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    raise AssertionError(f"no {needle!r} in olb's log: {olb_log(proc)}")


def open_stream(url: str, body=STREAM):
    """A streamed /api/generate whose first line has arrived."""
    client = httpx.Client(timeout=30)
    resp = client.send(client.build_request("POST", url + "/api/generate", json=body), stream=True)
    assert resp.status_code == 200
    lines = resp.iter_lines()
    assert json.loads(next(lines))["done"] is False
    return client, resp, lines


def finish_stream(stream) -> dict:
    """Read a stream to its end; its last line, which must be Ollama's final one."""
    client, resp, lines = stream
    try:
        last = None
        for line in lines:
            if line:
                last = json.loads(line)
        assert last is not None and last["done"] is True and "error" not in last, last
        return last
    finally:
        resp.close()
        client.close()


def reap(proc) -> None:
    """End a process these tests stopped themselves, and close its pipes."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    proc.stdout.close()
    proc.log.close()


def status(url: str) -> dict:
    with httpx.Client(timeout=10) as c:
        return c.get(url + "/olb/status").json()


def wait_status(url: str, cond, timeout: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        doc = status(url)
        if cond(doc) or time.monotonic() > deadline:
            return doc
        time.sleep(0.02)


@pytest.fixture
def sims(loop_thread):
    servers = [loop_thread.run(start_sim(SimConfig(**SLOW))) for _ in range(2)]
    yield servers
    for s in servers:
        loop_thread.run(s.close())


def write(path, text: str) -> None:
    # Written aside and renamed, as an editor or a config manager does: a
    # reload never reads half a file.
    with open(f"{path}.new", "w") as f:
        f.write(text)
    os.replace(f"{path}.new", path)


def test_version():
    proc = subprocess.run([sys.executable, "-m", "olb", "--version"], env=olb_env(), capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout.strip() == f"olb-fast {__version__}"


def test_config_file_overrides_the_environment_and_sighup_swaps_backends_mid_stream(sims, tmp_path):
    a, b = sims
    conf = tmp_path / "olb.env"
    write(conf, f"# olb\nOLB_BACKENDS={a.url};max=1\nOLB_QUEUE_TIMEOUT='20'\n")
    # The environment names a dead backend: the file's value wins.
    proc = start_olb(OLB_CONFIG=str(conf), OLB_BACKENDS="http://127.0.0.1:1", OLB_LISTEN="127.0.0.1:0",
                     OLB_HEALTH_INTERVAL="0", OLB_POLICY="least-inflight")
    pool = concurrent.futures.ThreadPoolExecutor(2)
    try:
        url = read_line_matching(proc, r"listening on (http://\S+)").group(1)
        assert [x["url"] for x in status(url)["backends"]] == [a.url]
        running = open_stream(url)
        # A's one slot is taken: the next request waits in olb's queue.
        queued = pool.submit(httpx.post, url + "/api/generate", json={**STREAM, "stream": False}, timeout=30)
        assert wait_status(url, lambda d: d["queue"] == 1)["queue"] == 1

        write(conf, f"OLB_BACKENDS={b.url};max=2\n")
        proc.send_signal(signal.SIGHUP)
        log = wait_for_log(proc, "queued request(s) moved")
        assert f"backend {a.url} removed; 1 running request(s) finish there first" in log
        assert f"backend {b.url} added" in log

        # The queued request was routed again, to the added backend.
        reply = queued.result(30)
        assert reply.status_code == 200 and reply.json()["done"] is True
        doc = status(url)
        assert [x["url"] for x in doc["backends"]] == [b.url] and doc["backends"][0]["capacity"] == 2
        # New requests go to the added backend too.
        for _ in range(3):
            r = httpx.post(url + "/api/generate", json=SHORT, timeout=30)
            assert r.status_code == 200
        assert status(url)["backends"][0]["served"] == 4
        # The stream on the removed backend ran to its end, uncut.
        assert finish_stream(running)["eval_count"] == 60
        wait_for_log(proc, "the previous configuration's last request ended")
        assert proc.poll() is None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        assert stop(proc) == 0


@pytest.mark.parametrize("bad,variable,workers", [
    ("OLB_MAX_INFLIGHT=lots\n", "OLB_MAX_INFLIGHT", "1"),
    ("OLB_MAX_INFLGHT=4\n", "OLB_MAX_INFLGHT", "1"),
    ("OLB_BACKENDS=ftp://somewhere\n", "OLB_BACKENDS", "1"),
    ("OLB_LISTEN=127.0.0.1:1\n", "OLB_LISTEN", "1"),
    ("OLB_SHUTDOWN_TIMEOUT=-1\n", "OLB_SHUTDOWN_TIMEOUT", "2"),
    ("OLB_WORKERS=3\n", "OLB_WORKERS", "2"),
])
def test_a_bad_file_is_refused_on_sighup_and_the_old_settings_stay(sims, tmp_path, bad, variable, workers):
    a, b = sims
    conf = tmp_path / "olb.env"
    write(conf, f"OLB_BACKENDS={a.url};max=3\nOLB_LISTEN=127.0.0.1:0\nOLB_WORKERS={workers}\n")
    proc = start_olb(OLB_CONFIG=str(conf), OLB_HEALTH_INTERVAL="0")
    try:
        url = read_line_matching(proc, r"listening on (http://\S+)").group(1)
        running = open_stream(url)
        pids = {status(url)["pid"] for _ in range(20)}
        write(conf, f"OLB_BACKENDS={b.url}\nOLB_LISTEN=127.0.0.1:0\nOLB_WORKERS={workers}\n{bad}")
        proc.send_signal(signal.SIGHUP)
        log = wait_for_log(proc, "reload refused")
        line = next(x for x in log.splitlines() if "reload refused" in x)
        assert variable in line, line
        for _ in range(20):  # every worker: the same ones, as they were
            doc = status(url)
            assert [(x["url"], x["capacity"]) for x in doc["backends"]] == [(a.url, 3)]
            assert doc["pid"] in pids
        assert finish_stream(running)["done"]
        r = httpx.post(url + "/api/generate", json={**STREAM, "stream": False}, timeout=30)
        assert r.status_code == 200
    finally:
        assert stop(proc) == 0


def test_sigterm_lets_a_stream_finish_and_refuses_the_queue_at_once(sims):
    a, _ = sims
    proc = start_olb(OLB_BACKENDS=f"{a.url};max=1", OLB_LISTEN="127.0.0.1:0", OLB_HEALTH_INTERVAL="0",
                     OLB_SHUTDOWN_TIMEOUT="20", OLB_QUEUE_TIMEOUT="20")
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        url = read_line_matching(proc, r"listening on (http://\S+)").group(1)
        # A 3 s stream (150 tokens at 50/s).
        running = open_stream(url, {**STREAM, "options": {"num_predict": 150}})
        queued = pool.submit(httpx.post, url + "/api/generate", json={**STREAM, "stream": False}, timeout=30)
        assert wait_status(url, lambda d: d["queue"] == 1)["queue"] == 1
        proc.send_signal(signal.SIGTERM)
        reply = queued.result(30)
        assert reply.status_code == 503 and reply.headers["retry-after"] == "1"
        assert "shutting down" in reply.json()["error"]
        # Answered at once: the stream is still running.
        assert json.loads(next(running[2]))["done"] is False
        assert finish_stream(running)["eval_count"] == 150
        assert proc.wait(20) == 0
        log = olb_log(proc)
        assert "1 queued request(s) refused (503), 1 running" in log and "cut" not in log
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        reap(proc)


def test_sigterm_cuts_what_outlives_the_shutdown_timeout_and_logs_it(sims):
    a, _ = sims
    proc = start_olb(OLB_BACKENDS=a.url, OLB_LISTEN="127.0.0.1:0", OLB_HEALTH_INTERVAL="0",
                     OLB_SHUTDOWN_TIMEOUT="0.2")
    try:
        url = read_line_matching(proc, r"listening on (http://\S+)").group(1)
        client, resp, lines = open_stream(url, {**STREAM, "options": {"num_predict": 5000}})
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        with pytest.raises(httpx.HTTPError):
            for _ in lines:
                pass
        resp.close()
        client.close()
        assert f"cut POST /api/generate (model llama3.2:latest) on {a.url} after OLB_SHUTDOWN_TIMEOUT=0.2s" \
            in olb_log(proc)
    finally:
        reap(proc)


def test_sighup_reaches_every_worker(sims, tmp_path):
    a, b = sims
    conf = tmp_path / "olb.env"
    write(conf, f"OLB_BACKENDS={a.url}\n")
    proc = start_olb(OLB_CONFIG=str(conf), OLB_LISTEN="127.0.0.1:0", OLB_WORKERS="2",
                     OLB_HEALTH_INTERVAL="0")
    try:
        url = read_line_matching(proc, r"listening on (http://\S+)").group(1)
        old_pids = {status(url)["pid"] for _ in range(20)}
        running = open_stream(url)
        write(conf, f"OLB_BACKENDS={b.url};max=5\n")
        proc.send_signal(signal.SIGHUP)
        wait_for_log(proc, "new worker(s) took over")
        # Once both old workers have stopped accepting, every worker that
        # answers has the new backends.
        wait_for_log(proc, "handing over to new workers", count=2)
        seen = set()
        for _ in range(40):
            doc = status(url)
            assert [(x["url"], x["capacity"]) for x in doc["backends"]] == [(b.url, 5)], doc
            seen.add(doc["pid"])
            r = httpx.post(url + "/api/generate", json=SHORT, timeout=30)
            assert r.status_code == 200
        assert len(seen) == 2 and not seen & old_pids
        assert finish_stream(running)["eval_count"] == 60
        # The retired workers exit once their requests have ended.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(p) for p in old_pids):
            time.sleep(0.05)
        assert not any(_alive(p) for p in old_pids)
    finally:
        assert stop(proc) == 0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_a_new_olb_takes_over_the_port_without_a_refused_connection(sims):
    a, b = sims
    old = start_olb(OLB_BACKENDS=a.url, OLB_LISTEN="127.0.0.1:0", OLB_HEALTH_INTERVAL="0")
    new = None
    stop_connecting = threading.Event()

    def connect_all_along() -> list[str]:
        # A fresh connection each time, through the whole hand-over: each one
        # must be answered, by one olb or the other (bounded in count and time).
        answered_by = []
        deadline = time.monotonic() + 30
        while not stop_connecting.is_set() and len(answered_by) < 20000 and time.monotonic() < deadline:
            with httpx.Client(timeout=10) as c:
                answered_by.append(c.get(url + "/olb/status").json()["backends"][0]["url"])
        return answered_by

    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        url = read_line_matching(old, r"listening on (http://\S+)").group(1)
        port = url.rsplit(":", 1)[1]
        running = open_stream(url)
        connecting = pool.submit(connect_all_along)
        new = start_olb(OLB_BACKENDS=b.url, OLB_LISTEN=f"127.0.0.1:{port}", OLB_HEALTH_INTERVAL="0")
        read_line_matching(new, r"listening on (http://\S+)")
        old.send_signal(signal.SIGTERM)
        # The old olb stops accepting at once and waits for its stream.
        assert finish_stream(running)["eval_count"] == 60
        assert old.wait(20) == 0
        stop_connecting.set()
        answered_by = connecting.result(30)  # raises if a connection was refused or reset
        assert answered_by[0] == a.url and answered_by[-1] == b.url
        assert b.url in answered_by[: -1]  # both answered while the old one drained
    finally:
        stop_connecting.set()
        pool.shutdown(wait=True)
        reap(old)
        if new is not None:
            assert stop(new) == 0

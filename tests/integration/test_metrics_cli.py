"""`olb-fast` processes: one scrape for N workers, the access log reopened on SIGUSR1, JSON logs."""

import os
import signal
import time

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families
from test_cli import olb_log, read_line_matching, stop
from test_cli import start_olb as _start_olb

from olb.sim import SimConfig, start_sim

#: /metrics and /olb/status read on the data port, served there behind
#: OLB_ADMIN_TOKEN: SO_REUSEPORT spreads these connections over the workers.
TOKEN = "metrics-cli-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def start_olb(args=(), **env):
    env.setdefault("OLB_ADMIN_LISTEN", "off")
    env.setdefault("OLB_ADMIN_TOKEN", TOKEN)
    return _start_olb(args, **env)


def scrape_total(url: str, name: str, **labels) -> float:
    # A fresh connection each time: SO_REUSEPORT hands it to either worker.
    with httpx.Client(timeout=10) as c:
        page = c.get(url + "/metrics", headers=AUTH).text
    return sum(s.value for f in text_string_to_metric_families(page) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def wait_for(cond, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.05)


def lines(path) -> list:
    try:
        with open(path, "rb") as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def test_two_workers_one_scrape_and_sigusr1_reopens(loop_thread, tmp_path):
    sims = [loop_thread.run(start_sim(SimConfig(token_rate=0, ttft=0, seed=1))) for _ in range(2)]
    log_path = tmp_path / "access.log"
    proc = start_olb(OLB_BACKENDS=",".join(s.url for s in sims), OLB_LISTEN="127.0.0.1:0", OLB_WORKERS="2",
                     OLB_HEALTH_INTERVAL="0", OLB_ACCESS_LOG=str(log_path), OLB_LOG_FORMAT="json")
    try:
        url = read_line_matching(proc, r"listening on (http://\S+)").group(1)
        sent = 24
        pids = set()
        for i in range(sent):
            # One connection each: SO_REUSEPORT spreads them over both workers.
            with httpx.Client(timeout=10) as c:
                r = c.post(url + "/api/generate", json={"model": "llama3.2", "prompt": str(i), "stream": False,
                                                        "options": {"num_predict": 3}})
                assert r.status_code == 200
                pids.add(c.get(url + "/olb/status", headers=AUTH).json()["pid"])
        assert len(pids) == 2, "the connections all went to one worker"
        # Each worker publishes its counters every second (metrics.PUBLISH_INTERVAL):
        # within about a second of the last request, whichever worker answers a
        # scrape counts every request of both (eight scrapes in a row, on eight
        # connections that SO_REUSEPORT spreads over the two).
        def all_counted():
            return all(scrape_total(url, "olb_requests_total", endpoint="/api/generate", status="200") == sent
                       and scrape_total(url, "olb_generated_tokens_total") == 3 * sent for _ in range(8))

        wait_for(all_counted, what=f"{sent} requests on every worker's page")
        assert scrape_total(url, "olb_workers") == 2
        # Never more than were sent, whichever worker answers.
        assert scrape_total(url, "olb_requests_total", endpoint="/api/generate") == sent
        # Both workers write the one file, whole lines each.
        wait_for(lambda: sum(b"/api/generate" in x for x in lines(log_path)) == sent, what="access lines")
        docs = [orjson.loads(x) for x in lines(log_path)]
        assert all(d["type"] == "access" for d in docs)
        generates = [d for d in docs if d["path"] == "/api/generate"]
        assert all(d["eval_tokens"] == 3 and d["status"] == 200 for d in generates), generates
        assert sorted(d["path"] for d in docs if d["path"] == "/api/generate") == ["/api/generate"] * sent
        # logrotate: move the file, SIGUSR1 to the supervisor, and the workers write a new one.
        rotated = tmp_path / "access.log.1"
        os.rename(log_path, rotated)
        os.kill(proc.pid, signal.SIGUSR1)
        wait_for(lambda: log_path.exists() and olb_log(proc).count("access log reopened") == 2,
                 what="both workers reopened the log")
        # (What was buffered at the signal went to the old file, before the reopen.)
        before = len(lines(rotated))
        for _ in range(4):
            with httpx.Client(timeout=10) as c:
                assert c.get(url + "/api/version").status_code == 200
        wait_for(lambda: sum(b"/api/version" in x for x in lines(log_path)) == 4, what="lines in the new file")
        assert len(lines(rotated)) == before
        # OLB_LOG_FORMAT=json holds for olb's other logs too.
        reopened = [orjson.loads(x) for x in olb_log(proc).splitlines() if "reopened" in x]
        assert reopened and all(d["logger"] == "olb.accesslog" and d["level"] == "info" for d in reopened)
    finally:
        assert stop(proc) == 0
        for s in sims:
            loop_thread.run(s.close())


def test_single_worker_sigusr1_reopens(loop_thread, tmp_path):
    sim = loop_thread.run(start_sim(SimConfig(token_rate=0, ttft=0, seed=1)))
    log_path = tmp_path / "access.log"
    proc = start_olb(OLB_BACKENDS=sim.url, OLB_LISTEN="127.0.0.1:0", OLB_HEALTH_INTERVAL="0",
                     OLB_ACCESS_LOG=str(log_path))
    try:
        url = read_line_matching(proc, r"listening on (http://\S+)").group(1)
        with httpx.Client(timeout=10) as c:
            assert c.get(url + "/api/version").status_code == 200
        wait_for(lambda: len(lines(log_path)) == 1, what="the first line")
        os.rename(log_path, tmp_path / "old.log")
        os.kill(proc.pid, signal.SIGUSR1)
        wait_for(lambda: log_path.exists(), what="a new file")
        with httpx.Client(timeout=10) as c:
            assert c.get(url + "/api/tags").status_code == 200
        wait_for(lambda: len(lines(log_path)) == 1, what="a line in the new file")
        assert b'"GET /api/tags"' in lines(log_path)[0]
        assert b'"GET /api/version"' in lines(tmp_path / "old.log")[0]
    finally:
        assert stop(proc) == 0
        loop_thread.run(sim.close())

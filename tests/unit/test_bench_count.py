"""bench/count.py's readers of perf's CSV output and of callgrind's out file, and the overhead
report's split by backend (olb-sim against the raw mock)."""

from bench import count, report


def test_perf_csv_sums_each_event(tmp_path):
    path = tmp_path / "perf.csv"
    path.write_text("# started on Wed Dec  2\n\n"
                    "120,,syscalls:sys_enter_read,1000,100.00,,\n"
                    "80,,syscalls:sys_enter_write,1000,100.00,,\n"
                    "7,,syscalls:sys_enter_writev,1000,100.00,,\n"
                    "<not counted>,,syscalls:sys_enter_sendmsg,0,0.00,,\n"
                    "5,,context-switches,1000,100.00,,\n")
    got = count._perf_read(str(path))
    assert got == {"syscalls:sys_enter_read": 120, "syscalls:sys_enter_write": 80,
                   "syscalls:sys_enter_writev": 7, "context-switches": 5}


def test_callgrind_counts_calls_by_callee_name(tmp_path):
    # Name compression as callgrind writes it: a name once, then its id alone.
    path = tmp_path / "callgrind.out"
    path.write_text("events: Ir\n"
                    "fn=(1) main\n"
                    "10 100\n"
                    "cfn=(2) _PyFrame_Clear\n"
                    "calls=7 0\n"
                    "10 70\n"
                    "cfn=(3) PyObject_Malloc\n"
                    "calls=4 0\n"
                    "10 40\n"
                    "cfn=(2)\n"
                    "calls=3 0\n"
                    "10 30\n"
                    "cfn=(4) memcpy\n"
                    "calls=9 0\n"
                    "10 9\n"
                    "fn=(3)\n"
                    "cfn=(5) malloc\n"
                    "calls=2 0\n"
                    "10 20\n"
                    "totals: 12345\n")
    assert count._callgrind_counts(str(path)) == {"instructions": 12345, "frames": 10, "allocs": 6}


def _row(case, kind, backend, us, **extra):
    row = {"case": case, "backend": backend, "target": kind, "kind": kind, "workers": 1,
           "cpu": {"proxy": {"us_per_op": us}}, "p99_ms": extra.pop("p99_ms", 1.0)}
    row.update(extra)
    return row


def test_targets_are_checked_per_backend():
    rows = [_row("burst", "olb", "sim", 4.0), _row("burst", "nginx", "sim", 5.0),
            _row("burst", "olb", "raw", 6.0), _row("burst", "nginx", "raw", 5.0)]
    checks = {c["target"]: c["met"] for c in report.check_targets(rows)}
    assert checks == {"CPU per streamed chunk ≤ nginx's (many short streams) [olb-sim]": True,
                      "CPU per streamed chunk ≤ nginx's (many short streams) [the raw mock]": False}


def test_ttft_checked_against_haproxy_at_the_top_level():
    rows = [_row("paced", k, "raw", 10.0, level=lvl, p99_ms=p99, p50_ms=1.0)
            for k, lvl, p99 in (("olb", 250, 5.0), ("haproxy", 250, 4.0),
                                ("olb", 1000, 40.0), ("haproxy", 1000, 90.0))]
    ttft = [c for c in report.check_targets(rows) if c["target"].startswith("TTFT p99")]
    assert len(ttft) == 1 and "1000 streams" in ttft[0]["target"] and ttft[0]["met"] is True

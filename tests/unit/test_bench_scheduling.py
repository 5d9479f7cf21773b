"""bench/scheduling.py's workload and report: fixed seeds, the bursty process's mean and spread,
medians over seeds and the issue's targets."""

import random
import statistics

import pytest

from bench import scheduling, scheduling_report


def counts(arrivals, seed, rate=2.0, duration=3000.0, window=10.0):
    times = list(scheduling.arrival_times(random.Random(seed), rate, duration, arrivals))
    per = [0] * int(duration / window)
    for t in times:
        per[int(t / window)] += 1
    return times, per


@pytest.mark.parametrize("arrivals", scheduling.ARRIVALS)
def test_arrivals_keep_the_mean_rate_and_stay_in_the_window(arrivals):
    # 1,000 on/off cycles: the long-run mean is within a few per cent.
    times, _ = counts(arrivals, 1, duration=30000.0)
    assert times == sorted(times) and 0 <= times[0] and times[-1] < 30000
    assert len(times) / 30000 == pytest.approx(2.0, rel=0.05)


def test_bursty_windows_vary_more_than_poisson():
    _, poisson = counts("poisson", 1)
    _, bursty = counts("bursty", 1)
    # Poisson: variance ~ mean (20 per 10 s window); the on/off process swings 4:1.
    assert statistics.variance(poisson) < 1.5 * statistics.mean(poisson)
    assert statistics.variance(bursty) > 3 * statistics.variance(poisson)


def test_unknown_arrivals_are_refused():
    with pytest.raises(ValueError, match="unknown arrivals"):
        list(scheduling.arrival_times(random.Random(1), 1.0, 10.0, "steady"))


def test_same_seed_same_sessions_other_seed_others():
    a = scheduling.make_sessions("llm", 3.0, 60.0, 7, "bursty")
    b = scheduling.make_sessions("llm", 3.0, 60.0, 7, "bursty")
    c = scheduling.make_sessions("llm", 3.0, 60.0, 8, "bursty")
    assert a == b and a != c
    assert {s.model for s in a} <= set(scheduling.MODELS)


def test_plan_default_and_full():
    args = scheduling.parse_args([])
    points = scheduling.plan(args)
    assert [(p.mix, p.arrivals, p.load) for p in points] == (
        [("llm", "poisson", x) for x in (0.2, 0.5, 0.8, 1.0, 1.2)]
        + [("llm", "bursty", 0.8), ("control", "poisson", 0.8)])
    full = scheduling.plan(scheduling.parse_args(["--full"]))
    assert len(full) == 3 * (2 * 8 + 1) and {p.seed for p in full} == {1, 2, 3}
    with pytest.raises(SystemExit):
        scheduling.parse_args(["--arrivals", "poisson,steady"])


def row(target, seed, p99, tok, loads, load=0.8, mix="llm"):
    figures = dict.fromkeys(scheduling_report.FIGURES, 1.0)
    figures.update(ttft_p99=p99, tokens_per_s=tok, loads=loads)
    return {"mix": mix, "arrivals": "poisson", "load": load, "target": target, "seed": seed,
            "gpu_busy": {"f0": 0.5}, "ttfts": [0.1, p99], **figures}


def test_medians_ranges_and_targets():
    rows = [row("olb", s, p, 400, l) for s, p, l in ((1, 2.0, 5), (2, 9.0, 7), (3, 3.0, 6))]
    rows += [row("nginx-lc", s, 20.0, 300, 60) for s in (1, 2, 3)]
    rows += [row("nginx-rr", s, 10.0, 200, 60) for s in (1, 2, 3)]
    summary = scheduling_report.aggregate(rows)
    olb = summary[0]
    assert (olb["ttft_p99"], olb["ttft_p99_range"], olb["loads"]) == (3.0, (2.0, 9.0), 6)
    assert "3.00 (2.00–9.00)" in scheduling_report.table(summary)
    met = {c["what"]: c["met"] for c in scheduling_report.check_targets(summary)}
    assert met == {"p99 TTFT ≤ ½ nginx least_conn": True, "p99 TTFT ≤ ¼ nginx round-robin": False,
                   "model loads ≤ ⅕ nginx least_conn": True, "throughput ≥ nginx least_conn": True}


def test_merge_replaces_rows_measured_again_and_keeps_every_command():
    def row(target, seed, p99):
        return {"target": target, "mix": "llm", "arrivals": "poisson", "load": 0.8, "seed": seed, "ttft_p99": p99}

    first = {"benchmark": "scheduling", "command": "python -m bench scheduling", "date": "d1", "wall_s": 10.0,
             "rows": [row("olb", 1, 9.0), row("nginx-lc", 1, 40.0)]}
    again = {"benchmark": "scheduling", "command": "python -m bench scheduling --targets olb", "date": "d2",
             "wall_s": 2.0, "rows": [row("olb", 1, 5.0), row("olb", 2, 6.0)]}
    merged = scheduling_report.merge([first, again])
    got = sorted((r["target"], r["seed"], r["ttft_p99"]) for r in merged["rows"])
    assert got == [("nginx-lc", 1, 40.0), ("olb", 1, 5.0), ("olb", 2, 6.0)]
    assert merged["command"] == "python -m bench scheduling; python -m bench scheduling --targets olb"
    assert merged["wall_s"] == 12.0 and merged["date"] == "d2"

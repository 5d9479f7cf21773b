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


def row(target, seed, p99, tok, loads, load=0.8, mix="llm", cluster="mixed", unfinished=0):
    figures = dict.fromkeys(scheduling_report.FIGURES, 1.0)
    figures.update(ttft_p99=p99, tokens_per_s=tok, loads=loads, unfinished=unfinished)
    return {"cluster": cluster, "mix": mix, "arrivals": "poisson", "load": load, "target": target, "seed": seed,
            "gpu_busy": {"f0": 0.5}, "ttfts": [0.1, p99], **figures}


def test_medians_ranges_and_targets():
    rows = [row("olb", s, p, 400, l) for s, p, l in ((1, 2.0, 5), (2, 9.0, 7), (3, 3.0, 6))]
    rows += [row("nginx-lc", s, 20.0, 300, 60) for s in (1, 2, 3)]
    rows += [row("nginx-rr", s, 10.0, 200, 60) for s in (1, 2, 3)]
    summary = scheduling_report.aggregate(rows)
    olb = summary[0]
    assert (olb["ttft_p99"], olb["ttft_p99_range"], olb["loads"]) == (3.0, (2.0, 9.0), 6)
    # Pooled: the p99 (nearest rank) of the six TTFTs of the three seeds, 0.1 0.1 0.1 2 3 9.
    assert olb["ttft_p99_pooled"] == 9.0
    assert "3.00 (2.00–9.00)" in scheduling_report.table(summary)
    met = {c["what"]: c["met"] for c in scheduling_report.check_targets(summary)}
    assert met == {"p99 TTFT ÷ nginx-lc ≤ 0.5": True, "p99 TTFT ÷ nginx-rr ≤ 0.25": False,
                   "loads ÷ nginx-lc ≤ 0.2": True, "tok/s ÷ nginx-lc ≥ 1": True, "unfinished = 0": True}


@pytest.mark.parametrize("mine, ref, factor, op, expect", [
    (5.0, 20.0, 0.5, "le", (True, 0.25)),
    (10.0, 20.0, 0.5, "le", (True, 0.5)),          # the limit itself is met
    (10.1, 20.0, 0.5, "le", (False, 0.505)),
    (300.0, 300.0, 1.0, "ge", (True, 1.0)),
    (299.0, 300.0, 1.0, "ge", (False, 299 / 300)),
    (0.0, 0.0, 0.2, "le", (True, None)),           # no loads either way: met, no ratio
    (1.0, 0.0, 0.2, "le", (False, None)),
    (0, None, 0.0, "zero", (True, None)),
    (2, None, 0.0, "zero", (False, None)),
    (None, None, 0.0, "zero", (None, None)),
    (None, 3.0, 0.5, "le", (None, None)),          # a figure missing: neither met nor not
])
def test_evaluate_one_check(mine, ref, factor, op, expect):
    met, ratio = scheduling_report.evaluate(mine, ref, factor, op)
    assert met == expect[0]
    assert ratio == (pytest.approx(expect[1]) if expect[1] is not None else None)


def test_targets_per_shape_per_load_and_a_tagged_olb():
    rows = []
    for cluster, olb_p99 in (("mixed", 4.0), ("big70b", 30.0)):
        for load in (0.5, 0.7, 0.9):
            for seed in (1, 2, 3):
                rows += [row("olb", seed, olb_p99, 400, 5, load, cluster=cluster, unfinished=(seed == 3) * 2),
                         row("olb@before", seed, 50.0, 300, 9, load, cluster=cluster, unfinished=(seed > 1) * 7),
                         row("nginx-lc", seed, 40.0, 300, 60, load, cluster=cluster),
                         row("nginx-rr", seed, 60.0, 250, 70, load, cluster=cluster)]
    rows += [row(t, 1, p, 100, 2, mix="control") for t, p in (("olb", 10.4), ("nginx-lc", 10.0))]
    checks = scheduling_report.check_targets(scheduling_report.aggregate(rows))
    by = {(c["target"], c["cluster"], c["mix"], c["load"], c["what"]): c for c in checks}
    # 50 % load is outside the issue's band; 70 and 90 % are in it, for each shape and olb.
    assert {k[3] for k in by if k[2] == "llm"} == {0.7, 0.9}
    assert len(checks) == 2 * 2 * 2 * 5 + 2
    assert by[("olb", "mixed", "llm", 0.7, "p99 TTFT ÷ nginx-lc ≤ 0.5")]["ratio"] == pytest.approx(0.1)
    assert not by[("olb", "big70b", "llm", 0.9, "p99 TTFT ÷ nginx-lc ≤ 0.5")]["met"]
    # Unfinished by the median over seeds (0, 0, 2 -> met) with the worst seed kept.
    u = by[("olb", "mixed", "llm", 0.9, "unfinished = 0")]
    assert (u["met"], u["worst"]) == (True, 2)
    assert not by[("olb@before", "mixed", "llm", 0.9, "unfinished = 0")]["met"]
    assert by[("olb", "mixed", "control", 0.8, "p99 TTFT ÷ nginx-lc ≤ 1.05")]["met"]
    text = scheduling_report.targets_table(checks)
    assert "| olb@before | big70b | poisson | 90% | 1.25× **NOT met** |" in text
    assert ("| olb | mixed | poisson | 70% | 0.10× met | 0.07× met | 0.08× met | 1.33× met | 0 (max 2) met | yes |"
            in text)
    summary = scheduling_report.targets_summary(checks)
    assert "| olb | mixed | 10 of 10 | – |" in summary
    assert "| olb | big70b | 6 of 10 | p99 TTFT ÷ nginx-lc ≤ 0.5 at 70% poisson;" in summary
    assert "| olb | control on mixed | 2 of 2 | – |" in summary


def test_a_check_without_its_reference_is_left_out():
    rows = [row("olb", 1, 2.0, 400, 5), row("nginx-lc", 1, 20.0, 300, 60)]
    whats = {c["what"] for c in scheduling_report.check_targets(scheduling_report.aggregate(rows))}
    assert "p99 TTFT ÷ nginx-rr ≤ 0.25" not in whats and "p99 TTFT ÷ nginx-lc ≤ 0.5" in whats


def test_table_has_every_figure_of_the_issue_and_na_without_sim_stats():
    rows = [dict(row("olb", s, 3.0, 400, 5), ttft_p999=7.0 + s, eviction_wait_s=None,
                 eviction_wait_max_s=20.0 + 10 * s) for s in (1, 2)]
    text = scheduling_report.table(scheduling_report.aggregate(rows))
    head, _, line = text.splitlines()
    for column in ("TTFT p50 s", "TTFT p99 s", "p99 pooled s", "TTFT p99.9 s", "tok/s", "loads", "evict wait s",
                   "worst GPU's evict wait s", "unfinished"):
        assert f"| {column} |" in head
    assert "| 8.50 (8.00–9.00) |" in line and "| n/a | 35 (30–40) |" in line


def test_ttft_values_keep_a_stalled_request_in_the_tail():
    R = scheduling.Result
    results = [R(issued=20.0, ttft=0.5, e2e=2.0), R(issued=20.0, status=503, error="http 503"),
               R(issued=21.0, ttft=1.5, error=scheduling.UNFINISHED),
               R(issued=22.0, error=scheduling.UNFINISHED, waited=80.0)]
    assert scheduling.ttft_values(results) == [0.5, 1.5, 80.0]


@pytest.mark.parametrize("stats, expect", [
    ([], {"eviction_wait_s": None, "eviction_wait_max_s": None, "sim_loads": None}),
    ([None, {"loads": 3, "eviction_wait_s": 2.0}], {"eviction_wait_s": None, "sim_loads": None}),
    ([{"loads": 3, "eviction_wait_s": 2.0, "pending": 0, "reloads": 1},
      {"loads": 4, "eviction_wait_s": 7.5, "pending": 2, "reloads": 0}],
     {"eviction_wait_s": 9.5, "eviction_wait_max_s": 7.5, "sim_loads": 7, "sim_pending": 2, "sim_reloads": 1}),
    ([{"loads": 3}], {"eviction_wait_s": None, "sim_loads": 3}),
])
def test_sim_figures_sum_the_instances_or_say_not_available(stats, expect):
    got = scheduling.sim_figures(stats)
    assert {k: got[k] for k in expect} == expect


@pytest.mark.parametrize("cluster, gpus, n_models", [("mixed", 4, 6), ("uniform8", 8, 10), ("big70b", 4, 7)])
def test_cluster_shapes(cluster, gpus, n_models):
    shape = scheduling.CLUSTERS[cluster]
    assert len(shape.gpus) == gpus and len(set(shape.all_models)) == n_models
    vram = {scheduling._profile(g, v).vram / 2**30 for _n, g, v in shape.gpus}
    assert vram == {"mixed": {12.0, 79.6474609375}, "uniform8": {23.98828125},
                    "big70b": {79.6474609375, 23.98828125}}[cluster]
    for m in shape.all_models:
        scheduling._model_spec(m)              # every model has a spec


def test_the_70b_fits_only_on_the_big_gpus_and_the_rest_everywhere():
    for name, shape in scheduling.CLUSTERS.items():
        for m in shape.all_models:
            where = [scheduling.fits(m, g, v, 2) for _n, g, v in shape.gpus]
            if m == scheduling.BIG_MODEL:
                assert where == [g == "h100" for _n, g, v in shape.gpus], name
            else:
                assert all(where), (name, m)


def test_popularity_with_a_fixed_share_rotates_the_rest():
    shape = scheduling.CLUSTERS["big70b"]
    for t in (0.0, 45.0, 89.0):
        w = scheduling._popularity(t, 90.0, shape=shape)
        assert sum(w) == pytest.approx(1.0) and w[-1] == 0.05
    first, last = scheduling._popularity(0.0, 90.0, shape=shape), scheduling._popularity(89.0, 90.0, shape=shape)
    assert first[0] == max(first[:-1]) and last[2] == max(last[:-1])
    # Without fixed shares: the unnormalised Zipf weights of before (the same sessions as before).
    assert scheduling._popularity(0.0, 90.0) == [1.0, 1 / 2, 1 / 3, 1 / 4, 1 / 5, 1 / 6]
    sessions = scheduling.make_sessions("llm", 20.0, 600.0, 3, cluster="big70b")
    share = sum(s.model == scheduling.BIG_MODEL for s in sessions) / len(sessions)
    assert 0.03 < share < 0.07
    assert {s.model for s in scheduling.make_sessions("llm", 20.0, 300.0, 3, cluster="uniform8")} == set(
        scheduling.MODELS10)


def test_capacity_serves_the_70b_on_the_big_gpus_only():
    probe = scheduling.make_sessions("llm", 1.0, 90.0, 1, cluster="big70b")
    cap = scheduling.capacity("llm", probe, 2, 90.0, cluster="big70b")
    lam, busy, per_gpu, w = cap["req_per_s"], cap["restricted_share"], cap["per_gpu"], cap["weights"]
    assert busy[2:] == [0.0, 0.0] and busy[0] == pytest.approx(busy[1]) and 0 < busy[0] < 1
    # The free models get exactly what the 70B leaves of each GPU.
    served = sum(r * (1 - b) for r, b in zip(per_gpu, busy))
    assert served == pytest.approx(lam * (1 - w[-1]))
    # Without a restricted model the capacity is the sum of the GPUs' (the mixed shape's rule).
    mixed = scheduling.capacity("llm", scheduling.make_sessions("llm", 1.0, 90.0, 1), 2, 90.0)
    assert mixed["req_per_s"] == pytest.approx(sum(mixed["per_gpu"]))
    # The 70B costs the big GPUs most of their time: less capacity than the same GPUs without it.
    assert lam < sum(per_gpu)


def test_plan_issue13_preset_and_flags_over_it():
    args = scheduling.parse_args(["--issue13"])
    points = scheduling.plan(args)
    assert args.targets == "olb,nginx-lc,nginx-rr" and len(points) == 5 * (3 * (3 + 1) + 1)
    seed1 = [(p.cluster, p.mix, p.arrivals, p.load) for p in points if p.seed == 1]
    assert seed1[:4] == [("mixed", "llm", "poisson", 0.7), ("mixed", "llm", "poisson", 0.8),
                         ("mixed", "llm", "poisson", 0.9), ("mixed", "llm", "bursty", 0.8)]
    assert seed1[-1] == ("mixed", "control", "poisson", 0.8)
    assert {p.cluster for p in points} == {"mixed", "uniform8", "big70b"}
    mine = scheduling.parse_args(["--issue13", "--cluster", "big70b", "--seeds", "1", "--time-scale", "10"])
    assert (mine.cluster, mine.control_cluster, mine.seeds, mine.time_scale, mine.duration) == (
        "big70b", "mixed", "1", 10.0, args.duration)
    quick = scheduling.parse_args(["--quick", "--targets", "olb,nginx-lc"])
    assert (quick.targets, quick.loads, quick.duration) == ("olb,nginx-lc", "0.8", 50.0)
    alone = scheduling.parse_args(["--cluster", "uniform8"])
    assert alone.control_cluster == "uniform8"
    for bad in (["--cluster", "tiny"], ["--quick", "--full"], ["--olb-tag", "a@b"],
                ["--olb-root", "/nonexistent"]):
        with pytest.raises(SystemExit):
            scheduling.parse_args(bad)


def test_merge_replaces_rows_measured_again_and_keeps_every_command():
    def row(target, seed, p99, cluster="mixed"):
        return {"target": target, "cluster": cluster, "mix": "llm", "arrivals": "poisson", "load": 0.8,
                "seed": seed, "ttft_p99": p99}

    first = {"benchmark": "scheduling", "command": "python -m bench scheduling", "date": "d1", "wall_s": 10.0,
             "rows": [row("olb", 1, 9.0), row("nginx-lc", 1, 40.0)]}
    again = {"benchmark": "scheduling", "command": "python -m bench scheduling --targets olb", "date": "d2",
             "wall_s": 2.0, "rows": [row("olb", 1, 5.0), row("olb", 2, 6.0), row("olb", 1, 7.0, "big70b")]}
    merged = scheduling_report.merge([first, again])
    got = sorted((r["target"], r["cluster"], r["seed"], r["ttft_p99"]) for r in merged["rows"])
    # The same seed on another shape is another row.
    assert got == [("nginx-lc", "mixed", 1, 40.0), ("olb", "big70b", 1, 7.0), ("olb", "mixed", 1, 5.0),
                   ("olb", "mixed", 2, 6.0)]
    assert merged["command"] == "python -m bench scheduling; python -m bench scheduling --targets olb"
    assert merged["wall_s"] == 12.0 and merged["date"] == "d2"


@pytest.mark.parametrize("scale, health, gpu, models, queue", [(10.0, "1", "0.5", "1", "30"),
                                                                (20.0, "0.5", "0.25", "0.5", "15")])
def test_olb_periods_are_fixed_in_simulated_time(scale, health, gpu, models, queue):
    env = scheduling.olb_env(["http://127.0.0.1:1", "http://127.0.0.1:2"], "llm", 8, scale)
    assert (env["OLB_HEALTH_INTERVAL"], env["OLB_GPU_POLL"], env["OLB_MODELS_INTERVAL"],
            env["OLB_QUEUE_TIMEOUT"]) == (health, gpu, models, queue)
    assert env["OLB_BACKENDS"] == ("http://127.0.0.1:1;max=8;metrics=http://127.0.0.1:1/metrics,"
                                   "http://127.0.0.1:2;max=8;metrics=http://127.0.0.1:2/metrics")


def test_merged_report_says_where_each_olb_came_from():
    def result(target, olb, seed):
        return {"benchmark": "scheduling", "command": f"run {target}", "date": "d", "wall_s": 1.0, "olb": olb,
                "rows": [row(target, seed, 2.0, 400, 5)]}

    merged = scheduling_report.merge([result("olb", {"root": "/w/after", "commit": "abc1234"}, 1),
                                      result("olb@before", {"root": "/tmp/olb-before", "commit": None}, 1)])
    head = scheduling_report.markdown(merged).splitlines()[2]
    assert head.endswith("; olb from /w/after at abc1234; olb from /tmp/olb-before")


def test_pooled_p99_is_over_every_seeds_ttfts_not_a_median():
    rows = [dict(row("olb", seed, 100.0 * seed - 2, 400, 5),
                 ttfts=[float(x) for x in range(100 * (seed - 1), 100 * seed)])
            for seed in (1, 2, 3)]
    olb = scheduling_report.aggregate(rows)[0]
    assert (olb["ttft_p99"], olb["ttft_p99_pooled"]) == (198.0, 296.0)

"""The scheduling benchmark's output: medians over seeds, the Markdown tables, the issue's targets
and the PNG plots, from the result that bench/scheduling.py writes (also `python -m bench plot`).

Every figure of a (cluster shape, mix, arrivals, load, target) cell is the median over the seeds
that ran it; with more than one seed the key figures also show their range (min–max), which is
the honest measure of how much one run can be trusted.  One figure is not a median: the p99 of
every seed's TTFTs pooled.  The issue's targets are checked from the medians (`check_targets`).
"""

from __future__ import annotations

import math
import os
import statistics

#: Per-row figures summarised over seeds.
FIGURES = ("requests", "ttft_p50", "ttft_p99", "ttft_p999", "e2e_p99", "tokens_per_s", "goodput_share",
           "rate_503", "rate_other_errors", "unfinished", "loads", "load_gpu_s", "eviction_wait_s",
           "eviction_wait_max_s", "cache_hit", "proxy_cpu_s")
#: The ones shown with their range when several seeds ran.
RANGED = ("ttft_p50", "ttft_p99", "ttft_p999", "tokens_per_s", "loads", "eviction_wait_s", "eviction_wait_max_s",
          "unfinished")
COLORS = {"olb": "C0", "olb-lif": "C9", "olb-rr": "C4", "nginx-lc": "C1", "nginx-rr": "C3",
          "haproxy-lc": "C2"}
#: The load of the TTFT CDF plot (the middle of the issue's 70-90 % band).
CDF_LOAD = 0.8
#: The issue's band of loads where the LLM-mix targets apply.
TARGET_LOADS = (0.7, 0.9)
#: The issue's targets on the LLM mix: (label, figure, reference target, factor, "le"/"ge"/"zero").
LLM_CHECKS = (("p99 TTFT ÷ nginx-lc ≤ 0.5", "ttft_p99", "nginx-lc", 0.5, "le"),
              ("p99 TTFT ÷ nginx-rr ≤ 0.25", "ttft_p99", "nginx-rr", 0.25, "le"),
              ("loads ÷ nginx-lc ≤ 0.2", "loads", "nginx-lc", 0.2, "le"),
              ("tok/s ÷ nginx-lc ≥ 1", "tokens_per_s", "nginx-lc", 1.0, "ge"),
              ("unfinished = 0", "unfinished", None, 0.0, "zero"))
#: ... and on the one-model control.
CONTROL_CHECKS = (("p99 TTFT ÷ nginx-lc ≤ 1.05", "ttft_p99", "nginx-lc", 1.05, "le"),
                  ("tok/s ÷ nginx-lc ≥ 0.95", "tokens_per_s", "nginx-lc", 0.95, "ge"))


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _cluster(row: dict) -> str:
    # Results from before --cluster ran on the `mixed` shape.
    return row.get("cluster", "mixed")


def aggregate(rows: list[dict]) -> list[dict]:
    """One summary per (cluster, mix, arrivals, load, target): the LLM mix first, shape by shape
    in the order they ran, Poisson before bursty, by load, the targets in the order they ran
    (so merged results read as one run); then the control mix."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (_cluster(r), r["mix"], r.get("arrivals", "poisson"), r["load"], r["target"])
        groups.setdefault(key, []).append(r)
    clusters = list(dict.fromkeys(k[0] for k in groups))
    targets = list(dict.fromkeys(k[4] for k in groups))
    order = sorted(groups, key=lambda k: (k[1] != "llm", clusters.index(k[0]), k[2] != "poisson", k[3],
                                          targets.index(k[4])))
    out = []
    for cluster, mix, arrivals, load, target in order:
        rs = groups[(cluster, mix, arrivals, load, target)]
        s = {"cluster": cluster, "mix": mix, "arrivals": arrivals, "load": load, "target": target,
             "seeds": sorted(r.get("seed", 1) for r in rs)}
        for key in FIGURES:
            values = [r.get(key) for r in rs]
            s[key] = _median(values)
            values = [v for v in values if v is not None]
            s[key + "_range"] = (min(values), max(values)) if values else None
        names = list(rs[0].get("gpu_busy") or {})
        s["gpu_busy"] = {n: _median([(r.get("gpu_busy") or {}).get(n) for r in rs]) for n in names}
        s["ttfts"] = sorted(x for r in rs for x in r.get("ttfts", []))
        # The p99 of every seed's TTFTs together: steadier than the median of per-seed p99s,
        # each of which rests on a handful of requests.
        s["ttft_p99_pooled"] = _pct(s["ttfts"], 99)
        out.append(s)
    return out


def _pct(values: list, q: float):
    """The q-th percentile by nearest rank (bench/scheduling.py's rule)."""
    if not values:
        return None
    return values[min(len(values) - 1, max(0, math.ceil(q / 100 * len(values)) - 1))]


def _f(x, fmt="{:.2f}", none="–"):
    return none if x is None else fmt.format(x)


def _ranged(s: dict, key: str, fmt: str, none: str = "–") -> str:
    text = _f(s[key], fmt, none)
    rng = s.get(key + "_range")
    if len(s["seeds"]) > 1 and rng is not None:
        text += f" ({fmt.format(rng[0])}–{fmt.format(rng[1])})"
    return text


def _busy(values: list) -> str:
    """GPU busy shares: each one for up to four GPUs, else the mean and the range."""
    if len(values) <= 4:
        return "/".join(_f(v, "{:.0%}") for v in values)
    known = [v for v in values if v is not None]
    if not known:
        return "–"
    return f"{sum(known) / len(known):.0%} ({min(known):.0%}–{max(known):.0%})"


def table(summary: list[dict]) -> str:
    head = ("| shape | mix | arrivals | load | target | req | TTFT p50 s | TTFT p99 s | p99 pooled s | "
            "TTFT p99.9 s | tok/s | loads | evict wait s | worst GPU's evict wait s | unfinished | 503 | "
            "other err | E2E p99 s | goodput | cache hit | GPU busy | proxy CPU s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in summary:
        lines.append(
            f"| {s['cluster']} | {s['mix']} | {s['arrivals']} | {s['load']:.0%} | {s['target']} | "
            f"{_f(s['requests'], '{:.0f}')} | {_ranged(s, 'ttft_p50', '{:.2f}')} | "
            f"{_ranged(s, 'ttft_p99', '{:.2f}')} | {_f(s['ttft_p99_pooled'])} | "
            f"{_ranged(s, 'ttft_p999', '{:.2f}')} | "
            f"{_ranged(s, 'tokens_per_s', '{:.0f}')} | {_ranged(s, 'loads', '{:.0f}')} | "
            f"{_ranged(s, 'eviction_wait_s', '{:.0f}', 'n/a')} | "
            f"{_ranged(s, 'eviction_wait_max_s', '{:.0f}', 'n/a')} | "
            f"{_ranged(s, 'unfinished', '{:.0f}')} | "
            f"{_f(s['rate_503'], '{:.1%}')} | {_f(s['rate_other_errors'], '{:.1%}')} | {_f(s['e2e_p99'])} | "
            f"{_f(s['goodput_share'], '{:.0%}')} | {_f(s['cache_hit'], '{:.0%}')} | "
            f"{_busy(list(s['gpu_busy'].values()))} | {_f(s['proxy_cpu_s'])} |")
    return "\n".join(lines)


def is_olb(target: str) -> bool:
    """olb's default policy, from this checkout (`olb`) or another (`olb@TAG`): the targets
    the issue's targets are checked for."""
    return target == "olb" or target.startswith("olb@")


def evaluate(mine, ref, factor: float, op: str) -> tuple[bool | None, float | None]:
    """(met, ratio) of one check: `mine` against `factor` x `ref` ("le", "ge"), or against
    zero ("zero", no reference, no ratio); met is None when a figure is missing."""
    if op == "zero":
        return (None if mine is None else mine == 0), None
    if mine is None or ref is None:
        return None, None
    met = mine <= factor * ref if op == "le" else mine >= factor * ref
    return met, (mine / ref if ref else None)


def check_targets(summary: list[dict]) -> list[dict]:
    """The issue's targets, from the medians over seeds, for each olb target: on the LLM mix at
    loads of 70-90 % (each shape, each arrival pattern) against nginx least_conn and
    round-robin run on the same points, and on the control within 5 % of least_conn.  A check
    whose reference did not run is left out."""
    by = {(s["cluster"], s["mix"], s["arrivals"], s["load"], s["target"]): s for s in summary}
    out = []
    for (cluster, mix, arrivals, load, target), s in by.items():
        if not is_olb(target):
            continue
        if mix == "llm" and TARGET_LOADS[0] - 1e-9 <= load <= TARGET_LOADS[1] + 1e-9:
            checks = LLM_CHECKS
        elif mix == "control":
            checks = CONTROL_CHECKS
        else:
            continue
        for what, key, ref_target, factor, op in checks:
            ref = by.get((cluster, mix, arrivals, load, ref_target)) if ref_target else None
            if ref_target and ref is None:
                continue
            theirs = ref[key] if ref else None
            met, ratio = evaluate(s[key], theirs, factor, op)
            rng = s.get(key + "_range")
            out.append({"target": target, "cluster": cluster, "mix": mix, "arrivals": arrivals, "load": load,
                        "what": what, "olb": s[key], "reference": theirs,
                        "limit": 0.0 if op == "zero" else (factor * theirs if theirs is not None else None),
                        "met": met, "ratio": ratio, "worst": rng[1] if rng and op == "zero" else None})
    return out


def _cell(c: dict) -> str:
    if c["met"] is None:
        return "n/a"
    if c["ratio"] is not None:
        value = f"{c['ratio']:.2f}×"
    elif c["limit"] == 0.0 and c["reference"] is None:
        value = f"{c['olb']:.0f}" + (f" (max {c['worst']:.0f})" if c.get("worst") else "")
    else:
        value = f"{_f(c['olb'])} vs {_f(c['reference'])}"
    return f"{value} {'met' if c['met'] else '**NOT met**'}"


def targets_table(checks: list[dict]) -> str:
    """The checks as a matrix: a row per (olb target, shape, arrivals, load), a column per target
    with the ratio (the median's over the reference's) and met / NOT met; the control apart."""
    out = []
    for mix, names in (("llm", [c[0] for c in LLM_CHECKS]), ("control", [c[0] for c in CONTROL_CHECKS])):
        rows: dict = {}
        for c in checks:
            if c["mix"] == mix:
                rows.setdefault((c["target"], c["cluster"], c["arrivals"], c["load"]), {})[c["what"]] = c
        if not rows:
            continue
        shape = "shape" if mix == "llm" else "control on"
        head = f"| target | {shape} | arrivals | load | " + " | ".join(names) + " | all met |"
        lines = [head, "|" + "---|" * (head.count("|") - 1)]
        for (target, cluster, arrivals, load), cells in rows.items():
            known = [c["met"] for c in cells.values() if c["met"] is not None]
            every = "yes" if known and all(known) and len(known) == len(names) else (
                "no" if not all(known) else "incomplete")
            lines.append(f"| {target} | {cluster} | {arrivals} | {load:.0%} | "
                         + " | ".join(_cell(cells[n]) if n in cells else "–" for n in names)
                         + f" | {every} |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def targets_summary(checks: list[dict]) -> str:
    """Per olb target and shape: how many checks are met and which are not."""
    groups: dict = {}
    for c in checks:
        shape = c["cluster"] if c["mix"] == "llm" else f"control on {c['cluster']}"
        groups.setdefault((c["target"], shape), []).append(c)
    lines = ["| target | shape | met | not met |", "|---|---|---|---|"]
    for (target, shape), cs in groups.items():
        known = [c for c in cs if c["met"] is not None]
        failed = [f"{c['what']} at {c['load']:.0%} {c['arrivals']}" for c in known if not c["met"]]
        lines.append(f"| {target} | {shape} | {len(known) - len(failed)} of {len(cs)} | "
                     f"{'; '.join(failed) or '–'} |")
    return "\n".join(lines)


def merge(results: list[dict]) -> dict:
    """Several scheduling results as one: rows of later results replace the
    rows of earlier ones with the same (target, mix, arrivals, load, seed).

    For re-measuring part of a run -- more seeds, or one target after a
    change to it -- and reporting the whole table from one file; the result
    keeps every run's command and date.
    """
    def key(row):
        return (row["target"], _cluster(row), row["mix"], row.get("arrivals", "poisson"), row["load"],
                row.get("seed", 1))

    merged = dict(results[0])
    clusters: dict = {}
    for result in results:
        clusters.update(result.get("clusters") or {})
    rows: dict = {}
    runs = []
    for result in results:
        for row in result["rows"]:
            rows[key(row)] = row
        runs += result.get("runs") or [{"command": result.get("command"), "date": result.get("date"),
                                        "wall_s": result.get("wall_s"), "olb": result.get("olb")}]
    merged.update(rows=list(rows.values()), runs=runs, clusters=clusters,
                  command="; ".join(r["command"] for r in runs if r.get("command")),
                  wall_s=sum(r.get("wall_s") or 0 for r in runs), date=results[-1].get("date"))
    return merged


def markdown(result: dict) -> str:
    summary = aggregate(result["rows"])
    m = result.get("machine", {})
    seeds = sorted({r.get("seed", 1) for r in result["rows"]})
    olbs = [r.get("olb") for r in result.get("runs") or [result]]
    where = "; ".join(dict.fromkeys(f"olb from {o['root']}" + (f" at {o['commit']}" if o.get("commit") else "")
                                    for o in olbs if o))
    out = [f"# Scheduling: {result.get('command', 'python -m bench.scheduling')}", "",
           f"{m.get('nproc', '?')} CPUs, {m.get('cpu', '?')}, Python {m.get('python', '?')}; "
           f"{m.get('nginx') or 'no nginx'}; {m.get('haproxy') or 'no HAProxy'}; "
           f"{len(result['rows'])} runs in {result.get('wall_s', 0):.0f} s; seeds {','.join(map(str, seeds))}"
           + (" (medians; min–max over seeds in parentheses)" if len(seeds) > 1 else "")
           + (f"; {where}" if where else ""), ""]
    shapes = result.get("clusters") or {}
    if shapes:
        out += [f"- `{name}`: {c.get('about', '')}" for name, c in shapes.items()] + [""]
    out += [table(summary), ""]
    checks = check_targets(summary)
    if checks:
        out += ["## The issue's targets", "",
                f"By the median over seeds; LLM mix at {TARGET_LOADS[0]:.0%}–{TARGET_LOADS[1]:.0%} load, ratios "
                "are olb's figure over the reference's on the same points; `unfinished` is the median count "
                "of requests still open after the drain (the worst seed in parentheses).", "",
                targets_table(checks), "", targets_summary(checks), ""]
    return "\n".join(out)


def can_plot() -> bool:
    """Whether matplotlib is installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot(result: dict, outdir: str, name: str = "scheduling") -> list[str]:
    """PNG plots into `outdir`; the paths written (none when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    summary = aggregate(result["rows"])
    written = []
    targets = list(dict.fromkeys(s["target"] for s in summary))
    # One row of plots per shape and arrival pattern swept over two loads or more.
    sweeps = {}
    for cluster in dict.fromkeys(s["cluster"] for s in summary):
        for pattern in ("poisson", "bursty"):
            pts = [s for s in summary
                   if s["mix"] == "llm" and s["arrivals"] == pattern and s["cluster"] == cluster]
            if len({s["load"] for s in pts}) >= 2:
                sweeps[(cluster, pattern)] = pts
    if sweeps:
        fig, grid = plt.subplots(len(sweeps), 2, figsize=(12, 4.2 * len(sweeps)), squeeze=False)
        for axes, ((cluster, pattern), sweep) in zip(grid, sweeps.items()):
            for t in targets:
                pts = sorted((s for s in sweep if s["target"] == t), key=lambda s: s["load"])
                if not pts:
                    continue
                x = [100 * s["load"] for s in pts]
                for ax, key in zip(axes, ("ttft_p99", "tokens_per_s")):
                    y = [s[key] for s in pts]
                    lo = [s[key] - s[key + "_range"][0] if s[key + "_range"] else 0 for s in pts]
                    hi = [s[key + "_range"][1] - s[key] if s[key + "_range"] else 0 for s in pts]
                    ax.errorbar(x, y, yerr=[lo, hi], fmt="-o", capsize=3, color=_color(t), label=t)
            axes[0].set(title=f"p99 time to first token ({cluster}, {pattern})",
                        xlabel="offered load, % of capacity",
                        ylabel="simulated s (log)")
            axes[0].set_yscale("log")
            axes[1].set(title=f"throughput ({cluster}, {pattern})", xlabel="offered load, % of capacity",
                        ylabel="eval tokens / simulated s")
            axes[1].set_ylim(bottom=0)
        written.append(_save(plt, fig, grid.ravel(), os.path.join(outdir, f"{name}_vs_load.png")))
    cdf = [s for s in summary if s["mix"] == "llm" and abs(s["load"] - CDF_LOAD) < 1e-9 and s["ttfts"]]
    # A row per shape, a column per arrival pattern.
    clusters = list(dict.fromkeys(s["cluster"] for s in cdf))
    patterns = list(dict.fromkeys(s["arrivals"] for s in cdf))
    if cdf:
        fig, grid = plt.subplots(len(clusters), len(patterns), figsize=(6.5 * len(patterns), 4.2 * len(clusters)),
                                 squeeze=False)
        used = []
        for row, cluster in zip(grid, clusters):
            for ax, pattern in zip(row, patterns):
                curves = [s for s in cdf if (s["cluster"], s["arrivals"]) == (cluster, pattern)]
                if not curves:
                    ax.set_visible(False)
                    continue
                used.append(ax)
                for s in curves:
                    xs = [max(x, 1e-3) for x in s["ttfts"]]
                    ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post",
                            color=_color(s["target"]), label=s["target"])
                ax.set(title=f"TTFT CDF, {cluster}, {CDF_LOAD:.0%} load, {pattern}", xlabel="simulated s (log)",
                       ylabel="share of requests")
                ax.set_xscale("log")
        written.append(_save(plt, fig, used, os.path.join(outdir, f"{name}_ttft_cdf.png")))
    return written


def _color(target: str):
    """A target's colour; an olb from another checkout (olb@before) is grey."""
    return COLORS.get(target, "C7" if "@" in target else None)


def _save(plt, fig, axes, path: str) -> str:
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path

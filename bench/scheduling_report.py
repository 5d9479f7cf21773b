"""The scheduling benchmark's output: medians over seeds, the Markdown tables, the issue's targets
and the PNG plots, from the result that bench/scheduling.py writes (also `python -m bench plot`).

Every figure of a (mix, arrivals, load, target) cell is the median over the seeds that ran it;
with more than one seed the key figures also show their range (min–max), which is the honest
measure of how much one run can be trusted.
"""

from __future__ import annotations

import os
import statistics

#: Per-row figures summarised over seeds.
FIGURES = ("requests", "ttft_p50", "ttft_p99", "e2e_p99", "tokens_per_s", "goodput_share", "rate_503",
           "rate_other_errors", "loads", "load_gpu_s", "cache_hit", "proxy_cpu_s")
#: The ones shown with their range when several seeds ran.
RANGED = ("ttft_p99", "tokens_per_s", "loads")
COLORS = {"olb": "C0", "olb-lif": "C9", "olb-rr": "C4", "nginx-lc": "C1", "nginx-rr": "C3",
          "haproxy-lc": "C2"}
#: The load of the TTFT CDF plot (the middle of the issue's 70-90 % band).
CDF_LOAD = 0.8


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def aggregate(rows: list[dict]) -> list[dict]:
    """One summary per (mix, arrivals, load, target): the LLM mix first, Poisson before
    bursty, by load, the targets in the order they ran (so merged results read as one run)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["mix"], r.get("arrivals", "poisson"), r["load"], r["target"]), []).append(r)
    targets = list(dict.fromkeys(k[3] for k in groups))
    order = sorted(groups, key=lambda k: (k[0] != "llm", k[1] != "poisson", k[2], targets.index(k[3])))
    out = []
    for mix, arrivals, load, target in order:
        rs = groups[(mix, arrivals, load, target)]
        s = {"mix": mix, "arrivals": arrivals, "load": load, "target": target,
             "seeds": sorted(r.get("seed", 1) for r in rs)}
        for key in FIGURES:
            s[key] = _median([r[key] for r in rs])
            values = [r[key] for r in rs if r[key] is not None]
            s[key + "_range"] = (min(values), max(values)) if values else None
        names = list(rs[0]["gpu_busy"])
        s["gpu_busy"] = {n: _median([r["gpu_busy"].get(n) for r in rs]) for n in names}
        s["ttfts"] = sorted(x for r in rs for x in r.get("ttfts", []))
        out.append(s)
    return out


def _f(x, fmt="{:.2f}"):
    return "–" if x is None else fmt.format(x)


def _ranged(s: dict, key: str, fmt: str) -> str:
    text = _f(s[key], fmt)
    rng = s.get(key + "_range")
    if len(s["seeds"]) > 1 and rng is not None:
        text += f" ({fmt.format(rng[0])}–{fmt.format(rng[1])})"
    return text


def table(summary: list[dict]) -> str:
    head = ("| mix | arrivals | load | target | req | TTFT p50 s | TTFT p99 s | E2E p99 s | tok/s | goodput | "
            "503 | other err | loads | load GPU-s | cache hit | GPU busy f0/f1/s0/s1 | proxy CPU s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in summary:
        busy = "/".join(_f(v, "{:.0%}") for v in s["gpu_busy"].values())
        lines.append(
            f"| {s['mix']} | {s['arrivals']} | {s['load']:.0%} | {s['target']} | {_f(s['requests'], '{:.0f}')} | "
            f"{_f(s['ttft_p50'])} | {_ranged(s, 'ttft_p99', '{:.2f}')} | {_f(s['e2e_p99'])} | "
            f"{_ranged(s, 'tokens_per_s', '{:.0f}')} | {_f(s['goodput_share'], '{:.0%}')} | "
            f"{_f(s['rate_503'], '{:.1%}')} | {_f(s['rate_other_errors'], '{:.1%}')} | "
            f"{_ranged(s, 'loads', '{:.0f}')} | {_f(s['load_gpu_s'], '{:.0f}')} | "
            f"{_f(s['cache_hit'], '{:.0%}')} | {busy} | {_f(s['proxy_cpu_s'])} |")
    return "\n".join(lines)


def check_targets(summary: list[dict]) -> list[dict]:
    """The issue's targets, from the medians: at LLM-mix loads in 70-90 % (each arrival pattern)
    against nginx least_conn and round-robin, and the control mix within 5 % of least_conn."""
    by = {(s["mix"], s["arrivals"], s["load"], s["target"]): s for s in summary}
    out = []
    for (mix, arrivals, load, target), s in by.items():
        if target != "olb":
            continue
        lc = by.get((mix, arrivals, load, "nginx-lc"))
        rr = by.get((mix, arrivals, load, "nginx-rr"))
        checks = []
        if mix == "llm" and 0.7 <= load <= 0.9:
            checks += [("p99 TTFT ≤ ½ nginx least_conn", "ttft_p99", lc, 0.5, "le"),
                       ("p99 TTFT ≤ ¼ nginx round-robin", "ttft_p99", rr, 0.25, "le"),
                       ("model loads ≤ ⅕ nginx least_conn", "loads", lc, 0.2, "le"),
                       ("throughput ≥ nginx least_conn", "tokens_per_s", lc, 1.0, "ge")]
        elif mix == "control":
            checks += [("control: p99 TTFT ≤ 1.05 × nginx least_conn", "ttft_p99", lc, 1.05, "le"),
                       ("control: throughput ≥ 0.95 × nginx least_conn", "tokens_per_s", lc, 0.95, "ge")]
        for what, key, ref, factor, op in checks:
            if ref is None or s[key] is None or ref[key] is None:
                continue
            mine, theirs = s[key], ref[key]
            met = mine <= factor * theirs if op == "le" else mine >= factor * theirs
            out.append({"mix": mix, "arrivals": arrivals, "load": load, "what": what, "olb": mine,
                        "reference": theirs, "limit": factor * theirs, "met": met,
                        "ratio": mine / theirs if theirs else None})
    return out


def targets_table(checks: list[dict]) -> str:
    lines = ["| load | arrivals | target | olb | reference | limit | ratio | met? |", "|---|---|---|---|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['load']:.0%} | {c['arrivals']} | {c['what']} | {c['olb']:.2f} | {c['reference']:.2f} | "
                     f"{c['limit']:.2f} | {_f(c['ratio'], '{:.2f}×')} | {'**met**' if c['met'] else '**NOT met**'} |")
    return "\n".join(lines)


def merge(results: list[dict]) -> dict:
    """Several scheduling results as one: rows of later results replace the
    rows of earlier ones with the same (target, mix, arrivals, load, seed).

    For re-measuring part of a run -- more seeds, or one target after a
    change to it -- and reporting the whole table from one file; the result
    keeps every run's command and date.
    """
    def key(row):
        return (row["target"], row["mix"], row.get("arrivals", "poisson"), row["load"], row.get("seed", 1))

    merged = dict(results[0])
    rows: dict = {}
    runs = []
    for result in results:
        for row in result["rows"]:
            rows[key(row)] = row
        runs += result.get("runs") or [{"command": result.get("command"), "date": result.get("date"),
                                        "wall_s": result.get("wall_s")}]
    merged.update(rows=list(rows.values()), runs=runs,
                  command="; ".join(r["command"] for r in runs if r.get("command")),
                  wall_s=sum(r.get("wall_s") or 0 for r in runs), date=results[-1].get("date"))
    return merged


def markdown(result: dict) -> str:
    summary = aggregate(result["rows"])
    m = result.get("machine", {})
    seeds = sorted({r.get("seed", 1) for r in result["rows"]})
    out = [f"# Scheduling: {result.get('command', 'python -m bench.scheduling')}", "",
           f"{m.get('nproc', '?')} CPUs, {m.get('cpu', '?')}, Python {m.get('python', '?')}; "
           f"{m.get('nginx') or 'no nginx'}; {m.get('haproxy') or 'no HAProxy'}; "
           f"{len(result['rows'])} runs in {result.get('wall_s', 0):.0f} s; seeds {','.join(map(str, seeds))}"
           + (" (medians; ranges in parentheses)" if len(seeds) > 1 else ""), "",
           table(summary), ""]
    checks = check_targets(summary)
    if checks:
        out += ["## The issue's targets", "", targets_table(checks), ""]
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
    # One row of plots per arrival pattern swept over two loads or more.
    sweeps = {}
    for pattern in ("poisson", "bursty"):
        pts = [s for s in summary if s["mix"] == "llm" and s["arrivals"] == pattern]
        if len({s["load"] for s in pts}) >= 2:
            sweeps[pattern] = pts
    if sweeps:
        fig, grid = plt.subplots(len(sweeps), 2, figsize=(12, 4.2 * len(sweeps)), squeeze=False)
        for axes, (pattern, sweep) in zip(grid, sweeps.items()):
            for t in targets:
                pts = sorted((s for s in sweep if s["target"] == t), key=lambda s: s["load"])
                if not pts:
                    continue
                x = [100 * s["load"] for s in pts]
                for ax, key in zip(axes, ("ttft_p99", "tokens_per_s")):
                    y = [s[key] for s in pts]
                    lo = [s[key] - s[key + "_range"][0] if s[key + "_range"] else 0 for s in pts]
                    hi = [s[key + "_range"][1] - s[key] if s[key + "_range"] else 0 for s in pts]
                    ax.errorbar(x, y, yerr=[lo, hi], fmt="-o", capsize=3, color=COLORS.get(t), label=t)
            axes[0].set(title=f"p99 time to first token (LLM mix, {pattern})", xlabel="offered load, % of capacity",
                        ylabel="simulated s (log)")
            axes[0].set_yscale("log")
            axes[1].set(title=f"throughput (LLM mix, {pattern})", xlabel="offered load, % of capacity",
                        ylabel="eval tokens / simulated s")
            axes[1].set_ylim(bottom=0)
        written.append(_save(plt, fig, grid.ravel(), os.path.join(outdir, f"{name}_vs_load.png")))
    cdf = [s for s in summary if s["mix"] == "llm" and abs(s["load"] - CDF_LOAD) < 1e-9 and s["ttfts"]]
    patterns = list(dict.fromkeys(s["arrivals"] for s in cdf))
    if cdf:
        fig, axes = plt.subplots(1, len(patterns), figsize=(6.5 * len(patterns), 4.2), squeeze=False)
        for ax, pattern in zip(axes[0], patterns):
            for s in (s for s in cdf if s["arrivals"] == pattern):
                xs = [max(x, 1e-3) for x in s["ttfts"]]
                ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post",
                        color=COLORS.get(s["target"]), label=s["target"])
            ax.set(title=f"TTFT CDF, LLM mix, {CDF_LOAD:.0%} load, {pattern}", xlabel="simulated s (log)",
                   ylabel="share of requests")
            ax.set_xscale("log")
        written.append(_save(plt, fig, axes[0], os.path.join(outdir, f"{name}_ttft_cdf.png")))
    return written


def _save(plt, fig, axes, path: str) -> str:
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path

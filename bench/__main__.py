"""`python -m bench`: olb's benchmarks, from the repository root with the venv active.

    python -m bench overhead            olb vs direct, nginx, HAProxy, floor; olb-sim and the raw mock (~17 min)
    python -m bench overhead --quick    a smoke run (~5 min)
    python -m bench micro [PYTEST ARGS]  pytest-benchmark micro-benchmarks of olb._core and olb._http (~20 s)
    python -m bench e2e [...]           bench/e2e.py: olb vs direct only, more detail per process
    python -m bench scheduling [...]    bench/scheduling.py: olb's scheduler vs nginx/HAProxy, simulated cluster
    python -m bench chaos [...]         bench/chaos.py: backends killed, slow and non-reading clients, few
                                        descriptors; every request classified
    python -m bench control [...]       bench/control_plane.py: requests that run no model, every slot busy
    python -m bench count [...]         bench/count.py: syscalls, wake-ups, instructions, Python frames and
                                        allocations per chunk or request, olb against nginx, HAProxy, floor
    python -m bench plot FILE.json...   the Markdown and plots again, from saved results
                                        (scheduling results merged: later rows replace earlier)
    python -m bench tools               which proxies this machine has

Results go to bench/results/ (git-ignored): JSON, a Markdown table, PNG plots
when matplotlib is installed (`pip install '.[bench]'`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def _write(outdir: str, name: str, result: dict) -> None:
    from . import report

    os.makedirs(outdir, exist_ok=True)
    md = report.markdown(result)
    with open(os.path.join(outdir, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(outdir, f"{name}.md"), "w") as f:
        f.write(md)
    plots = report.plot(result, outdir)
    print("\n" + md)
    print(f"results: {os.path.join(outdir, name)}.json, .md")
    if plots:
        print("plots: " + ", ".join(plots))
    else:
        print("plots: none (matplotlib is missing: pip install '.[bench]')")


def cmd_overhead(p, args) -> int:
    import uvloop

    from . import overhead, proc

    overhead.finish_arguments(p, args)
    info = proc.machine()
    command = "python -m bench " + shlex.join(sys.argv[1:])
    print(f"# {command}\n# {info['nproc']} CPUs, {info['cpu']}, Python {info['python']}; "
          f"{info['nginx'] or 'no nginx'}; {info['haproxy'] or 'no HAProxy'}", flush=True)
    result = uvloop.run(overhead.run(args))
    result.update(command=command, machine=info, date=time.strftime("%Y-%m-%d %H:%M:%S %z"),
                  args={k: v for k, v in vars(args).items() if k != "func"})
    _write(args.out, "overhead", result)
    return 1 if any(r["errors"] for r in result["rows"]) else 0


def cmd_plot(p, args) -> int:
    results = []
    for path in args.files:
        with open(path) as f:
            results.append(json.load(f))
    name = os.path.splitext(os.path.basename(args.files[0]))[0]
    outdir = args.out or os.path.dirname(os.path.abspath(args.files[0]))
    if all(r.get("benchmark") == "scheduling" for r in results):
        from . import scheduling, scheduling_report

        scheduling.write(scheduling_report.merge(results), outdir, name)
    elif len(results) == 1:
        _write(outdir, name, results[0])
    else:
        p.error("only scheduling results can be merged")
    return 0


def cmd_micro(p, args) -> int:
    os.makedirs(args.out, exist_ok=True)
    out = os.path.join(args.out, "micro.json")
    argv = [sys.executable, "-m", "pytest", os.path.join(HERE, "test_bench_core.py"),
            os.path.join(HERE, "test_bench_select.py"), "--benchmark-only",
            f"--benchmark-json={out}", "-q", "-p", "no:cacheprovider", *args.rest]
    print("# " + " ".join(argv), flush=True)
    rc = subprocess.call(argv)
    if rc == 0 and os.path.exists(out):
        with open(out) as f:
            data = json.load(f)
        rows = ["| group | benchmark | mean µs | min µs | rounds |", "|---|---|---:|---:|---:|"]
        for b in sorted(data["benchmarks"], key=lambda b: (b["group"] or "", b["stats"]["mean"])):
            s = b["stats"]
            rows.append(f"| {b['group']} | {b['name']} | {s['mean'] * 1e6:.2f} | {s['min'] * 1e6:.2f} | "
                        f"{s['rounds']} |")
        md = "\n".join(rows) + "\n"
        with open(os.path.join(args.out, "micro.md"), "w") as f:
            f.write(md)
        print("\n" + md + f"\nresults: {out}, micro.md")
    return rc


#: The sub-commands that hand their flags to a module's main(argv): name, module, help, and
#: how main is called (chaos also takes the results directory).
PASSTHROUGH = (
    ("e2e", "e2e", "bench/e2e.py (olb vs direct)", lambda mod, rest: mod.main(rest)),
    ("scheduling", "scheduling", "bench/scheduling.py: olb's scheduler on a simulated LLM cluster",
     lambda mod, rest: mod.main(rest) or 0),
    ("chaos", "chaos", "bench/chaos.py: olb under adversity, every request classified",
     lambda mod, rest: mod.main(rest, RESULTS)),
    ("control", "control_plane", "bench/control_plane.py: HEAD /, /api/version, /api/tags, /api/show "
     "with every slot busy", lambda mod, rest: mod.main(rest)),
    ("count", "count", "bench/count.py: syscalls, wake-ups, instructions, Python frames and allocations "
     "per chunk or request", lambda mod, rest: mod.main(rest)),
)


def cmd_tools(p, args) -> int:
    from . import proc, targets

    info = proc.machine()
    print(f"{info['nproc']} CPUs, {info['cpu']}, {info['mem_gib']} GiB, Linux {info['kernel']}, "
          f"Python {info['python']}")
    for kind in ("nginx", "haproxy"):
        why = targets.TargetSpec(kind).missing()
        print(f"{kind:8} {info[kind] if not why else 'missing: ' + why}")
    try:
        import matplotlib

        print(f"plots    matplotlib {matplotlib.__version__}")
    except ImportError:
        print("plots    missing: pip install '.[bench]'")
    return 0


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstrings as written, and every flag's default."""


def main(argv=None) -> int:
    from . import overhead

    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", required=True)
    o = sub.add_parser("overhead", help="olb vs direct vs nginx vs HAProxy, one run",
                       description=overhead.__doc__, formatter_class=_Help)
    overhead.add_arguments(o)
    o.add_argument("--out", default=RESULTS, help="directory for overhead.json, overhead.md and plots")
    o.set_defaults(func=lambda a: cmd_overhead(o, a))
    m = sub.add_parser("micro", help="pytest-benchmark micro-benchmarks of olb._core")
    m.add_argument("--out", default=RESULTS)
    m.set_defaults(passthrough="pytest")
    m.set_defaults(func=lambda a: cmd_micro(m, a))
    for name, module, text, call in PASSTHROUGH:
        sp = sub.add_parser(name, help=f"{text}; its flags follow", add_help=False)
        sp.set_defaults(func=lambda a, module=module, call=call: call(
            importlib.import_module(f".{module}", __package__), a.rest), passthrough=name)
    pl = sub.add_parser("plot", help="Markdown and plots again from a saved JSON result; several "
                                     "scheduling results are merged, later rows replacing earlier ones")
    pl.add_argument("files", nargs="+", metavar="FILE.json")
    pl.add_argument("--out", default=None, help="directory (default: the JSON's)")
    pl.set_defaults(func=lambda a: cmd_plot(pl, a))
    t = sub.add_parser("tools", help="which proxies and plotting this machine has")
    t.set_defaults(func=lambda a: cmd_tools(t, a))
    # `micro`, `e2e`, `scheduling`, `chaos`, `control` and `count` hand the flags they do not know
    # to pytest and to their module.
    args, rest = p.parse_known_args(argv)
    if rest and not getattr(args, "passthrough", None):
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""olb's benchmarks: `python -m bench --help` (run from the repository root).

Modules: `proc` (child processes, CPU and memory from /proc), `load` (the
load generator), `targets` (direct, olb, nginx, HAProxy, any other balancer),
`overhead` (the comparison), `report` (Markdown and plots), `progress`.
`e2e.py` is the older olb-vs-direct script, `test_bench_core.py` the
pytest-benchmark micro-benchmarks of the compiled core.
"""

"""`python -m bench`: every sub-command answers --help (a help text with a stray
`%` once made argparse crash on `overhead --help`)."""

import subprocess
import sys

import pytest

ROOT = __file__.rsplit("/tests/", 1)[0]


@pytest.mark.parametrize("argv", [["--help"], ["overhead", "--help"], ["scheduling", "--help"],
                                  ["e2e", "--help"], ["chaos", "--help"], ["control", "--help"], ["count", "--help"], ["plot", "--help"],
                                  ["tools"]])
def test_bench_subcommands_answer(argv):
    out = subprocess.run([sys.executable, "-m", "bench", *argv], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip()

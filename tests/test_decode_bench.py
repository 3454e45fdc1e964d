"""benchmarks/decode_speed.py: the rows of several rounds are merged as documented, and a tiny run prints its
table (one fresh process per row and round)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "decode_speed.py"


def test_rounds_keep_the_fastest_run_the_shortest_long_prompt_and_the_largest_peak(bench_module):
    best_of = bench_module("decode_speed").best_of
    slow = {"total": 2.0, "ttft": 0.05, "long_ttft": 0.30, "peak_mb": 500.0, "read_bw": 20e9, "ids": [[1]]}
    fast = {"total": 1.0, "ttft": 0.07, "long_ttft": 0.40, "peak_mb": 480.0, "read_bw": 30e9, "ids": [[2]]}
    assert best_of(None, slow) is slow
    for a, b in ((slow, fast), (fast, slow)):
        kept = best_of(a, b)
        # the fastest round's own numbers, the other round's better long-prompt TTFT and higher peak
        assert (kept["total"], kept["ttft"], kept["read_bw"], kept["ids"]) == (1.0, 0.07, 30e9, [[2]])
        assert (kept["long_ttft"], kept["peak_mb"]) == (0.30, 500.0)
    assert fast["long_ttft"] == 0.40 and slow["peak_mb"] == 500.0  # the rows given are not changed


def test_a_tiny_run_with_two_rounds_prints_one_row_per_engine(tmp_path):
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--layouts", "gpt2", "--n-layer", "1", "--vocab", "4096", "--new-tokens", "4",
         "--prompt-tokens", "8", "--prefill-tokens", "16", "--repeats", "1", "--batches", "1", "--threads", "2",
         "--engines", "zenlm eager", "--dtypes", "fp32", "--rounds", "2", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "fastest of 1 x 2 rounds (engines taking turns)" in res.stdout
    rows = [line for line in res.stdout.splitlines() if line.startswith("| gpt2 |")]
    assert len(rows) == 1 and "| zenlm eager |" in rows[0], res.stdout
    assert "failed" not in res.stdout


def test_rounds_below_one_are_refused_with_a_usage_error():
    res = subprocess.run([sys.executable, str(SCRIPT), "--rounds", "0"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--rounds must be at least 1, got 0" in res.stderr
    assert "Traceback" not in res.stderr and not res.stdout

"""benchmarks/program_build.py refuses bad arguments with a usage line (its builds are what tests/test_compiled.py
checks: the two C++ files compile side by side, and a failed compile fails the build)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "program_build.py"


@pytest.mark.parametrize("argv, message", [(["--rounds", "0"], "--rounds must be at least 1, got 0"),
                                           (["--dtypes", "fp16"], "--dtypes takes fp32, bf16 and int8, got 'fp16'"),
                                           (["--dtypes", ","], "--dtypes takes fp32, bf16 and int8")])
def test_bad_arguments_are_refused_with_a_usage_error(argv, message):
    res = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and message in res.stderr
    assert "Traceback" not in res.stderr and not res.stdout

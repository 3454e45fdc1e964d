"""User mistakes and missing resources at the command line: one line, `zenlm: error: ...`, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def _zenlm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zenlm", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_from_hub_without_network_says_so_in_one_line(tmp_path: Path) -> None:
    r = _zenlm("convert", "from-hf", "--from-hub", "openai-community/gpt2", "--out", str(tmp_path / "run"),
               env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("zenlm: error: could not download 'openai-community/gpt2'")
    assert "needs network access" in lines[0] and "hf download" in lines[0]
    assert not (tmp_path / "run").exists()

"""`zenlm demo` end to end with a short budget: tokenizer, shards, training, evaluation, plot, sample."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "demo"
    # the tiny preset and a fixed number of steps: the pipeline is the point here, not the model
    r = subprocess.run([sys.executable, "-m", "zenlm", "demo", "--max-seconds", "200", "--max-steps", "30",
                        "--model", "tiny", "--out", str(out), "--device", "cpu"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "validation loss" in r.stdout and "bits/byte" in r.stdout
    assert "--- sample" in r.stdout
    sample = r.stdout.split("--- sample")[1].split("--- end of sample")[0]
    assert len(sample.strip()) > 40
    assert (out / "run" / "plots" / "loss.png").stat().st_size > 1000
    assert (out / "run" / "model.safetensors").is_file()
    # the demo folder is replaced by a second demo, but a foreign folder is never touched
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("precious")
    from zenlm.cli import main

    capsys.readouterr()
    assert main(["demo", "--max-seconds", "45", "--out", str(foreign)]) == 2  # in this process: 2 s sooner
    assert "not a zenlm demo folder" in capsys.readouterr().err
    assert (foreign / "keep.txt").read_text() == "precious"


@pytest.mark.slow
def test_chinese_demo_trains_and_writes_chinese(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`zenlm demo --lang zh`: People's Daily -> BPE -> shards -> GPT -> a Chinese sample (smaller vocab and model)."""
    import zenlm
    from zenlm.recipes import demo as demo_mod

    monkeypatch.setitem(demo_mod.DEMOS, "zh", dict(demo_mod.DEMOS["zh"], vocab_size=1024))
    # a fixed number of steps (time only caps it), so a slow or busy machine tests the same thing
    res = demo_mod.demo(lang="zh", max_seconds=600, max_steps=250, model="tiny", out=tmp_path / "zh", device="cpu")
    assert res.train.step == 250
    assert res.train.val["val_loss"] < 5.5, res.train.val  # uniform: ln(1024) = 6.93
    assert res.train.val["val_bpb"] > 0
    lm = zenlm.load(res.run_dir, device="cpu")
    text = lm.generate(res.prompt, max_new_tokens=30, temperature=0.0)
    assert sum("\u4e00" <= ch <= "\u9fff" for ch in text) >= 5

"""User mistakes and missing resources at the command line: one line, `zenlm: error: ...`, exit 2."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


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


# ------------------------------------------------------------------------------------------ values of flags
FIXTURE_GPT = Path(__file__).resolve().parents[1] / "fixtures" / "runs" / "gpt"


@pytest.mark.parametrize(("flags", "says"), [
    (["--lr", "nan"], "argument --lr: expected a finite number, got 'nan'"),
    (["--weight-decay", "nan"], "argument --weight-decay: expected a finite number"),
    (["--max-seconds", "inf"], "argument --max-seconds: expected a finite number"),
    (["--threads", "-1"], "zenlm: error: threads must be >= 1"),
    (["--seed", str(2**70)], "zenlm: error: seed must be a whole number in 0..2**32-1"),
    (["--seed", "-3"], "zenlm: error: seed must be a whole number in 0..2**32-1"),
    (["--max-steps", "2.7"], "argument --max-steps: expected a whole number, got '2.7'"),
])
def test_bad_training_values_are_refused_before_anything_is_written(
        flags: list[str], says: str, char_data: Path, tmp_path: Path, zenlm_cli) -> None:
    out = tmp_path / "run"
    rc, _, err = zenlm_cli(["pretrain", "--data", str(char_data), "--out", str(out), "--model", "tiny", *flags])
    assert rc == 2 and says in err, err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize(("text", "says"), [
    ("max_steps: 2.7\n", "max_steps: expected a whole number, got 2.7"),
    ("lr: .nan\n", "lr: expected a finite number"),
    ("seed: [1, 2]\n", "seed: expected one value"),
    ("compile: maybe\n", "compile: expected true or false"),
])
def test_a_config_file_is_read_as_strictly_as_the_command_line(
        text: str, says: str, char_data: Path, tmp_path: Path, zenlm_cli) -> None:
    (tmp_path / "train.yaml").write_text(text)
    out = tmp_path / "run"
    rc, _, err = zenlm_cli(["pretrain", "--data", str(char_data), "--out", str(out), "--config",
                        str(tmp_path / "train.yaml")])
    assert rc == 2 and says in err, err
    assert not out.exists()


def test_whole_numbers_written_as_floats_are_accepted_and_not_rounded() -> None:
    from zenlm.clikit import parse_int

    assert parse_int("1e3") == 1000 and parse_int(2.0) == 2 and parse_int("12") == 12
    for bad in ("2.7", 2.7, True, "nan", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_int(bad)


def test_a_generation_seed_beyond_64_bits_is_refused_by_name(zenlm_cli) -> None:
    rc, _, err = zenlm_cli(["generate", str(FIXTURE_GPT), "a", "--seed", str(2**70), "--device", "cpu"])
    assert rc == 2 and "zenlm: error: seed must be an integer in 0..2**64-1" in err, err


@pytest.mark.parametrize("tiny", ["1e-40", "5e-324"])
def test_a_vanishing_temperature_is_greedy_decoding(tiny: str, capsys) -> None:
    """Issue 13.19: logits / 1e-40 overflowed to inf and the draw raised; the limit T -> 0 is greedy."""
    from zenlm.cli import main

    common = ["generate", str(FIXTURE_GPT), "ab", "--max-new-tokens", "8", "--seed", "1", "--device", "cpu"]
    assert main([*common, "--temperature", "0"]) == 0
    greedy = capsys.readouterr().out
    assert main([*common, "--temperature", tiny]) == 0
    assert capsys.readouterr().out == greedy


def test_a_vanishing_temperature_gives_the_greedy_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """With every logit negative, logits / 1e-40 is -inf everywhere and the draw had nothing to draw from."""
    import zenlm
    from zenlm.models.gpt import GPT

    forward = GPT.forward
    monkeypatch.setattr(GPT, "forward", lambda self, *a, **kw: forward(self, *a, **kw) - 100.0)  # same argmax
    lm = zenlm.load(FIXTURE_GPT, device="cpu")
    greedy = lm.generate("ab", max_new_tokens=8, temperature=0)
    for tiny in (1e-40, 5e-324):
        for top_k in (None, 5):
            assert lm.generate("ab", max_new_tokens=8, temperature=tiny, top_k=top_k, seed=1) == greedy


@pytest.mark.parametrize(("cls", "field", "value", "says"), [
    ("TrainConfig", "max_steps", 2.7, "max_steps must be a whole number, got 2.7"),
    ("TrainConfig", "max_seconds", float("nan"), "max_seconds must be a finite number or None"),
    ("TrainConfig", "grad_accum", "4", "grad_accum must be a whole number, got '4' (text, not a number"),
    ("OptimConfig", "lr", float("nan"), "lr must be a finite number"),
    ("OptimConfig", "weight_decay", float("inf"), "weight_decay must be a finite number"),
    ("OptimConfig", "lr", "3e-4", "YAML reads 3e-4 as text"),
    ("OptimConfig", "betas", [0.9], "betas must be a list of 2 values"),
    ("OptimConfig", "weight_decay", -0.1, "weight_decay must be >= 0"),
])
def test_settings_classes_check_their_field_types(cls: str, field: str, value, says: str) -> None:
    from zenlm.errors import ConfigError
    from zenlm.train.loop import TrainConfig
    from zenlm.train.optim import OptimConfig

    with pytest.raises(ConfigError, match=re.escape(says)):
        {"TrainConfig": TrainConfig, "OptimConfig": OptimConfig}[cls](**{field: value})


@pytest.mark.parametrize("verb", [["pretrain", "--data", "{data}"], ["finetune", "seq2seq", "--data", "{pairs}"]])
def test_a_model_shape_too_large_for_memory_is_refused_before_allocating(verb: list[str], char_data: Path,
                                                                         tmp_path: Path, zenlm_cli) -> None:
    """Issue 13.17: sizes are estimated from the config (on the meta device) and compared with free memory."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"source": "abc", "target": "cba"}\n' * 20)
    out = tmp_path / "run"
    args = [a.format(data=char_data, pairs=pairs) for a in verb]
    rc, _, err = zenlm_cli([*args, "--out", out, "--n-embd", str(2**20), "--max-steps", "1"])
    assert rc == 2 and "more than the" in err and "of memory free" in err and "n_embd" in err, err
    assert not out.exists() or not any(out.iterdir())

"""Every metadata file a run, checkpoint or data directory holds, damaged a few ways: the command that reads it
ends with one line, `zenlm: error: FILE ...`, and exit status 2; never a traceback, never a silent success.

Each case damages one file of a fresh copy and runs the verb that reads it, in this process (so an unexpected
exception fails the test with its traceback).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "runs"


def _yaml_edit(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        d = yaml.safe_load(path.read_text(encoding="utf-8"))
        change(d)
        path.write_text(yaml.safe_dump(d, sort_keys=False), encoding="utf-8")
    return edit


def _json_edit(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        d = json.loads(path.read_text(encoding="utf-8"))
        path.write_text(json.dumps(change(d)), encoding="utf-8")
    return edit


def _text(text: str | bytes) -> Callable[[Path], None]:
    return lambda p: p.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])


def _set(section: str, **values) -> Callable[[Path], None]:
    return _yaml_edit(lambda d: d.setdefault(section, {}).update(values) if isinstance(d.get(section), dict)
                      or section not in d else d.update({section: values}))


def _check(rc: int, err: str, file: str) -> None:
    assert rc == 2, err
    lines = [x for x in err.splitlines() if x.startswith("zenlm: error:")]
    assert len(lines) == 1 and file in lines[0], err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------ a run directory
RUN_CASES = [  # (fixture run, file, damage, what the message says)
    ("gpt", "config.yaml", _text(b"\xff\xfe model"), "not UTF-8"),
    ("gpt", "config.yaml", _text("model: [1, 2\n"), "not valid YAML"),
    ("gpt", "config.yaml", _text("- a list\n"), "no 'model' section"),
    ("gpt", "config.yaml", _text("model: [1, 2]\n"), "'model' must be a mapping"),
    ("gpt", "config.yaml", _set("model", n_layer="2"), "n_layer must be a whole number, got '2'"),
    ("gpt", "config.yaml", _set("model", n_embd=16.5), "n_embd must be a whole number, got 16.5"),
    ("gpt", "config.yaml", _set("model", rope_theta="abc"), "rope_theta must be a finite number"),
    ("gpt", "config.yaml", _set("model", block_size=10**12), "more than the"),
    ("gpt", "config.yaml", _set("model", n_layer=10**9), "more than the"),
    ("gpt", "config.yaml", _set("model", block_size="1e12"), "YAML reads 1e12 as text"),
    ("gpt", "config.yaml", _set("model", arch=5), "model.arch must be the name"),
    ("gpt", "config.yaml", _set("model", arch="xx"), "unknown model architecture 'xx'"),
    ("gpt", "config.yaml", _set("model", colour="blue"), "unknown GPTConfig fields ['colour']"),
    ("gpt", "config.yaml", _yaml_edit(lambda d: d.update(task="classify")), "'task' must be a mapping"),
    ("gpt", "config.yaml", _yaml_edit(lambda d: d.update(quantization=5)), "'quantization' must be a mapping"),
    ("gpt", "tokenizer.json", _text("{not json"), "not a valid tokenizer.json"),
    ("gpt", "tokenizer.json", _text("[1, 2, 3]"), "not a valid tokenizer.json"),
    ("gpt", "tokenizer.json", _text(""), "not a valid tokenizer.json"),
    ("gpt", "tokenizer.json", _text(b"\xff\xfe\x00"), "not a valid tokenizer.json"),
    ("gpt", "tokenizer_config.json", _text("{bad"), "not valid JSON"),
    ("gpt", "tokenizer_config.json", _text("[1, 2]"), "must hold a JSON object"),
    ("gpt", "tokenizer_config.json", _json_edit(lambda d: {**d, "chat_template": 5}), "'chat_template' must be"),
    ("gpt", "model.safetensors", _text(b"garbage"), "model.safetensors"),
    ("gpt", "model.safetensors", _truncate, "model.safetensors"),
    ("gpt", "model.safetensors", lambda p: p.unlink(), "neither model.safetensors nor a checkpoint"),
    ("gpt-classify", "config.yaml", _set("task", labels=["only"]), "task.labels (two or more names)"),
    ("gpt-classify", "config.yaml", _set("task", pooling="max"), "pooling 'max' is not supported"),
    ("gpt-classify", "config.yaml", _set("task", dropout="x"), "task.dropout must be a number"),
    ("encdec", "config.yaml", _yaml_edit(lambda d: d.update(seq2seq=5)), "'seq2seq' must be a mapping"),
    ("encdec", "config.yaml", _set("seq2seq", eos_id="x"), "seq2seq.eos_id must be a token id"),
    ("encdec", "config.yaml", _set("seq2seq", max_source_tokens=-1), "seq2seq.max_source_tokens must be"),
    ("encdec", "config.yaml", _set("model", n_enc_layer=2.5), "n_enc_layer must be a whole number"),
]
VERB = {"gpt": ["generate", "{run}", "a", "--max-new-tokens", "1"], "gpt-classify": ["predict", "{run}", "a"],
        "encdec": ["generate", "{run}", "a", "--max-new-tokens", "1"]}


@pytest.mark.parametrize(("kind", "file", "damage", "says"), RUN_CASES,
                         ids=[f"{k}-{f}-{i}" for i, (k, f, _, _) in enumerate(RUN_CASES)])
def test_a_damaged_run_file_is_named(kind: str, file: str, damage, says: str, tmp_path: Path, zenlm_cli) -> None:
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / kind, run)
    damage(run / file)
    rc, _, err = zenlm_cli([a.format(run=run) for a in VERB[kind]] + ["--device", "cpu"])
    _check(rc, err, file if file != "model.safetensors" or "neither" not in says else str(run))
    assert says in err, err


# ----------------------------------------------------------------------- a checkpoint and --resume
@pytest.fixture(scope="module")
def trained(char_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run with one checkpoint (step 2)."""
    import contextlib
    import io

    from zenlm.cli import main

    run = tmp_path_factory.mktemp("trained") / "run"
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert main(["pretrain", "--data", str(char_data), "--out", str(run), "--model", "tiny", "--n-layer", "1",
                     "--batch-size", "2", "--seq-len", "16", "--max-steps", "2", "--eval-tokens", "256",
                     "--device", "cpu", "--precision", "fp32", "--threads", "1"]) == 0
    return run


CKPT = "checkpoints/step-000002"
RESUME_CASES = [  # (file in the run, damage, what the message says)
    (f"{CKPT}/trainer.json", _text("{"), "not valid JSON"),
    (f"{CKPT}/trainer.json", _text("[]"), "must hold a JSON object"),
    (f"{CKPT}/trainer.json", _json_edit(lambda d: {**d, "step": "2"}), "'step' must be a whole number"),
    (f"{CKPT}/trainer.json", _json_edit(lambda d: {k: v for k, v in d.items() if k != "optimizers"}),
     "no 'optimizers' entry"),
    (f"{CKPT}/rng.safetensors", _text(b"\x00" * 16), "rng.safetensors"),
    (f"{CKPT}/optimizer.safetensors", _truncate, "optimizer.safetensors"),
    (f"{CKPT}/model.safetensors", _text(b"garbage"), "model.safetensors"),
    ("config.yaml", _set("train", seed="7"), "seed must be a whole number"),
    ("config.yaml", _set("train", max_steps=2.7), "max_steps must be a whole number, got 2.7"),
    ("config.yaml", _set("train", surprise=1), "unknown TrainConfig fields"),
    ("config.yaml", _set("optim", lr="1e-3"), "YAML reads 1e-3 as text"),
    ("config.yaml", _set("optim", betas=[0.9]), "betas must be a list of 2 values"),
    ("config.yaml", _set("batch", batch_size="2"), "batch_size must be a whole number"),
    ("config.yaml", _yaml_edit(lambda d: d.update(train=[1, 2])), "'train' must be a mapping"),
    ("config.yaml", _yaml_edit(lambda d: d.update(objective="denoise")), "objective 'denoise' is not one of"),
    ("tokenizer.json", _text("{}"), "tokenizer.json"),
]


@pytest.mark.parametrize(("file", "damage", "says"), RESUME_CASES,
                         ids=[f"{Path(f).name}-{i}" for i, (f, _, _) in enumerate(RESUME_CASES)])
def test_a_damaged_file_is_named_on_resume(file: str, damage, says: str, trained: Path, char_data: Path,
                                           tmp_path: Path, zenlm_cli) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    damage(run / file)
    rc, _, err = zenlm_cli(["pretrain", "--data", char_data, "--out", run, "--resume", "--max-steps", "3",
                     "--device", "cpu", "--threads", "1"])
    _check(rc, err, Path(file).name)
    assert says in err, err


@pytest.mark.parametrize("line", ["5", '{"step": "x"}', "[1, 2]", '{"step": 1, "train_loss": 3.0'])
def test_a_damaged_metrics_line_does_not_stop_a_resume(line: str, trained: Path, char_data: Path, tmp_path: Path,
                                                      zenlm_cli) -> None:
    """metrics.jsonl is a log: a line a crash cut short or an edit broke is dropped on resume, not fatal."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    with (run / "metrics.jsonl").open("a") as f:
        f.write(line + "\n")
    rc, _, err = zenlm_cli(["pretrain", "--data", char_data, "--out", run, "--resume", "--max-steps", "3",
                     "--device", "cpu", "--threads", "1"])
    assert rc == 0, err
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 3


# ------------------------------------------------------------------------------------ a data directory
DATA_CASES = [
    ("index.json", _text("{"), "not valid JSON"),
    ("index.json", _text("[]"), "must hold a JSON object"),
    ("index.json", _json_edit(lambda d: {**d, "vocab_size": "82"}), "'vocab_size' must be a whole number"),
    ("index.json", _json_edit(lambda d: {**d, "splits": {**d["splits"], "val": None}}), "split 'val' must be"),
    ("tokenizer.json", _text("{not json"), "not a valid tokenizer.json"),
    ("tokenizer_config.json", _text("[]"), "must hold a JSON object"),
    ("train-00000.bin", _truncate, "train-00000.bin"),
    ("train-00000.bin", _text(b"NOTZENLM" + b"\x00" * 40), "train-00000.bin"),
]


@pytest.mark.parametrize(("file", "damage", "says"), DATA_CASES,
                         ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(DATA_CASES)])
def test_a_damaged_data_file_is_named(file: str, damage, says: str, char_data: Path, tmp_path: Path,
                                      zenlm_cli) -> None:
    data = tmp_path / "data"
    shutil.copytree(char_data, data)
    damage(data / file)
    out = tmp_path / "run"
    rc, _, err = zenlm_cli(["pretrain", "--data", data, "--out", out, "--model", "tiny", "--max-steps", "1",
                     "--device", "cpu", "--threads", "1"])
    _check(rc, err, file)
    assert says in err, err
    assert not out.exists()  # found before anything was written

"""Run-level mistakes found before any work is done, and runs that can always be continued or restarted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from zenlm.data.corpus import open_corpus
from zenlm.data.shards import prepare
from zenlm.errors import DataError
from zenlm.recipes.pretrain import pretrain
from zenlm.tokenizer import Tokenizer
from zenlm.train.checkpoint import list_checkpoints
from zenlm.train.loop import TrainConfig


def test_a_validation_split_shorter_than_one_window_is_refused_before_training(
        tmp_path: Path, sample_text: str, char_tok: Tokenizer) -> None:
    (tmp_path / "train.txt").write_text(sample_text[:20_000], encoding="utf-8")
    (tmp_path / "val.txt").write_text("short", encoding="utf-8")
    data = tmp_path / "data"
    prepare(open_corpus(str(tmp_path / "train.txt"), val=str(tmp_path / "val.txt")), char_tok, data)
    out = tmp_path / "run"
    with pytest.raises(DataError, match="validation split .* too small for seq_len 32"):
        pretrain(data, out, model="tiny", seq_len=32, batch_size=2,
                 train=TrainConfig(max_steps=5, device="cpu", tensorboard=False))
    assert not out.exists()  # nothing written: the same command works once the data is fixed


def test_prepare_on_a_full_disk_names_the_file_and_leaves_no_shards(
        tmp_path: Path, sample_text: str, char_tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from zenlm.data import shards

    class FullDisk:
        """A file on a full disk: the header fits, the first ids do not, and closing fails again (flush)."""

        def __init__(self, f) -> None:
            self.f, self.writes = f, 0

        def write(self, b: bytes) -> int:
            self.writes += 1
            if self.writes > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def seek(self, *a):
            return self.f.seek(*a)

        def close(self) -> None:
            self.f.close()
            raise OSError(errno.ENOSPC, "No space left on device")

    real_open = shards._ShardWriter._open

    def open_on_full_disk(self) -> None:
        real_open(self)
        self._f = FullDisk(self._f)

    monkeypatch.setattr(shards._ShardWriter, "_open", open_on_full_disk)
    (tmp_path / "t.txt").write_text(sample_text[:5000], encoding="utf-8")
    out = tmp_path / "data"
    with pytest.raises(DataError, match=r"no space left on device while writing .*train-00000\.bin\.tmp"):
        prepare(open_corpus(str(tmp_path / "t.txt")), char_tok, out)
    assert not [p.name for p in out.iterdir() if p.suffix in (".bin", ".tmp") or p.name == "index.json"]
    monkeypatch.setattr(shards._ShardWriter, "_open", real_open)
    assert prepare(open_corpus(str(tmp_path / "t.txt")), char_tok, out)["splits"]["train"]["tokens"] > 0


# ---------------------------------------------------------------------------- resume, restart, overwrite
def _losses(run: Path) -> list[tuple[int, float]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["train_loss"]) for r in map(json.loads, lines) if "train_loss" in r]


# a run whose learning rate does not depend on --max-steps, so a split run can equal a straight one
TINY = ["--model", "tiny", "--n-layer", "1", "--batch-size", "2", "--seq-len", "16", "--optimizer", "adamw",
        "--schedule", "constant", "--warmup-steps", "0", "--lr", "0.003", "--device", "cpu", "--precision", "fp32",
        "--threads", "1"]


def test_resume_continues_with_the_runs_own_settings(char_data: Path, tmp_path: Path, zenlm_cli) -> None:
    """Issue 13.5: plain --resume used the CLI's defaults for seed, grad_accum, intervals and eval_tokens."""
    own = ["--seed", "7", "--grad-accum", "2", "--log-every", "1", "--eval-every", "2", "--ckpt-every", "2",
           "--eval-tokens", "256"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert zenlm_cli(["pretrain", "--data", char_data, "--out", straight, *TINY, *own, "--max-steps", "5"]).rc == 0
    assert zenlm_cli(["pretrain", "--data", char_data, "--out", split, *TINY, *own, "--max-steps", "3"]).rc == 0
    rc, _, err = zenlm_cli(["pretrain", "--data", char_data, "--out", split, "--resume", "--max-steps", "5",
                     "--threads", "1"])
    assert rc == 0, err
    assert "--max-steps 5 (the run's: 3)" in err and "--seed" not in err  # only what the command line changed
    assert _losses(split) == _losses(straight)  # bit for bit: same seed, accumulation, batches
    a, b = load_file(straight / "model.safetensors"), load_file(split / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    saved = yaml.safe_load((split / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 5 and saved["train"]["seed"] == 7 and saved["batch"]["eval_tokens"] == 256


def test_flags_given_on_resume_win_with_a_note(char_data: Path, tmp_path: Path, zenlm_cli) -> None:
    run = tmp_path / "run"
    assert zenlm_cli(["pretrain", "--data", char_data, "--out", run, *TINY, "--max-steps", "2", "--seed", "7",
                  "--eval-tokens", "256"]).rc == 0
    rc, _, err = zenlm_cli(["pretrain", "--data", char_data, "--out", run, "--resume", "--max-steps", "3", "--seed", "8",
                     "--lr", "0.001", "--n-layer", "4", "--threads", "1"])
    assert rc == 0, err
    assert "--seed 8 (the run's: 7)" in err and "--lr 0.001 (the run's: 0.003)" in err
    assert "--n-layer ignored: a resumed run keeps its own model" in err
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["seed"] == 8 and saved["optim"]["lr"] == 0.001 and saved["model"]["n_layer"] == 1


def test_resume_on_other_data_is_refused_and_a_copy_is_fine(
        char_data: Path, tmp_path: Path, sample_text: str, char_tok: Tokenizer, bpe_tok: Tokenizer, zenlm_cli) -> None:
    """Issue 13.20: a fingerprint of the tokenizer and the shard index is kept in config.yaml and compared."""
    import shutil

    run = tmp_path / "run"
    assert zenlm_cli(["pretrain", "--data", char_data, "--out", run, *TINY, "--max-steps", "2",
                  "--eval-tokens", "256"]).rc == 0
    assert set(yaml.safe_load((run / "config.yaml").read_text())["data"]) >= {"tokenizer_sha256", "index_sha256"}
    (tmp_path / "t.txt").write_text(sample_text[:30_000], encoding="utf-8")
    other_text = tmp_path / "other-text"
    prepare(open_corpus(str(tmp_path / "t.txt")), char_tok, other_text)
    other_tok = tmp_path / "other-tok"
    prepare(open_corpus(str(tmp_path / "t.txt")), bpe_tok, other_tok)
    for data, says in ((other_text, "holds other token shards than"), (other_tok, "the tokenizer of")):
        rc, _, err = zenlm_cli(["pretrain", "--data", data, "--out", run, "--resume", "--max-steps", "3"])
        assert rc == 2 and says in err and f"resume with --data {char_data.resolve()}" in err, err
    copy = tmp_path / "copy"
    shutil.copytree(char_data, copy)
    rc, _, err = zenlm_cli(["pretrain", "--data", copy, "--out", run, "--resume", "--max-steps", "3",
                            "--threads", "1"])
    assert rc == 0, err


def _unstarted(run: Path) -> None:
    """What a run killed before its first checkpoint leaves: config.yaml, the tokenizer, metrics, no weights."""
    import shutil

    shutil.rmtree(run / "checkpoints")
    (run / "model.safetensors").unlink()


def test_a_run_stopped_before_its_first_checkpoint_can_be_started_again(
        char_data: Path, tmp_path: Path, zenlm_cli) -> None:
    """Issue 13.16: neither --resume nor a fresh start worked; the directory had to be deleted by hand."""
    run = tmp_path / "run"
    cmd = ["pretrain", "--data", char_data, "--out", run, *TINY, "--seed", "5", "--eval-tokens", "256",
           "--log-every", "1"]
    assert zenlm_cli([*cmd, "--max-steps", "2"]).rc == 0
    _unstarted(run)
    rc, _, err = zenlm_cli([*cmd, "--max-steps", "2"])
    assert rc == 0 and "stopped before its first checkpoint; starting it again" in err, err
    _unstarted(run)
    rc, _, err = zenlm_cli(["pretrain", "--data", char_data, "--out", run, "--resume", "--threads", "1"])
    assert rc == 0 and "has no checkpoint yet" in err and "starting it from step 0 with its saved settings" in err
    assert (run / "model.safetensors").is_file() and [s for s, _ in _losses(run)] == [1, 2]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["seed"] == 5


def test_overwrite_starts_a_run_again_and_a_fresh_start_says_so(char_data: Path, tmp_path: Path, zenlm_cli) -> None:
    """Issue 14.6: a run with a checkpoint could only be resumed; now --overwrite starts it again."""
    run = tmp_path / "run"
    cmd = ["pretrain", "--data", char_data, "--out", run, *TINY, "--eval-tokens", "256"]
    assert zenlm_cli([*cmd, "--max-steps", "3"]).rc == 0
    rc, _, err = zenlm_cli([*cmd, "--max-steps", "2"])
    assert rc == 2 and "--resume to continue it, --overwrite to start it again" in err
    rc, _, err = zenlm_cli([*cmd, "--max-steps", "2", "--resume", "--overwrite"])
    assert rc == 2 and "not both" in err
    rc, _, err = zenlm_cli([*cmd, "--max-steps", "2", "--overwrite"])
    assert rc == 0 and "--overwrite: the run in" in err
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-000002"]
    assert _losses(run)[-1][0] == 2


def test_pretrain_never_writes_into_a_folder_of_other_files(char_data: Path, tmp_path: Path, zenlm_cli) -> None:
    """Issue 13.9: `pretrain --out DIR` wrote its run over whatever DIR held."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.yaml").parent.joinpath("notes.txt").write_text("keep me")
    (out / "model.safetensors").write_bytes(b"not ours")
    for extra in ([], ["--overwrite"]):
        rc, _, err = zenlm_cli(["pretrain", "--data", char_data, "--out", out, *TINY, "--max-steps", "1", *extra])
        assert rc == 2 and "is not empty and holds no zenlm run" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "notes.txt"]
    assert (out / "model.safetensors").read_bytes() == b"not ours"


def test_fp16_on_a_cpu_is_refused_before_anything_is_written(char_data: Path, tmp_path: Path, zenlm_cli) -> None:
    run = tmp_path / "run"
    rc, _, err = zenlm_cli(["pretrain", "--data", char_data, "--out", run, *TINY[:-4], "--device", "cpu",
                     "--precision", "fp16", "--max-steps", "1"])
    assert rc == 2 and "fp16 is not supported on the CPU" in err
    assert not run.exists()


@pytest.mark.parametrize("fail_at", [1, 4])
def test_the_advice_after_a_non_finite_loss_works(
        fail_at: int, char_data: Path, tmp_path: Path, zenlm_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 14.6: the message advised --resume when no checkpoint existed. Now it says what works, and it does."""
    from zenlm.recipes import pretrain as recipe

    real, calls = recipe.causal_lm_loss, {"n": 0}

    def explodes(model, batch):
        calls["n"] += 1
        out = real(model, batch)
        return out._replace(loss_sum=out.loss_sum * float("nan")) if calls["n"] >= fail_at else out

    run = tmp_path / "run"
    cmd = ["pretrain", "--data", char_data, "--out", run, *TINY, "--ckpt-every", "2", "--max-steps", "5",
           "--eval-tokens", "256"]
    monkeypatch.setattr(recipe, "causal_lm_loss", explodes)
    rc, _, err = zenlm_cli(cmd)
    assert rc == 2 and f"the training loss became nan at step {fail_at}" in err, err
    monkeypatch.setattr(recipe, "causal_lm_loss", real)
    if fail_at == 1:
        assert "No checkpoint was saved yet: run the same command again" in err
        rc, _, err = zenlm_cli(cmd)
    else:
        assert "continue from step-000002 with --resume" in err
        rc, _, err = zenlm_cli(["pretrain", "--data", char_data, "--out", run, "--resume"])
    assert rc == 0, err
    assert (run / "model.safetensors").is_file()

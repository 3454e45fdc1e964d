"""Training loop, optimisers, schedules, checkpoints and exact resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zenlm.config import GPTConfig
from zenlm.data.corpus import open_corpus
from zenlm.data.shards import prepare
from zenlm.errors import CheckpointError, ConfigError, TrainingError
from zenlm.models.gpt import GPT
from zenlm.recipes.pretrain import causal_lm_loss, pretrain
from zenlm.tokenizer import train_tokenizer
from zenlm.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from zenlm.train.loop import TrainConfig, fit
from zenlm.train.optim import OptimConfig, build_optimizers, lr_factor

TEXT = (
    "the quick brown fox jumps over the lazy dog. a stitch in time saves nine.\n"
    "all that glitters is not gold. to be or not to be, that is the question.\n"
) * 120


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train-data")
    (root / "corpus.txt").write_text(TEXT, encoding="utf-8")
    corpus = open_corpus(str(root / "corpus.txt"), val_fraction=0.1)
    tok = train_tokenizer(corpus.texts("train"), kind="char")
    prepare(corpus, tok, root / "data")
    return root / "data"


def tiny_train(**kw) -> TrainConfig:
    base = dict(max_steps=20, eval_every=10, log_every=1, ckpt_every=0, device="cpu", precision="fp32",
                tensorboard=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_lr_schedule_shapes() -> None:
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, schedule="cosine")
    assert lr_factor(cfg, 0, 0.0) == pytest.approx(0.1)
    assert lr_factor(cfg, 9, 0.0) == pytest.approx(1.0)
    assert lr_factor(cfg, 50, 0.0) == pytest.approx(1.0)
    assert lr_factor(cfg, 50, 0.5) == pytest.approx(0.55)
    assert lr_factor(cfg, 50, 1.0) == pytest.approx(0.1)
    assert lr_factor(cfg, 50, 2.0) == pytest.approx(0.1)  # clamped past the end
    wsd = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=0, schedule="wsd", cooldown_frac=0.5)
    assert lr_factor(wsd, 5, 0.4) == 1.0
    assert lr_factor(wsd, 5, 0.75) == pytest.approx(0.5)
    lin = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=0, schedule="linear")
    assert lr_factor(lin, 5, 0.25) == pytest.approx(0.75)
    with pytest.raises(ConfigError, match="schedule"):
        OptimConfig(schedule="step")
    with pytest.raises(ConfigError, match="min_lr"):
        OptimConfig(lr=1e-3, min_lr=1e-2)


def test_muon_groups_hidden_matrices_only() -> None:
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, tie_embeddings=False))
    adam, muon = build_optimizers(model, OptimConfig(name="muon"), "cpu")
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        is_hidden = name.startswith("blocks.") and p.ndim == 2
        assert (id(p) in muon_ids) == is_hidden, name
    n_adam = sum(len(g["params"]) for g in adam.param_groups)
    assert n_adam + len(muon_ids) == len(list(model.parameters()))


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_pretrain_loss_falls_and_writes_run_dir(data_dir: Path, tmp_path: Path, optimizer: str) -> None:
    run = tmp_path / "run"
    res = pretrain(data_dir, run, model="tiny", batch_size=8, seq_len=32,
                   train=tiny_train(max_steps=40, eval_every=20),
                   optim=OptimConfig(name=optimizer, lr=3e-3, warmup_steps=5))
    assert res.step == 40 and res.stopped_by == "max_steps"
    recs = read_metrics(run)
    losses = [r["train_loss"] for r in recs if "train_loss" in r]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5
    for key in ("step", "elapsed_s", "lr", "train_loss", "tokens_per_s"):
        assert key in recs[0]
    evals = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in evals] == [20, 40]
    val = json.loads((data_dir / "index.json").read_text())["splits"]["val"]
    # one byte per character token, plus the end-of-document token that has no bytes
    assert val["tokens"] == val["bytes"] + 1
    for r in evals:
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]), rel=1e-6)
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2) * val["tokens"] / val["bytes"], rel=1e-6)
    for f in ("config.yaml", "tokenizer.json", "model.safetensors", "plots/loss.png"):
        assert (run / f).is_file(), f
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-000040"]
    assert not list((run / "checkpoints").glob("*.tmp*"))


def test_resume_is_bitwise_exact(data_dir: Path, tmp_path: Path) -> None:
    common = dict(model="tiny", batch_size=4, seq_len=32, model_overrides={"dropout": 0.1})
    opt = OptimConfig(lr=2e-3, warmup_steps=3)
    straight = tmp_path / "straight"
    pretrain(data_dir, straight, train=tiny_train(max_steps=12, eval_every=0), optim=opt, **common)
    split = tmp_path / "split"
    pretrain(data_dir, split, train=tiny_train(max_steps=5, decay_steps=12, eval_every=0), optim=opt, **common)
    res = pretrain(data_dir, split, resume=True, train=tiny_train(max_steps=12, eval_every=0), optim=opt,
                   **common)
    assert res.step == 12
    a = [(r["step"], r["train_loss"]) for r in read_metrics(straight) if "train_loss" in r]
    b = [(r["step"], r["train_loss"]) for r in read_metrics(split) if "train_loss" in r]
    assert a == b  # the same floats, bit for bit
    wa, wb = load_file(straight / "model.safetensors"), load_file(split / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_existing_run_needs_resume_flag(data_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    pretrain(data_dir, run, model="tiny", batch_size=2, seq_len=16, train=tiny_train(max_steps=2))
    with pytest.raises(ConfigError, match="--resume"):
        pretrain(data_dir, run, model="tiny", batch_size=2, seq_len=16, train=tiny_train(max_steps=2))
    with pytest.raises(CheckpointError, match="not a zenlm run directory"):
        pretrain(data_dir, tmp_path / "other", model="tiny", resume=True, train=tiny_train())
    import shutil

    shutil.rmtree(run / "checkpoints")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        pretrain(data_dir, run, resume=True, train=tiny_train())


def test_non_finite_loss_is_caught_before_the_update(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16))
    calls = {"n": 0}
    snapshot: dict[str, torch.Tensor] = {}

    def loss_fn(m, batch):
        calls["n"] += 1
        out = causal_lm_loss(m, batch)
        if calls["n"] == 3:
            snapshot.update({k: v.detach().clone() for k, v in model.state_dict().items()})
            out = out._replace(loss_sum=out.loss_sum * float("nan"))
        return out

    x = torch.randint(0, 20, (2, 9))
    with pytest.raises(TrainingError, match="at step 3"):
        fit(model, lambda s, m: (x[:, :-1], x[:, 1:]), loss_fn, tmp_path, tiny_train(max_steps=10),
            OptimConfig(warmup_steps=0))
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k]), k


def test_checkpoint_round_trip_and_corruption(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16)
    model = GPT(cfg)
    opts = build_optimizers(model, OptimConfig(name="muon"), "cpu")
    x = torch.randint(0, 20, (2, 9))
    causal_lm_loss(model, (x[:, :-1], x[:, 1:])).loss_sum.backward()
    for o in opts:
        o.step()
    path = save_checkpoint(tmp_path, 7, model, opts, {"elapsed_s": 1.5})
    assert path.name == "step-000007"
    model2 = GPT(cfg)
    opts2 = build_optimizers(model2, OptimConfig(name="muon"), "cpu")
    state = load_checkpoint(path, model2, opts2)
    assert state["step"] == 7 and state["elapsed_s"] == 1.5
    for (k, v), v2 in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(v, v2), k
    assert str(opts[1].state_dict()) == str(opts2[1].state_dict())
    # a truncated tensor file is refused with the file named
    (path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(path, GPT(cfg), build_optimizers(GPT(cfg), OptimConfig(name="muon"), "cpu"))
    # a checkpoint for another shape names the tensor
    other = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=32))
    good = save_checkpoint(tmp_path, 8, model, opts, {})
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(good, other, build_optimizers(other, OptimConfig(name="muon"), "cpu"))
    # keep=N prunes old checkpoints
    for s in (9, 10, 11):
        save_checkpoint(tmp_path, s, model, opts, {}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000010", "step-000011"]


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(data_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "zenlm", "pretrain", "--data", str(data_dir), "--out", str(run),
           "--model", "tiny", "--max-steps", "100000", "--batch-size", "2", "--seq-len", "16",
           "--log-every", "1", "--eval-every", "0", "--ckpt-every", "0", "--device", "cpu"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 60
    while time.time() < deadline and not (
        (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").stat().st_size > 0
    ):
        time.sleep(0.1)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped by signal" in out + err
    ckpts = list_checkpoints(run / "checkpoints")
    assert len(ckpts) == 1
    step = int(ckpts[0].name.split("-")[1])
    assert step >= 1
    assert (run / "model.safetensors").is_file()
    res = pretrain(data_dir, run, resume=True, train=tiny_train(max_steps=step + 2, eval_every=0))
    assert res.step == step + 2


def test_resumed_run_keeps_its_best_evaluation(tmp_path: Path) -> None:
    """With best_metric, the best evaluation before a resume still counts after it (value, step, weights)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16))
    gen = torch.Generator().manual_seed(0)

    def get_batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randint(0, 20, (2, 9), generator=gen)
        return x[:, :-1], x[:, 1:]

    def scripted(scores: list[float]):
        it = iter(scores)
        return lambda m: {"val_score": next(it)}

    run = tmp_path / "run"
    run.mkdir()
    opt = OptimConfig(name="adamw", lr=1e-2, warmup_steps=0)
    first = fit(model, get_batch, causal_lm_loss, run, tiny_train(max_steps=6, eval_every=3), opt,
                evaluate=scripted([1.0, 0.2]), best_metric="val_score")
    assert first.best_step == 3
    kept = load_file(run / "model.safetensors")  # the step-3 weights (moved there at the end)
    assert not (run / "best.safetensors").exists()
    second = fit(model, get_batch, causal_lm_loss, run, tiny_train(max_steps=12, eval_every=3), opt,
                 evaluate=scripted([0.5, 0.4]), resume=True, best_metric="val_score")
    assert second.best_step == 3  # not step 9 (0.5), the best *after* the resume
    assert second.val["val_score"] == 1.0
    final = load_file(run / "model.safetensors")
    assert all(torch.equal(final[k], kept[k]) for k in kept)

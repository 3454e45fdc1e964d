"""Masked-LM pretraining of a BERT: BERT's masking rule, the masked-only loss and metrics, the recipe, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from zenlm.cli import main
from zenlm.data.batches import MLMBatches, MLMMasking, mlm_eval_batches
from zenlm.data.corpus import open_corpus
from zenlm.data.shards import TokenShards, prepare
from zenlm.errors import ConfigError, DataError
from zenlm.models.bert import Bert
from zenlm.recipes.pretrain import (
    evaluate_mlm,
    masked_lm_loss,
    masked_lm_metrics,
    masked_lm_scores,
    mlm_targets,
    pretrain,
)
from zenlm.rundir import build_model_from_run
from zenlm.tokenizer import Tokenizer, train_tokenizer
from zenlm.train.loop import TrainConfig
from zenlm.train.optim import OptimConfig

# bert-tiny made smaller still: 2 layers x 64 wide
TINY = dict(model="bert-tiny", model_overrides=dict(d_model=64, d_ff=256, n_head=2), batch_size=16, seq_len=32,
            eval_tokens=2048)


def tiny_train(**kw) -> TrainConfig:
    base = dict(max_steps=40, eval_every=20, log_every=1, ckpt_every=0, device="cpu", precision="fp32",
                tensorboard=False, seed=5)
    base.update(kw)
    return TrainConfig(**base)


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _write_docs(path: Path, text: str) -> None:
    """One JSON document per paragraph, so the shards hold many <|eos|> document separators."""
    docs = [p for p in text.split("\n\n") if p.strip()]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")


@pytest.fixture(scope="module")
def mlm_data(tmp_path_factory: pytest.TempPathFactory, sample_text: str, wordpiece_tok: Tokenizer) -> Path:
    root = tmp_path_factory.mktemp("mlm_data")
    _write_docs(root / "docs.jsonl", sample_text[:80_000])
    prepare(open_corpus(str(root / "docs.jsonl"), val_fraction=0.1), wordpiece_tok, root / "data")
    return root / "data"


def _masking_args(tok: Tokenizer) -> dict:
    return dict(mask_id=tok.mask_id, vocab_size=tok.vocab_size, special_ids=tok.special_ids, cls_id=tok.bos_id,
                sep_id=tok.eos_id)


# ---------------------------------------------------------------------------------------------- (a) masking
def test_masking_follows_berts_rule(mlm_data: Path, wordpiece_tok: Tokenizer) -> None:
    tok = wordpiece_tok
    shards = TokenShards.open(mlm_data, "train")
    batches = MLMBatches(shards, batch_size=256, seq_len=64, seed=11, **_masking_args(tok))
    ids, labels = batches.get(3, 1)
    assert ids.shape == labels.shape == (256, 64) and ids.dtype == labels.dtype == torch.int64
    # the original rows: [CLS] window [SEP], the windows starting where CausalBatches would draw them
    windows = torch.stack([torch.from_numpy(shards.window(int(s), 62)) for s in batches.starts(3, 1)])
    orig = torch.cat([torch.full((256, 1), tok.bos_id), windows, torch.full((256, 1), tok.eos_id)], dim=1)
    special = torch.isin(orig, torch.tensor(sorted(tok.special_ids)))
    assert special[:, 1:-1].sum() > 50  # document separators inside the windows
    chosen = labels != -100
    assert not (chosen & special).any()  # [CLS], [SEP], <|eos|> ... are never chosen
    assert torch.equal(labels[chosen], orig[chosen])  # labels: the original id where chosen, -100 elsewhere
    assert torch.equal(ids[~chosen], orig[~chosen])  # positions not chosen are untouched
    assert (chosen.sum(1) >= 1).all()
    frac = chosen.sum().item() / (~special).sum().item()
    assert abs(frac - 0.15) < 0.01, frac
    n = chosen.sum().item()
    to_mask = (ids[chosen] == tok.mask_id).sum().item() / n
    kept = (ids[chosen] == orig[chosen]).sum().item() / n
    randomised = ids[chosen][(ids[chosen] != tok.mask_id) & (ids[chosen] != orig[chosen])]
    assert abs(to_mask - 0.8) < 0.03 and abs(kept - 0.1) < 0.03 and abs(len(randomised) / n - 0.1) < 0.03
    assert not torch.isin(randomised, torch.tensor(sorted(tok.special_ids))).any()  # random ids are ordinary
    # a pure function of (seed, step, micro)
    again = MLMBatches(TokenShards.open(mlm_data, "train"), 256, 64, seed=11, **_masking_args(tok)).get(3, 1)
    assert torch.equal(again[0], ids) and torch.equal(again[1], labels)
    assert not torch.equal(batches.get(4, 1)[1], labels) and not torch.equal(batches.get(3, 0)[1], labels)


def test_masking_never_chooses_special_ids_and_expects_mask_prob() -> None:
    masking = MLMMasking(mask_id=4, vocab_size=50, special_ids=[0, 1, 2, 3, 4, 7], cls_id=0, sep_id=1)
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 12, (400, 30), generator=g)  # about half the ids are special
    ids, labels = masking(windows, g)
    assert ids.shape == (400, 32) and (ids[:, 0] == 0).all() and (ids[:, -1] == 1).all()
    special = torch.isin(torch.cat([torch.zeros(400, 1, dtype=torch.long), windows,
                                    torch.ones(400, 1, dtype=torch.long)], 1), torch.tensor([0, 1, 2, 3, 4, 7]))
    assert (labels[special] == -100).all()
    assert abs((labels != -100).sum().item() / (~special).sum().item() - 0.15) < 0.015
    only_special = masking(torch.full((2, 5), 7), g)[1]
    assert (only_special == -100).all()  # nothing to choose: nothing chosen (and no error)
    with pytest.raises(ConfigError, match="mask_prob"):
        MLMMasking(mask_id=4, vocab_size=50, special_ids=[], cls_id=0, sep_id=1, mask_prob=0.0)


def test_eval_batches_are_sequential_and_fixed(mlm_data: Path, wordpiece_tok: Tokenizer) -> None:
    val = TokenShards.open(mlm_data, "val")
    a = list(mlm_eval_batches(val, 4, 16, 16 * 10, **_masking_args(wordpiece_tok)))
    b = list(mlm_eval_batches(val, 4, 16, 16 * 10, **_masking_args(wordpiece_tok)))
    assert [x.shape[0] for x, _ in a] == [4, 4, 2]
    for (x1, y1), (x2, y2) in zip(a, b, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    first = a[0][0][0]
    window = torch.from_numpy(val.window(0, 14))
    unchanged = a[0][1][0] == -100
    assert torch.equal(first[1:-1][unchanged[1:-1]], window[unchanged[1:-1]])


# ---------------------------------------------------------------------------------------------- (c) the loss
class _FixedHidden(nn.Module):
    """A stand-in encoder: the hidden state of every position is a fixed row; the MLM head is the identity."""

    def __init__(self, h_BTC: torch.Tensor) -> None:
        super().__init__()
        self.h = h_BTC
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, ids_BT: torch.Tensor) -> torch.Tensor:
        return self.h * self.w

    def mlm_logits(self, h: torch.Tensor) -> torch.Tensor:
        return h.float()


def test_masked_loss_and_accuracy_by_hand() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0]])
    target = torch.tensor([0, 2, 3])  # arg-max 0, 1, 3: the first and the last are right
    ce = [math.log(math.e ** 2 + 3) - 2, math.log(math.e + 3), math.log(math.e ** 3 + 3) - 3]
    loss_sum, correct = masked_lm_scores(logits, target)
    assert loss_sum == pytest.approx(sum(ce), rel=1e-6) and correct == 2
    m = masked_lm_metrics(loss_sum, correct, 3)
    assert m["val_loss"] == pytest.approx(sum(ce) / 3, rel=1e-6)
    assert m["val_mlm_ppl"] == pytest.approx(math.exp(sum(ce) / 3), rel=1e-6)
    assert m["val_masked_acc"] == pytest.approx(2 / 3)
    # the same three rows placed at positions (0, 1), (1, 0), (1, 2) of a [2, 3] batch; the rest is noise
    h = torch.randn(2, 3, 4) * 10
    h[0, 1], h[1, 0], h[1, 2] = logits
    labels = torch.full((2, 3), -100)
    labels[0, 1], labels[1, 0], labels[1, 2] = target
    pos, tgt = mlm_targets(labels)
    assert pos.tolist() == [1, 3, 5] and tgt.tolist() == [0, 2, 3]
    model = _FixedHidden(h)
    out = masked_lm_loss(model, (torch.zeros(2, 3, dtype=torch.long), pos, tgt))
    assert out.loss_sum.item() == pytest.approx(sum(ce), rel=1e-6) and out.n_targets == 3 and out.n_tokens == 6
    out.loss_sum.backward()  # differentiable through the gather
    assert model.w.grad is not None
    assert evaluate_mlm(model, [(torch.zeros(2, 3, dtype=torch.long), labels)], torch.device("cpu")) == \
        pytest.approx(m)


# ---------------------------------------------------------------------------------------------- (b) the recipe
def test_mlm_pretraining_loss_falls(mlm_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    res = pretrain(mlm_data, run, objective="mlm", **TINY, train=tiny_train(),
                   optim=OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=5, weight_decay=0.01))
    assert res.step == 40
    recs = read_metrics(run)
    losses = [r["train_loss"] for r in recs if "train_loss" in r]
    first, last = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert last < first - 0.4, (first, last)  # about ln(600) = 6.4 at the start
    evals = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in evals] == [20, 40]
    for r in evals:
        assert 0.0 <= r["val_masked_acc"] <= 1.0
        assert r["val_mlm_ppl"] == pytest.approx(math.exp(r["val_loss"]), rel=1e-6)
        assert "val_bpb" not in r
    assert evals[-1]["val_loss"] < math.log(600) - 0.4
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["objective"] == "mlm" and cfg["model"]["arch"] == "bert" and cfg["model"]["d_model"] == 64
    assert cfg["model"]["pad_id"] == Tokenizer.load(mlm_data).pad_id
    model, _, _ = build_model_from_run(run)
    assert isinstance(model, Bert)
    model.load_state_dict(load_file(run / "model.safetensors"))
    for f in ("tokenizer.json", "model.safetensors", "plots/loss.png"):
        assert (run / f).is_file(), f


# ---------------------------------------------------------------------------------------------- (e) resume
def test_mlm_resume_continues_exactly(mlm_data: Path, tmp_path: Path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = dict(TINY, batch_size=4)
    pretrain(mlm_data, straight, objective="mlm", train=tiny_train(max_steps=8, eval_every=0), **common)
    pretrain(mlm_data, split, objective="mlm", train=tiny_train(max_steps=4, decay_steps=8, eval_every=0),
             **common)
    # the objective, model and optimiser defaults come back from config.yaml
    res = pretrain(mlm_data, split, resume=True, train=tiny_train(max_steps=8, eval_every=0))
    assert res.step == 8 and "val_masked_acc" in res.val
    a = [(r["step"], r["train_loss"]) for r in read_metrics(straight) if "train_loss" in r]
    b = [(r["step"], r["train_loss"]) for r in read_metrics(split) if "train_loss" in r]
    assert a == b
    wa, wb = load_file(straight / "model.safetensors"), load_file(split / "model.safetensors")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    optim = yaml.safe_load((split / "config.yaml").read_text())["optim"]  # the masked-LM default optimiser
    assert (optim["name"], optim["lr"], optim["weight_decay"], optim["schedule"]) == ("adamw", 5e-4, 0.01, "linear")
    with pytest.raises(ConfigError, match="is a mlm run"):
        pretrain(mlm_data, split, objective="causal-lm", resume=True, train=tiny_train(max_steps=9))


# ---------------------------------------------------------------------------------------------- (d) errors
def test_presets_must_match_the_objective(mlm_data: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="GPT .*bert-tiny, bert-mini"):
        pretrain(mlm_data, tmp_path / "a", objective="mlm", model="tiny", train=tiny_train())
    with pytest.raises(ConfigError, match="BERT encoder preset.*--objective mlm"):
        pretrain(mlm_data, tmp_path / "b", model="bert-tiny", train=tiny_train())
    with pytest.raises(ConfigError, match="unknown objective"):
        pretrain(mlm_data, tmp_path / "c", objective="denoise", train=tiny_train())
    with pytest.raises(ConfigError, match="max_len"):
        pretrain(mlm_data, tmp_path / "d", objective="mlm", model="bert-tiny", model_overrides={"max_len": 16},
                 seq_len=32, train=tiny_train())
    assert not any((tmp_path / d).exists() for d in "abcd")


def test_tokenizer_without_mask_token_is_refused(tmp_path: Path, sample_text: str) -> None:
    (tmp_path / "t.txt").write_text(sample_text[:20_000], encoding="utf-8")
    corpus = open_corpus(str(tmp_path / "t.txt"), val_fraction=0.1)
    tok = train_tokenizer(corpus.texts("train"), kind="wordpiece", vocab_size=300,
                          special_tokens=["<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"])
    prepare(corpus, tok, tmp_path / "data")
    with pytest.raises(DataError, match=r"<\|mask\|>.*zenlm tokenizer train --kind wordpiece"):
        pretrain(tmp_path / "data", tmp_path / "run", objective="mlm", train=tiny_train())
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- the CLI
def test_mlm_recipes_build_valid_configs() -> None:
    from zenlm.models.bert import get_bert_preset
    from zenlm.recipes.registry import DEFAULT_RECIPE, MLM_RECIPES, recipe_settings

    assert DEFAULT_RECIPE["mlm"] in MLM_RECIPES
    for name in MLM_RECIPES:
        s = recipe_settings(name)
        assert s["objective"] == "mlm"
        OptimConfig(**s["optim"])
        assert s["seq_len"] <= get_bert_preset(s["model"], vocab_size=600, **s["model_overrides"]).max_len


def test_cli_objective_picks_the_mlm_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import functools

    seen: dict = {}

    @functools.wraps(pretrain)  # the CLI reads its flags from the recipe's signature
    def fake_pretrain(data, out, **kw):
        seen.clear()
        seen.update(kw)
        raise ConfigError("stop here")

    monkeypatch.setattr("zenlm.recipes.pretrain.pretrain", fake_pretrain)
    assert main(["pretrain", "--data", "d", "--out", str(tmp_path / "r"), "--objective", "mlm",
                 "--n-embd", "96", "--block-size", "64"]) == 2
    assert seen["objective"] == "mlm" and seen["model"] == "bert-mini" and seen["seq_len"] == 128
    assert seen["model_overrides"] == {"d_model": 96, "max_len": 64}
    o = seen["optim"]
    assert (o.name, o.lr, o.weight_decay, o.schedule, o.warmup_steps) == ("adamw", 5e-4, 0.01, "linear", 100)
    # --resume without --objective continues with the run's own objective and its recipe's defaults
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text(yaml.safe_dump({"model": {"arch": "bert"}, "objective": "mlm"}))
    assert main(["pretrain", "--data", "d", "--out", str(tmp_path / "r"), "--resume"]) == 2
    assert seen["objective"] == "mlm" and seen["optim"].name == "adamw"
    assert main(["pretrain", "--data", "d", "--out", str(tmp_path / "x")]) == 2
    assert seen["objective"] == "causal-lm" and seen["model"] == "demo" and seen["optim"].name == "muon"

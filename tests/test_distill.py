"""Knowledge distillation: the loss against a hand computation, alpha = 0 against plain training (classifier and
language model, bit for bit), exact resume of both recipes after an interruption, and the verb."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import zenlm
from zenlm.cli import main
from zenlm.data.corpus import open_corpus
from zenlm.data.shards import prepare
from zenlm.errors import ConfigError
from zenlm.models.bert import Bert, BertConfig
from zenlm.progress import Progress
from zenlm.recipes.distill import (
    DistillSettings,
    distill_classifier,
    distill_lm,
    distillation_loss,
    recipe_for,
    soft_kl,
)
from zenlm.recipes.finetune_classify import finetune_classify
from zenlm.recipes.pretrain import pretrain
from zenlm.tokenizer import Tokenizer
from zenlm.train.checkpoint import save_model
from zenlm.train.loop import TrainConfig
from zenlm.train.optim import OptimConfig

RUNS = Path(__file__).parent / "fixtures" / "runs"
POS = ["a good and happy day", "what a lovely cat", "i love the sun", "so good, so kind", "a happy dog"]
NEG = ["a bad and sad day", "what an awful mat", "i hate the rain", "so bad, so cruel", "a sad log"]


def test_kl_term_equals_a_hand_computation() -> None:
    zs, zt, T = [1.0, 0.0, -1.0], [2.0, 1.0, 0.0], 2.0
    p = [math.exp(v / T) / sum(math.exp(u / T) for u in zt) for v in zt]
    q = [math.exp(v / T) / sum(math.exp(u / T) for u in zs) for v in zs]
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    assert soft_kl(torch.tensor([zs]), torch.tensor([zt]), T).item() == pytest.approx(kl, rel=1e-6)
    ce = -math.log(math.exp(zs[2]) / sum(math.exp(u) for u in zs))  # the label is class 2
    s, t, y = torch.tensor([zs, zs]), torch.tensor([zt, zt]), torch.tensor([2, -100])  # the 2nd row is not scored
    for alpha in (0.0, 0.3, 1.0):
        want = alpha * T**2 * kl + (1 - alpha) * ce
        assert distillation_loss(s, t, y, alpha, T).item() == pytest.approx(want, rel=1e-6)
    assert soft_kl(t, t, T).tolist() == pytest.approx([0.0, 0.0], abs=1e-7)  # a student equal to its teacher
    h_s, h_t = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 2.0], [0.0, 1.0]])
    with_cos = distillation_loss(s, t, y, 0.5, T, (h_s, h_t), cos_weight=0.7)  # row 1: cos 0 -> 1 - 0 = 1
    assert with_cos.item() == pytest.approx(0.5 * T**2 * kl + 0.5 * ce + 0.7, rel=1e-6)
    with pytest.raises(ConfigError, match="alpha"):
        DistillSettings(alpha=1.5)


def _cpu(**kw) -> TrainConfig:
    return TrainConfig(device="cpu", precision="fp32", tensorboard=False, seed=0, **kw)


def _losses(run: Path) -> list[float]:
    return [r["train_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "train_loss" in r]


def _same_weights(a: Path, b: Path) -> bool:
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _interrupt_at(step: int):  # noqa: ANN202
    def progress(p: Progress) -> None:
        if p.task == "train" and p.info and p.info.get("step") == step:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C: the loop stops after this step with a checkpoint
    return progress


# ---------------------------------------------------------------------------------------------- classifiers
@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("distill") / "labels.jsonl"
    rows = [{"text": t, "label": "pos"} for t in POS] * 4 + [{"text": t, "label": "neg"} for t in NEG] * 4
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def student_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small BERT run with the teacher's (the fixture classifier's) tokenizer: a pretrained student."""
    out = tmp_path_factory.mktemp("distill") / "base"
    out.mkdir()
    tok = Tokenizer.load(RUNS / "bert-classify")
    torch.manual_seed(1)
    model = Bert(BertConfig(vocab_size=tok.vocab_size, d_model=16, n_layer=1, n_head=2, d_ff=32, max_len=32,
                            pad_id=tok.pad_id))
    tok.save(out)
    (out / "config.yaml").write_text(yaml.safe_dump({"model": model.config.to_dict()}), encoding="utf-8")
    save_model(model, out / "model.safetensors")
    return out


def test_classifier_at_alpha_0_equals_fine_tuning(labelled: Path, student_base: Path, tmp_path: Path) -> None:
    kw = dict(batch_size=8, epochs=2, lr=1e-3, patience=0, evals_per_epoch=2)
    finetune_classify(student_base, labelled, tmp_path / "plain", max_len=32, train=_cpu(log_every=1), **kw)
    res = distill_classifier(RUNS / "bert-classify", str(student_base), tmp_path / "kd", data=labelled,
                             settings=DistillSettings(alpha=0.0), train=_cpu(log_every=1), **kw)
    assert _losses(tmp_path / "plain") == _losses(tmp_path / "kd") and len(_losses(tmp_path / "kd")) == 8
    assert _same_weights(tmp_path / "plain", tmp_path / "kd")
    assert res.report is not None and (tmp_path / "kd" / "teacher.safetensors").is_file()
    clf = zenlm.load(tmp_path / "kd", device="cpu")  # a classifier run like any other
    assert clf.classify(["a good day"])[0]["label"] in ("neg", "pos")


def test_classifier_distillation_resumes_exactly(labelled: Path, tmp_path: Path) -> None:
    kw = dict(data=labelled, settings=DistillSettings(alpha=0.7, temperature=3.0, cosine=0.5), batch_size=8,
              epochs=2, patience=0, student_overrides=dict(n_layer=1, d_model=16, n_head=2, d_ff=32, max_len=32))
    distill_classifier(RUNS / "bert-classify", "bert-tiny", tmp_path / "a", train=_cpu(log_every=1), **kw)
    stopped = distill_classifier(RUNS / "bert-classify", "bert-tiny", tmp_path / "b", train=_cpu(log_every=1),
                                 progress=_interrupt_at(3), **kw)
    assert stopped.train.stopped_by == "signal"
    distill_classifier(RUNS / "bert-classify", "ignored-on-resume", tmp_path / "b", resume=True,
                       train=_cpu(log_every=1), **kw)
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    assert _same_weights(tmp_path / "a", tmp_path / "b")
    assert not any(k.startswith(("proj", "student.")) for k in load_file(str(tmp_path / "b" / "model.safetensors")))


# ---------------------------------------------------------------------------------------------- language models
@pytest.fixture(scope="module")
def lm_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("distill_lm")
    text = ("the cat sat on the mat. the dog sat on the log. a cat and a dog met on the mat.\n"
            "to be or not to be, that is the question. the rest is silence.\n") * 40
    (root / "text.txt").write_text(text, encoding="utf-8")
    prepare(open_corpus(str(root / "text.txt")), Tokenizer.load(RUNS / "gpt"), root / "data")
    return root / "data"


_LM = dict(batch_size=4, seq_len=16, eval_tokens=256)
_OPTIM = OptimConfig(name="adamw", lr=3e-3, min_lr=3e-4, warmup_steps=2)


def test_language_model_at_alpha_0_equals_pretraining(lm_data: Path, tmp_path: Path) -> None:
    pretrain(lm_data, tmp_path / "plain", model="tiny", train=_cpu(max_steps=6, eval_every=3, log_every=1),
             optim=_OPTIM, eval_seq_len=16, eval_batch_size=4, **_LM)
    res = distill_lm(RUNS / "gpt", "tiny", tmp_path / "kd", data=lm_data, settings=DistillSettings(alpha=0.0),
                     train=_cpu(max_steps=6, eval_every=3, log_every=1), optim=_OPTIM, **_LM)
    assert _losses(tmp_path / "plain") == _losses(tmp_path / "kd") and len(_losses(tmp_path / "kd")) == 6
    assert _same_weights(tmp_path / "plain", tmp_path / "kd") and "val_bpb" in res.train.val
    lm = zenlm.load(tmp_path / "kd", device="cpu")  # a GPT run like any other
    assert isinstance(lm.generate("the ", max_new_tokens=5, temperature=0), str)


def test_language_model_distillation_learns_and_resumes_exactly(lm_data: Path, tmp_path: Path) -> None:
    kw = dict(data=lm_data, settings=DistillSettings(alpha=0.5, temperature=2.0, cosine=0.5), optim=_OPTIM,
              student_overrides=dict(n_layer=1, n_embd=32), **_LM)
    whole = distill_lm(RUNS / "gpt", "tiny", tmp_path / "a", train=_cpu(max_steps=8, log_every=1), **kw)
    losses = _losses(tmp_path / "a")
    assert losses[-1] < losses[0]
    distill_lm(RUNS / "gpt", "tiny", tmp_path / "b", train=_cpu(max_steps=8, log_every=1), progress=_interrupt_at(3),
               **kw)
    distill_lm(RUNS / "gpt", "tiny", tmp_path / "b", resume=True, train=_cpu(max_steps=8, log_every=1), **kw)
    assert _losses(tmp_path / "b") == losses and _same_weights(tmp_path / "a", tmp_path / "b")
    assert whole.train.val["val_bpb"] > 0


def test_the_verb(labelled: Path, tmp_path: Path, capsys) -> None:
    args = ["distill", "--teacher", str(RUNS / "bert-classify"), "--student", "bert-tiny", "--data", str(labelled),
            "--out", str(tmp_path / "kd"), "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--precision",
            "fp32", "--alpha", "0.9"]
    assert main(args) == 0
    assert "macro" in capsys.readouterr().out
    saved = yaml.safe_load((tmp_path / "kd" / "config.yaml").read_text())
    assert saved["distill"]["alpha"] == 0.9 and saved["task"]["labels"] == ["neg", "pos"]
    assert main(args) == 2  # the run exists: a clean error, no traceback
    assert main(["distill", "--teacher", str(RUNS / "encdec"), "--student", "tiny", "--out", str(tmp_path / "x")]) == 2
    assert recipe_for(RUNS / "gpt") is distill_lm and recipe_for(RUNS / "gpt-classify") is distill_classifier

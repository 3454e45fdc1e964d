"""Seq2seq data (reading, truncation, batches, denoising), the fine-tuning recipe, the API and the CLI verbs."""

from __future__ import annotations

import json
import random
import warnings

import numpy as np
import pytest
import torch

import zenlm
import zenlm.seq2seq as s2s
from zenlm.cli import main
from zenlm.data.batches import IGNORE_INDEX as IGNORE
from zenlm.data.seq2seq import (
    Pair,
    PromptCompletionBatches,
    Seq2SeqBatches,
    encode_pairs,
    infill_noise,
    prompt_completion_example,
    read_pairs,
    seq2seq_example,
)
from zenlm.errors import ConfigError, DataError
from zenlm.recipes.finetune_seq2seq import finetune_seq2seq
from zenlm.tokenizer import train_tokenizer
from zenlm.train.loop import TrainConfig
from zenlm.train.optim import OptimConfig

LETTERS = "abcdefgh"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train fastest on one thread (and the suite runs two workers on two cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def letters_tok():
    return train_tokenizer([LETTERS + " "], kind="char")


@pytest.fixture(scope="module")
def reverse_pairs(tmp_path_factory):
    """A toy task: write the letters of the source backwards."""
    d = tmp_path_factory.mktemp("pairs")
    rng = random.Random(0)
    lines = []
    for _ in range(300):
        w = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))
        lines.append(json.dumps({"source": w, "target": w[::-1]}))
    (d / "train.jsonl").write_text("\n".join(lines[:260]) + "\n")
    (d / "val.jsonl").write_text("\n".join(lines[260:]) + "\n")
    return d


def _write(tmp_path, text: str):
    p = tmp_path / "p.jsonl"
    p.write_text(text, encoding="utf-8")
    return p


# ------------------------------------------------------------------------------------------ reading


def test_read_pairs_ok_and_blank_lines(tmp_path):
    p = _write(tmp_path, '{"source": "a b", "target": "c"}\n\n{"src": "x", "tgt": "y", "source": "s", "target": "t"}\n')
    assert read_pairs(p) == [Pair("a b", "c"), Pair("s", "t")]
    p2 = _write(tmp_path, '{"src": "x", "tgt": "y"}\n')
    assert read_pairs(p2, "src", "tgt") == [Pair("x", "y")]


@pytest.mark.parametrize("text,match", [
    ('{"source": "a"}\n', "no 'target' field"),
    ('{"target": "a"}\n', "no 'source' field"),
    ('{"source": "  ", "target": "a"}\n', "'source' is empty"),
    ('{"source": "a", "target": ""}\n', "'target' is empty"),
    ('{"source": "a", "target": 3}\n', "must be a string"),
    ('["a", "b"]\n', "not an object"),
    ('{"source": "a", "target": \n', "not valid JSON"),
    ("\n\n", "holds no pairs"),
])
def test_read_pairs_errors(tmp_path, text, match):
    with pytest.raises(DataError, match=match):
        read_pairs(_write(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_pairs(tmp_path / "nope.jsonl")


def test_truncation_warns_and_counts(letters_tok):
    pairs = [Pair("abcdefgh", "ab"), Pair("abc", "abcdefg"), Pair("ab", "a")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        enc = encode_pairs(pairs, letters_tok, 4, 5)
    assert [str(w.message) for w in caught] == [
        "1 of 3 sources are longer than 4 tokens and were truncated (kept the first 4).",
        "1 of 3 targets are longer than 5 tokens and were truncated (kept the first 5).",
    ]
    assert (enc.truncated_sources, enc.truncated_targets) == (1, 1)
    assert [len(s) for s in enc.sources] == [4, 3, 2] and [len(t) for t in enc.targets] == [2, 5, 1]
    with pytest.raises(DataError, match="source is empty"):
        encode_pairs([Pair(" ", "a")], letters_tok, 4, 4)
    with pytest.raises(DataError, match="no room"):
        encode_pairs(pairs, letters_tok, 0, 4)


# ------------------------------------------------------------------------------------------ batches


def test_examples_shift_and_mask():
    src, tgt_in, labels = seq2seq_example([5, 6], [7, 8, 9], bos_id=1, eos_id=2)
    assert (src, tgt_in, labels) == ([5, 6, 2], [1, 7, 8, 9], [7, 8, 9, 2])
    x, y = prompt_completion_example([5, 6], [7, 8], sep_id=1, eos_id=2)
    # full sequence 5 6 1 7 8 2: inputs drop the last, labels drop the first and hide the prompt
    assert x == [5, 6, 1, 7, 8]
    assert y == [IGNORE, IGNORE, 7, 8, 2]


def test_batches_are_padded_and_deterministic(letters_tok):
    enc = encode_pairs([Pair("abc", "cba"), Pair("abcdef", "f"), Pair("ab", "ba")], letters_tok, 10, 10)
    b = Seq2SeqBatches(enc, 2, bos_id=1, eos_id=2, pad_id=0, seed=3)
    src, mask, tgt_in, labels = b.get(5, 0)
    assert src.shape[0] == 2 and mask.dtype == torch.bool
    assert torch.equal(src[~mask], torch.zeros_like(src[~mask]))
    assert ((labels == IGNORE) == (tgt_in == 0)).all()  # padding positions are exactly the ignored labels
    again = Seq2SeqBatches(enc, 2, bos_id=1, eos_id=2, pad_id=0, seed=3).get(5, 0)
    assert all(torch.equal(a, c) for a, c in zip((src, mask, tgt_in, labels), again, strict=True))
    # one epoch visits every example once
    seen = [i for step in range(3) for i in b.sampler.indices(step, 0)][:3]
    assert sorted(seen) == [0, 1, 2]
    x, y = PromptCompletionBatches(enc, 3, sep_id=1, eos_id=2, pad_id=0).get(0)
    assert x.shape == y.shape and (y != IGNORE).sum() == sum(len(t) + 1 for t in enc.targets)


def test_infill_noise():
    rng = np.random.default_rng(0)
    ids = list(range(10, 110))
    noisy = infill_noise(ids, rng, mask_id=4, noise_density=0.3, mean_span=3.0)
    kept = [t for t in noisy if t != 4]
    assert kept == [t for t in ids if t in set(kept)]  # order kept
    assert 60 <= len(kept) <= 75  # about 30% hidden
    assert all(not (a == 4 and b == 4) for a, b in zip(noisy, noisy[1:], strict=False))  # one mask per span
    assert infill_noise(ids, np.random.default_rng(0), 4) == noisy
    with pytest.raises(DataError):
        infill_noise(ids, rng, 4, noise_density=1.5)


# ------------------------------------------------------------------------------------------- recipe


def _train(max_steps=120):
    return TrainConfig(max_steps=max_steps, eval_every=60, log_every=10, tensorboard=False, device="cpu",
                       precision="fp32", seed=0)


def _losses(run):
    return [r["train_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "train_loss" in r]


@pytest.mark.parametrize("arch,model", [("encdec", "encdec-tiny"), ("gpt", "tiny")])
def test_short_finetune_loss_falls_and_generates(tmp_path, reverse_pairs, letters_tok, arch, model):
    run = tmp_path / arch
    res = finetune_seq2seq(reverse_pairs / "train.jsonl", run, arch=arch, model=model, tokenizer=letters_tok,
                           val=reverse_pairs / "val.jsonl", batch_size=32, label_smoothing=0.1,
                           train=_train(), optim=OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=10,
                                                             weight_decay=0.0))
    losses = _losses(run)
    assert losses[-1] < 0.6 * losses[0]
    assert res.val["val_loss"] < 1.5
    lm = s2s.load(run, device="cpu")
    outs = lm.generate(["abcd", "hgf"], num_beams=2)
    assert isinstance(outs, list) and len(outs) == 2 and all(set(o) <= set(LETTERS) for o in outs)
    report = s2s.evaluate_generation(lm, read_pairs(reverse_pairs / "val.jsonl"), num_beams=1, metrics=["chrf"])
    assert report["n"] == 40 and 0 <= report["metrics"]["chrf"] <= 100
    if arch == "encdec":
        assert isinstance(zenlm.load(run, device="cpu"), s2s.Seq2SeqLM)
        assert report["metrics"]["chrf"] > 30  # it learned something about reversing


def test_recipe_refuses_bad_settings(tmp_path, reverse_pairs, letters_tok):
    data = reverse_pairs / "train.jsonl"
    with pytest.raises(ConfigError, match="denoising"):
        finetune_seq2seq(data, tmp_path / "a", arch="gpt", objective="denoise", tokenizer=letters_tok)
    with pytest.raises(ConfigError, match="label_smoothing"):
        finetune_seq2seq(data, tmp_path / "b", label_smoothing=1.0, tokenizer=letters_tok)
    with pytest.raises(ConfigError, match="arch"):
        finetune_seq2seq(data, tmp_path / "c", arch="rnn", tokenizer=letters_tok)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="no 'tgt' field"):
        finetune_seq2seq(data, tmp_path / "d", target_field="tgt", tokenizer=letters_tok)


def test_denoise_then_finetune_from_it(tmp_path, letters_tok):
    rng = random.Random(1)
    text = "\n\n".join(" ".join("".join(rng.choice(LETTERS) for _ in range(4)) for _ in range(12))
                       for _ in range(40))
    (tmp_path / "text.txt").write_text(text)
    pre = tmp_path / "pre"
    finetune_seq2seq(tmp_path / "text.txt", pre, objective="denoise", model="encdec-tiny", tokenizer=letters_tok,
                     batch_size=8, val_fraction=0.1, train=_train(20))
    assert json.loads((pre / "metrics.jsonl").read_text().splitlines()[-1])["val_loss"] > 0
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"source": w, "target": w[::-1]}) + "\n" for w in text.split()[:50]))
    run = tmp_path / "ft"
    finetune_seq2seq(pairs, run, init=pre, batch_size=8, train=_train(5))
    assert (run / "model.safetensors").is_file()
    with pytest.raises(ConfigError, match="holds a encdec model"):
        finetune_seq2seq(pairs, tmp_path / "x", init=pre, arch="gpt", train=_train(5))


def test_cli_finetune_and_evaluate(tmp_path, reverse_pairs, letters_tok, capsys):
    letters_tok.save(tmp_path / "tok")
    run = tmp_path / "run"
    rc = main(["finetune", "seq2seq", "--data", str(reverse_pairs / "train.jsonl"), "--out", str(run),
               "--model", "encdec-tiny", "--tokenizer", str(tmp_path / "tok"), "--max-steps", "10",
               "--device", "cpu", "--precision", "fp32", "--batch-size", "8"])
    assert rc == 0
    report_path = tmp_path / "report.json"
    rc = main(["evaluate", str(run), "--data", str(reverse_pairs / "val.jsonl"), "--out", str(report_path),
               "--num-beams", "2", "--limit", "8", "--device", "cpu"])
    assert rc == 0
    report = json.loads(report_path.read_text())
    assert report["n"] == 8 and set(report["metrics"]) == {"bleu", "chrf", "rouge1", "rouge2", "rougeL"}
    assert len(report["predictions"]) == 8
    out = capsys.readouterr().out
    assert "| rougeL |" in out
    assert main(["generate", str(run), "abcd", "--max-new-tokens", "5", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("abcd")
    # a user mistake is an error message, not a traceback
    assert main(["evaluate", str(run), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_losses_match_the_formula():
    from zenlm.models.encdec import EncoderDecoder, get_encdec_preset
    from zenlm.recipes.finetune_seq2seq import seq2seq_loss

    torch.manual_seed(0)
    model = EncoderDecoder(get_encdec_preset("encdec-tiny", vocab_size=20))
    src = torch.randint(3, 20, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.bool)
    tgt_in = torch.randint(3, 20, (2, 4))
    labels = torch.randint(3, 20, (2, 4))
    labels[1, 2:] = IGNORE
    logp = torch.log_softmax(model(src, tgt_in, mask), dim=-1)
    keep = labels != IGNORE
    nll = -logp[keep].gather(1, labels[keep][:, None]).squeeze(1)
    eps = 0.1
    expected = ((1 - eps) * nll + eps * -logp[keep].mean(-1)).mean()  # smoothing mass spread over all V tokens
    out = seq2seq_loss(model, (src, mask, tgt_in, labels), label_smoothing=eps)
    assert out.n_targets == 6 and out.n_tokens == 2 * 5 + 2 * 4
    torch.testing.assert_close(out.loss_sum / out.n_targets, expected)
    plain = seq2seq_loss(model, (src, mask, tgt_in, labels)).loss_sum
    torch.testing.assert_close(plain, nll.sum())


def test_jsonl_readers_refuse_files_that_are_not_utf8(tmp_path):
    from zenlm.data.classify import read_labelled
    from zenlm.data.seq2seq import read_texts

    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes('{"source": "café", "target": "x", "text": "café", "label": "a"}\n'.encode("latin-1"))
    for read in (read_pairs, read_texts, read_labelled):
        with pytest.raises(DataError, match="not valid UTF-8.*save it as UTF-8"):
            read(bad)

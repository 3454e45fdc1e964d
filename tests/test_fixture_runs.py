"""Run directories written by an earlier release still load and produce the same outputs.

tests/fixtures/runs/ holds tiny runs (GPT, its int8 copy, BERT and GPT classifiers, an encoder-decoder) written
by tests/fixtures/make_runs.py before the code was reorganised, with what they produced in expected.json. A
change to config.yaml parsing, model building, weight names or decoding that breaks old runs fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import zenlm
from zenlm.encoder import EncoderLM
from zenlm.seq2seq import Seq2SeqLM

RUNS = Path(__file__).parent / "fixtures" / "runs"
EXPECTED = json.loads((RUNS / "expected.json").read_text(encoding="utf-8"))
KINDS = {"LM": zenlm.LM, "EncoderLM": EncoderLM, "Seq2SeqLM": Seq2SeqLM}


def _check_logits(logits: torch.Tensor, want: dict) -> None:
    flat = logits.detach().float().flatten()
    assert list(logits.shape) == want["shape"]
    torch.testing.assert_close(flat[:8], torch.tensor(want["head"]), atol=1e-4, rtol=1e-4)
    assert float(flat.sum()) == pytest.approx(want["sum"], abs=1e-2)
    assert float(flat.abs().sum()) == pytest.approx(want["abs_sum"], abs=1e-2)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_run_loads_as_the_same_kind(name: str) -> None:
    lm = zenlm.load(RUNS / name, device="cpu")
    assert isinstance(lm, KINDS[EXPECTED[name]["kind"]])


@pytest.mark.parametrize("name", ["gpt", "gpt-int8"])
def test_gpt_fixture_generates_the_same_tokens(name: str) -> None:
    want = EXPECTED[name]
    # fp32 activations, as the expected outputs were computed (an int8 run now computes in bf16 by default
    # where the CPU has native bf16)
    lm = zenlm.load(RUNS / name, device="cpu", dtype="fp32")
    with torch.no_grad():
        _check_logits(lm.model(torch.tensor([lm.tokenizer.encode(want["logits_input"])])), want["logits"])
    for prompt, text in want["greedy"].items():
        assert lm.generate(prompt, max_new_tokens=20, temperature=0) == text
    for prompt, ids in want.get("greedy_ids", {}).items():
        assert lm.tokenizer.encode(lm.generate(prompt, max_new_tokens=20, temperature=0)) == ids


@pytest.mark.parametrize("name", ["bert-classify", "gpt-classify"])
def test_classifier_fixture_gives_the_same_probabilities(name: str) -> None:
    want = EXPECTED[name]
    clf = zenlm.load(RUNS / name, device="cpu")
    assert clf.labels == want["labels"]
    torch.testing.assert_close(clf.predict_proba(want["texts"]), torch.tensor(want["probs"]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(clf.embed(want["texts"][:1])[0, :8], torch.tensor(want["embed_head"]),
                               atol=1e-5, rtol=1e-4)


def test_encdec_fixture_writes_the_same_targets() -> None:
    want = EXPECTED["encdec"]
    s2s = zenlm.load(RUNS / "encdec", device="cpu")
    tok = s2s.tokenizer
    src = torch.tensor([tok.encode(want["logits_source"]) + [tok.eos_id]])
    tgt = torch.tensor([[tok.bos_id] + tok.encode(want["logits_target"])])
    with torch.no_grad():
        _check_logits(s2s.model(src, tgt, torch.ones_like(src)), want["logits"])
    assert s2s.generate(want["sources"], num_beams=1) == want["greedy"]
    assert s2s.generate(want["sources"], num_beams=2) == want["beam2"]

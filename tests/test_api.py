"""The Python API: zenlm.load(), LM.generate / stream / perplexity."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import zenlm
from zenlm.data.corpus import open_corpus
from zenlm.data.shards import prepare
from zenlm.errors import CheckpointError
from zenlm.recipes.pretrain import pretrain
from zenlm.tokenizer import train_tokenizer
from zenlm.train.loop import TrainConfig


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("api")
    (root / "c.txt").write_text("hello world, hello zenlm. 你好，世界！\n" * 200, encoding="utf-8")
    corpus = open_corpus(str(root / "c.txt"), val_fraction=0.1)
    tok = train_tokenizer(corpus.texts("train"), kind="bpe", vocab_size=300)
    prepare(corpus, tok, root / "data")
    pretrain(root / "data", root / "run", model="tiny", batch_size=4, seq_len=32,
             train=TrainConfig(max_steps=30, eval_every=0, device="cpu", precision="fp32", tensorboard=False))
    return root / "run"


def test_generate_is_reproducible_and_streams(run_dir: Path) -> None:
    lm = zenlm.load(run_dir, device="cpu")
    a = lm.generate("hello", max_new_tokens=12, temperature=1.0, seed=7)
    b = lm.generate("hello", max_new_tokens=12, temperature=1.0, seed=7)
    assert a == b
    assert "".join(lm.stream("hello", max_new_tokens=12, temperature=1.0, seed=7)) == a
    greedy_cache = lm.generate("你好", max_new_tokens=15, temperature=0)
    greedy_plain = lm.generate("你好", max_new_tokens=15, temperature=0, use_cache=False)
    assert greedy_cache == greedy_plain


def test_perplexity_matches_a_hand_computation(run_dir: Path) -> None:
    lm = zenlm.load(run_dir, device="cpu")
    text = "hello world, hello zenlm."
    ids = [lm.tokenizer.eos_id, *lm.tokenizer.encode(text)]
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids[:-1]]))[0]
    nll = F.cross_entropy(logits, torch.tensor(ids[1:])).item()
    assert lm.perplexity(text) == pytest.approx(math.exp(nll), rel=1e-5)
    assert lm.perplexity([text, text]) == pytest.approx(math.exp(nll), rel=1e-5)
    # a trained model finds its training text far likelier than shuffled characters
    assert lm.perplexity(text) < lm.perplexity("zl,e hnmolo  dwlrleho.lo")
    assert lm.bits_per_byte(text) == pytest.approx(nll * (len(ids) - 1) / math.log(2) / len(text.encode()),
                                                   rel=1e-5)


def test_perplexity_scores_a_piece_of_positions_at_a_time(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With room for 4 positions' logits (SCORING_LOGITS), the head runs on pieces of at most 4 positions and
    the perplexity is the one of the whole window's logits."""
    import zenlm.scoring
    from zenlm.models.gpt import GPT

    lm = zenlm.load(run_dir, device="cpu")
    text = "hello world, hello zenlm. 你好，世界！ hello world."
    whole = lm.perplexity(text)
    monkeypatch.setattr(zenlm.scoring, "SCORING_LOGITS", 4 * lm.model.config.vocab_size)
    pieces: list[int] = []
    head = GPT.head
    monkeypatch.setattr(GPT, "head", lambda self, x: (pieces.append(x.shape[0] * x.shape[1]), head(self, x))[1])
    assert lm.perplexity(text) == pytest.approx(whole, rel=1e-6)
    assert max(pieces) == 4 and sum(pieces) == len(lm.tokenizer.encode(text))  # every position, once


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="config.yaml"):
        zenlm.load(tmp_path)

"""The Kneser–Ney n-gram model: normalisation, a hand computation, a slow reference, files, evaluation."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from zenlm.data.shards import TokenShards
from zenlm.errors import CheckpointError, ConfigError, DataError
from zenlm.generate import GenerationConfig, generate_ids
from zenlm.models.ngram import (
    MIN_DISCOUNT,
    NGRAM_PRESETS,
    NGramConfig,
    NGramLM,
    estimate_discounts,
    get_ngram_preset,
)
from zenlm.recipes.ladder import evaluate_ngram, evaluate_stateful_lm
from zenlm.rundir import load_run, save_run

V = 9
RNG = np.random.default_rng(0)
# a skewed random text over 7 of the 9 ids (ids 7 and 8 never occur: they must still get probability)
TEXT = RNG.choice(7, size=400, p=[0.3, 0.2, 0.15, 0.12, 0.1, 0.08, 0.05])


@pytest.mark.parametrize("modified", [True, False])
@pytest.mark.parametrize("order", [1, 2, 3, 4, 5])
def test_probabilities_sum_to_one_over_the_vocabulary(order: int, modified: bool) -> None:
    m = NGramLM.from_ids(TEXT, NGramConfig(vocab_size=V, order=order, modified=modified))
    seen = np.stack([TEXT[i:i + order - 1] for i in RNG.integers(0, 300, size=40)])  # histories from the text
    unseen = RNG.integers(-1, V, size=(40, order - 1))  # random, some before the text (-1)
    ctx = torch.from_numpy(np.concatenate([seen, unseen])).long()
    p = m.probs(ctx)
    torch.testing.assert_close(p.sum(1), torch.ones(80, dtype=torch.float64), rtol=0, atol=1e-12)
    assert (p > 0).all()  # the uniform base: every id, seen or not, keeps some mass
    w = torch.from_numpy(RNG.integers(0, V, size=80))
    torch.testing.assert_close(m.prob_of(ctx, w), p[torch.arange(80), w], rtol=1e-12, atol=0)


def test_bigram_equals_a_hand_computation() -> None:
    # text "a b a b c" (ids 0 1 0 1 2) in a 4-id vocabulary, one discount D = 0.5 for every order
    m = NGramLM.from_ids(np.array([0, 1, 0, 1, 2]), NGramConfig(vocab_size=4, order=2, modified=False,
                                                                discount=0.5))
    # unigrams use continuation counts: a follows {b}, b follows {a}, c follows {b} -> 1 each, total 3
    # P1(w) = max(1 - 0.5, 0) / 3 + gamma * 1/4, gamma = 0.5 * 3 / 3 = 0.5
    p1 = 0.5 / 3 + 0.5 / 4
    # bigrams use plain counts: ab 2, ba 1, bc 1
    expected = {
        (0, 1): (2 - 0.5) / 2 + (0.5 * 1 / 2) * p1,  # P(b | a): gamma(a) = 0.5 * 1 distinct / 2
        (0, 0): (0.5 * 1 / 2) * p1,  # P(a | a): only the lower order's share
        (1, 0): (1 - 0.5) / 2 + (0.5 * 2 / 2) * p1,  # P(a | b)
        (1, 3): (0.5 * 2 / 2) * 0.5 / 4,  # P(d | b): d never seen, the uniform's share of P1
        (2, 0): p1,  # P(a | c): c is never followed by anything, so the unigram answers
    }
    for (h, w), p in expected.items():
        got = m.prob_of(torch.tensor([[h]]), torch.tensor([w])).item()
        assert got == pytest.approx(p, abs=1e-15), (h, w)
    assert m.probs(torch.tensor([[2]]))[0].tolist() == pytest.approx([p1, p1, p1, 0.5 / 4])


def _reference_kn(ids: list[int], vocab: int, n: int, modified: bool) -> dict:
    """Interpolated Kneser–Ney straight from the formulas, with dictionaries (slow, for checking)."""
    grams = {k: Counter(tuple(ids[i - k + 1:i + 1]) for i in range(k - 1, len(ids))) for k in range(1, n + 2)}

    def count(k: int, gram: tuple) -> int:  # plain counts at the top, continuation counts below
        if k == n:
            return grams[n][gram]
        return sum(1 for g in grams[k + 1] if g[1:] == gram)

    counts = {k: {g: count(k, g) for g in grams[k]} for k in range(1, n + 1)}
    discounts = {}
    for k in range(1, n + 1):
        nr = Counter(counts[k].values())
        y = nr[1] / (nr[1] + 2 * nr[2]) if nr[1] + 2 * nr[2] else 0.5
        d = [r - (r + 1) * y * nr[r + 1] / nr[r] if nr[r] else y for r in (1, 2, 3)] if modified else [y] * 3
        discounts[k] = [min(max(x, MIN_DISCOUNT), r) for x, r in zip(d, (1, 2, 3), strict=True)]

    def disc(k: int, c: int) -> float:
        return 0.0 if c == 0 else discounts[k][min(c, 3) - 1]

    def prob(k: int, h: tuple, w: int) -> float:
        if k == 0:
            return 1 / vocab
        c = {v: counts[k].get(h + (v,), 0) for v in range(vocab)}
        total = sum(c.values())
        if total == 0:
            return prob(k - 1, h[1:], w)
        gamma = sum(disc(k, x) for x in c.values()) / total
        return max(c[w] - disc(k, c[w]), 0) / total + gamma * prob(k - 1, h[1:], w)

    return {"prob": prob, "discounts": discounts}


@pytest.mark.parametrize("modified", [True, False])
def test_vectorised_counting_equals_the_formulas_written_out(modified: bool) -> None:
    ids = [int(x) for x in RNG.choice(5, size=120, p=[0.4, 0.25, 0.15, 0.12, 0.08])]
    n, vocab = 3, 6
    ref = _reference_kn(ids, vocab, n, modified)
    m = NGramLM.from_ids(np.array(ids), NGramConfig(vocab_size=vocab, order=n, modified=modified))
    for k, d in ref["discounts"].items():
        assert m.discounts()[k] == pytest.approx(d, abs=1e-12)
    contexts = [tuple(ids[i:i + 2]) for i in range(0, 100, 7)] + [(5, 0), (0, 5), (4, 4)]
    for h in contexts:
        got = m.probs(torch.tensor([h]))[0]
        want = [ref["prob"](n, h, w) for w in range(vocab)]
        assert got.tolist() == pytest.approx(want, abs=1e-12), h


def test_discounts_from_counts_of_counts() -> None:
    counts = np.array([1] * 10 + [2] * 4 + [3] * 3 + [4] * 2 + [7])  # n1..n4 = 10, 4, 3, 2
    y = 10 / (10 + 2 * 4)
    assert estimate_discounts(counts, modified=False).tolist() == pytest.approx([y] * 3)
    assert estimate_discounts(counts, modified=True).tolist() == pytest.approx(
        [1 - 2 * y * 4 / 10, 2 - 3 * y * 3 / 4, 3 - 4 * y * 2 / 3])


def test_feeding_in_pieces_with_the_state_equals_feeding_whole() -> None:
    m = NGramLM.from_ids(TEXT, NGramConfig(vocab_size=V, order=4))
    idx = torch.from_numpy(TEXT[:40].reshape(2, 20))
    whole, _ = m(idx)
    a, state = m(idx[:, :7])
    b, state = m(idx[:, 7:8], state)
    c, _ = m(idx[:, 8:], state)
    torch.testing.assert_close(torch.cat([a, b, c], 1), whole)
    torch.testing.assert_close(m(idx, m.init_state(2))[0], whole)  # the start state is "no history"
    # log_prob_targets scores each id of one sequence from the ids before it
    lp = m.log_prob_targets(idx[0])
    torch.testing.assert_close(lp.float(), whole[0, :-1].gather(1, idx[0, 1:, None])[:, 0])


def test_save_and_load_round_trip(tmp_path: Path, char_tok) -> None:
    """A run directory like any other (the registry builds the model from the tables of its weights file)."""
    m = NGramLM.from_ids(TEXT, NGramConfig(vocab_size=V, order=3, modified=True))
    save_run(tmp_path / "ng", m, char_tok)
    back = load_run(tmp_path / "ng", device="cpu", dtype="bf16").model  # the tables keep their dtypes
    assert isinstance(back, NGramLM) and back.config == m.config and back.num_entries() == m.num_entries()
    assert back.order3.alpha.dtype == torch.float64 and not back.training
    ctx = torch.from_numpy(RNG.integers(-1, V, size=(30, 2)))
    assert torch.equal(back.probs(ctx), m.probs(ctx))
    saved = yaml.safe_load((tmp_path / "ng" / "config.yaml").read_text())
    assert saved["model"] == {"arch": "ngram", "vocab_size": V, "order": 3, "modified": True, "discount": None}
    assert not list((tmp_path / "ng").glob("*.tmp*"))


def test_bad_saved_models_are_refused(tmp_path: Path, char_tok) -> None:
    m = NGramLM.from_ids(TEXT, NGramConfig(vocab_size=V, order=3))
    d = save_run(tmp_path / "ng", m, char_tok)
    assert set(load_file(str(d / "model.safetensors"))) == set(m.tables()) and "order3.alpha" in m.tables()
    with pytest.raises(CheckpointError, match="no config.yaml"):
        load_run(tmp_path)
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    (d / "config.yaml").write_text(yaml.safe_dump({**cfg, "model": {**cfg["model"], "order": 4}}))
    with pytest.raises(CheckpointError, match="order-4 model"):
        load_run(d)
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_run(d)


def test_the_uniform_model_before_counting() -> None:
    """What the registry builds before anything is counted: every history unseen, P(w) = 1/V, on any device."""
    m = NGramLM.uniform(NGramConfig(vocab_size=V, order=3))
    logits, state = m(torch.tensor([[1, 2, 3, 4]]))
    torch.testing.assert_close(logits.exp(), torch.full((1, 4, V), 1 / V))
    assert state[0].tolist() == [[3, 4]] and m.num_entries() == 1
    with torch.device("meta"):  # built without memory, as the registry counts parameters
        assert NGramLM.uniform(NGramConfig(vocab_size=V, order=5)).order5.alpha.is_meta


def test_config_and_data_errors() -> None:
    with pytest.raises(ConfigError, match="order"):
        NGramConfig(order=0)
    with pytest.raises(ConfigError, match="modified=False"):
        NGramConfig(discount=0.5)
    with pytest.raises(ConfigError, match="discount"):
        NGramConfig(discount=1.5, modified=False)
    with pytest.raises(DataError, match="must lie in 0..8"):
        NGramLM.from_ids(np.array([0, 1, 9]), NGramConfig(vocab_size=V, order=2))
    with pytest.raises(DataError, match="too few"):
        NGramLM.from_ids(np.array([0, 1]), NGramConfig(vocab_size=V, order=3))
    assert list(NGRAM_PRESETS) == ["ngram-2", "ngram-3", "ngram-4", "ngram-5"]
    assert get_ngram_preset("ngram-5", vocab_size=V).order == 5
    with pytest.raises(ConfigError, match="unknown n-gram preset"):
        get_ngram_preset("ngram-9")


def test_evaluation_and_sampling_on_shards(char_data: Path) -> None:
    train, val = TokenShards.open(char_data, "train"), TokenShards.open(char_data, "val")
    vocab = int(train.index["vocab_size"])
    losses = {}
    for n in (2, 4):
        m = NGramLM.from_shards(train, NGramConfig(vocab_size=vocab, order=n))
        r = evaluate_ngram(m, val, 64, 3000, bytes_per_token=1.25, chunk=500)  # chunks cut mid-history
        assert r == pytest.approx(evaluate_ngram(m, val, 64, 3000, bytes_per_token=1.25))
        # read as one stream carrying its state, the n-gram scores every token with the same history
        assert evaluate_stateful_lm(m, val, 1, 64, 3000, 1.25) == pytest.approx(r, rel=1e-6)
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / np.log(2) / 1.25)
        losses[n] = r["val_loss"]
    assert losses[4] < losses[2] < np.log(vocab)  # longer histories help on real text
    cfg = GenerationConfig(max_new_tokens=30, temperature=0.8, seed=3)
    a = list(generate_ids(m, [5, 6], cfg))
    assert a == list(generate_ids(m, [5, 6], cfg)) and len(a) == 30 and max(a) < vocab

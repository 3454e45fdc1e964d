"""Beam search: width 1 is greedy, it finds what greedy misses, its options work, and it drives both models."""

from __future__ import annotations

import math

import pytest
import torch

from zenlm.beam import (
    BeamConfig,
    EncDecStepper,
    GPTStepper,
    banned_ngram_tokens,
    beam_search,
    beam_search_encdec,
    beam_search_gpt,
)
from zenlm.config import GPTConfig
from zenlm.errors import ConfigError
from zenlm.generate import GenerationConfig, generate_ids
from zenlm.models.encdec import EncoderDecoder, get_encdec_preset
from zenlm.models.gpt import GPT

EOS, A, B, C, D = 0, 1, 2, 3, 4


class TableStepper:
    """A hand-built next-token distribution: probabilities looked up by the tokens generated so far."""

    def __init__(self, table: dict[tuple[int, ...], dict[int, float]], batch_size: int = 1, vocab: int = 5):
        self.table, self.batch_size, self.vocab = table, batch_size, vocab
        self.capacity = 10
        self.context = [[] for _ in range(batch_size)]

    def _logits(self) -> torch.Tensor:
        rows = []
        for prefix in self.rows:
            probs = self.table.get(tuple(prefix), {EOS: 1.0})
            rows.append([math.log(probs.get(v, 1e-12)) for v in range(self.vocab)])
        return torch.tensor(rows)

    def start(self, k: int) -> torch.Tensor:
        self.rows = [[] for _ in range(self.batch_size * k)]
        return self._logits()

    def step(self, tokens_N: torch.Tensor) -> torch.Tensor:
        self.rows = [r + [int(t)] for r, t in zip(self.rows, tokens_N, strict=True)]
        return self._logits()

    def reorder(self, index_N: torch.Tensor) -> None:
        self.rows = [list(self.rows[int(i)]) for i in index_N]


# greedy takes A (0.5) and then can do no better than 0.34: p(A C) = 0.17.
# B starts lower (0.4) but is followed by the end token with 0.9: p(B) = 0.36.
TOY = {
    (): {A: 0.5, B: 0.4, C: 0.1},
    (A,): {C: 0.34, D: 0.33, EOS: 0.33},
    (A, C): {EOS: 1.0},
    (A, D): {EOS: 1.0},
    (B,): {EOS: 0.9, C: 0.1},
}


def test_beam_finds_the_sequence_greedy_misses():
    greedy = beam_search(TableStepper(TOY), BeamConfig(num_beams=1), eos_id=EOS)[0][0]
    assert greedy.tokens == [A, C]
    assert greedy.logprob == pytest.approx(math.log(0.5 * 0.34), abs=1e-5)
    for lp in (0.0, 1.0):
        best = beam_search(TableStepper(TOY), BeamConfig(num_beams=2, length_penalty=lp), eos_id=EOS)[0][0]
        assert best.tokens == [B]
        assert best.logprob == pytest.approx(math.log(0.4 * 0.9), abs=1e-5)
        assert best.score == pytest.approx(math.log(0.36) / 2**lp, abs=1e-5)  # length counts the end token


def test_length_penalty_and_return_sequences_rank_hypotheses():
    # two finished outputs: [B] (p=0.36, 2 tokens) and [A, C] (p=0.17, 3 tokens)
    cfg = BeamConfig(num_beams=3, num_return_sequences=3, length_penalty=1.0)
    hyps = beam_search(TableStepper(TOY), cfg, eos_id=EOS)[0]
    assert [h.tokens for h in hyps][:2] == [[B], [A, C]]
    assert all(hyps[i].score >= hyps[i + 1].score for i in range(len(hyps) - 1))
    # every returned output ended with the end token, which its length (for the penalty) counts
    for h in hyps:
        assert h.score == pytest.approx(h.logprob / (len(h.tokens) + 1) ** 1.0, abs=1e-5)


def test_batched_inputs_are_independent():
    table = dict(TOY)
    single = beam_search(TableStepper(table), BeamConfig(num_beams=2), eos_id=EOS)[0][0]
    batched = beam_search(TableStepper(table, batch_size=3), BeamConfig(num_beams=2), eos_id=EOS)
    assert [h[0].tokens for h in batched] == [single.tokens] * 3


def test_no_repeat_ngram():
    assert banned_ngram_tokens([1, 2, 3, 1, 2], 3) == {3}
    assert banned_ngram_tokens([1, 2, 1], 2) == {2}
    assert banned_ngram_tokens([5, 6], 1) == {5, 6}
    assert banned_ngram_tokens([1], 3) == set()
    # a distribution that loves alternating A and B: with no_repeat_ngram_size=2 no bigram occurs twice
    class Loop(TableStepper):
        def _logits(self):
            rows = []
            for prefix in self.rows:
                nxt = {B: 0.7, A: 0.2, EOS: 0.1} if (not prefix or prefix[-1] == A) else {A: 0.7, B: 0.2, EOS: 0.1}
                rows.append([math.log(nxt.get(v, 1e-12)) for v in range(self.vocab)])
            return torch.tensor(rows)

    plain = beam_search(Loop({}), BeamConfig(num_beams=1, max_new_tokens=6), eos_id=EOS)[0][0].tokens
    assert plain == [B, A, B, A, B, A]
    no_rep = beam_search(Loop({}), BeamConfig(num_beams=1, max_new_tokens=6, no_repeat_ngram_size=2), eos_id=EOS)
    toks = no_rep[0][0].tokens
    bigrams = list(zip(toks, toks[1:], strict=False))
    assert len(bigrams) == len(set(bigrams))


def test_min_new_tokens_and_early_stopping():
    out = beam_search(TableStepper(TOY), BeamConfig(num_beams=2, min_new_tokens=2), eos_id=EOS)[0][0]
    assert len(out.tokens) >= 2
    early = beam_search(TableStepper(TOY), BeamConfig(num_beams=2, early_stopping=True), eos_id=EOS)[0][0]
    assert early.tokens == [B]


@pytest.mark.parametrize("bad", [dict(num_beams=0), dict(max_new_tokens=0), dict(no_repeat_ngram_size=-1),
                                 dict(num_beams=2, num_return_sequences=3), dict(num_beams=True)])
def test_bad_config(bad):
    with pytest.raises(ConfigError):
        BeamConfig(**bad)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=40, block_size=32, n_layer=2, n_head=2, n_embd=32, pos="rope", norm="rmsnorm")
    model = GPT(cfg).eval()
    with torch.no_grad():  # sharper distributions than the random init gives, so ties cannot decide
        model.tok_emb.weight.mul_(20)
    return model


@pytest.mark.parametrize("use_cache", [True, False])
def test_gpt_width_one_equals_greedy(use_cache):
    model = _tiny_gpt()
    prompt = [3, 7, 11]
    for eos in (None, 5):
        greedy = list(generate_ids(model, prompt, GenerationConfig(max_new_tokens=12, temperature=0.0,
                                                                     use_cache=use_cache), eos_id=eos))
        beam = beam_search_gpt(model, [prompt], BeamConfig(num_beams=1, max_new_tokens=12), eos_id=eos,
                               use_cache=use_cache)
        assert beam[0][0].tokens == greedy


def test_gpt_beam_cached_equals_uncached_and_groups_prompts():
    model = _tiny_gpt(1)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8]]
    cfg = BeamConfig(num_beams=3, max_new_tokens=8, num_return_sequences=2)
    cached = beam_search_gpt(model, prompts, cfg, eos_id=9, use_cache=True)
    plain = beam_search_gpt(model, prompts, cfg, eos_id=9, use_cache=False)
    assert [[h.tokens for h in r] for r in cached] == [[h.tokens for h in r] for r in plain]
    alone = beam_search_gpt(model, [prompts[1]], cfg, eos_id=9)
    assert [h.tokens for h in alone[0]] == [h.tokens for h in cached[1]]
    # beam search never returns a sequence less likely than greedy's (same length budget, no eos)
    g = beam_search_gpt(model, prompts, BeamConfig(num_beams=1, max_new_tokens=8), eos_id=None)
    b = beam_search_gpt(model, prompts, BeamConfig(num_beams=4, max_new_tokens=8, length_penalty=0.0), eos_id=None)
    for gg, bb in zip(g, b, strict=True):
        assert bb[0].logprob >= gg[0].logprob - 1e-4
    with pytest.raises(ConfigError):
        GPTStepper(model, [[1, 2], [3]])
    with pytest.raises(ConfigError):
        beam_search_gpt(model, [[]], cfg, eos_id=None)


def _tiny_encdec(pos: str = "learned") -> EncoderDecoder:
    torch.manual_seed(0)
    model = EncoderDecoder(get_encdec_preset("encdec-tiny", vocab_size=30, pos=pos, max_target_len=16)).eval()
    with torch.no_grad():
        model.tok_emb.weight.mul_(20)
    return model


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_encdec_width_one_is_greedy_and_cache_changes_nothing(pos):
    model = _tiny_encdec(pos)
    sources = [[5, 6, 7, 8, 2], [9, 10, 2]]
    start, eos = 1, 2
    # greedy by hand, no cache: re-run the whole decoder on the prefix every step
    expected = []
    for src in sources:
        prefix = [start]
        with torch.no_grad():
            for _ in range(10):
                logits = model(torch.tensor([src]), torch.tensor([prefix]))[0, -1]
                tok = int(logits.argmax())
                if tok == eos:
                    break
                prefix.append(tok)
        expected.append(prefix[1:])
    cfg1 = BeamConfig(num_beams=1, max_new_tokens=10)
    for use_cache in (True, False):
        got = beam_search_encdec(model, sources, cfg1, start_id=start, eos_id=eos, use_cache=use_cache)
        assert [r[0].tokens for r in got] == expected
    cfg4 = BeamConfig(num_beams=4, max_new_tokens=10, num_return_sequences=4, no_repeat_ngram_size=2)
    a = beam_search_encdec(model, sources, cfg4, start_id=start, eos_id=eos, use_cache=True)
    b = beam_search_encdec(model, sources, cfg4, start_id=start, eos_id=eos, use_cache=False)
    assert [[h.tokens for h in r] for r in a] == [[h.tokens for h in r] for r in b]
    for ra, rb in zip(a, b, strict=True):
        for ha, hb in zip(ra, rb, strict=True):
            assert ha.logprob == pytest.approx(hb.logprob, abs=1e-4)


def test_encdec_capacity_caps_output_length():
    model = _tiny_encdec()
    stepper = EncDecStepper(model, torch.tensor([[5, 6, 2]]), None, start_id=1)
    assert stepper.capacity == 16
    out = beam_search(stepper, BeamConfig(num_beams=2, max_new_tokens=100), eos_id=None)
    assert len(out[0][0].tokens) == 16

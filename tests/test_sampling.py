"""The one sampling pipeline (zenlm.sampling): its order (penalties, log-probs, temperature, filters, draw), the
OpenAI penalties, seeded per-sequence generators, and the limits it must survive (tiny temperatures, seeds out
of the generator's range), for generate, generate_batch and the server engine alike."""

from __future__ import annotations

import math

import pytest
import torch

from zenlm.config import GPTConfig
from zenlm.errors import ConfigError
from zenlm.generate import GenerationConfig, generate_batch, generate_ids
from zenlm.models.gpt import GPT
from zenlm.sampling import (
    Sampler,
    SamplingConfig,
    draw,
    make_generator,
    pick_token,
    presence_frequency_penalty,
)


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=40, block_size=32, n_layer=1, n_head=2, n_embd=16, init_std=0.5)).eval()


@pytest.mark.parametrize("temperature", [1e-40, 5e-324, 1e-300])
def test_a_temperature_too_small_to_divide_by_is_greedy(temperature):
    logits = torch.tensor([0.5, 3.0, -2.0, 2.9])
    cfg = SamplingConfig(temperature=temperature)
    assert not torch.isfinite((logits / temperature).max())  # the case: logits / temperature overflows
    for extra in ({}, {"top_k": 2}, {"top_p": 0.5}):
        assert pick_token(logits, SamplingConfig(temperature=temperature, **extra), make_generator(0)) == 1
    assert Sampler(cfg, 4).choose(logits).token == 1
    model = tiny_gpt()  # and end to end: the greedy tokens, no error inside the draw
    greedy = list(generate_ids(model, [1, 2, 3], GenerationConfig(max_new_tokens=6, temperature=0)))
    assert list(generate_ids(model, [1, 2, 3], GenerationConfig(max_new_tokens=6, temperature=temperature,
                                                                seed=1))) == greedy
    assert generate_batch(model, [[1, 2, 3], [4]], GenerationConfig(max_new_tokens=6, temperature=temperature,
                                                                   seed=2))[0] == greedy


def test_a_small_but_finite_temperature_still_samples_by_probability():
    logits = torch.tensor([0.0, 1e-6, -5.0])  # at T=1e-7 the two best are e^10 apart: nearly always token 1
    draws = [pick_token(logits, SamplingConfig(temperature=1e-7), make_generator(s)) for s in range(20)]
    assert set(draws) <= {0, 1} and draws.count(1) >= 19


def test_a_draw_follows_the_probabilities_and_never_picks_an_impossible_token():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.0, 0.3, 0.0])
    g = make_generator(0)
    counts = torch.bincount(torch.tensor([draw(probs, g) for _ in range(6000)]), minlength=6)
    assert counts[1] == counts[3] == counts[5] == 0  # the impossible tokens, the last one too
    share = counts.double() / counts.sum()
    assert torch.allclose(share, probs.double(), atol=0.025)  # ~4 standard deviations at n=6000
    g1, g2 = make_generator(7), make_generator(7)  # the same seed: the same sequence of draws
    assert [draw(probs, g1) for _ in range(20)] == [draw(probs, g2) for _ in range(20)]
    one_hot = torch.zeros(50)
    one_hot[37] = 1.0
    assert {draw(one_hot, g) for _ in range(50)} == {37}


def test_a_uniform_number_that_rounds_up_to_the_total_takes_the_last_possible_token(monkeypatch):
    import zenlm.sampling as sampling

    monkeypatch.setattr(sampling.torch, "rand", lambda *a, **k: torch.ones(1, dtype=torch.float64))
    assert draw(torch.tensor([0.25, 0.5, 0.25, 0.0])) == 2


@pytest.mark.parametrize("seed", [-1, 2**64, 2**70, 1.5, True, "3"])
def test_seeds_outside_the_generators_range_are_refused(seed):
    with pytest.raises(ConfigError, match="seed"):
        SamplingConfig(seed=seed)
    with pytest.raises(ConfigError, match="seed"):
        GenerationConfig(seed=seed)
    with pytest.raises(ConfigError, match="seed"):
        make_generator(seed)


def test_the_largest_seed_works_and_batch_rows_wrap_around():
    top = 2**64 - 1
    a, b = make_generator(top), make_generator(top)
    assert torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))
    model = tiny_gpt()
    cfg = dict(max_new_tokens=8, temperature=1.0)
    rows = generate_batch(model, [[1, 2], [3, 4]], GenerationConfig(**cfg, seed=top))
    assert rows[0] == list(generate_ids(model, [1, 2], GenerationConfig(**cfg, seed=top)))
    assert rows[1] == list(generate_ids(model, [3, 4], GenerationConfig(**cfg, seed=0)))  # seed + 1 mod 2**64


@pytest.mark.parametrize("bad", [dict(temperature=math.inf), dict(presence_penalty=math.nan),
                                 dict(frequency_penalty=-math.inf), dict(logprobs=-1), dict(logprobs=True),
                                 dict(repetition_penalty=math.inf)])
def test_sampling_config_refuses_values_that_cannot_work(bad):
    with pytest.raises(ConfigError):
        SamplingConfig(**bad)


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    counts = torch.tensor([0.0, 1.0, 3.0])
    torch.testing.assert_close(presence_frequency_penalty(torch.zeros(3), counts, 0.5, 0.25),
                               torch.tensor([0.0, -0.75, -1.25]))
    logits = torch.tensor([2.0, 1.9, 1.0, -1.0])
    sampler = Sampler(SamplingConfig(temperature=0, frequency_penalty=0.2), 4, prompt_ids=[0, 0, 0])
    picks = [sampler.choose(logits).token for _ in range(3)]
    # the prompt does not count (token 0 first); once generated, 0 drops below 1, then 1 below 0
    assert picks == [0, 1, 0]
    assert sampler.counts_V is not None and sampler.counts_V.tolist() == [2.0, 1.0, 0.0, 0.0]


def test_repetition_penalty_covers_the_prompt_and_the_output():
    logits = torch.tensor([2.0, 1.9, 1.2])
    sampler = Sampler(SamplingConfig(temperature=0, repetition_penalty=2.0), 3, prompt_ids=[0])
    # 0 is in the prompt (2.0 -> 1.0); 1 once generated drops to 0.95, 2 to 0.6; seen once or often: halved once
    assert [sampler.choose(logits).token for _ in range(4)] == [1, 2, 0, 0]


def test_logprobs_are_after_the_penalties_and_before_the_temperature():
    logits = torch.tensor([1.0, 2.0, 0.0, -1.0])
    cfg = SamplingConfig(temperature=0.5, presence_penalty=1.0, logprobs=2, seed=3)
    sampler = Sampler(cfg, 4)
    sampler.observe(1)  # token 1 already generated: its logit drops by 1
    choice = sampler.choose(logits)
    want_V = torch.log_softmax(torch.tensor([1.0, 1.0, 0.0, -1.0]), -1)
    assert choice.logprob == pytest.approx(float(want_V[choice.token]))
    assert [i for i, _ in choice.top_logprobs] in ([0, 1], [1, 0])
    assert choice.top_logprobs[0][1] == pytest.approx(float(want_V[0]))
    assert Sampler(SamplingConfig(logprobs=0), 4).choose(logits).top_logprobs == []
    assert len(Sampler(SamplingConfig(logprobs=9), 4).choose(logits).top_logprobs) == 4
    assert Sampler(SamplingConfig(), 4).choose(logits).logprob is None  # not asked for: not computed


def test_seeded_samplers_are_reproducible_and_independent_of_each_other():
    logits = torch.zeros(50)  # uniform: every draw is the generator's
    cfg = SamplingConfig(temperature=1.0, seed=7)
    one, other = Sampler(cfg, 50), Sampler(cfg, 50, seed_offset=1)
    seq_one, seq_other = [], []
    for _ in range(10):  # two sequences drawing in turn
        seq_one.append(one.choose(logits).token)
        seq_other.append(other.choose(logits).token)
    again = Sampler(cfg, 50)
    assert [again.choose(logits).token for _ in range(10)] == seq_one  # alone: the same draws
    plus_one = Sampler(SamplingConfig(temperature=1.0, seed=8), 50)
    assert [plus_one.choose(logits).token for _ in range(10)] == seq_other  # offset 1 = seed + 1
    assert seq_one != seq_other
    assert not cfg.argmax_only and SamplingConfig(temperature=0).argmax_only
    assert not SamplingConfig(temperature=0, logprobs=0).argmax_only

"""Stateful causal LMs at inference (zenlm.stateful): generation through the state equals the full-sequence
forward for every rung, batched rows equal decoding alone, scoring carries the state, and the registry's
"stateful" capability is what routes a model there."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zenlm.errors import ConfigError
from zenlm.generate import GenerationConfig, generate_batch, generate_ids
from zenlm.models.gpt import GPT
from zenlm.models.ngram import NGramConfig, NGramLM
from zenlm.models.registry import architectures, get_architecture
from zenlm.models.rnn import MLPLM, RNNLM, MLPLMConfig, RNNLMConfig
from zenlm.presets import get_preset
from zenlm.stateful import is_stateful, select_rows, stack_rows, sum_nll

V = 40


def _ngram() -> NGramLM:
    return NGramLM.from_ids(np.random.default_rng(0).integers(0, V, 600), NGramConfig(vocab_size=V, order=3))


RUNGS = {
    "lstm": lambda: RNNLM(RNNLMConfig(vocab_size=V, n_embd=8, n_hidden=16, n_layer=2, dropout=0.5)),
    "gru": lambda: RNNLM(RNNLMConfig(vocab_size=V, cell="gru", n_embd=8, n_hidden=16, n_layer=1)),
    "mlp": lambda: MLPLM(MLPLMConfig(vocab_size=V, context=3, n_embd=4, n_hidden=16, direct=True)),
    "ngram": _ngram,
}


@pytest.fixture(params=list(RUNGS))
def rung(request) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        model = RUNGS[request.param]()
        for p in model.parameters():  # large random weights, so that greedy text varies
            p.normal_(0.0, 1.0)
    return model


def test_the_registry_routes_the_rungs() -> None:
    stateful = {a.name for a in architectures() if a.can("stateful")}
    assert stateful == {"ngram", "mlp", "rnn"}
    assert all(get_architecture(n).can("causal-lm") and get_architecture(n).can("generate") for n in stateful)
    assert get_architecture("ngram").count is not None and get_architecture("rnn").count is None
    assert is_stateful(_ngram()) and is_stateful(RUNGS["lstm"]())
    assert not is_stateful(GPT(get_preset("tiny", vocab_size=V))) and not is_stateful(torch.nn.Linear(2, 2))


def test_greedy_generation_through_the_state_equals_the_full_sequence_forward(rung: torch.nn.Module) -> None:
    cfg = GenerationConfig(max_new_tokens=15, temperature=0)
    greedy = list(generate_ids(rung, [1, 2, 3], cfg))
    assert rung.training or isinstance(rung, NGramLM)  # the mode is restored
    ids = [1, 2, 3]
    rung.eval()
    with torch.no_grad():
        for _ in range(15):  # greedy by reading the whole sequence again at every step
            ids.append(int(rung(torch.tensor([ids]))[0][0, -1].argmax()))
    assert greedy == ids[3:] and len(set(greedy)) > 1
    assert list(generate_ids(rung, [1, 2, 3], GenerationConfig(max_new_tokens=15, temperature=0,
                                                               use_cache=False))) == greedy
    stop = greedy[4]
    assert list(generate_ids(rung, [1, 2, 3], cfg, eos_id=stop)) == greedy[:greedy.index(stop)]


def test_batched_rows_equal_decoding_alone(rung: torch.nn.Module) -> None:
    prompts = [[1, 2, 3], [7], [5, 9, 11, 13, 2, 4]]
    greedy = GenerationConfig(max_new_tokens=12, temperature=0)
    alone = [list(generate_ids(rung, p, greedy)) for p in prompts]
    assert generate_batch(rung, prompts, greedy) == alone
    # a row that ends early (on_token says so) leaves the batch; the others go on as before
    assert generate_batch(rung, prompts, greedy, on_token=lambda i, t: i == 1) == [alone[0], alone[1][:1], alone[2]]
    sampled = GenerationConfig(max_new_tokens=12, temperature=1.0, top_k=5, seed=7)
    rows = generate_batch(rung, prompts, sampled)
    assert rows == generate_batch(rung, prompts, sampled)  # seeded
    assert rows[0] == list(generate_ids(rung, prompts[0], sampled))  # row 0 draws with the seed itself


def test_scoring_carries_the_state_across_windows(rung: torch.nn.Module) -> None:
    rung.eval()
    ids = torch.randint(0, V, (50,)).tolist()
    with torch.no_grad():
        logits = rung(torch.tensor([ids[:-1]]))[0][0]
    whole = F.cross_entropy(logits.float(), torch.tensor(ids[1:]), reduction="sum").item()
    for window in (7, 49, 1000):
        assert sum_nll(rung, ids, window) == pytest.approx(whole, rel=1e-5)


def test_state_rows_select_and_stack() -> None:
    lm = RUNGS["lstm"]().eval()
    a, b = lm.init_state(2), lm.init_state(1)
    a = tuple(t + torch.arange(2.0)[:, None, None] for t in a)  # row r filled with r
    both = stack_rows([a, b])
    assert [t.shape[0] for t in both] == [3, 3]
    assert torch.equal(select_rows(both, [1])[0], a[0][1:2]) and torch.equal(select_rows(both, [2])[1], b[1])


def test_what_a_stateful_model_refuses() -> None:
    lm = RUNGS["lstm"]()
    with pytest.raises(ConfigError, match="drop compile"):
        list(generate_ids(lm, [1], GenerationConfig(max_new_tokens=2, compile=True)))
    with pytest.raises(ConfigError, match="at least one prompt token"):
        generate_ids(lm, [], GenerationConfig())
    with pytest.raises(ConfigError, match=f"0..{V - 1}"):
        generate_ids(lm, [V], GenerationConfig())
    assert math.isfinite(sum_nll(lm, [1, 2, 3]))

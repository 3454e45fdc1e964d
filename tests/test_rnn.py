"""The MLP and LSTM/GRU language models: the gate formulas, incremental = whole, configs and presets."""

from __future__ import annotations

import pytest
import torch

from zenlm.errors import ConfigError
from zenlm.models.registry import build_model, config_from_dict
from zenlm.models.rnn import (
    MLP_PRESETS,
    MLPLM,
    RNN_PRESETS,
    RNNLM,
    MLPLMConfig,
    RNNLMConfig,
    get_rnn_preset,
    gru_cell,
    lstm_cell,
)

V = 23
CONFIGS = {
    "lstm": RNNLMConfig(vocab_size=V, n_embd=12, n_hidden=16, n_layer=2, dropout=0.3),
    "lstm-tied": RNNLMConfig(vocab_size=V, n_embd=16, n_hidden=16, n_layer=1, tie_embeddings=True),
    "gru": RNNLMConfig(vocab_size=V, cell="gru", n_embd=12, n_hidden=16, n_layer=3, dropout=0.2),
    "mlp": MLPLMConfig(vocab_size=V, context=4, n_embd=6, n_hidden=20, dropout=0.3),
    "mlp-direct": MLPLMConfig(vocab_size=V, context=3, n_embd=5, n_hidden=10, direct=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_incremental_forward_equals_the_whole_sequence(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(CONFIGS[name]).eval()
    idx = torch.randint(0, V, (3, 13))
    whole, end_state = model(idx)
    state, pieces = None, []
    for t in range(13):  # one token at a time, as generation does
        logits, state = model(idx[:, t:t + 1], state)
        pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, 1), whole)
    for a, b in zip(state, end_state, strict=True):
        torch.testing.assert_close(a, b)
    a, state = model(idx[:, :5])  # uneven pieces
    b, _ = model(idx[:, 5:], state)
    torch.testing.assert_close(torch.cat([a, b], 1), whole)
    # an explicit start state is the same as none
    torch.testing.assert_close(model(idx, model.init_state(3))[0], whole)


def test_nn_lstm_computes_the_gate_formulas() -> None:
    torch.manual_seed(1)
    model = RNNLM(RNNLMConfig(vocab_size=V, n_embd=7, n_hidden=9, n_layer=2, forget_bias=0.5)).eval()
    idx = torch.randint(0, V, (2, 6))
    logits, (h_n, c_n) = model(idx)
    x = model.emb(idx)  # [B, T, E]
    h = [torch.zeros(2, 9) for _ in range(2)]
    c = [torch.zeros(2, 9) for _ in range(2)]
    outs = []
    for t in range(6):
        inp = x[:, t]
        for layer in range(2):
            w = [getattr(model.rnn, f"{n}_l{layer}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            h[layer], c[layer] = lstm_cell(inp, h[layer], c[layer], *w)
            inp = h[layer]
        outs.append(model.head(inp))
    torch.testing.assert_close(torch.stack(outs, 1), logits)
    torch.testing.assert_close(torch.stack(h, 1), h_n)  # the state is batch first: [B, L, H]
    torch.testing.assert_close(torch.stack(c, 1), c_n)
    # the forget gate starts open: its bias rows H..2H of layer 0 hold forget_bias
    assert torch.all(model.rnn.bias_ih_l0[9:18] == 0.5) and torch.all(model.rnn.bias_hh_l0[9:18] == 0)


def test_nn_gru_computes_the_gate_formulas() -> None:
    torch.manual_seed(2)
    model = RNNLM(RNNLMConfig(vocab_size=V, cell="gru", n_embd=5, n_hidden=8, n_layer=1)).eval()
    idx = torch.randint(0, V, (2, 5))
    logits, (h_n,) = model(idx)
    x, h, outs = model.emb(idx), torch.zeros(2, 8), []
    for t in range(5):
        h = gru_cell(x[:, t], h, model.rnn.weight_ih_l0, model.rnn.weight_hh_l0, model.rnn.bias_ih_l0,
                     model.rnn.bias_hh_l0)
        outs.append(model.head(h))
    torch.testing.assert_close(torch.stack(outs, 1), logits)
    torch.testing.assert_close(h[:, None], h_n)


def test_mlp_sees_exactly_its_window() -> None:
    torch.manual_seed(3)
    model = MLPLM(MLPLMConfig(vocab_size=V, context=3, n_embd=4, n_hidden=8, direct=True)).eval()
    idx = torch.randint(0, V, (1, 10))
    logits, (last,) = model(idx)
    assert last.tolist() == [idx[0, -3:].tolist()]
    changed = idx.clone()
    changed[0, 4] = (changed[0, 4] + 1) % V
    diff = (model(changed)[0] - logits).abs().amax(-1)[0]
    # token 4 is in the windows ending at positions 4, 5 and 6 only
    assert diff[:4].max() == 0 and diff[7:].max() == 0 and diff[4:7].min() > 0
    # the first position's window is [pad, pad, idx0]: the learned padding row, id vocab_size
    x = torch.cat([model.emb.weight[V], model.emb.weight[V], model.emb.weight[idx[0, 0]]])
    first = model.out(torch.tanh(model.hidden(x))) + model.direct(x)
    torch.testing.assert_close(first, logits[0, 0])


@pytest.mark.parametrize("name", [*MLP_PRESETS, *RNN_PRESETS])
def test_presets_build_and_count_their_parameters(name: str) -> None:
    cfg = get_rnn_preset(name, vocab_size=100)
    with torch.device("meta"):
        model = build_model(cfg)
    assert model.num_params() == cfg.num_params() == sum(p.numel() for p in model.parameters())
    assert config_from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["arch"] == ("mlp" if name in MLP_PRESETS else "rnn")
    assert {**MLP_PRESETS, **RNN_PRESETS}[name].description


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_parameter_counts_match_the_built_models(name: str) -> None:
    assert build_model(CONFIGS[name]).num_params() == CONFIGS[name].num_params()


def test_config_mistakes_are_refused() -> None:
    with pytest.raises(ConfigError, match="n_embd == n_hidden"):
        RNNLMConfig(n_embd=10, n_hidden=12, tie_embeddings=True)
    with pytest.raises(ConfigError, match="'lstm' or 'gru'"):
        RNNLMConfig(cell="rnn")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="dropout"):
        MLPLMConfig(dropout=1.0)
    with pytest.raises(ConfigError, match="context"):
        MLPLMConfig(context=0)
    with pytest.raises(ConfigError, match="unknown recurrent LM preset"):
        get_rnn_preset("lstm-huge")
    with pytest.raises(ConfigError, match="unknown model settings"):
        get_rnn_preset("lstm-small", n_head=4)
    with pytest.raises(ConfigError, match="unknown RNNLMConfig fields"):
        config_from_dict({"arch": "rnn", "n_heads": 2})

"""The two neural rungs below the Transformer: a feed-forward (MLP) LM and a recurrent (LSTM / GRU) LM.

**MLP language model** (Bengio, Ducharme, Vincent & Jauvin 2003). The next token depends on a fixed window of
the n−1 previous tokens; each is looked up in a shared embedding table C and the vectors are concatenated::

    x = [C(w_{t−n+2}); ...; C(w_t)]                 # [(n−1)·d]: the window, oldest first
    h = tanh(H x + b_h)                             # hidden layer
    y = b + U h  (+ W x  with direct connections)    # logits over the vocabulary; P = softmax(y)

The window is all the model knows: its "state" between calls is just the last n−1 ids (positions before the
start of the text are a learned padding vector, id ``vocab_size``).

**LSTM language model** (Hochreiter & Schmidhuber 1997; the regularised form of Zaremba, Sutskever & Vinyals
2014). Embedding -> L stacked LSTM layers -> linear head, dropout on every non-recurrent connection (input,
between layers, output). One LSTM layer at time t, with input x_t, previous hidden state h_{t−1} and cell c_{t−1}::

    i_t = σ(W_ii x_t + b_ii + W_hi h_{t−1} + b_hi)         # input gate:  how much new content to write
    f_t = σ(W_if x_t + b_if + W_hf h_{t−1} + b_hf)         # forget gate: how much of the old cell to keep
    g_t = tanh(W_ig x_t + b_ig + W_hg h_{t−1} + b_hg)      # candidate content
    o_t = σ(W_io x_t + b_io + W_ho h_{t−1} + b_ho)         # output gate: how much of the cell to show
    c_t = f_t ⊙ c_{t−1} + i_t ⊙ g_t                       # the cell: an additive memory, so gradients
    h_t = o_t ⊙ tanh(c_t)                                 #   flow back through many steps without vanishing

``nn.LSTM`` computes exactly this (its weights stack the four gates in the order i, f, g, o), with fused kernels;
:func:`lstm_cell` writes the same step out line by line and the tests hold ``nn.LSTM`` to it. The GRU option
(Cho et al. 2014) has two gates and no separate cell::

    r_t = σ(W_ir x_t + b_ir + W_hr h_{t−1} + b_hr)         # reset gate
    z_t = σ(W_iz x_t + b_iz + W_hz h_{t−1} + b_hz)         # update gate
    n_t = tanh(W_in x_t + b_in + r_t ⊙ (W_hn h_{t−1} + b_hn))
    h_t = (1 − z_t) ⊙ n_t + z_t ⊙ h_{t−1}

Both models speak one **stateful protocol** (shared with :class:`zenlm.models.ngram.NGramLM`; the architecture
registry calls it the "stateful" capability, see :mod:`zenlm.models.registry`)::

    logits_BTV, state = model(idx_BT, state=None)   # state: a tuple of tensors; None = start of a text
    state = model.init_state(batch_size)            # the start state, explicitly

Every state tensor has the batch first (the LSTM's (h, c) are kept as [B, L, H], not nn.LSTM's [L, B, H]), so
rows of any family's state are selected, stacked and reset alike (``t[rows]``). Generation feeds one token at a
time with the returned state (instead of a KV cache), truncated back-propagation through time carries the state
from one window into the next, and feeding a text in pieces gives the same logits as feeding it whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from zenlm.config import ModelConfig, Preset, config_from_preset
from zenlm.errors import ConfigError

State = tuple[Tensor, ...]
CellKind = Literal["lstm", "gru"]


def _positive(cfg: Any, *names: str) -> None:
    for name in names:
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"{name} must be > 0, got {getattr(cfg, name)!r}.")


def _dropout_ok(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {p!r}.")


# ---------------------------------------------------------------------------------------------- MLP LM
@dataclass
class MLPLMConfig(ModelConfig):
    """Bengio et al.'s feed-forward LM.

    vocab_size: token ids
    context:    n−1, the number of previous tokens the model sees
    n_embd:     d, the width of one token's embedding (the hidden layer sees context·d numbers)
    n_hidden:   width of the tanh hidden layer
    direct:     add the direct connections W x from the concatenated embeddings to the logits
    dropout:    on the concatenated embeddings and on the hidden layer while training
    """

    ARCH = "mlp"

    vocab_size: int = 8192
    context: int = 8
    n_embd: int = 32
    n_hidden: int = 512
    direct: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _positive(self, "vocab_size", "context", "n_embd", "n_hidden")
        _dropout_ok(self.dropout)

    def num_params(self) -> int:
        """Parameter count from the shapes (equals ``sum(p.numel())`` of the built model)."""
        V, N, C, H = self.vocab_size, self.context, self.n_embd, self.n_hidden
        return (V + 1) * C + (N * C + 1) * H + (H + 1) * V + (N * C * V if self.direct else 0)


class MLPLM(nn.Module):
    """Feed-forward n-gram LM with learned embeddings (see the module docstring)."""

    param_roles = {"out": "head", "direct": "head"}  # read into the logits (zenlm.train.optim)

    def __init__(self, config: MLPLMConfig) -> None:
        super().__init__()
        self.config = c = config
        self.pad_id = c.vocab_size  # the extra embedding row: "before the text"
        self.emb = nn.Embedding(c.vocab_size + 1, c.n_embd)  # C
        self.hidden = nn.Linear(c.context * c.n_embd, c.n_hidden)  # H, b_h
        self.out = nn.Linear(c.n_hidden, c.vocab_size)  # U, b
        self.direct = nn.Linear(c.context * c.n_embd, c.vocab_size, bias=False) if c.direct else None  # W
        self.drop = nn.Dropout(c.dropout)
        nn.init.normal_(self.emb.weight, std=1.0)
        nn.init.normal_(self.out.weight, std=0.02)
        nn.init.zeros_(self.out.bias)
        if self.direct is not None:
            nn.init.zeros_(self.direct.weight)

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        """The start state: a window of padding ids, [B, n−1] int64."""
        return (torch.full((batch_size, self.config.context), self.pad_id, dtype=torch.long, device=device),)

    def forward(self, idx_BT: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """idx_BT [B, T] int64 (+ the last n−1 ids before it) -> (logits_BTV, the last n−1 ids of the lot)."""
        B, T = idx_BT.shape
        N = self.config.context
        (prev_BN,) = state if state is not None else self.init_state(B, idx_BT.device)
        seq_BS = torch.cat([prev_BN, idx_BT], dim=1)  # [B, N + T]
        window_BTN = seq_BS.unfold(1, N, 1)[:, 1:]  # the N ids ending at each position t (inclusive)
        x_BTK = self.drop(self.emb(window_BTN).flatten(2))  # x = [C(w_{t-N+1}); ...; C(w_t)], K = N·d
        h_BTH = self.drop(torch.tanh(self.hidden(x_BTK)))  # h = tanh(H x + b_h)
        logits_BTV = self.out(h_BTH)  # b + U h
        if self.direct is not None:
            logits_BTV = logits_BTV + self.direct(x_BTK)  # + W x
        return logits_BTV, (seq_BS[:, T:],)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ---------------------------------------------------------------------------------------------- LSTM / GRU
@dataclass
class RNNLMConfig(ModelConfig):
    """A recurrent LM: embedding -> stacked LSTM (or GRU) layers -> linear head.

    vocab_size:     token ids
    cell:           "lstm" or "gru"
    n_embd:         embedding width (the first layer's input)
    n_hidden:       hidden (and cell) width of every layer
    n_layer:        stacked recurrent layers
    dropout:        on the embeddings, between layers and before the head (Zaremba et al.'s placement)
    tie_embeddings: the head uses the embedding matrix (needs n_embd == n_hidden)
    forget_bias:    initial bias of the LSTM forget gate (1 keeps the memory open early in training)
    init_range:     embeddings and head start uniform in [−init_range, init_range]
    """

    ARCH = "rnn"

    vocab_size: int = 8192
    cell: CellKind = "lstm"
    n_embd: int = 256
    n_hidden: int = 256
    n_layer: int = 2
    dropout: float = 0.0
    tie_embeddings: bool = False
    forget_bias: float = 1.0
    init_range: float = 0.1

    def __post_init__(self) -> None:
        _positive(self, "vocab_size", "n_embd", "n_hidden", "n_layer", "init_range")
        if self.cell not in ("lstm", "gru"):
            raise ConfigError(f"cell={self.cell!r} is not supported; choose 'lstm' or 'gru'.")
        _dropout_ok(self.dropout)
        if self.tie_embeddings and self.n_embd != self.n_hidden:
            raise ConfigError(f"tie_embeddings needs n_embd == n_hidden (the head reuses the {self.n_embd}-wide "
                              f"embeddings on {self.n_hidden}-wide outputs); make them equal or untie.")

    def num_params(self) -> int:
        """Parameter count from the shapes (equals ``sum(p.numel())`` of the built model)."""
        V, E, H, L = self.vocab_size, self.n_embd, self.n_hidden, self.n_layer
        gates = 4 if self.cell == "lstm" else 3
        rnn = gates * H * (E + H + 2) + (L - 1) * gates * H * (H + H + 2)
        return V * E + rnn + (0 if self.tie_embeddings else V * H) + V


class RNNLM(nn.Module):
    """Embedding -> nn.LSTM / nn.GRU -> head; state = (h, c) for an LSTM, (h,) for a GRU, each [B, L, H]."""

    param_roles = {"head": "head"}  # zenlm.train.optim; the recurrent matrices are "hidden"

    def __init__(self, config: RNNLMConfig) -> None:
        super().__init__()
        self.config = c = config
        self.emb = nn.Embedding(c.vocab_size, c.n_embd)
        rnn_cls = nn.LSTM if c.cell == "lstm" else nn.GRU
        self.rnn = rnn_cls(c.n_embd, c.n_hidden, c.n_layer, batch_first=True,
                           dropout=c.dropout if c.n_layer > 1 else 0.0)
        self.drop = nn.Dropout(c.dropout)
        self.head = nn.Linear(c.n_hidden, c.vocab_size)
        if c.tie_embeddings:
            self.head.weight = self.emb.weight
        nn.init.uniform_(self.emb.weight, -c.init_range, c.init_range)
        nn.init.zeros_(self.head.bias)
        if not c.tie_embeddings:
            nn.init.uniform_(self.head.weight, -c.init_range, c.init_range)
        if c.cell == "lstm" and c.forget_bias:
            H = c.n_hidden
            with torch.no_grad():  # gates are stacked i, f, g, o: the forget gate is rows H .. 2H
                for layer in range(c.n_layer):
                    getattr(self.rnn, f"bias_ih_l{layer}")[H:2 * H].fill_(c.forget_bias)
                    getattr(self.rnn, f"bias_hh_l{layer}")[H:2 * H].zero_()

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        """The start state: zeros, (h_BLH, c_BLH) for an LSTM, (h_BLH,) for a GRU."""
        c = self.config
        device = device if device is not None else self.emb.weight.device
        shape = (batch_size, c.n_layer, c.n_hidden)
        n = 2 if c.cell == "lstm" else 1
        return tuple(torch.zeros(shape, device=device, dtype=self.emb.weight.dtype) for _ in range(n))

    def forward(self, idx_BT: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """idx_BT [B, T] int64, state from the previous call (None = zeros) -> (logits_BTV, new state)."""
        x_BTE = self.drop(self.emb(idx_BT))
        hx = None
        if state is not None:  # batch first -> nn.LSTM's [L, B, H]; nn.GRU takes h alone
            hx_LBH = tuple(t.transpose(0, 1).contiguous() for t in state)
            hx = hx_LBH if self.config.cell == "lstm" else hx_LBH[0]
        out_BTH, new = self.rnn(x_BTE, hx)
        logits_BTV = self.head(self.drop(out_BTH))
        new_LBH = new if isinstance(new, tuple) else (new,)
        return logits_BTV, tuple(t.transpose(0, 1) for t in new_LBH)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def lstm_cell(x_BE: Tensor, h_BH: Tensor, c_BH: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor,
              b_hh: Tensor) -> tuple[Tensor, Tensor]:
    """One LSTM step written as the formula (module docstring), with nn.LSTM's weight layout: w_ih [4H, E],
    w_hh [4H, H], b_ih and b_hh [4H], gates stacked i, f, g, o. -> (h_t, c_t), each [B, H]. A reference for the
    tests; the model runs the fused nn.LSTM."""
    i, f, g, o = (x_BE @ w_ih.T + b_ih + h_BH @ w_hh.T + b_hh).chunk(4, dim=-1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c_BH = f * c_BH + i * g
    h_BH = o * torch.tanh(c_BH)
    return h_BH, c_BH


def gru_cell(x_BE: Tensor, h_BH: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor) -> Tensor:
    """One GRU step as the formula, with nn.GRU's layout (gates stacked r, z, n) -> h_t [B, H]."""
    xr, xz, xn = (x_BE @ w_ih.T + b_ih).chunk(3, dim=-1)
    hr, hz, hn = (h_BH @ w_hh.T + b_hh).chunk(3, dim=-1)
    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return (1 - z) * n + z * h_BH


# ---------------------------------------------------------------------------------------------- presets
MLP_PRESETS: dict[str, Preset] = {
    "mlp-small": Preset(
        "MLP LM (Bengio et al.): 8 previous tokens x 32-wide embeddings -> 512 tanh units -> softmax.",
        dict(context=8, n_embd=32, n_hidden=512)),
    "mlp-direct": Preset(
        "mlp-small plus the paper's direct connections from the embeddings to the logits.",
        dict(context=8, n_embd=32, n_hidden=512, direct=True)),
}
RNN_PRESETS: dict[str, Preset] = {
    "lstm-small": Preset(
        "2-layer LSTM, 200 units, no dropout: the shape of Zaremba et al.'s small PTB model.",
        dict(cell="lstm", n_embd=200, n_hidden=200, n_layer=2)),
    "lstm-medium": Preset(
        "2-layer LSTM, 650 units, dropout 0.5, tied embeddings: Zaremba et al.'s medium shape.",
        dict(cell="lstm", n_embd=650, n_hidden=650, n_layer=2, dropout=0.5, tie_embeddings=True)),
    "gru-small": Preset(
        "2-layer GRU, 200 units, no dropout: lstm-small with the two-gate cell.",
        dict(cell="gru", n_embd=200, n_hidden=200, n_layer=2)),
}
def get_rnn_preset(name: str, **overrides: Any) -> MLPLMConfig | RNNLMConfig:
    """The config of preset ``name`` (one of :data:`MLP_PRESETS` or :data:`RNN_PRESETS`) with any config fields in
    ``overrides`` changed; e.g. ``get_rnn_preset("lstm-small", vocab_size=tok.vocab_size, dropout=0.2)``.
    (Any family's preset: :func:`zenlm.models.registry.preset_config`.)"""
    if name in MLP_PRESETS:
        return config_from_preset(MLPLMConfig, MLP_PRESETS, name, overrides, "MLP LM")
    return config_from_preset(RNNLMConfig, RNN_PRESETS, name, overrides, "recurrent LM")


__all__ = ["MLPLMConfig", "MLPLM", "RNNLMConfig", "RNNLM", "lstm_cell", "gru_cell", "MLP_PRESETS", "RNN_PRESETS",
           "get_rnn_preset", "State"]

"""SeqGAN's parts (Yu, Zhang, Wang & Yu 2017): a generator that samples sentences, a CNN that judges them, and
the Monte-Carlo roll-outs that turn the judge's verdict on whole sentences into a reward for every word.

**The game.** A generator G_theta (any zenlm language model: the LSTM of :mod:`zenlm.models.rnn` or a GPT)
and a discriminator D_phi (the probability that a sentence is real) play the GAN min-max game::

    min_theta max_phi  E_{Y ~ data}[log D_phi(Y)] + E_{Y ~ G_theta}[log(1 - D_phi(Y))]

D's side is plain binary classification (real = 1, generated = 0). G's side cannot be trained by back-propagating
through D: a sentence is a sequence of discrete draws. SeqGAN treats G as a policy in reinforcement learning
(state = the words so far, action = the next word) whose episode's reward is D's verdict on the finished sentence,
and follows the policy gradient (REINFORCE)::

    grad J(theta) = E_{Y ~ G}[ sum_t Q(Y_1..t-1, y_t) * grad log G_theta(y_t | Y_1..t-1) ]

    Q(Y_1..t-1, y_t) = 1/K sum_k D(Y^k)   with Y^k = Y_1..t completed by G (a roll-out)    for t < T
                     = D(Y_1..T)                                                              for t = T

so a word is credited with how real the sentences that *continue* it look on average (K roll-outs per prefix).
:func:`rollout_rewards` computes Q, :func:`sample_sequences` draws Y, and the policy protocol below lets both run
any zenlm LM one token at a time.

**The discriminator** (:class:`CNNDiscriminator`) is the paper's: embeddings, convolutions of several widths with
max-over-time pooling (Kim 2014), a highway layer (Srivastava et al. 2015), dropout and a logistic output::

    e = emb(Y)                                       # [B, T, E]
    f_w = max_t relu(conv_w(e))                      # one [n_w] vector per filter width w
    f = [f_w1; f_w2; ...]                            # [F]
    g = sigmoid(W_g f);  f = g * relu(W_h f) + (1 - g) * f        # highway
    logit = W_o dropout(f);  D(Y) = sigmoid(logit)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zenlm.config import dataclass_from_dict
from zenlm.errors import ConfigError
from zenlm.models.cache import KVCache


# ---------------------------------------------------------------------------------------------- discriminator
@dataclass
class CNNDiscriminatorConfig:
    """The CNN sentence classifier used as SeqGAN's discriminator.

    vocab_size:    token ids
    n_embd:        embedding width
    widths:        filter widths (words seen by one filter)
    filters:       filters per width (same length as ``widths``)
    dropout:       before the output layer, while training
    """

    vocab_size: int = 5000
    n_embd: int = 64
    widths: list[int] = field(default_factory=lambda: [2, 3, 4, 5])
    filters: list[int] = field(default_factory=lambda: [64, 64, 64, 64])
    dropout: float = 0.25

    def __post_init__(self) -> None:
        if self.vocab_size < 1 or self.n_embd < 1:
            raise ConfigError("the discriminator needs vocab_size >= 1 and n_embd >= 1.")
        if len(self.widths) != len(self.filters) or not self.widths or min(self.widths + self.filters) < 1:
            raise ConfigError(f"give one positive filter count per positive width, got widths {self.widths} and "
                              f"filters {self.filters}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CNNDiscriminatorConfig:
        return dataclass_from_dict(cls, d)


class CNNDiscriminator(nn.Module):
    """ids [B, T] (T >= the widest filter) -> one logit per sentence [B]; D(Y) = sigmoid(logit)."""

    param_roles = {"out": "head"}

    def __init__(self, config: CNNDiscriminatorConfig) -> None:
        super().__init__()
        self.config = c = config
        self.emb = nn.Embedding(c.vocab_size, c.n_embd)
        self.convs = nn.ModuleList(nn.Conv1d(c.n_embd, n, w) for w, n in zip(c.widths, c.filters, strict=True))
        width = sum(c.filters)
        self.highway_gate = nn.Linear(width, width)
        self.highway = nn.Linear(width, width)
        self.drop = nn.Dropout(c.dropout)
        self.out = nn.Linear(width, 1)

    def forward(self, ids_BT: Tensor) -> Tensor:
        if ids_BT.shape[1] < max(self.config.widths):
            raise ConfigError(f"sentences of {ids_BT.shape[1]} tokens are shorter than the widest filter "
                              f"({max(self.config.widths)}); use narrower filters or longer sentences.")
        e_BET = self.emb(ids_BT).transpose(1, 2)  # Conv1d wants channels first
        f_BF = torch.cat([F.relu(conv(e_BET)).amax(dim=2) for conv in self.convs], dim=1)  # max over time
        g_BF = torch.sigmoid(self.highway_gate(f_BF))
        f_BF = g_BF * F.relu(self.highway(f_BF)) + (1 - g_BF) * f_BF
        return self.out(self.drop(f_BF)).squeeze(1).float()


class SeqGAN(nn.Module):
    """The generator and the discriminator as one module, so one training loop (and one checkpoint) holds both;
    the objectives (:mod:`zenlm.recipes.seqgan`) use the parts."""

    def __init__(self, generator: nn.Module, discriminator: CNNDiscriminator) -> None:
        super().__init__()
        self.generator = generator
        self.discriminator = discriminator


# ---------------------------------------------------------------------------------------------- the policy
# Any zenlm LM as a policy that runs one token at a time: an LSTM (forward(idx, state) -> (logits, state)) keeps its
# (h, c); a GPT (forward(idx, cache=...) -> logits) keeps a KV cache.
PolicyState = Any


def lm_logits(model: nn.Module, idx_BT: Tensor) -> Tensor:
    """Next-token logits [B, T, V] for every position of idx_BT, whichever protocol the LM speaks."""
    out = model(idx_BT)
    return out[0] if isinstance(out, tuple) else out


def policy_start(model: nn.Module, prefix_BT: Tensor, max_len: int) -> tuple[Tensor, PolicyState]:
    """Read prefix_BT [B, P] -> (float32 logits [B, V] of the next token, the state to continue from); ``max_len``
    is how many tokens in all the rows will be fed (a GPT's cache size)."""
    if hasattr(model, "make_cache"):
        cache = model.make_cache(prefix_BT.shape[0], max_len)
        return model(prefix_BT, cache=cache, last_only=True)[:, -1].float(), cache
    logits_BTV, state = model(prefix_BT)
    return logits_BTV[:, -1].float(), state


def policy_step(model: nn.Module, tokens_B: Tensor, state: PolicyState) -> tuple[Tensor, PolicyState]:
    """Feed one token per row -> (float32 logits [B, V] of the next one, the new state)."""
    if isinstance(state, KVCache):
        return model(tokens_B[:, None], cache=state)[:, -1].float(), state
    logits_BTV, state = model(tokens_B[:, None], state)
    return logits_BTV[:, -1].float(), state


def draw(logits_BV: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """One token per row from softmax(logits / temperature) (temperature 0: the argmax): the batched form of
    :func:`zenlm.sampling.pick_token` without top-k/p. -> [B] int64."""
    if temperature == 0:
        return logits_BV.argmax(-1)
    probs_BV = torch.softmax(logits_BV / temperature, dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(1)


@torch.no_grad()
def complete(model: nn.Module, prefix_BT: Tensor, length: int, *, temperature: float = 1.0,
             generator: torch.Generator | None = None, end_id: int | None = None, pad_id: int = 0) -> Tensor:
    """Complete every row of prefix_BT [B, P] (its first column is the start token) to ``length`` drawn tokens
    after the start: -> [B, length] (the prefix's own tokens first). After ``end_id`` a row holds ``pad_id``."""
    B, P = prefix_BT.shape
    out_BL = torch.empty((B, length), dtype=torch.long, device=prefix_BT.device)
    out_BL[:, :P - 1] = prefix_BT[:, 1:]
    ended_B = (prefix_BT[:, 1:] == end_id).any(1) if end_id is not None else None
    if P - 1 < length:
        logits_BV, state = policy_start(model, prefix_BT, length)
        for t in range(P - 1, length):
            tok_B = draw(logits_BV, temperature, generator)
            if ended_B is not None:
                tok_B = tok_B.masked_fill(ended_B, pad_id)
                ended_B = ended_B | (tok_B == end_id)
            out_BL[:, t] = tok_B
            if t + 1 < length:
                logits_BV, state = policy_step(model, tok_B, state)
    return out_BL


def sample_sequences(model: nn.Module, n: int, length: int, start_id: int, *, temperature: float = 1.0,
                     generator: torch.Generator | None = None, end_id: int | None = None, pad_id: int = 0,
                     device: torch.device | str | None = None) -> Tensor:
    """``n`` sequences of ``length`` tokens drawn from ``model`` after the start token: [n, length]."""
    device = device if device is not None else next(model.parameters()).device
    start_N1 = torch.full((n, 1), start_id, dtype=torch.long, device=device)
    return complete(model, start_N1, length, temperature=temperature, generator=generator, end_id=end_id,
                    pad_id=pad_id)


@torch.no_grad()
def rollout_rewards(model: nn.Module, discriminator: nn.Module, seqs_BT: Tensor, start_id: int, n_rollouts: int,
                    *, generator: torch.Generator | None = None, end_id: int | None = None,
                    pad_id: int = 0) -> Tensor:
    """Q [B, T] of the module docstring for generated seqs_BT [B, T]: for t < T the mean of D over ``n_rollouts``
    completions of the prefix y_1..t by ``model`` (temperature 1), for t = T D of the sequence itself."""
    B, T = seqs_BT.shape
    start_B1 = torch.full((B, 1), start_id, dtype=torch.long, device=seqs_BT.device)
    q_BT = torch.empty((B, T), device=seqs_BT.device)
    for t in range(1, T):
        prefix_KB = torch.cat([start_B1, seqs_BT[:, :t]], 1).repeat(n_rollouts, 1)  # [K*B, t+1], K blocks of B
        done_KBT = complete(model, prefix_KB, T, generator=generator, end_id=end_id, pad_id=pad_id)
        q_BT[:, t - 1] = torch.sigmoid(discriminator(done_KBT)).view(n_rollouts, B).mean(0)
    q_BT[:, T - 1] = torch.sigmoid(discriminator(seqs_BT))
    return q_BT


__all__ = ["CNNDiscriminator", "CNNDiscriminatorConfig", "SeqGAN", "complete", "draw", "lm_logits", "policy_start",
           "policy_step", "rollout_rewards", "sample_sequences"]

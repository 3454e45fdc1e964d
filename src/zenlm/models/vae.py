"""A variational autoencoder for sentences (Bowman, Vilnis, Vinyals, Dai, Jozefowicz & Bengio 2016).

A sentence x = x_1 .. x_n is explained by a latent code z ∈ R^d drawn from the prior p(z) = N(0, I); the decoder
p(x | z) is an LSTM language model whose state starts from z. The encoder q(z | x) reads the sentence and
proposes a Gaussian for its code::

    h      = LSTM_enc(emb(x))[n]                        # the encoder's state after the last word     [B, H]
    mu     = W_mu h + b_mu                              # q(z | x) = N(mu, diag(sigma^2))              [B, d]
    logvar = W_lv h + b_lv                              # log sigma^2
    z      = mu + exp(logvar / 2) * eps,  eps ~ N(0, I) # the reparameterisation: z is differentiable
                                                        #   in mu and logvar, the noise is outside
    h_0, c_0 = split(W_z z + b_z)                       # z becomes the decoder's starting state
    logits_t = W_o LSTM_dec(emb(<bos> x_1 .. x_{t-1}))  # p(x_t | x_<t, z)

Training maximises the evidence lower bound (ELBO) of log p(x), per sentence::

    log p(x) >= ELBO = E_q[log p(x | z)] - KL(q(z | x) || p(z))
    KL(N(mu, sigma^2) || N(0, 1)) = 1/2 * sum_j (mu_j^2 + sigma_j^2 - 1 - log sigma_j^2)     (closed form)

:func:`gaussian_kl` computes the KL term exactly as written; the expectation is estimated with one draw of z.

**Posterior collapse.** An LSTM decoder is a strong language model on its own: early in training it can lower
the reconstruction term faster by ignoring z than the encoder can make z informative, and the cheapest way to
satisfy the KL term is then q(z | x) = p(z) for every x (KL = 0, z carries nothing). Bowman et al.'s two
remedies are in the recipe (:mod:`zenlm.recipes.vae`): **KL annealing** (the KL term's weight rises from 0 to 1,
so the encoder learns to use z before it is charged for it) and **word dropout** (here, in :meth:`TextVAE.forward`:
a fraction of the decoder's input words are replaced by <unk>, so the decoder cannot predict the sentence from
its own prefix alone and must read z).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zenlm.config import ModelConfig, Preset, config_from_preset
from zenlm.errors import ConfigError

State = tuple[Tensor, Tensor]


@dataclass
class TextVAEConfig(ModelConfig):
    """A sentence VAE: LSTM encoder -> Gaussian q(z | x) -> LSTM decoder started from z.

    vocab_size:   token ids (the embedding is shared by the encoder and the decoder)
    n_embd:       word embedding width
    n_hidden:     hidden (and cell) width of both LSTMs
    z_dim:        d, the size of the latent code
    dropout:      on the embeddings and before the output layer while training
    word_dropout: probability of replacing a decoder input word by <unk> while training (0 = off)
    unk_id:       the id word dropout writes (the tokenizer's <|unk|>)
    max_len:      the longest sentence (in tokens) the recipe feeds; generation stops there
    """

    ARCH = "vae"

    vocab_size: int = 8192
    n_embd: int = 128
    n_hidden: int = 256
    z_dim: int = 16
    dropout: float = 0.0
    word_dropout: float = 0.0
    unk_id: int = 0
    max_len: int = 64

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_embd", "n_hidden", "z_dim", "max_len"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}.")
        for name in ("dropout", "word_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)!r}.")
        if not 0 <= self.unk_id < self.vocab_size:
            raise ConfigError(f"unk_id {self.unk_id} is not a token id (vocabulary of {self.vocab_size}).")


def gaussian_kl(mu_BZ: Tensor, logvar_BZ: Tensor) -> Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) per row, in closed form: [B, d] -> [B] (nats)."""
    return 0.5 * (mu_BZ.pow(2) + logvar_BZ.exp() - 1.0 - logvar_BZ).sum(-1)


def reparameterize(mu_BZ: Tensor, logvar_BZ: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """z = mu + sigma * eps with eps ~ N(0, I) drawn from ``generator`` (None: torch's global one). [B, d]."""
    eps_BZ = torch.randn(mu_BZ.shape, generator=generator, device=mu_BZ.device, dtype=mu_BZ.dtype)
    return mu_BZ + torch.exp(0.5 * logvar_BZ) * eps_BZ


class TextVAE(nn.Module):
    """The sentence VAE of the module docstring.

    Inputs are right-padded: ``src_BT`` holds the sentences (no <bos>/<eos>), ``lengths_B`` their lengths;
    ``dec_in_BT`` is ``<bos> x_1 .. x_n`` (padded), the decoder's teacher-forced input.
    """

    param_roles = {"out": "head", "to_mu": "head", "to_logvar": "head"}  # read out of the network

    def __init__(self, config: TextVAEConfig) -> None:
        super().__init__()
        self.config = c = config
        self.emb = nn.Embedding(c.vocab_size, c.n_embd)
        self.encoder = nn.LSTM(c.n_embd, c.n_hidden, batch_first=True)
        self.to_mu = nn.Linear(c.n_hidden, c.z_dim)
        self.to_logvar = nn.Linear(c.n_hidden, c.z_dim)
        self.z_to_state = nn.Linear(c.z_dim, 2 * c.n_hidden)
        self.decoder = nn.LSTM(c.n_embd, c.n_hidden, batch_first=True)
        self.out = nn.Linear(c.n_hidden, c.vocab_size)
        self.drop = nn.Dropout(c.dropout)
        nn.init.uniform_(self.emb.weight, -0.1, 0.1)
        nn.init.uniform_(self.out.weight, -0.1, 0.1)
        nn.init.zeros_(self.out.bias)

    # ------------------------------------------------------------------------------------------ q(z | x)
    def encode(self, src_BT: Tensor, lengths_B: Tensor) -> tuple[Tensor, Tensor]:
        """The posterior's parameters (mu_BZ, logvar_BZ) for right-padded sentences src_BT [B, T] of
        lengths_B [B] (>= 1). The LSTM reads left to right, so its output at n-1 has read exactly x_1 .. x_n."""
        out_BTH, _ = self.encoder(self.drop(self.emb(src_BT)))
        last_B = (lengths_B - 1).clamp(min=0)
        h_BH = out_BTH[torch.arange(src_BT.shape[0], device=src_BT.device), last_B]
        return self.to_mu(h_BH), self.to_logvar(h_BH)

    # ------------------------------------------------------------------------------------------ p(x | z)
    def initial_state(self, z_BZ: Tensor) -> State:
        """The decoder's starting (h_0, c_0), each [1, B, H], from the code z_BZ."""
        h_BH, c_BH = self.z_to_state(z_BZ).chunk(2, dim=-1)
        return h_BH[None].contiguous(), c_BH[None].contiguous()

    def decode(self, z_BZ: Tensor, dec_in_BT: Tensor) -> Tensor:
        """Teacher-forced logits [B, T, V] of p(x_t | x_<t, z) for the decoder input dec_in_BT (<bos> first)."""
        out_BTH, _ = self.decoder(self.drop(self.emb(dec_in_BT)), self.initial_state(z_BZ))
        return self.out(self.drop(out_BTH))

    def step(self, tokens_B: Tensor, state: State) -> tuple[Tensor, State]:
        """One decoder step for generation: the newest token of each row [B] and the state -> (logits [B, V],
        the next state)."""
        out_B1H, (h, c) = self.decoder(self.emb(tokens_B[:, None]), state)
        return self.out(out_B1H[:, 0]), (h, c)

    # ------------------------------------------------------------------------------------------ training
    def drop_words(self, dec_in_BT: Tensor) -> Tensor:
        """Word dropout while training: each input word after <bos> becomes <unk> with probability
        ``word_dropout`` (drawn from torch's global generator, like nn.Dropout). Padding positions may change
        too; they are never scored."""
        p = self.config.word_dropout
        if not self.training or p == 0.0:
            return dec_in_BT
        drop_BT = torch.rand(dec_in_BT.shape, device=dec_in_BT.device) < p
        drop_BT[:, 0] = False  # <bos> stays: it marks the start
        return dec_in_BT.masked_fill(drop_BT, self.config.unk_id)

    def forward(self, src_BT: Tensor, lengths_B: Tensor, dec_in_BT: Tensor,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Encode, draw z (reparameterised, noise from ``generator``), decode -> (logits_BTV, mu_BZ, logvar_BZ)."""
        mu_BZ, logvar_BZ = self.encode(src_BT, lengths_B)
        z_BZ = reparameterize(mu_BZ, logvar_BZ, generator)
        return self.decode(z_BZ, self.drop_words(dec_in_BT)), mu_BZ, logvar_BZ

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def reconstruction_nll(logits_BTV: Tensor, target_BT: Tensor, ignore_index: int = -100) -> Tensor:
    """-log p(x | z) per sentence: the summed cross-entropy of each row's scored targets -> [B] (nats)."""
    nll_BT = F.cross_entropy(logits_BTV.float().transpose(1, 2), target_BT, ignore_index=ignore_index,
                             reduction="none")
    return nll_BT.sum(-1)


VAE_PRESETS: dict[str, Preset] = {
    "vae-tiny": Preset("LSTM VAE, 32-wide embeddings, 64 units, 8-dimensional code: for tests and smoke runs.",
                       dict(n_embd=32, n_hidden=64, z_dim=8)),
    "vae-small": Preset("LSTM VAE, 128-wide embeddings, 256 units, 16-dimensional code: minutes on a CPU.",
                        dict(n_embd=128, n_hidden=256, z_dim=16)),
    "vae-bowman": Preset("Bowman et al.'s language-modelling shape: 353-wide embeddings, 191 units, 13-dim code.",
                         dict(n_embd=353, n_hidden=191, z_dim=13)),
}


def get_vae_preset(name: str, **overrides: Any) -> TextVAEConfig:
    """The config of VAE preset ``name`` with config fields in ``overrides`` changed."""
    return config_from_preset(TextVAEConfig, VAE_PRESETS, name, overrides, "VAE")


__all__ = ["VAE_PRESETS", "TextVAE", "TextVAEConfig", "gaussian_kl", "get_vae_preset", "reconstruction_nll",
           "reparameterize"]

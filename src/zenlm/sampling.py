"""Sampling: the scores of the next token -> the token, for one sequence; the one pipeline generation, batched
generation and the server all use.

    logits   = logits.float()                                    # [V], the model's scores of every next token
    logits   = ctrl(logits, seen, repetition_penalty)            # CTRL: tokens of the prompt and the output
    logits   = logits - frequency_penalty * count                # OpenAI: how often each token was generated
                      - presence_penalty * (count > 0)           #         whether it was generated at all
    logprobs = log_softmax(logits)                               # the reported log-probabilities
    if temperature == 0:  token = argmax(logits)                 # greedy
    else:
        scaled = logits / temperature                            # < 1 sharpens, > 1 flattens
        scaled = top_p(top_k(scaled))                            # keep the k best, then the smallest nucleus >= p
        token  ~ softmax(scaled)                                 # drawn with the sequence's own generator:
                                                                 # one uniform number, inverted through the CDF

Every step is a function below, tested on its own; :class:`Sampler` holds one sequence's state (its seeded
generator and the token counts the penalties read) and runs them in this order. Two limits are handled here
once: a temperature so small that ``logits / temperature`` overflows float32 (1e-40, 5e-324) is the limit
T -> 0 of sampling, greedy decoding, instead of an error inside the draw; and a seed must be an integer in
``0 .. 2**64 - 1`` (what ``torch.Generator.manual_seed`` takes), else :class:`~zenlm.errors.ConfigError`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from zenlm.errors import ConfigError
from zenlm.scoring import score_tokens

SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes 0 .. 2**64 - 1 (negative values too, remapped: refused here)


def check_seed(seed: object) -> None:
    """Refuse a seed ``torch.Generator.manual_seed`` would not take as given: it must be None (a fresh random
    seed) or an integer in ``0 .. 2**64 - 1``."""
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ConfigError(f"seed must be an integer in 0..2**64-1 (or None for a random seed), got {seed!r}.")


def make_generator(seed: int | None, device: torch.device | str | None = None) -> torch.Generator:
    """A random generator on ``device`` seeded with ``seed`` (None: a fresh random seed)."""
    check_seed(seed)
    generator = torch.Generator(device=device if device is not None else "cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


@dataclass
class SamplingConfig:
    """How one sequence picks each token (validated on creation).

    temperature:        0 means greedy (always the best token); else divide the logits by it before drawing
    top_k:              draw only among the k most likely tokens (None: no limit)
    top_p:              draw only among the most likely tokens whose probabilities add up to at least p
                        (None or 1.0: no limit)
    repetition_penalty: > 1 discourages every token of the prompt and the output so far (CTRL); 1 = none
    presence_penalty:   subtracted from the logit of every token generated at least once (OpenAI); 0 = none
    frequency_penalty:  times the number of times a token was generated, subtracted from its logit (OpenAI)
    seed:               the generator's seed, 0 .. 2**64 - 1 (None: a fresh random seed)
    logprobs:           None: report nothing; k >= 0: the chosen token's log-probability and the k best ones
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}.")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise ConfigError(f"top_k must be an integer >= 1 (or None for no limit), got {self.top_k!r}.")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1] (or None for no limit), got {self.top_p}.")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise ConfigError(
                f"repetition_penalty must be > 0 (1.0 means none), got {self.repetition_penalty}."
            )
        for name in ("presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name} must be a finite number (0 means none), got {getattr(self, name)}.")
        check_seed(self.seed)
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or self.logprobs < 0):
            raise ConfigError(f"logprobs must be an integer >= 0 (or None), got {self.logprobs!r}.")

    @property
    def argmax_only(self) -> bool:
        """Greedy with nothing to count or report: the token is the argmax of the raw logits (a batch of such
        rows can take one argmax for all)."""
        return (self.temperature == 0 and self.repetition_penalty == 1.0 and not self.presence_penalty
                and not self.frequency_penalty and self.logprobs is None)


# ------------------------------------------------------------------------------------------ penalties


def ctrl_penalty(logits_V: Tensor, seen_V: Tensor, penalty: float) -> Tensor:
    """CTRL repetition penalty over the tokens marked in the boolean mask seen_V [V]: a seen token's logit is
    divided by ``penalty`` if positive, multiplied if negative (so penalty > 1 always makes it less likely)."""
    penalised_V = torch.where(logits_V > 0, logits_V / penalty, logits_V * penalty)
    return torch.where(seen_V, penalised_V, logits_V)


def apply_repetition_penalty(logits_V: Tensor, prev_ids: Sequence[int] | Tensor, penalty: float) -> Tensor:
    """:func:`ctrl_penalty` for every token id in ``prev_ids`` (any order, repeats allowed).

    logits_V: [V] float. Returns a new [V] tensor (``logits_V`` itself when there is nothing to do).
    """
    if penalty == 1.0 or len(prev_ids) == 0:
        return logits_V
    return ctrl_penalty(logits_V, _mask_of(prev_ids, logits_V.shape[-1], logits_V.device), penalty)


def presence_frequency_penalty(logits_V: Tensor, counts_V: Tensor, presence: float, frequency: float) -> Tensor:
    """OpenAI's penalties: ``logits - frequency * count - presence * (count > 0)``, counts_V [V] = how many
    times each token was generated so far."""
    return logits_V - frequency * counts_V - presence * (counts_V > 0)


def _mask_of(ids: Iterable[int] | Tensor, vocab_size: int, device: torch.device | str | None) -> Tensor:
    mask_V = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    ids_t = torch.as_tensor(ids if isinstance(ids, Tensor) else list(ids), dtype=torch.long, device=device)
    if ids_t.numel():
        mask_V[ids_t] = True
    return mask_V


# --------------------------------------------------------------------------------- filters and the draw


def top_k_filter(logits_V: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest logits, set the rest to -inf. logits_V: [V] -> [V].

    Tokens tied with the k-th largest logit are kept too.
    """
    if k >= logits_V.shape[-1]:
        return logits_V
    kth_value = torch.topk(logits_V, k).values[-1]
    return logits_V.masked_fill(logits_V < kth_value, float("-inf"))


def top_p_filter(logits_V: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probabilities sum to >= ``p``;
    set the rest to -inf. The most likely token is always kept. logits_V: [V] -> [V].
    """
    if p >= 1.0:
        return logits_V
    sorted_V, order_V = torch.sort(logits_V, descending=True)
    probs_V = torch.softmax(sorted_V, dim=-1)
    mass_before_V = torch.cumsum(probs_V, dim=-1) - probs_V  # probability of all better tokens
    drop_sorted_V = mass_before_V >= p  # the better tokens already hold p: this one is not needed
    drop_sorted_V[0] = False
    drop_V = torch.empty_like(drop_sorted_V).scatter_(0, order_V, drop_sorted_V)
    return logits_V.masked_fill(drop_V, float("-inf"))


def pick_token(logits_V: Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> int:
    """The token for (already penalised) logits_V [V]: greedy when ``cfg.temperature == 0``, else temperature,
    top-k, top-p and a draw from ``generator`` (None: torch's global generator).

    A temperature so small that the best logit divided by it overflows float32 (or the temperature itself is 0
    in float32) is treated as 0: the draw's limit as the temperature goes to 0 is the best token."""
    if cfg.temperature == 0:
        return int(torch.argmax(logits_V).item())
    scaled_V = logits_V / cfg.temperature
    if not bool(torch.isfinite(scaled_V.max())):  # overflowed (inf) or 0 / 0 (nan): the T -> 0 limit
        return int(torch.argmax(logits_V).item())
    if cfg.top_k is not None:
        scaled_V = top_k_filter(scaled_V, cfg.top_k)
    if cfg.top_p is not None:
        scaled_V = top_p_filter(scaled_V, cfg.top_p)
    return draw(torch.softmax(scaled_V, dim=-1), generator)


def draw(probs_V: Tensor, generator: torch.Generator | None = None) -> int:
    """One token drawn from the distribution probs_V [V] (non-negative, summing to 1) with one uniform number u:
    the token i whose slice ``[cdf[i-1], cdf[i])`` of the cumulative sum holds u (the inverse-CDF method), so
    token i comes with probability probs_V[i] and a token of probability 0 never. The sum runs in float64.

    ``torch.multinomial`` draws one exponential number per token of the vocabulary instead: about 170 µs a
    token for 8,192 tokens on our 2-core test machine, against about 20 µs here, paid for every token of every
    sampled sequence."""
    cdf_V = torch.cumsum(probs_V, 0, dtype=torch.float64)
    u_1 = torch.rand(1, dtype=torch.float64, generator=generator, device=probs_V.device) * cdf_V[-1]
    i = int(torch.searchsorted(cdf_V, u_1, right=True)[0])  # the first i with cdf[i] > u
    if i >= cdf_V.shape[0]:  # u rounded up to the total: the last token that has probability
        i = int(torch.nonzero(probs_V)[-1, 0])
    return i


# -------------------------------------------------------------------------------------- one sequence


@dataclass
class Choice:
    """One picked token: its id and, when asked for (``SamplingConfig.logprobs``), its log-probability and the
    best ``logprobs`` tokens with theirs (after the penalties, before the temperature)."""

    token: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class Sampler:
    """One sequence's sampling: its settings, its seeded generator and what the penalties count.

    cfg:         the settings
    vocab_size:  V, the length of the logits
    device:      where the logits are (the generator and the counts live there)
    prompt_ids:  the prompt, for the repetition penalty (OpenAI's penalties count generated tokens only)
    seed_offset: the generator is seeded with ``(cfg.seed + seed_offset) mod 2**64`` (row i of a batch uses
                 offset i, so its draws do not depend on the other rows); ignored without a seed
    """

    def __init__(
        self, cfg: SamplingConfig, vocab_size: int, *, device: torch.device | str | None = None,
        prompt_ids: Sequence[int] = (), seed_offset: int = 0,
    ) -> None:
        self.cfg = cfg
        seed = None if cfg.seed is None else (cfg.seed + seed_offset) % SEED_LIMIT
        self.generator = make_generator(seed, device)
        self.seen_V = _mask_of(prompt_ids, vocab_size, device) if cfg.repetition_penalty != 1.0 else None
        penalties = cfg.presence_penalty or cfg.frequency_penalty
        self.counts_V = torch.zeros(vocab_size, device=device) if penalties else None

    def penalise(self, logits_V: Tensor) -> Tensor:
        """logits_V [V] -> float32 logits after the repetition and the presence/frequency penalties."""
        logits_V = logits_V.float()
        if self.seen_V is not None:
            logits_V = ctrl_penalty(logits_V, self.seen_V, self.cfg.repetition_penalty)
        if self.counts_V is not None:
            logits_V = presence_frequency_penalty(logits_V, self.counts_V, self.cfg.presence_penalty,
                                                  self.cfg.frequency_penalty)
        return logits_V

    def choose(self, logits_V: Tensor) -> Choice:
        """Pick the next token from the model's logits_V [V] and count it as generated."""
        logits_V = self.penalise(logits_V)
        choice = Choice(pick_token(logits_V, self.cfg, self.generator))
        if self.cfg.logprobs is not None:  # the same helper scores prompt tokens (zenlm.scoring)
            token_1 = torch.tensor([choice.token], device=logits_V.device)
            scores = score_tokens(logits_V[None], token_1, self.cfg.logprobs)
            choice.logprob = float(scores.logprob_T[0])
            choice.top_logprobs = list(zip(scores.top_id_TK[0].tolist(), scores.top_logprob_TK[0].tolist(),
                                           strict=True))
        self.observe(choice.token)
        return choice

    def observe(self, token: int) -> None:
        """Count ``token`` as generated (for the penalties); :meth:`choose` does it for the tokens it picks."""
        if self.seen_V is not None:
            self.seen_V[token] = True
        if self.counts_V is not None:
            self.counts_V[token] += 1


__all__ = [
    "SamplingConfig",
    "Sampler",
    "Choice",
    "check_seed",
    "make_generator",
    "ctrl_penalty",
    "apply_repetition_penalty",
    "presence_frequency_penalty",
    "top_k_filter",
    "top_p_filter",
    "pick_token",
    "draw",
]

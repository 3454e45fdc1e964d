"""Scoring text: how likely a causal language model finds each token of a sequence it is shown.

For ids ``x_0 .. x_T`` the model's logits at position ``t`` predict token ``t + 1``:

    log p(x_{t+1} | x_0..x_t) = logits[t, x_{t+1}] - logsumexp_v logits[t, v]        (log-softmax)

Summing these over a continuation gives the log-likelihood that multiple-choice and loglikelihood benchmarks
compare; summing them over a whole document gives its perplexity, ``exp(-sum / n_tokens)``.

The log-softmax is taken once, in float32, and everything a caller reads (the token's own log-prob, the k
best log-probs, whether the token is the best one) is read from that one tensor. That is what makes a check
such as ``token_logprob == max(top_logprobs)`` exact rather than approximate: the two numbers are the same
float, not two roundings of the same quantity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, TypeVar

import torch
from torch import Tensor

# Scoring many positions (lm-eval's requests, a text's perplexity) applies the output head and the log-softmax to
# at most this many logits at a time (16 Mi floats, 64 MiB), a piece of positions after another: a rolling
# lm-eval batch of 16 GPT-2 windows (16 x 1,024 positions x 50,257 tokens) would otherwise hold 3.3 GB of float32
# logits and as much again for their log-softmax (docs/BENCHMARKS.md, "lm-eval: the head a piece of positions
# at a time"). Used by zenlm.lmeval, zenlm.api.LM.nll and the serving engine's prompt scoring.
SCORING_LOGITS = 1 << 24


class TokenScores(NamedTuple):
    """Per-position scores of T target tokens (see :func:`score_tokens`)."""

    logprob_T: Tensor  # [T] float32: log p(target_t | what came before)
    greedy_T: Tensor  # [T] bool: no other token has a higher log-prob (ties count as greedy)
    top_logprob_TK: Tensor  # [T, K] float32, best first (K = top_k; K = 0 gives an empty tensor)
    top_id_TK: Tensor  # [T, K] int64: the ids of those log-probs


# score_tokens works through its rows a block of at most this many logits at a time (4 Mi floats, 16 MiB: 83
# positions of GPT-2's vocabulary). Every row's scores are its own, so the blocks change no bit; but a block's
# log-softmax is read again by the max, the gather and the top-k while it is still in the cache, and its memory
# is reused from block to block instead of being mapped afresh: 333 positions of GPT-2 scored in 19.8-19.9 ms
# against 41.9-42.3 ms in one go on a 2-core Xeon (docs/BENCHMARKS.md).
SCORE_BLOCK = 1 << 22

R = TypeVar("R")


def score_tokens(logits_TV: Tensor, targets_T: Tensor, top_k: int = 0) -> TokenScores:
    """Score ``targets_T`` [T] (int64) under ``logits_TV`` [T, V], where row t holds the logits that
    predict target t (for a sequence ``ids``: ``logits[:-1]`` of ``model(ids)`` with ``targets = ids[1:]``).

    top_k: also return the k most likely tokens of each position (0: none).
    """
    step = max(1, SCORE_BLOCK // max(1, logits_TV.shape[-1]))
    if logits_TV.shape[0] <= step:
        return _score_block(logits_TV, targets_T, top_k)
    blocks = [_score_block(logits_TV[i : i + step], targets_T[i : i + step], top_k)
              for i in range(0, logits_TV.shape[0], step)]
    return TokenScores(*(torch.cat(parts) for parts in zip(*blocks, strict=True)))


def _score_block(logits_TV: Tensor, targets_T: Tensor, top_k: int) -> TokenScores:
    """:func:`score_tokens` of a block of rows, in one go."""
    logprobs_TV = torch.log_softmax(logits_TV.float(), dim=-1)
    logprob_T = logprobs_TV.gather(-1, targets_T[:, None]).squeeze(-1)
    greedy_T = logprob_T >= logprobs_TV.amax(dim=-1)
    if top_k > 0:
        top_logprob_TK, top_id_TK = torch.topk(logprobs_TV, min(top_k, logprobs_TV.shape[-1]), dim=-1)
    else:
        top_logprob_TK = logprobs_TV.new_zeros(logprob_T.shape[0], 0)
        top_id_TK = targets_T.new_zeros(logprob_T.shape[0], 0)
    return TokenScores(logprob_T, greedy_T, top_logprob_TK, top_id_TK)


def map_logits(head: Callable[[Tensor], Tensor], h_NC: Tensor, vocab_size: int,
               fn: Callable[[slice, Tensor], R]) -> list[R]:
    """``fn(positions, logits [n, V])`` for the head's logits of the N positions ``h_NC`` [N, C], a piece of
    positions at a time (at most :data:`SCORING_LOGITS` logits each) -> the results, in order. ``head`` maps
    [1, n, C] to [1, n, V] (a GPT's :meth:`~zenlm.models.gpt.GPT.inference_head`). A piece's logits are let go before the
    next piece's are made, so one piece is held at a time (a loop over a generator of pieces would hold two)."""
    step = max(1, SCORING_LOGITS // vocab_size)
    out = []
    for p in range(0, h_NC.shape[0], step):
        logits_nV = head(h_NC[p : p + step][None])[0]
        out.append(fn(slice(p, p + step), logits_nV))
        del logits_nV
    return out


__all__ = ["SCORE_BLOCK", "SCORING_LOGITS", "TokenScores", "map_logits", "score_tokens"]

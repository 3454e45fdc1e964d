"""Beam search: keep the ``num_beams`` best partial sequences instead of only the best one.

Greedy decoding commits to the most likely token at every step; a sequence whose first token is a little
less likely but whose continuation is much more likely is never seen. Beam search scores whole sequences::

    score(y) = sum_t log p(y_t | y_<t, x)                    # log-probability of the sequence
    ranked by score(y) / len(y) ** length_penalty            # > 0 favours longer, < 0 shorter outputs

At each step every running hypothesis is extended by every token, the best ``2 * num_beams`` extensions are
looked at in order: one that ends with the end token becomes a finished hypothesis (if it ranks within the
first ``num_beams``), the others refill the ``num_beams`` running slots. A batch item is done when it holds
``num_beams`` finished hypotheses and (without ``early_stopping``) the best running one, normalised at the
current length, no longer beats the worst finished one. ``len(y)`` counts generated tokens, the end token
included.

The search knows nothing about models. It talks to a :class:`Stepper`, which holds the model's state for
``batch * num_beams`` rows; :class:`EncDecStepper` and :class:`GPTStepper` adapt the two model kinds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from zenlm.errors import ConfigError

if TYPE_CHECKING:
    from zenlm.models.encdec import EncoderDecoder
    from zenlm.models.gpt import GPT


@dataclass
class BeamConfig:
    """How beam search runs.

    num_beams:            hypotheses kept per input (1 = greedy decoding)
    max_new_tokens:       longest output, in tokens (the end token included)
    length_penalty:       rank finished hypotheses by sum log-prob / length ** length_penalty
    early_stopping:       stop an input as soon as it has num_beams finished hypotheses
    no_repeat_ngram_size: forbid any n-gram of this size from occurring twice in a hypothesis (0 = off)
    num_return_sequences: how many of the best hypotheses to return per input (<= num_beams)
    min_new_tokens:       the end token is forbidden before this many tokens
    """

    num_beams: int = 4
    max_new_tokens: int = 64
    length_penalty: float = 1.0
    early_stopping: bool = False
    no_repeat_ngram_size: int = 0
    num_return_sequences: int = 1
    min_new_tokens: int = 0

    def __post_init__(self) -> None:
        for name in ("num_beams", "max_new_tokens", "num_return_sequences"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}.")
        for name in ("no_repeat_ngram_size", "min_new_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {v!r}.")
        if self.num_return_sequences > self.num_beams:
            raise ConfigError(f"num_return_sequences ({self.num_return_sequences}) cannot exceed num_beams "
                              f"({self.num_beams}).")


@dataclass
class Hypothesis:
    """One finished output: its tokens (end token removed), summed log-probability and ranking score."""

    tokens: list[int]
    logprob: float
    score: float


class Stepper(Protocol):
    """What beam search needs from a model, for ``batch_size`` inputs times ``num_beams`` rows.

    batch_size: number of inputs
    capacity:   most tokens that can be generated (context limits)
    context:    per input, the tokens already in front of the output (prompt or start token); only used
                for ``no_repeat_ngram_size``
    start(k):   set up k rows per input (row ``b * k + j`` is beam j of input b); logits [B*k, V] of the
                first output token
    step(t_N):  append token t_N[r] to row r; logits [N, V] of the next token
    reorder(i): row r continues from old row i[r] (its cache or prefix is copied)
    """

    batch_size: int
    capacity: int
    context: list[list[int]]

    def start(self, k: int) -> Tensor: ...

    def step(self, tokens_N: Tensor) -> Tensor: ...

    def reorder(self, index_N: Tensor) -> None: ...


def banned_ngram_tokens(seq: Sequence[int], n: int) -> set[int]:
    """Tokens that would complete an n-gram already present in ``seq`` (the last n-1 tokens + token)."""
    if n <= 0 or len(seq) < n - 1:
        return set()
    prefix = tuple(seq[len(seq) - (n - 1) :])
    return {seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i : i + n - 1]) == prefix}


class _Finished:
    """The best ``k`` finished hypotheses of one input, as (score, logprob, tokens)."""

    def __init__(self, k: int, length_penalty: float) -> None:
        self.k, self.lp = k, length_penalty
        self.items: list[tuple[float, float, list[int]]] = []

    def add(self, tokens: list[int], logprob: float) -> None:
        score = logprob / max(len(tokens), 1) ** self.lp
        self.items.append((score, logprob, tokens))
        self.items.sort(key=lambda h: h[0], reverse=True)
        del self.items[self.k :]

    def worst(self) -> float:
        return self.items[-1][0] if len(self.items) >= self.k else float("-inf")


@torch.inference_mode()
def beam_search(stepper: Stepper, cfg: BeamConfig, eos_id: int | None) -> list[list[Hypothesis]]:
    """Run beam search; per input, the ``cfg.num_return_sequences`` best hypotheses, best first.

    Without ``eos_id`` every hypothesis runs to ``max_new_tokens`` (capped by ``stepper.capacity``).
    """
    B, K = stepper.batch_size, cfg.num_beams
    max_new = min(cfg.max_new_tokens, stepper.capacity)
    if max_new < 1:
        raise ConfigError("no room to generate: the input already fills the model's context.")
    logits_NV = stepper.start(K)
    device, V = logits_NV.device, logits_NV.shape[-1]
    scores_BK = torch.zeros(B, K, device=device)
    scores_BK[:, 1:] = float("-inf")  # the K rows start identical: only the first one may expand
    rows: list[list[int]] = [[] for _ in range(B * K)]  # generated tokens of each row
    finished = [_Finished(K, cfg.length_penalty) for _ in range(B)]
    done = [False] * B
    n_cand = min(2 * K, K * V)
    for t in range(max_new):
        logp_NV = torch.log_softmax(logits_NV.float(), dim=-1)
        if eos_id is not None and t < cfg.min_new_tokens:
            logp_NV[:, eos_id] = float("-inf")
        if cfg.no_repeat_ngram_size:
            for r in range(B * K):
                banned = banned_ngram_tokens(stepper.context[r // K] + rows[r], cfg.no_repeat_ngram_size)
                if banned:
                    logp_NV[r, list(banned)] = float("-inf")
        cand_BKV = scores_BK[:, :, None] + logp_NV.view(B, K, V)
        top_s, top_i = cand_BKV.view(B, K * V).topk(n_cand, dim=-1)
        top_s, top_i = top_s.tolist(), top_i.tolist()
        new_scores = [[float("-inf")] * K for _ in range(B)]
        new_src = [[b * K] * K for b in range(B)]
        new_tok = [[eos_id or 0] * K for _ in range(B)]
        for b in range(B):
            if done[b]:
                continue
            j = 0
            for rank in range(n_cand):
                s, src, tok = top_s[b][rank], top_i[b][rank] // V, top_i[b][rank] % V
                if s == float("-inf"):
                    break
                if eos_id is not None and tok == eos_id:
                    if rank < K:  # an end token outside the top K does not make a finished hypothesis
                        finished[b].add(rows[b * K + src] + [eos_id], s)
                    continue
                new_scores[b][j], new_src[b][j], new_tok[b][j] = s, b * K + src, tok
                j += 1
                if j == K:
                    break
            fin = finished[b]
            if len(fin.items) >= K:
                best_running = new_scores[b][0] / (t + 1) ** cfg.length_penalty
                done[b] = cfg.early_stopping or best_running <= fin.worst() or j == 0
            elif j == 0:  # nothing left to extend
                done[b] = True
        index = [r for srcs in new_src for r in srcs]
        flat_tok = [x for toks in new_tok for x in toks]
        rows = [rows[r] + [tok] for r, tok in zip(index, flat_tok, strict=True)]
        scores_BK = torch.tensor(new_scores, device=device)
        if all(done) or t + 1 == max_new:
            break
        stepper.reorder(torch.tensor(index, device=device))
        logits_NV = stepper.step(torch.tensor(flat_tok, device=device))
    # inputs that ran out of length: their running hypotheses count as finished
    out: list[list[Hypothesis]] = []
    for b in range(B):
        if not done[b]:
            for j in range(K):
                s = float(scores_BK[b, j])
                if s != float("-inf"):
                    finished[b].add(rows[b * K + j], s)
        hyps = []
        for score, logprob, tokens in finished[b].items[: cfg.num_return_sequences]:
            if eos_id is not None and tokens and tokens[-1] == eos_id:
                tokens = tokens[:-1]
            hyps.append(Hypothesis(tokens, logprob, score))
        out.append(hyps)
    return out


# --------------------------------------------------------------------------------------- model adapters


class EncDecStepper:
    """:class:`Stepper` for an :class:`~zenlm.models.encdec.EncoderDecoder`: the sources are encoded once,
    every row starts from ``start_id``; with ``use_cache`` each step feeds one token per row."""

    def __init__(self, model: EncoderDecoder, src_BS: Tensor, src_mask_BS: Tensor | None, start_id: int,
                 use_cache: bool = True) -> None:
        self.model, self.src, self.mask, self.start_id, self.use_cache = model, src_BS, src_mask_BS, start_id, use_cache
        self.batch_size = src_BS.shape[0]
        self.capacity = model.config.max_target_len  # start token + capacity-1 fed tokens fill the context
        self.context = [[start_id] for _ in range(self.batch_size)]

    def start(self, k: int) -> Tensor:
        memory_BSC = self.model.encode(self.src, self.mask)
        self.memory = memory_BSC.repeat_interleave(k, dim=0)
        self.rows_mask = None if self.mask is None else self.mask.repeat_interleave(k, dim=0)
        self.prefix_NT = torch.full((self.memory.shape[0], 1), self.start_id, dtype=torch.long,
                                    device=self.src.device)
        self.cache = self.model.make_cache(self.memory, self.rows_mask) if self.use_cache else None
        return self.model.decode(self.prefix_NT, self.memory, self.rows_mask, cache=self.cache,
                                 last_only=True)[:, -1]

    def step(self, tokens_N: Tensor) -> Tensor:
        if self.cache is not None:
            return self.model.decode(tokens_N[:, None], cache=self.cache, last_only=True)[:, -1]
        self.prefix_NT = torch.cat([self.prefix_NT, tokens_N[:, None]], dim=1)
        return self.model.decode(self.prefix_NT, self.memory, self.rows_mask, last_only=True)[:, -1]

    def reorder(self, index_N: Tensor) -> None:
        if self.cache is not None:
            self.cache.reorder(index_N)
        else:
            self.prefix_NT = self.prefix_NT.index_select(0, index_N)
            self.memory = self.memory.index_select(0, index_N)
            if self.rows_mask is not None:
                self.rows_mask = self.rows_mask.index_select(0, index_N)


class GPTStepper:
    """:class:`Stepper` for a :class:`~zenlm.models.gpt.GPT` continuing prompts of one common length."""

    def __init__(self, model: GPT, prompts: Sequence[Sequence[int]], use_cache: bool = True) -> None:
        lengths = {len(p) for p in prompts}
        if len(lengths) != 1 or 0 in lengths:
            raise ConfigError("GPTStepper needs non-empty prompts of one length (beam_search_gpt groups them).")
        self.model, self.use_cache = model, use_cache
        self.prompts = [list(p) for p in prompts]
        self.batch_size = len(prompts)
        P, block = len(self.prompts[0]), model.config.block_size
        if P > block:
            raise ConfigError(f"prompt of {P} tokens exceeds the model's context ({block}); shorten it.")
        self.capacity = block - P + 1
        self.context = self.prompts

    def start(self, k: int) -> Tensor:
        device = next(self.model.parameters()).device
        self.ids_NT = torch.tensor(self.prompts, dtype=torch.long, device=device).repeat_interleave(k, dim=0)
        self.cache = self.model.make_cache(self.ids_NT.shape[0]) if self.use_cache else None
        return self.model(self.ids_NT, cache=self.cache, last_only=True)[:, -1]

    def step(self, tokens_N: Tensor) -> Tensor:
        if self.cache is not None:
            return self.model(tokens_N[:, None], cache=self.cache, last_only=True)[:, -1]
        self.ids_NT = torch.cat([self.ids_NT, tokens_N[:, None]], dim=1)
        return self.model(self.ids_NT, last_only=True)[:, -1]

    def reorder(self, index_N: Tensor) -> None:
        if self.cache is not None:
            self.cache.select_rows(index_N)
        else:
            self.ids_NT = self.ids_NT.index_select(0, index_N)


def _eval_mode(model: torch.nn.Module):
    was = model.training
    model.eval()
    return was


def beam_search_gpt(model: GPT, prompts: Sequence[Sequence[int]], cfg: BeamConfig, *, eos_id: int | None,
                    use_cache: bool = True, batch_size: int = 16) -> list[list[Hypothesis]]:
    """Beam search continuations of token-id prompts with a GPT; prompts of equal length share a batch."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("beam search needs at least one prompt, each with at least one token.")
    out: list[list[Hypothesis] | None] = [None] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    was = _eval_mode(model)
    try:
        for idx in by_len.values():
            for s in range(0, len(idx), batch_size):
                chunk = idx[s : s + batch_size]
                res = beam_search(GPTStepper(model, [prompts[i] for i in chunk], use_cache), cfg, eos_id)
                for i, r in zip(chunk, res, strict=True):
                    out[i] = r
    finally:
        model.train(was)
    return [r for r in out if r is not None]


def beam_search_encdec(model: EncoderDecoder, sources: Sequence[Sequence[int]], cfg: BeamConfig, *,
                       start_id: int, eos_id: int | None, pad_id: int = 0, use_cache: bool = True,
                       batch_size: int = 16) -> list[list[Hypothesis]]:
    """Beam search outputs for token-id sources with an encoder-decoder (sources right-padded per batch)."""
    if not sources or any(len(s) == 0 for s in sources):
        raise ConfigError("beam search needs at least one source, each with at least one token.")
    device = next(model.parameters()).device
    out: list[list[Hypothesis]] = []
    was = _eval_mode(model)
    try:
        for s in range(0, len(sources), batch_size):
            chunk = [list(x) for x in sources[s : s + batch_size]]
            S = max(len(x) for x in chunk)
            src_BS = torch.full((len(chunk), S), pad_id, dtype=torch.long, device=device)
            mask_BS = torch.zeros(len(chunk), S, dtype=torch.bool, device=device)
            for i, x in enumerate(chunk):
                src_BS[i, : len(x)] = torch.tensor(x, device=device)
                mask_BS[i, : len(x)] = True
            out.extend(beam_search(EncDecStepper(model, src_BS, mask_BS, start_id, use_cache), cfg, eos_id))
    finally:
        model.train(was)
    return out


__all__ = ["BeamConfig", "Hypothesis", "Stepper", "beam_search", "banned_ngram_tokens", "EncDecStepper",
           "GPTStepper", "beam_search_gpt", "beam_search_encdec"]

"""An interpolated Kneser–Ney n-gram language model, counted from token ids with numpy.

The first rung of the ladder: no parameters are learned, the model is a table of counts. For an n-gram model
the probability of the next token ``w`` after a history ``h`` (the last n−1 tokens) is built from the
longest history down to no history at all, each order filling in what the one above left out::

    P_k(w | h) = max(c_k(h w) − D_k(c_k(h w)), 0) / c_k(h •)   +   γ_k(h) · P_{k−1}(w | h')
    γ_k(h)     = Σ_{w: c_k(h w) > 0} D_k(c_k(h w)) / c_k(h •)        (the mass the discounts took away)
    P_0(w)     = 1 / V                                               (uniform: every id gets some mass)

where ``h'`` is ``h`` without its oldest token, ``c_k(h •) = Σ_w c_k(h w)``, and when ``c_k(h •) = 0`` (a
history never seen) the order passes its lower order on unchanged: ``P_k(w | h) = P_{k−1}(w | h')``.

What is counted, ``c_k``, is the point of Kneser–Ney:

* at the highest order n, ``c_n(h w)`` is the plain count of the n-gram ``h w`` in the training ids;
* at every lower order, ``c_k(h w) = N1+(• h w)``, the number of *distinct* tokens ``v`` seen before ``h w``
  (the continuation count). A lower order is only consulted when the higher one has little evidence, and then
  the question is "how many different contexts does ``w`` complete?", not "how often does ``w`` occur?".
  (The classic example: "Francisco" is frequent, but almost only after "San"; it should get little mass after an
  unseen history.)

Discounts ``D_k`` come from the counts of counts ``n_r`` (how many k-grams have ``c_k = r``) of each order::

    Y = n_1 / (n_1 + 2 n_2)
    single discount (interpolated KN):   D_k(c) = Y                               for every c >= 1
    modified KN (Chen & Goodman 1998):   D_k(1) = 1 − 2Y n_2/n_1,   D_k(2) = 2 − 3Y n_3/n_2,
                                         D_k(c >= 3) = 3 − 4Y n_4/n_3

(each clipped into ``[MIN_DISCOUNT, c]``; a fraction is left when the counts of counts are too few to say).
Every ``P_k(· | h)`` sums to 1 over the vocabulary: the discounted counts give ``1 − γ_k(h)`` and the lower order,
itself a distribution, gets exactly ``γ_k(h)``.

How it is stored (all numpy/torch arrays, saved with safetensors; no Python loops over tokens):

* every distinct j-token sequence ``u_1 .. u_j`` (oldest first) gets a dense id, the rank of its key
  ``id(u_2 .. u_j) · V + u_1`` among the sorted keys of its length (``context{j}.keys``). The key extends the
  id of the shorter history by one *older* token, so looking up the histories of all orders for a context is
  one chain of ``searchsorted`` calls, each order one step longer than the last.
* order k keeps one entry per k-gram ``h w``, sorted by (id of h, w): the next token ``order{k}.next``, its count
  ``order{k}.count`` and its discounted probability ``order{k}.alpha = max(c − D(c), 0) / c(h •)``; per history,
  ``order{k}.offsets`` (where its entries start, CSR style) and ``order{k}.gamma``; ``order{k}.discount`` holds
  ``[D(1), D(2), D(3+)]``.

Counting is one ``np.unique`` per order over all positions of the id array (sort based, O(N log N)), so the
million ids of shakespeare-char count in about a second.

The model is an ``nn.Module`` with buffers only (its state dict is the tables, saved like any model's weights by
:func:`zenlm.recipes.ladder.save_ngram`), so it moves between devices like the others, and it speaks the same
stateful protocol as the recurrent rungs (:mod:`zenlm.models.rnn`)::

    logits_BTV, state = model(idx_BT, state)     # logits are log-probabilities; state = (the last n−1 ids,)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from zenlm.config import ModelConfig, Preset, config_from_preset
from zenlm.errors import CheckpointError, ConfigError, DataError

MAX_ORDER = 10
MIN_DISCOUNT = 0.05
NO_TOKEN = -1  # a context position before the start of the text


@dataclass
class NGramConfig(ModelConfig):
    """An interpolated Kneser–Ney n-gram model.

    vocab_size: ids 0 .. vocab_size−1 (the uniform base distribution spreads over all of them)
    order:      n, the length of the longest n-gram (the history is n−1 tokens); 1 .. 10
    modified:   three discounts per order (modified KN, Chen & Goodman) instead of one (interpolated KN)
    discount:   a fixed single discount in (0, 1] for every order instead of the estimate from the counts of
                counts (for teaching and hand computation); None = estimate
    """

    ARCH = "ngram"

    vocab_size: int = 8192
    order: int = 5
    modified: bool = True
    discount: float | None = None

    def __post_init__(self) -> None:
        if not self.vocab_size > 0:
            raise ConfigError(f"vocab_size must be > 0, got {self.vocab_size!r}.")
        if not 1 <= self.order <= MAX_ORDER:
            raise ConfigError(f"order must be between 1 and {MAX_ORDER}, got {self.order!r}.")
        if self.discount is not None:
            if not 0.0 < self.discount <= 1.0:
                raise ConfigError(f"discount must be in (0, 1] (or None to estimate it), got {self.discount!r}.")
            if self.modified:
                raise ConfigError("a fixed discount is a single discount per order; set modified=False with it.")



NGRAM_PRESETS: dict[str, Preset] = {
    f"ngram-{n}": Preset(f"interpolated modified Kneser–Ney {n}-gram model: counted, not trained; history of "
                         f"{n - 1} token{'s' if n > 2 else ''}.", {"order": n})
    for n in (2, 3, 4, 5)
}


def get_ngram_preset(name: str, **overrides: Any) -> NGramConfig:
    """The NGramConfig of preset ``name`` ("ngram-2" .. "ngram-5") with any fields in ``overrides`` changed."""
    return config_from_preset(NGramConfig, NGRAM_PRESETS, name, overrides, "n-gram")


# ---------------------------------------------------------------------------------------------- counting
def estimate_discounts(counts: np.ndarray, modified: bool) -> np.ndarray:
    """[D(1), D(2), D(3+)] from the counts of counts of ``counts`` (see the module docstring)."""
    n = [int(np.count_nonzero(counts == r)) for r in range(5)]  # n[r] = k-grams seen exactly r times
    y = n[1] / (n[1] + 2 * n[2]) if n[1] + 2 * n[2] > 0 else 0.5
    if not modified:
        d = np.full(3, y)
    else:
        def one(r: int) -> float:  # D(r) = r − (r+1) Y n_{r+1} / n_r; Y itself when n_r is 0
            return r - (r + 1) * y * n[r + 1] / n[r] if n[r] > 0 else y

        d = np.array([one(1), one(2), one(3)])
    return np.clip(d, MIN_DISCOUNT, [1.0, 2.0, 3.0])


def _discount_of(counts: np.ndarray, d: np.ndarray) -> np.ndarray:
    """D(c) for every count: 0 for c = 0, d[0] for 1, d[1] for 2, d[2] for 3 or more."""
    table = np.concatenate([[0.0], d])
    return table[np.minimum(counts, 3)]


def count_ngrams(ids: np.ndarray, config: NGramConfig) -> dict[str, np.ndarray]:
    """Count every order of ``ids`` (a 1-D integer array, one long text) into the tables of the module docstring.

    Returns the named arrays that :class:`NGramLM` holds. Memory is a few int64 arrays of len(ids) at a time.
    """
    a = np.ascontiguousarray(ids, dtype=np.int64)
    N, V, n = len(a), config.vocab_size, config.order
    if N < n:
        raise DataError(f"{N} token ids are too few to count {n}-grams; give more text or a lower order.")
    if a.min() < 0 or a.max() >= V:
        raise DataError(f"token ids must lie in 0..{V - 1} (vocab_size), found {a.min()}..{a.max()}.")
    out: dict[str, np.ndarray] = {}
    cid_prev = np.zeros(N, dtype=np.int64)  # id of the (j−1)-gram ending at each position; j = 0: the empty one
    n_prev = 1  # number of distinct (j−1)-grams
    levels: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]] = []
    for j in range(1, n + 1):
        pos = np.arange(j - 1, N)  # positions where a j-gram ends
        key = cid_prev[pos] * V + a[pos - j + 1]  # id of its newer j−1 tokens, extended by the oldest one
        keys, first, inverse, counts = np.unique(key, return_index=True, return_inverse=True, return_counts=True)
        cid = np.full(N, -1, dtype=np.int64)
        cid[pos] = inverse.reshape(-1)
        p = pos[first]  # where each distinct j-gram first ends
        # the j-gram seen as history + next token: history = its first j−1 tokens (ending one earlier)
        history = cid_prev[p - 1] if j > 1 else np.zeros(len(keys), dtype=np.int64)
        levels.append((keys, counts, history, a[p], n_prev))
        if j < n:
            out[f"context{j}.keys"] = keys
        cid_prev, n_prev = cid, len(keys)

    for k in range(1, n + 1):
        keys, counts, history, nxt, n_hist = levels[k - 1]
        if k == n:
            c = counts  # plain counts at the highest order
        else:  # continuation counts: distinct older tokens v before each k-gram = its (k+1)-gram extensions
            c = np.bincount(levels[k][0] // V, minlength=len(keys)).astype(np.int64)
        d = np.full(3, config.discount) if config.discount is not None else estimate_discounts(c, config.modified)
        order = np.lexsort((nxt, history))  # entries sorted by (history id, next token)
        history, nxt, c = history[order], nxt[order], c[order]
        offsets = np.searchsorted(history, np.arange(n_hist + 1)).astype(np.int64)
        disc = _discount_of(c, d)
        total = np.bincount(history, weights=c, minlength=n_hist)  # c(h •)
        taken = np.bincount(history, weights=disc, minlength=n_hist)  # Σ_w D(c(h w))
        seen = total > 0
        denom = np.where(seen, total, 1.0)
        out[f"order{k}.offsets"] = offsets
        out[f"order{k}.next"] = nxt
        out[f"order{k}.count"] = c
        out[f"order{k}.alpha"] = np.maximum(c - disc, 0.0) / denom[history]
        out[f"order{k}.gamma"] = np.where(seen, taken / denom, 1.0)  # an unseen history passes everything on
        out[f"order{k}.discount"] = d.astype(np.float64)
    return out


# ---------------------------------------------------------------------------------------------- the model
def _find(sorted_keys: Tensor, key_M: Tensor) -> tuple[Tensor, Tensor]:
    """Binary search of M keys in a sorted 1-D tensor -> (position [M], found [M] bool); where not found the
    position is a valid index (or 0 for an empty table) that the caller masks."""
    if len(sorted_keys) == 0:
        zeros = torch.zeros_like(key_M)
        return zeros, zeros.bool()
    pos = torch.searchsorted(sorted_keys, key_M).clamp(max=len(sorted_keys) - 1)
    return pos, sorted_keys[pos] == key_M


class NGramLM(nn.Module):
    """Interpolated Kneser–Ney n-gram LM over the tables made by :func:`count_ngrams` (see the module docstring).

    Build one with :meth:`from_ids` / :meth:`from_shards`, or from saved tables (``NGramLM(config, tables)``; see
    :func:`zenlm.recipes.ladder.load_ngram`).
    """

    def __init__(self, config: NGramConfig, tables: dict[str, np.ndarray | Tensor]) -> None:
        super().__init__()
        self.config = config
        n = config.order
        expected = {f"context{j}.keys" for j in range(1, n)} | {
            f"order{k}.{f}" for k in range(1, n + 1) for f in ("offsets", "next", "count", "alpha", "gamma",
                                                                "discount")}
        if set(tables) != expected:
            missing, extra = sorted(expected - set(tables)), sorted(set(tables) - expected)
            raise CheckpointError(f"n-gram tables do not match an order-{n} model: missing {missing[:4]}, "
                                  f"unexpected {extra[:4]}.")
        for name, t in tables.items():  # "order2.alpha" -> buffer "alpha" of submodule "order2"
            group, field = name.split(".")
            if not hasattr(self, group):
                self.add_module(group, nn.Module())
            t = torch.as_tensor(t)
            getattr(self, group).register_buffer(field, t.double() if t.is_floating_point() else t.long())
        sizes = [1] + [len(self._t(f"context{j}.keys")) for j in range(1, n)]
        for k in range(1, n + 1):
            off, nxt = self._t(f"order{k}.offsets"), self._t(f"order{k}.next")
            if len(off) != sizes[k - 1] + 1 or len(self._t(f"order{k}.gamma")) != sizes[k - 1] or \
                    (not off.is_meta and int(off[-1]) != len(nxt)):
                raise CheckpointError(f"n-gram order {k}: the offsets, entries and histories disagree in size.")
            # key of each entry (history id, next token), sorted: finds P(w | h) for one w by binary search
            hist = torch.repeat_interleave(torch.arange(sizes[k - 1], device=off.device), torch.diff(off),
                                           output_size=len(nxt))
            getattr(self, f"order{k}").register_buffer(
                "entry_keys", hist * config.vocab_size + nxt, persistent=False)

    def _apply(self, fn: Any, recurse: bool = True) -> NGramLM:
        """``.to()``, ``.cuda()``, ``.float()`` ...: the tables move between devices but keep their dtypes (float64
        probabilities cast to bf16 would no longer sum to 1, and ids must stay integers)."""
        probe = torch.zeros((), dtype=torch.float64)
        moved = fn(probe)
        if moved.dtype == probe.dtype:
            return super()._apply(fn, recurse)
        return super()._apply(lambda t: t.to(moved.device), recurse)

    def _t(self, name: str) -> Tensor:
        return self.get_buffer(name)

    # ------------------------------------------------------------------------------------------ building
    @classmethod
    def uniform(cls, config: NGramConfig) -> NGramLM:
        """The model before anything is counted: no history ever seen, so every order passes the uniform
        ``P_0(w) = 1/V`` on unchanged (what a freshly built model of the registry is; counting replaces it)."""
        n = config.order
        tables: dict[str, np.ndarray] = {f"context{j}.keys": np.zeros(0, np.int64) for j in range(1, n)}
        for k in range(1, n + 1):
            histories = 1 if k == 1 else 0  # only the empty history exists
            tables.update({f"order{k}.offsets": np.zeros(histories + 1, np.int64),
                           f"order{k}.next": np.zeros(0, np.int64), f"order{k}.count": np.zeros(0, np.int64),
                           f"order{k}.alpha": np.zeros(0), f"order{k}.gamma": np.ones(histories),
                           f"order{k}.discount": np.zeros(3)})
        return cls(config, tables)

    @classmethod
    def from_ids(cls, ids: np.ndarray, config: NGramConfig) -> NGramLM:
        """Count ``ids`` (1-D integer array) into a model of ``config``."""
        return cls(config, count_ngrams(ids, config))

    @classmethod
    def from_shards(cls, shards: Any, config: NGramConfig) -> NGramLM:
        """Count a whole split of token shards (a :class:`zenlm.data.shards.TokenShards`)."""
        return cls.from_ids(shards.window(0, len(shards)), config)

    def tables(self) -> dict[str, Tensor]:
        """The tables by name (``order{k}.alpha`` etc.): the model's state dict, what is saved."""
        return dict(self.state_dict())

    def num_entries(self) -> int:
        """Stored probabilities: one per distinct n-gram of every order plus one weight per history."""
        n = self.config.order
        return sum(len(self._t(f"order{k}.next")) + len(self._t(f"order{k}.gamma")) for k in range(1, n + 1))

    def num_params(self) -> int:
        """Trainable parameters: none (see :meth:`num_entries` for the table size)."""
        return 0

    def discounts(self) -> dict[int, list[float]]:
        """Order -> [D(1), D(2), D(3+)]."""
        return {k: self._t(f"order{k}.discount").tolist() for k in range(1, self.config.order + 1)}

    # ------------------------------------------------------------------------------------------ queries
    def history_ids(self, ctx_MJ: Tensor) -> list[Tensor]:
        """Ids of the histories of every order for M contexts.

        ctx_MJ: [M, n−1] int64, the n−1 most recent tokens, oldest first, NO_TOKEN (−1) before the text.
        Returns n tensors [M]: element j is the id of the last j tokens among the distinct j-grams (j = 0: the
        empty history, id 0), or −1 where that history never occurred in training (nor any longer one).
        """
        V, n = self.config.vocab_size, self.config.order
        hid = torch.zeros(ctx_MJ.shape[0], dtype=torch.long, device=ctx_MJ.device)
        out = [hid]
        for j in range(1, n):
            keys = self._t(f"context{j}.keys")
            tok = ctx_MJ[:, n - 1 - j]  # the j-th most recent token
            key = hid * V + tok
            pos, found = _find(keys, key)
            hid = torch.where(found & (hid >= 0) & (tok >= 0), pos, -1)
            out.append(hid)
        return out

    def _gamma(self, k: int, hid: Tensor) -> Tensor:
        gamma = self._t(f"order{k}.gamma")
        if len(gamma) == 0:  # no history of this length was ever seen
            return torch.ones(hid.shape, dtype=torch.float64, device=hid.device)
        return torch.where(hid >= 0, gamma[hid.clamp(min=0)], 1.0)

    def probs(self, ctx_MJ: Tensor) -> Tensor:
        """Next-token distributions for M contexts: ctx_MJ [M, n−1] (see :meth:`history_ids`) -> [M, V] float64.

        P = 1/V, then for k = 1 .. n:  P = γ_k(h) · P + alpha_k(h, ·)   (alpha scattered from the order's entries).
        """
        M, V = ctx_MJ.shape[0], self.config.vocab_size
        hids = self.history_ids(ctx_MJ)
        p_MV = torch.full((M, V), 1.0 / V, dtype=torch.float64, device=ctx_MJ.device)
        for k in range(1, self.config.order + 1):
            hid = hids[k - 1]
            if len(self._t(f"order{k}.gamma")) == 0:  # no history of this length was seen: nothing to add
                continue
            p_MV *= self._gamma(k, hid)[:, None]
            off = self._t(f"order{k}.offsets")
            lo = off[hid.clamp(min=0)]
            n_M = torch.where(hid >= 0, off[hid.clamp(min=0) + 1] - lo, 0)  # entries of each row's history
            rows = torch.repeat_interleave(torch.arange(M, device=p_MV.device), n_M)
            first = torch.repeat_interleave(lo - (torch.cumsum(n_M, 0) - n_M), n_M)
            idx = first + torch.arange(len(rows), device=p_MV.device)  # the entries, row by row
            p_MV.index_put_((rows, self._t(f"order{k}.next")[idx]), self._t(f"order{k}.alpha")[idx],
                            accumulate=True)
        return p_MV

    def prob_of(self, ctx_MJ: Tensor, next_M: Tensor) -> Tensor:
        """P(next_M[m] | ctx_MJ[m]) for M (context, token) pairs -> [M] float64, without building [M, V]."""
        V = self.config.vocab_size
        hids = self.history_ids(ctx_MJ)
        p_M = torch.full(next_M.shape, 1.0 / V, dtype=torch.float64, device=next_M.device)
        for k in range(1, self.config.order + 1):
            hid = hids[k - 1]
            pos, hit = _find(self._t(f"order{k}.entry_keys"), hid.clamp(min=0) * V + next_M)
            alpha = torch.where(hit & (hid >= 0), self._t(f"order{k}.alpha")[pos], 0.0) if hit.any() else 0.0
            p_M = self._gamma(k, hid) * p_M + alpha
        return p_M

    def contexts(self, ids_BT: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The history of every position of ids_BT [B, T] after ``state`` ([B, n−1] earlier ids, NO_TOKEN
        where none): -> (ctx [B, T, n−1] of the n−1 ids up to and including each position, new state [B, n−1])."""
        B, T = ids_BT.shape
        J = self.config.order - 1
        if state is None:
            state = torch.full((B, J), NO_TOKEN, dtype=torch.long, device=ids_BT.device)
        seq = torch.cat([state.to(ids_BT.device, torch.long), ids_BT.long()], dim=1)  # [B, J + T]
        ctx = seq.unfold(1, J, 1)[:, 1:] if J else seq.new_zeros(B, T, 0)  # window ending at each position
        return ctx, seq[:, seq.shape[1] - J:]

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> tuple[Tensor]:
        """The start state: no history, ([B, n−1] of NO_TOKEN,)."""
        return (torch.full((batch_size, self.config.order - 1), NO_TOKEN, dtype=torch.long, device=device),)

    def forward(self, idx_BT: Tensor, state: tuple[Tensor, ...] | None = None) -> tuple[Tensor, tuple[Tensor]]:
        """Log-probabilities of the next token after every position: idx_BT [B, T] int64, state = (the last n−1
        ids [B, n−1],) or None -> (logits_BTV float32 log P, new state). Feeding a text in pieces with the returned
        state gives the same result as feeding it whole."""
        ctx, new_state = self.contexts(idx_BT, state[0] if state is not None else None)
        B, T, J = ctx.shape
        p = self.probs(ctx.reshape(B * T, J))
        return p.log().float().view(B, T, -1), (new_state,)

    def log_prob_targets(self, ids_N: Tensor) -> Tensor:
        """Natural log P(ids[i] | the up to n−1 ids before it) for i = 1 .. N−1 -> [N−1] float64."""
        ctx, _ = self.contexts(ids_N[None, :-1])
        return self.prob_of(ctx[0], ids_N[1:].long()).log()


__all__ = ["NGramConfig", "NGramLM", "NGRAM_PRESETS", "get_ngram_preset", "count_ngrams", "estimate_discounts",
           "NO_TOKEN"]

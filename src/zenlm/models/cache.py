"""Key/value caches for incremental decoding: each new token costs one position of work, not the whole context.

    KVCache       every layer's past keys and values, preallocated [B, K, max_len, D] per layer; ``pos`` filled
    LayerCache    one attention call's view of one layer's buffers: where its new keys/values go (one common
                  position for all rows, or one position per row) and how many keys it then reads
    Seq2SeqCache  an encoder-decoder's: the decoder's own KVCache plus the cross-attention keys/values of the
                  encoder's memory (computed once per source)

An attention layer calls ``cache.update(k_new, v_new)`` and attends over what it returns; the model decides the
positions (:meth:`zenlm.models.gpt.GPT.forward`, :meth:`zenlm.models.gpt.GPT.decode_step`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from zenlm.device import advise_huge_pages, lazy_zeros


class LayerCache(NamedTuple):
    """One layer's cache buffers as one attention call uses them.

    k, v:  the layer's buffers [B_max, K, L, D] (written in place)
    pos:   an int: the T new tokens of every row take positions ``pos .. pos+T-1`` (slices of the buffers, whose
           rows past B are left alone); or a tensor pos_B [B]: row b's one new token takes position ``pos_B[b]``
           (rows at different positions)
    keys:  S, how many key positions the call reads back: ``pos + T``, or ``max(pos_B) + 1``
    rows:  with pos_B: ``arange(B)``, the rows written (made once per step, shared by the layers)
    """

    k: Tensor
    v: Tensor
    pos: int | Tensor
    keys: int
    rows: Tensor | None = None

    def update(self, k_BKTD: Tensor, v_BKTD: Tensor) -> tuple[Tensor, Tensor]:
        """Write the new keys/values [B, K, T, D] at their positions -> every key/value to attend over,
        ([B, K, S, D], [B, K, S, D]) (views of the buffers, in the buffers' dtype)."""
        B = k_BKTD.shape[0]
        if isinstance(self.pos, int):
            T = k_BKTD.shape[2]
            self.k[:B, :, self.pos : self.pos + T] = k_BKTD  # in place: no reallocation per step
            self.v[:B, :, self.pos : self.pos + T] = v_BKTD
        else:  # row b -> its own position (index_put needs the buffers' dtype)
            rows_B = torch.arange(B, device=k_BKTD.device) if self.rows is None else self.rows
            k_BKD, v_BKD = k_BKTD[:, :, 0], v_BKTD[:, :, 0]
            if k_BKD.dtype != self.k.dtype:
                k_BKD, v_BKD = k_BKD.to(self.k.dtype), v_BKD.to(self.v.dtype)
            self.k[rows_B, :, self.pos] = k_BKD
            self.v[rows_B, :, self.pos] = v_BKD
        return self.k[:B, :, : self.keys], self.v[:B, :, : self.keys]


class KVCache:
    """Preallocated keys and values of every layer, for incremental decoding.

    k, v: lists of n_layer tensors; ``k[i]`` is layer i's buffer [B, n_kv_head, max_len, head_dim].
          One separate tensor per layer (not one [n_layer, ...] tensor): a compiled decode step writes the
          new key of layer i into ``k[i]`` in place, which the compiler does only for a whole input tensor,
          not for a slice of one (it would copy the layer's cache every step).
    pos:  how many positions are filled; the next forward pass writes positions ``pos .. pos+T-1``
          (and uses them as the absolute positions of its tokens), then advances ``pos`` by T.
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_kv_head: int,
        max_len: int,
        head_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        shape = (batch_size, n_kv_head, max_len, head_dim)
        dtype = torch.get_default_dtype() if dtype is None else dtype
        # zeros that cost memory only as positions are written (a CPU cache for a whole context would
        # otherwise be resident in full from the start: zenlm.device.lazy_zeros)
        self.k = [lazy_zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [lazy_zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.pos = 0

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    def reserve(self, rows: int | slice, start: int, stop: int) -> None:
        """Write zeros into positions ``start .. stop-1`` of ``rows`` in every layer, to be overwritten: call it
        only where no sequence still needs what is there. A CPU cache is allocated lazily
        (:func:`zenlm.device.lazy_zeros`: the OS hands out a page when it is first written); reserving the
        positions a sequence will fill gives them their memory up front, not page by page during its decode
        steps (on our 2-core VM a server's first requests on a pool not reserved decoded up to 20% slower).

        Reserving the whole cache (every row, every position: the server's pool, generate_batch's) first asks
        for transparent huge pages (:func:`zenlm.device.advise_huge_pages`): a batched step reads every row's
        keys and values, and with 4 KiB pages that is a TLB miss every 4 KiB."""
        whole = (rows == slice(None) or rows == slice(0, self.batch_size)) and start == 0 and stop >= self.max_len
        for t in self.k + self.v:
            if whole:
                advise_huge_pages(t)
            t[rows, :, start:stop].zero_()

    def layers(self, T: int) -> list[LayerCache]:
        """Each layer's view for a call that appends T positions to every row (at ``pos``); the caller
        advances ``pos`` by T afterwards."""
        return [LayerCache(k, v, self.pos, self.pos + T) for k, v in zip(self.k, self.v, strict=True)]

    def reset(self) -> None:
        """Forget everything (the buffers are reused, not reallocated)."""
        self.pos = 0

    def row(self, b: int) -> KVCache:
        """An empty batch-1 cache whose buffers are views of row b of this one (a forward pass through it
        writes into row b): prefill one sequence of a batch on its own."""
        return self.rows(b, b + 1)

    def rows(self, start: int, stop: int) -> KVCache:
        """An empty cache whose buffers are views of rows ``start .. stop-1`` of this one: prefill several
        prompts of the same length in one forward pass."""
        view = KVCache.__new__(KVCache)
        view.k = [t[start:stop] for t in self.k]
        view.v = [t[start:stop] for t in self.v]
        view.pos = 0
        return view

    def select_rows(self, index_B: Tensor) -> None:
        """Keep rows ``index_B`` (in that order, repeats allowed) as the new batch, e.g. reordering beams."""
        self.k = [t.index_select(0, index_B) for t in self.k]
        self.v = [t.index_select(0, index_B) for t in self.v]

    def move_rows(self, src: Sequence[int], length: int) -> None:
        """Row r takes the first ``length`` positions of row ``src[r]``, for r = 0 .. len(src)-1, in place
        (batch compaction when sequences finish; the batch buffers keep their size)."""
        idx = torch.tensor(list(src), device=self.device)
        for t in self.k + self.v:
            t[: len(idx), :, :length] = t[idx, :, :length]  # the right side is a copy: no overlap


class Seq2SeqCache:
    """Everything generation keeps per source: the decoder's own keys/values (a :class:`KVCache` over
    ``n_dec_layer`` layers) and each decoder layer's cross-attention keys/values of the memory.

    self_kv:   KVCache, k/v per decoder layer [B, H, max_len, D]; ``pos`` = target positions filled
    cross_kv:  per decoder layer (k [B, H, S, D], v [B, H, S, D])
    src_mask:  [B, 1, 1, S] boolean (True = real source token) or None (no padding)
    """

    def __init__(self, self_kv: KVCache, cross_kv: list[tuple[Tensor, Tensor]], src_mask: Tensor | None) -> None:
        self.self_kv, self.cross_kv, self.src_mask = self_kv, cross_kv, src_mask

    @property
    def pos(self) -> int:
        return self.self_kv.pos

    @property
    def batch_size(self) -> int:
        return self.self_kv.batch_size

    def reorder(self, index_N: Tensor) -> None:
        """Keep rows ``index_N`` (beam search: each surviving hypothesis takes its parent's cache).

        Every row of the cross-attention cache is rebuilt too, so any permutation is allowed.
        """
        self.self_kv.select_rows(index_N)
        self.cross_kv = [(k.index_select(0, index_N), v.index_select(0, index_N)) for k, v in self.cross_kv]
        if self.src_mask is not None:
            self.src_mask = self.src_mask.index_select(0, index_N)


__all__ = ["KVCache", "LayerCache", "Seq2SeqCache"]

"""LoRA: low-rank adapters on a frozen model.

A frozen linear layer ``y = W x + b`` (W: [out, in]) learns a small correction instead of a new W::

    y = W x + b + (alpha / r) * B (A (dropout(x)))        A: [r, in],  B: [out, r],  r << min(in, out)

* A starts like any ``nn.Linear`` weight (Kaiming-uniform) and B at zero, so ``B A = 0``: the adapted model
  computes exactly what the base computes until the first update.
* Only A and B are trained, ``r * (in + out)`` numbers per layer instead of ``in * out`` (2% of a 768x768
  layer at r = 8). Gradients still flow *through* the frozen W to the layers below, but W itself gets no
  gradient and no optimiser state: that is where the memory goes in full fine-tuning.
* ``alpha / r`` scales the update so that the size of the first steps does not depend on r (a learning rate
  found at one rank carries over to another).
* Merging folds the update into the weight, ``W' = W + (alpha / r) B A``: the merged model is an ordinary
  model with no extra cost at inference. Unmerging subtracts it again.

Composition, not subclassing: :func:`apply_lora` replaces each chosen ``nn.Linear`` (or an int8
:class:`~zenlm.models.int8.Int8Linear`: QLoRA-style training on a frozen int8 base) by a module that holds the
original layer as ``base`` and adds the two small matrices. The model classes know nothing about LoRA.

**Fused projections.** Our attention computes q, k and v with one matrix ``W_qkv = [W_q; W_k; W_v]`` (rows
stacked). The two reference layouts differ:

* GPT-2 fuses them too (``c_attn``), and a LoRA on it is one pair: ``dW_qkv = s B A`` with B: [3C, r].
* Llama has three matrices (``q_proj``, ``k_proj``, ``v_proj``) and PEFT gives each its own pair, so stacked
  ``dW_qkv = s [B_q A_q; B_k A_k; B_v A_v]``. That is *not* one product ``B A`` of rank r: three independent
  A's give a rank up to 3r. It is one only when ``A_q = A_k = A_v``, i.e. one shared A with B split by rows.

One shared pair therefore exports exactly to separate adapters (every part gets A and its rows of B), but
separate adapters do not import into one shared pair. :class:`SplitLoRALinear` keeps one pair per part (q, k,
v, or any subset: PEFT's default Llama targets are q and v) on the fused layer, which is exactly PEFT's
separate adapters in both directions. ``LoRAConfig.qkv = "auto"`` uses it for every model except GPT-2-style
ones (learned positions), whose reference layout is the fused pair.

**Trainable token rows.** A chat template brings tokens that pretraining hardly used, above all the end-of-turn
token. Their output-head rows were trained only to keep them unlikely, and adapters on the hidden matrices can
reach them only by steering every hidden state towards a row that points away. ``LoRAConfig.tokens`` names a
few token ids whose embedding row and output-head row are trained directly (PEFT's ``trainable_token_indices``)::

    E'[i] = R_emb[k]    W_head'[i] = R_head[k]      for the k-th chosen id i;  every other row stays frozen

R starts as a copy of the base rows (an exact no-op). A tied model has one R for both uses. The embedding looks
the ids up as usual and puts R's row in where one of the ids occurs; the head computes its logits as usual and
replaces the chosen ids' logits by ``h R_head^T``: no [V, C] copy of the table is made, and only the n x C rows
get gradients and optimiser state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zenlm.errors import ConfigError
from zenlm.models.int8 import Int8Embedding, Int8Linear

# Layer groups a target list may name. A pattern matches the *end* of a dotted module name, one component per
# dotted part, with fnmatch wildcards inside a component ("*attn.qkv" matches blocks.0.attn.qkv and
# dec_blocks.0.self_attn.qkv; "blocks.*.qkv" is BERT's flat block and never GPT's blocks.0.attn.qkv).
GROUPS: dict[str, tuple[str, ...]] = {
    "attn": ("*attn.qkv", "*attn.q", "*attn.kv", "*attn.proj", "blocks.*.qkv", "blocks.*.proj"),
    "mlp": ("mlp.*", "blocks.*.fc", "blocks.*.out"),
}
GROUPS["all"] = GROUPS["attn"] + GROUPS["mlp"]
# Fused projections and the parts stacked (by rows) in them, in order.
FUSED_PARTS: dict[str, tuple[str, ...]] = {"qkv": ("q", "k", "v"), "kv": ("k", "v")}
QKV_MODES = ("auto", "fused", "split")

Linearish = nn.Linear | Int8Linear


@dataclass
class LoRAConfig:
    """What to adapt and how.

    rank:    r, the inner size of B A
    alpha:   the update is scaled by alpha / rank
    dropout: dropout on the adapter's input while training (the base path never sees it)
    targets: which linear layers get an adapter. Each entry is a group (``attn``: the attention projections,
             ``mlp``: the feed-forward layers, ``all``: both), one part of the fused attention projection
             (``q``, ``k``, ``v``), or a module-name pattern matched against the end of the names with ``*``
             inside one component (``attn.proj``, ``blocks.0.mlp.*``, ``lm_head``). Every entry must match
             some layer.
    qkv:     ``split`` gives each part of a fused q/k/v projection its own A and B (Llama / PEFT layout),
             ``fused`` one pair for the whole projection (GPT-2 layout); ``auto`` picks ``fused`` for models with
             learned positions (GPT-2 style) and ``split`` for all others
    tokens:  tokens whose embedding and output-head rows are trained beside the adapters (decoder-only models):
             ``auto`` (the recipe's choice: ``finetune chat`` takes the special tokens its conversations use, such
             as the end-of-turn token; other recipes none), ``none``, or token ids and token strings
             (``<|eos|>``); a recipe resolves the strings with its tokenizer before the adapters are made
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("all",)
    qkv: str = "auto"
    tokens: tuple[str, ...] = ("auto",)

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        self.targets = tuple(t for target in self.targets for t in str(target).replace(",", " ").split())
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"LoRA rank must be an integer >= 1, got {self.rank!r}.")
        if not self.alpha > 0:
            raise ConfigError(f"LoRA alpha must be > 0, got {self.alpha!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}.")
        if not self.targets:
            raise ConfigError("LoRA needs at least one target (attn, mlp, all, q, k, v or a module-name pattern).")
        if self.qkv not in QKV_MODES:
            raise ConfigError(f"LoRA qkv={self.qkv!r} is not supported; choose one of {', '.join(QKV_MODES)}.")
        self.alpha = float(self.alpha)
        self.dropout = float(self.dropout)
        # one string is a comma/space separated list (the Python API); list entries are taken whole, so a
        # token such as "," can be named from the command line; digits are ids
        raw = self.tokens.replace(",", " ").split() if isinstance(self.tokens, str) else \
            [self.tokens] if isinstance(self.tokens, int) else list(self.tokens)
        self.tokens = tuple(int(t) if isinstance(t, int) or str(t).isdigit() else str(t) for t in raw)  # type: ignore[assignment]
        if len(self.tokens) > 1 and ({"auto", "none"} & {str(t) for t in self.tokens}):
            raise ConfigError(f"LoRA tokens {list(self.tokens)}: 'auto' and 'none' stand alone.")

    @property
    def token_ids(self) -> tuple[int, ...]:
        """The resolved token ids (empty for ``auto`` and ``none``); ConfigError while a token string is left."""
        if self.tokens in (("auto",), ("none",), ()):
            return ()
        names = [t for t in self.tokens if not isinstance(t, int)]
        if names:
            raise ConfigError(f"LoRA tokens {names} are token strings; this recipe has no tokenizer to read them "
                              "with, give their ids instead.")
        return tuple(dict.fromkeys(self.tokens))  # type: ignore[arg-type]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets),
                "qkv": self.qkv, "tokens": list(self.tokens)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoRAConfig:
        # a run saved before trainable token rows existed has no "tokens": it trained none
        return cls(**{k: d[k] for k in ("rank", "alpha", "dropout", "targets", "qkv") if k in d},
                   tokens=tuple(d.get("tokens") or ("none",)))

    def with_tokens(self, tok: Any, auto: Sequence[int] = ()) -> LoRAConfig:
        """This config with ``tokens`` resolved to ids by tokenizer ``tok`` (:class:`zenlm.tokenizer.Tokenizer`):
        ``auto`` becomes ``auto`` (the recipe's choice, e.g. the special tokens a chat template writes), ``none``
        no ids; a token string must be one token of ``tok``."""
        if self.tokens == ("none",) or not self.tokens:
            return dataclasses.replace(self, tokens=())
        if self.tokens == ("auto",):
            return dataclasses.replace(self, tokens=tuple(int(i) for i in auto))
        ids: list[int] = []
        for t in self.tokens:
            if isinstance(t, int):
                i: int | None = t
            else:
                i = tok.token_to_id(t)
                if i is None:
                    raise ConfigError(f"LoRA token {t!r} is not one token of this tokenizer; give a token it has "
                                      "(e.g. its end-of-turn token) or a token id.")
            if not 0 <= i < tok.vocab_size:
                raise ConfigError(f"LoRA token id {i} is outside the tokenizer's {tok.vocab_size} ids.")
            ids.append(i)
        return dataclasses.replace(self, tokens=tuple(dict.fromkeys(ids)))


# ------------------------------------------------------------------------------------------------ layers


def _base_weight(base: Linearish) -> Tensor:
    """The weight the base layer computes with, in full precision: [out, in]."""
    return base.dequantized(torch.float32) if isinstance(base, Int8Linear) else base.weight.float()


def _new_pair(in_features: int, out_features: int, rank: int, like: Linearish) -> tuple[nn.Linear, nn.Linear]:
    """A [rank, in] (initialised like every nn.Linear: Kaiming-uniform) and B [out, rank] (zero)."""
    ref = next(t for t in [*like.parameters(), *like.buffers()] if t is not None)
    dtype = ref.dtype if ref.is_floating_point() else torch.float32
    lora_a = nn.Linear(in_features, rank, bias=False, device=ref.device, dtype=dtype)
    lora_b = nn.Linear(rank, out_features, bias=False, device=ref.device, dtype=dtype)
    nn.init.zeros_(lora_b.weight)
    return lora_a, lora_b


class _LoRABase(nn.Module):
    """What both adapter layers share: the frozen base layer, the scale and merging."""

    base: Linearish
    # optimisers that treat parameters by role (zenlm.train.optim.roles_of) give A and B to AdamW, never Muon
    param_roles: ClassVar[dict[str, str]] = {"lora_a": "adapter", "lora_b": "adapter"}

    def __init__(self, base: Linearish, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.scale = rank, float(alpha), float(alpha) / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self) -> Tensor:
        """The update this adapter adds to the base weight, ``(alpha / r) B A``: [out, in] (float32)."""
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight in place (``W += (alpha / r) B A``); forward then skips the
        adapter. An int8 base cannot hold the sum: use :func:`merge_and_unload`, which writes a float layer."""
        if self.merged:
            return
        if isinstance(self.base, Int8Linear):
            raise ConfigError("an int8 base layer cannot be merged in place; merge_and_unload() replaces it by a "
                              "full-precision layer instead.")
        self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`: ``W -= (alpha / r) B A``."""
        if not self.merged:
            return
        self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
        self.merged = False

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing what this layer computes: weight ``W + (alpha / r) B A`` (an int8 base
        is expanded to float32 first), the base's bias."""
        w = _base_weight(self.base)  # [out, in] float32
        if not self.merged:
            w = w + self.delta_weight()
        dtype = self.base.weight.dtype if isinstance(self.base, nn.Linear) else torch.float32
        out = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                        device=w.device, dtype=dtype)
        out.weight.copy_(w.to(dtype))
        if self.base.bias is not None:
            out.bias.copy_(self.base.bias.to(dtype))  # type: ignore[union-attr]
        return out


class LoRALinear(_LoRABase):
    """``y = base(x) + (alpha / r) * B(A(dropout(x)))`` around a frozen linear layer ``base``.

    base:   an ``nn.Linear`` or ``Int8Linear`` (its parameters are left frozen)
    lora_a: ``nn.Linear(in, r)``, its weight is A [r, in]
    lora_b: ``nn.Linear(r, out)``, its weight is B [out, r], zero at the start
    """

    def __init__(self, base: Linearish, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(base, rank, alpha, dropout)
        self.lora_a, self.lora_b = _new_pair(self.in_features, self.out_features, rank, base)

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., in] -> [..., out]"""
        y = self.base(x)  # W x + b
        if self.merged:
            return y
        # + (alpha / r) B A x, scaled while it is r wide and added in place: one out-wide temporary per call
        # instead of three, which keeps a CPU heap from fragmenting (and training's peak memory from growing)
        return y.add_(self.lora_b(self.lora_a(self.dropout(x)) * self.scale))

    def delta_weight(self) -> Tensor:
        return (self.lora_b.weight.float() @ self.lora_a.weight.float()) * self.scale

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


class SplitLoRALinear(_LoRABase):
    """A fused projection ``[W_q; W_k; W_v]`` with one LoRA pair per part: the rows of part p get
    ``(alpha / r) * B_p(A_p(dropout(x)))``; parts without a pair are left as they are.

    Stacked, the update is one product with a block-diagonal B (a zero block for a part without a pair)::

        [B_q A_q; B_k A_k; B_v A_v] = blockdiag(B_q, B_k, B_v) @ [A_q; A_k; A_v]      [out, 3r] @ [3r, in]

    so the forward pass is two small products, like :class:`LoRALinear`'s.

    parts:  part name -> number of rows, in the order they are stacked, e.g. {"q": H*D, "k": K*D, "v": K*D}
    lora_a: ``ModuleDict`` part -> ``nn.Linear(in, r)``;  lora_b: part -> ``nn.Linear(r, rows)`` (zero)
    """

    def __init__(self, base: Linearish, parts: dict[str, int], adapted: Sequence[str], rank: int, alpha: float,
                 dropout: float = 0.0) -> None:
        super().__init__(base, rank, alpha, dropout)
        if sum(parts.values()) != self.out_features:
            raise ConfigError(f"parts {parts} do not add up to the layer's {self.out_features} outputs.")
        unknown = [p for p in adapted if p not in parts]
        if unknown or not adapted:
            raise ConfigError(f"cannot adapt part(s) {unknown or list(adapted)} of a layer with parts {list(parts)}.")
        self.parts = dict(parts)
        pairs = {p: _new_pair(self.in_features, parts[p], rank, base) for p in parts if p in adapted}
        self.lora_a = nn.ModuleDict({p: a for p, (a, _) in pairs.items()})
        self.lora_b = nn.ModuleDict({p: b for p, (_, b) in pairs.items()})

    def stacked(self) -> tuple[Tensor, Tensor]:
        """[A_q; A_k; A_v] [n*r, in] and blockdiag(B_q, B_k, B_v) [out, n*r] over the n adapted parts (a part
        without a pair contributes zero rows)."""
        a_stack = torch.cat([self.lora_a[p].weight for p in self.lora_a], dim=0)
        blocks = [self.lora_b[p].weight if p in self.lora_b else a_stack.new_zeros(n, 0)
                  for p, n in self.parts.items()]
        return a_stack, torch.block_diag(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., in] -> [..., out]; each adapted part's rows get their own low-rank update."""
        y = self.base(x)  # W x + b, all parts
        if self.merged:
            return y
        a_stack, b_block = self.stacked()
        return y.add_(F.linear(F.linear(self.dropout(x), a_stack) * self.scale, b_block))

    def delta_weight(self) -> Tensor:
        """The parts' updates stacked like the parts: [out, in], zero rows for parts without a pair."""
        a_stack, b_block = self.stacked()
        return (b_block.float() @ a_stack.float()) * self.scale

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, parts={list(self.parts)}, adapted={list(self.lora_a)}"


LORA_LAYERS = (LoRALinear, SplitLoRALinear)


class TokenRows(nn.Module):
    """A frozen token embedding whose rows for a few ids are trained: ``emb(i) = R[k]`` when ``i = ids[k]``,
    else the base row.

    base: an ``nn.Embedding`` or ``Int8Embedding`` [V, C] (left frozen)
    rows: R [n, C], a parameter that starts as the base's rows of ``ids`` (so the layer starts as a no-op)
    """

    param_roles: ClassVar[dict[str, str]] = {"rows": "adapter"}

    def __init__(self, base: nn.Embedding | Int8Embedding, ids: Sequence[int]) -> None:
        super().__init__()
        self.base = base
        V = base.num_embeddings
        bad = [i for i in ids if not 0 <= int(i) < V]
        if bad or not ids:
            raise ConfigError(f"trainable token ids {bad or list(ids)} are not ids of this {V}-row embedding.")
        dev = base.scale.device if isinstance(base, Int8Embedding) else base.weight.device
        ids_n = torch.tensor([int(i) for i in ids], dtype=torch.long, device=dev)
        slot_v = torch.full((V,), -1, dtype=torch.long, device=dev)
        slot_v[ids_n] = torch.arange(len(ids_n), device=dev)
        self.register_buffer("ids", ids_n, persistent=False)    # [n] the chosen ids
        self.register_buffer("slot", slot_v, persistent=False)  # [V] id -> its row of R, or -1
        with torch.no_grad():
            self.rows = nn.Parameter(base(ids_n).detach().clone().float()
                                     if isinstance(base, Int8Embedding) else base.weight[ids_n].detach().clone())
        self.num_embeddings, self.embedding_dim = V, base.embedding_dim

    @property
    def weight(self) -> Tensor:
        """The table this layer looks up, [V, C] (a copy with R's rows in place: for inspection and export, not
        for the forward pass)."""
        w = self.base.weight if isinstance(self.base, nn.Embedding) else self.base.weight_int8.float() * \
            self.base.scale.float()[:, None]
        return w.detach().index_copy(0, self.ids, self.rows.detach().to(w.dtype))

    def forward(self, idx: Tensor) -> Tensor:
        """idx: [...] token ids -> [..., C]: the base's rows, R's for the chosen ids."""
        x = self.base(idx)
        k = self.slot[idx]  # [...] the row of R, or -1
        return torch.where((k >= 0).unsqueeze(-1), self.rows[k.clamp(min=0)].to(x.dtype), x)

    def merged_embedding(self) -> nn.Embedding:
        """A plain ``nn.Embedding`` holding the table this layer computes with (an int8 base expanded to float32)."""
        w = self.weight
        out = nn.Embedding(self.num_embeddings, self.embedding_dim, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w)
        return out

    def extra_repr(self) -> str:
        return f"ids={self.ids.tolist()}"


class TokenRowsHead(nn.Module):
    """An output head whose rows for the ids of a :class:`TokenRows` are trained: ``z = h W^T`` with the
    chosen ids' logits replaced by ``h R^T`` ([..., C] -> [..., V]).

    base:  the head layer (``nn.Linear`` or ``Int8Linear``), or None when the head is the embedding's own
           table (a tied model with a float table)
    rows:  an own R [n, C] for an untied head (starts as the head's rows); a tied head uses the embedding's R
    """

    param_roles: ClassVar[dict[str, str]] = {"rows": "adapter"}

    def __init__(self, base: Linearish | None, emb: TokenRows, tied: bool) -> None:
        super().__init__()
        self.base = base
        self._emb = [emb]  # not a submodule: its parameters are the embedding's, saved under tok_emb
        self.tied = tied
        self.register_buffer("ids", emb.ids.clone(), persistent=False)
        if tied:
            self.rows = None
        else:
            assert base is not None
            w = _base_weight(base)
            self.rows = nn.Parameter(w[self.ids].detach().clone().to(
                base.weight.dtype if isinstance(base, nn.Linear) else torch.float32))
        self.in_features, self.out_features = emb.embedding_dim, emb.num_embeddings

    def head_rows(self) -> Tensor:
        """R of this head: [n, C]."""
        return self._emb[0].rows if self.rows is None else self.rows

    @property
    def weight(self) -> Tensor:
        """The head matrix this layer computes with, [V, C] (a copy, for inspection and export)."""
        w = self._emb[0].base.weight if self.base is None else _base_weight(self.base)
        return w.detach().index_copy(0, self.ids, self.head_rows().detach().to(w.dtype))

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., C] -> logits [..., V]."""
        from zenlm.models.layers import mixed_linear

        z = mixed_linear(x, self._emb[0].base.weight) if self.base is None else self.base(x)
        z_rows = mixed_linear(x, self.head_rows())  # [..., n] the chosen ids' logits
        return z.index_copy(-1, self.ids, z_rows.to(z.dtype))

    def merged_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` (no bias) holding the head matrix this layer computes with."""
        w = self.weight
        out = nn.Linear(self.in_features, self.out_features, bias=False, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w)
        return out

    def extra_repr(self) -> str:
        return f"ids={self.ids.tolist()}, tied={self.tied}"


TOKEN_LAYERS = (TokenRows, TokenRowsHead)


def apply_token_rows(model: nn.Module, ids: Sequence[int]) -> None:
    """Train the embedding and output-head rows of token ``ids`` of decoder ``model`` (``tok_emb`` and
    ``lm_head``, or the table alone when tied), in place; the rest of both tables stays frozen."""
    from zenlm.models.gpt import GPT

    emb = getattr(model, "tok_emb", None)
    if not isinstance(model, GPT) or not isinstance(emb, (nn.Embedding, Int8Embedding)):
        raise ConfigError(f"trainable token rows are for decoder-only language models; this "
                          f"{type(model).__name__} has no token embedding and output head to train rows of. Use "
                          "--lora-tokens none.")
    head = model.lm_head
    if isinstance(head, LORA_LAYERS):
        raise ConfigError("the output head carries a LoRA adapter already; train either LoRA on lm_head or its "
                          "token rows (--lora-tokens none), not both.")
    for p in emb.parameters():
        p.requires_grad_(False)
    rows = TokenRows(emb, ids)
    model.tok_emb = rows
    if head is None:  # tied, float table
        model.lm_head = TokenRowsHead(None, rows, tied=True)
    else:  # an own head, or an int8 head that shares the int8 table (tied)
        for p in head.parameters():
            p.requires_grad_(False)
        shared = isinstance(head, Int8Linear) and isinstance(emb, Int8Embedding) and \
            head.weight_int8.data_ptr() == emb.weight_int8.data_ptr()
        model.lm_head = TokenRowsHead(head, rows, tied=shared)


def token_rows(model: nn.Module) -> TokenRows | None:
    """The model's :class:`TokenRows` embedding, if its token rows are trained."""
    emb = getattr(model, "tok_emb", None)
    return emb if isinstance(emb, TokenRows) else None


def _unload_token_rows(model: nn.Module) -> None:
    """Put plain layers back in place of the token-row layers, holding what they compute."""
    emb = token_rows(model)
    if emb is None:
        return
    head = model.lm_head
    model.tok_emb = emb.merged_embedding()
    if isinstance(head, TokenRowsHead):
        model.lm_head = None if head.tied else head.merged_linear()


# --------------------------------------------------------------------------------------------- targets


def _matches(pattern: str, name: str) -> bool:
    """Does ``pattern`` match the last components of the dotted ``name`` (fnmatch within each component)?"""
    p, n = pattern.split("."), name.split(".")
    return len(p) <= len(n) and all(fnmatchcase(c, pc) for c, pc in zip(n[len(n) - len(p):], p, strict=True))


def linear_layers(model: nn.Module) -> dict[str, Linearish]:
    """Every linear layer of ``model`` that LoRA can adapt, by module name (adapter internals excluded)."""
    inside = {id(m) for lora in model.modules() if isinstance(lora, LORA_LAYERS + TOKEN_LAYERS)
              for m in lora.modules()}
    # an int8 head tied to the int8 embedding (zenlm.models.int8.quantize_int8) is the embedding: not a layer
    tied = {m.weight_int8.data_ptr() for m in model.modules() if isinstance(m, Int8Embedding)}
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, Int8Linear)) and id(m) not in inside
            and not (isinstance(m, Int8Linear) and m.weight_int8.data_ptr() in tied)}


def _layer_summary(names: Sequence[str]) -> str:
    """Layer names with their block index replaced by * (one entry per kind of layer)."""
    seen: dict[str, None] = {}
    for n in names:
        seen[re.sub(r"\.\d+\.", ".*.", n)] = None
    return ", ".join(seen)


def _default_qkv(model: nn.Module) -> str:
    return "fused" if getattr(getattr(model, "config", None), "pos", None) == "learned" else "split"


def resolve_targets(model: nn.Module, cfg: LoRAConfig) -> dict[str, list[str] | None]:
    """Which layers ``cfg.targets`` selects: module name -> the parts adapted (a fused q/k/v layer in split
    mode) or None (the whole layer gets one pair). ConfigError naming the targets that match nothing and the
    layers there are."""
    layers = linear_layers(model)
    mode = _default_qkv(model) if cfg.qkv == "auto" else cfg.qkv
    chosen: dict[str, set[str]] = {}
    unmatched = []
    for target in cfg.targets:
        found = False
        for name in layers:
            leaf = name.rsplit(".", 1)[-1]
            if target in ("q", "k", "v"):
                if target in FUSED_PARTS.get(leaf, ()):
                    chosen.setdefault(name, set()).add(target)
                    found = True
                elif leaf == target:
                    chosen.setdefault(name, set())
                    found = True
            elif any(_matches(p, name) for p in GROUPS.get(target, (target,))):
                chosen.setdefault(name, set()).update(FUSED_PARTS.get(leaf, ()))
                found = True
        if not found:
            unmatched.append(target)
    if unmatched:
        raise ConfigError(
            f"LoRA target(s) {', '.join(map(repr, unmatched))} match no linear layer of this "
            f"{type(model).__name__}. Its linear layers are: {_layer_summary(list(layers))}. A target is a group "
            f"({', '.join(GROUPS)}), a part of the fused attention projection (q, k, v) or a pattern matched "
            "against the end of these names (* within one name part, e.g. attn.proj or mlp.*).")
    out: dict[str, list[str] | None] = {}
    for name in layers:  # in model order
        if name not in chosen:
            continue
        leaf = name.rsplit(".", 1)[-1]
        all_parts = FUSED_PARTS.get(leaf)
        if all_parts is None or mode == "split":
            out[name] = [p for p in all_parts if p in chosen[name]] if all_parts else None
        elif chosen[name] == set(all_parts):
            out[name] = None
        else:
            raise ConfigError(
                f"{name} is one fused {'/'.join(all_parts)} projection with one LoRA pair (qkv='fused', the GPT-2 "
                f"layout), so it cannot adapt only {', '.join(sorted(chosen[name]))}; target the whole layer "
                "(attn or qkv), or use qkv='split'.")
    return out


def _part_sizes(parent: nn.Module, leaf: str, base: Linearish) -> dict[str, int]:
    """Rows of each part of a fused projection (grouped-query attention has fewer k/v rows than q rows)."""
    names = FUSED_PARTS[leaf]
    if leaf == "qkv" and hasattr(parent, "n_kv_head"):
        H, K, D = parent.n_head, parent.n_kv_head, parent.head_dim
        return {"q": H * D, "k": K * D, "v": K * D}
    return {p: base.out_features // len(names) for p in names}


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, leaf = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), leaf


# --------------------------------------------------------------------------------------------- applying


def apply_lora(model: nn.Module, cfg: LoRAConfig, modules: dict[str, list[str] | None] | None = None
               ) -> dict[str, list[str] | None]:
    """Freeze every parameter of ``model`` and wrap the chosen linear layers in LoRA adapters, in place.

    modules: the layers to adapt as returned by :func:`resolve_targets` (name -> parts or None); None resolves
             ``cfg.targets``. A saved run passes its own list, so it rebuilds exactly the layers it trained.
    Returns the module map. Only the new A and B matrices (and the rows of ``cfg.token_ids``, see
    :func:`apply_token_rows`) require gradients afterwards (a task head built around ``model``, e.g. a
    classifier's, is not touched).
    """
    if has_lora(model):
        raise ConfigError("this model already has LoRA adapters; merge them first (merge_and_unload).")
    if modules is None:
        modules = resolve_targets(model, cfg)
    layers = linear_layers(model)
    missing = [n for n in modules if n not in layers]
    if missing:
        raise ConfigError(f"LoRA layer(s) {missing[:5]} do not exist in this {type(model).__name__}; its linear "
                          f"layers are: {_layer_summary(list(layers))}.")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, parts in modules.items():
        parent, leaf = _parent(model, name)
        base = layers[name]
        if parts is None:
            new: nn.Module = LoRALinear(base, cfg.rank, cfg.alpha, cfg.dropout)
        else:
            if leaf not in FUSED_PARTS:
                raise ConfigError(f"{name} is not a fused projection; it has no parts {parts}.")
            new = SplitLoRALinear(base, _part_sizes(parent, leaf, base), parts, cfg.rank, cfg.alpha, cfg.dropout)
        setattr(parent, leaf, new)
    if cfg.token_ids:
        apply_token_rows(model, cfg.token_ids)
    return dict(modules)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear | SplitLoRALinear]]:
    """(name, layer) of every LoRA layer in ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, LORA_LAYERS):
            yield name, m


def has_lora(model: nn.Module) -> bool:
    return any(True for _ in lora_layers(model)) or token_rows(model) is not None


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """What a LoRA run trains and saves: every parameter that requires a gradient (the A and B matrices, and a
    task head trained alongside them), by state-dict name. The frozen base stays in the base run."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def weights_fingerprint(model: nn.Module) -> str:
    """``sha256:<hex>`` over the name, dtype, shape and bytes of every tensor of ``model.state_dict()``, in name
    order: what a LoRA run records of its base, to refuse a base whose weights changed since."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # read in place, no copy of the bytes
    return f"sha256:{h.hexdigest()}"


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; int8 weights count as parameters of the base."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters()) + sum(
        m.weight_int8.numel() for m in model.modules() if isinstance(m, Int8Linear))
    return trainable, total


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight in place (``W += (alpha / r) B A``); returns ``model``."""
    for _, layer in lora_layers(model):
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_lora` (``W -= (alpha / r) B A``); returns ``model``."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every LoRA layer by a plain ``nn.Linear`` holding ``W + (alpha / r) B A`` (an int8 base becomes a
    float32 layer); returns ``model``, which is then an ordinary model again."""
    for name, layer in list(lora_layers(model)):
        parent, leaf = _parent(model, name)
        setattr(parent, leaf, layer.merged_linear())
    _unload_token_rows(model)
    return model


def describe_lora(model: nn.Module) -> str:
    """One line for progress messages: which layers carry adapters and how many parameters are trained."""
    names = [n for n, _ in lora_layers(model)]
    trainable, total = count_parameters(model)
    rows = token_rows(model)
    tokens = f"; embedding and head rows of token ids {rows.ids.tolist()}" if rows is not None else ""
    return (f"LoRA on {len(names)} layers ({_layer_summary(names)}){tokens}: {trainable:,} trainable of {total:,} "
            f"parameters ({trainable / max(total, 1):.2%})")


__all__ = ["LoRAConfig", "LoRALinear", "SplitLoRALinear", "LORA_LAYERS", "GROUPS", "FUSED_PARTS", "apply_lora",
           "resolve_targets", "linear_layers", "lora_layers", "has_lora", "adapter_state_dict", "count_parameters",
           "merge_lora", "unmerge_lora", "merge_and_unload", "describe_lora", "weights_fingerprint", "TokenRows",
           "TokenRowsHead", "apply_token_rows", "token_rows"]

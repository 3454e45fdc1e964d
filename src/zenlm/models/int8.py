"""Int8 weight-only quantisation of linear layers (per output channel).

Decoding one token at a time reads every weight once per step, so its speed is set by the bytes of weights
moved, not by arithmetic. Storing the weights of the linear layers as int8 moves a quarter of the fp32 bytes.
For a weight matrix W [N, K] (N outputs), each row n gets its own scale::

    s_n = max_k |W[n, k]| / 127                 # the row's largest weight maps to +-127
    q[n, k] = round(W[n, k] / s_n)  in [-127, 127]   (int8)
    y = x @ (q * s)^T + b  =  (x @ q^T) * s + b  # the scale is applied once per output, after the product

Per-channel scales keep the error small: a row with small weights is not forced onto a scale set by another
row's outliers. The rounding error of one weight is at most s_n / 2.

How it runs: on a CPU with at most ``PACK_MAX_ROWS`` rows (decoding a few sequences), PyTorch's
``_weight_int8pack_mm`` multiplies by the int8 matrix directly (about 2.5x faster than a dense bf16 product at
batch 1 for a 768x2304 matrix here). That kernel is fast for bf16 inputs only (fp32 inputs take a path about
15x slower). With fp32 activations the eager layer stays exact: the int8 matrix is expanded to fp32 for each
product, which makes eager int8 decoding with fp32 activations slow (a fifth of its bf16 twin's speed); the
compiled decode steps avoid it (:mod:`zenlm.compiled`, the default): one sequence reads int8 in its fused
multiply-and-sum loops (fp32 sums), and a batched step passes its rows through the int8 kernel rounded to bf16,
its sums scaled in fp32. In every other case (prompt prefill, scoring, GPUs) the int8 matrix is expanded to
the activation dtype first (exact in that dtype, no faster), a large one (a vocabulary's output head) a block of
rows at a time (:func:`expanded_product`), so that no float copy of it exists whole. Under ``torch.compile`` with one row (:mod:`zenlm.compiled`)
the product is written as a multiply-and-sum over the int8 matrix (:func:`~zenlm.models.layers.matvec`): the
compiler widens q to float inside its loop, so the int8 bytes are all that is read.
A tied embedding/output head becomes one int8 matrix with a scale per vocabulary row, used for both the
lookup and the head; an untied embedding stays in full precision (a lookup reads only a few rows).

Training through a frozen int8 layer (LoRA on an int8 base, :mod:`zenlm.models.lora`) needs only the gradient
with respect to the input, ``dL/dx = (dL/dy * s) @ q``. :class:`_Int8Matmul` computes it from the int8 matrix
again, so the backward pass keeps no full-precision copy of any weight alive (the plain expression would save
the expanded matrix of every layer until the backward pass reaches it: the memory of an fp32 model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zenlm.models.layers import matvec, one_row_as_sum

METHOD = "int8-weight-only"
_PACK_MM = getattr(torch, "_weight_int8pack_mm", None)
# The int8 kernel is built for matrix-vector work: past a few rows (prompt prefill, large batches) expanding
# the weight to bf16 and using the dense product is faster.
PACK_MAX_ROWS = 16
# The most elements of an int8 matrix expanded at once for a product of many input rows (a prompt's pass,
# scoring): a larger matrix is expanded a block of rows at a time. The expanded copy is a temporary, so this
# bounds the memory a pass takes beside the weights and activations: GPT-2's tied output head (50,257 x 768)
# expanded whole is 77 MB in bf16, 154 MB in fp32; in blocks of at most 4 Mi elements, 8 / 16 MB. Smaller
# matrices (GPT-2's layers: at most 2.4 M) are expanded whole: cut in two, their products were 15% slower
# (docs/BENCHMARKS.md, "int8: large matrices expanded a block of rows at a time").
EXPAND_ELEMENTS = 4 * 1024 * 1024


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def expanded_product(x_MK: Tensor, q_NK: Tensor, s_N: Tensor) -> Tensor:
    """``(x @ q^T) * s`` with q expanded to x's dtype, at most :data:`EXPAND_ELEMENTS` of it at a time -> [M, N]
    in x's dtype.

    A block of rows of q is a block of output columns, each the same sum over K as with q expanded whole (bit
    for bit in most shapes; where the library picks another kernel for the smaller product, within its
    rounding), and the temporary is one block, not the whole matrix."""
    N, K = q_NK.shape
    if N * K <= EXPAND_ELEMENTS:
        return F.linear(x_MK, q_NK.to(x_MK.dtype)) * s_N.to(x_MK.dtype)
    rows = max(1, EXPAND_ELEMENTS // K)
    y_MN = x_MK.new_empty(x_MK.shape[0], N)
    for n in range(0, N, rows):
        y_MN[:, n : n + rows] = F.linear(x_MK, q_NK[n : n + rows].to(x_MK.dtype))
    return y_MN.mul_(s_N.to(x_MK.dtype))


class _Int8Matmul(torch.autograd.Function):
    """``y = (x @ q^T) * s`` whose backward re-expands q: saves the int8 matrix, not a float copy of it."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x_MK: Tensor, q_NK: Tensor, s_N: Tensor) -> Tensor:
        ctx.save_for_backward(q_NK, s_N)
        ctx.x_dtype = x_MK.dtype  # type: ignore[attr-defined]
        return F.linear(x_MK, q_NK.to(x_MK.dtype)).mul_(s_N.to(x_MK.dtype))

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, g_MN: Tensor) -> tuple[Tensor, None, None]:
        q_NK, s_N = ctx.saved_tensors  # type: ignore[attr-defined]
        g_MK = (g_MN * s_N.to(g_MN.dtype)) @ q_NK.to(g_MN.dtype)  # dL/dx = (dL/dy * s) @ q
        return g_MK.to(ctx.x_dtype), None, None  # type: ignore[attr-defined]


class Int8Linear(nn.Module):
    """A linear layer whose weight is int8 with one scale per output channel: ``y = (x @ q^T) * s + b``.

    weight_int8: [out_features, in_features] int8;  scale: [out_features] (float);  bias: [out_features] or None.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """Quantise an ``nn.Linear`` (its weight is read in fp32)."""
        w_NK = linear.weight.detach()
        q = cls(linear.in_features, linear.out_features, linear.bias is not None).to(w_NK.device)
        q_NK, scale_N = quantize_rows(w_NK)
        q.weight_int8.copy_(q_NK)
        q.scale.copy_(scale_N)
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())  # type: ignore[union-attr]
        return q

    def dequantized(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight the layer computes with, ``q * s`` [out_features, in_features]."""
        return self.weight_int8.to(dtype) * self.scale.to(dtype)[:, None]

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., in_features] -> [..., out_features] in x's dtype."""
        x_MK = x.reshape(-1, self.in_features)
        if one_row_as_sum(x_MK.shape[0]):  # see zenlm.compiled: fused, reads int8
            y_MN = matvec(x_MK, self.weight_int8) * self.scale.to(x.dtype)
        elif x.requires_grad and torch.is_grad_enabled():  # training through a frozen int8 layer (LoRA)
            y_MN = _Int8Matmul.apply(x_MK, self.weight_int8, self.scale)
        elif x.dtype == torch.bfloat16 and self._packable(x_MK):
            y_MN = _PACK_MM(x_MK.contiguous(), self.weight_int8, self.scale.to(torch.bfloat16))
        elif x.dtype == torch.float32 and _tracing() and self._packable(x_MK):
            # a batched compiled decode step: the bf16 kernel, scaled in fp32 (see above). The kernel takes the
            # scale rounded to bf16 and the fp32 factor s / bf16(s) corrects it. (A constant scale of ones
            # instead is not a buffer Inductor hands the kernel: building the program failed.)
            s_N = self.scale.float()
            s16_N = s_N.to(torch.bfloat16)
            y_MN = _PACK_MM(x_MK.to(torch.bfloat16), self.weight_int8, s16_N).float() * (s_N / s16_N.float())
        else:
            y_MN = expanded_product(x_MK, self.weight_int8, self.scale)
        if self.bias is not None:
            y_MN = y_MN + self.bias.to(y_MN.dtype)
        return y_MN.reshape(*x.shape[:-1], self.out_features)

    def _packable(self, x_MK: Tensor) -> bool:
        """Whether the int8 kernel takes these rows: on a CPU, few rows, and in_features a multiple of 16 (the
        kernel reads 16 at a time; other widths crash it or give wrong sums, in torch 2.13)."""
        return (x_MK.device.type == "cpu" and _PACK_MM is not None and x_MK.shape[0] <= PACK_MAX_ROWS
                and self.in_features % 16 == 0)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Embedding(nn.Module):
    """A token embedding stored as int8 rows with one scale per row: ``emb[i] = q[i] * s[i]``.

    For a model whose output head is tied to its embedding, the same int8 matrix serves as the head (one scale
    per output channel = per vocabulary row), see :func:`quantize_int8`.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("weight_int8", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(num_embeddings))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> Int8Embedding:
        lin = Int8Linear.from_linear(_as_linear(emb.weight))
        q = cls(emb.num_embeddings, emb.embedding_dim).to(emb.weight.device)
        q.weight_int8.copy_(lin.weight_int8)
        q.scale.copy_(lin.scale)
        return q

    def forward(self, idx: Tensor) -> Tensor:
        """idx: [...] int64 -> [..., embedding_dim] in the scale's dtype."""
        return self.weight_int8[idx].to(self.scale.dtype) * self.scale[idx].unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


def quantize_rows(w_NK: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row int8 quantisation: w [N, K] (any float dtype) -> (q [N, K] int8, scale [N] float32), with
    ``scale_n = max_k |w[n, k]| / 127`` and ``q = round(w / scale)``. Rows are independent, so a large matrix
    can be quantised a block of rows at a time (lean loading does, see zenlm.rundir)."""
    w_NK = w_NK.float()
    scale_N = (w_NK.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    return torch.round(w_NK / scale_N[:, None]).clamp_(-127, 127).to(torch.int8), scale_N


def _as_linear(weight: Tensor) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device)
    lin.weight.data = weight.detach()
    return lin


def quantize_int8(model: nn.Module, *, empty: bool = False) -> nn.Module:
    """Replace every ``nn.Linear`` inside ``model`` by an :class:`Int8Linear`, in place; returns ``model``.

    A zenlm GPT with a tied output head (``lm_head is None``) also gets an :class:`Int8Embedding`, and an
    ``lm_head`` that shares its int8 matrix (decoding reads the head every step; it is stored once).
    empty: only change the structure (zero int8 weights), to load a quantised checkpoint into afterwards.
    """
    tied = getattr(model, "lm_head", 0) is None and isinstance(getattr(model, "tok_emb", None), nn.Embedding)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                if empty:
                    new = Int8Linear(child.in_features, child.out_features, child.bias is not None)
                    new = new.to(child.weight.device)
                else:
                    new = Int8Linear.from_linear(child)
                setattr(module, name, new)
    if tied:
        emb: nn.Embedding = model.tok_emb  # type: ignore[assignment]
        if empty:
            q_emb = Int8Embedding(emb.num_embeddings, emb.embedding_dim).to(emb.weight.device)
        else:
            q_emb = Int8Embedding.from_embedding(emb)
        head = Int8Linear(emb.embedding_dim, emb.num_embeddings, bias=False).to(emb.weight.device)
        head.weight_int8, head.scale = q_emb.weight_int8, q_emb.scale  # one matrix, two uses
        model.tok_emb, model.lm_head = q_emb, head
    return model


def dequantize_int8(model: nn.Module) -> nn.Module:
    """Undo :func:`quantize_int8` structurally, in place: every ``Int8Linear`` becomes an ``nn.Linear`` and an
    ``Int8Embedding`` an ``nn.Embedding`` holding ``q * s`` in float32 (a tied head becomes ``lm_head = None``
    again). The rounding of the quantisation stays; returns ``model``."""
    emb, head = getattr(model, "tok_emb", None), getattr(model, "lm_head", None)
    tied = isinstance(emb, Int8Embedding) and isinstance(head, Int8Linear) and \
        head.weight_int8.data_ptr() == emb.weight_int8.data_ptr()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Int8Linear):
                lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                device=child.scale.device)
                with torch.no_grad():
                    lin.weight.copy_(child.dequantized())
                    if child.bias is not None:
                        lin.bias.copy_(child.bias)
                setattr(module, name, lin)
            elif isinstance(child, Int8Embedding):
                e = nn.Embedding(child.num_embeddings, child.embedding_dim, device=child.scale.device)
                with torch.no_grad():
                    e.weight.copy_(child.weight_int8.float() * child.scale[:, None])
                setattr(module, name, e)
    if tied:
        model.lm_head = None
    return model


__all__ = ["Int8Linear", "Int8Embedding", "quantize_int8", "quantize_rows", "dequantize_int8", "expanded_product",
           "METHOD", "EXPAND_ELEMENTS"]

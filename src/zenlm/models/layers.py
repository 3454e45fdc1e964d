"""Building blocks of the Transformers: norms, rotary positions, MLPs (attention is :mod:`zenlm.models.attention`).

Shape letters used in tensor names:
    B batch, T new positions in this call, S positions attended over (keys), C model width,
    H query heads, K key/value heads, D head dim, F MLP hidden width.

Each piece is a small ``nn.Module`` that does one thing, sized by explicit arguments (not a model config);
:mod:`zenlm.models.gpt` and :mod:`zenlm.models.encdec` compose them into blocks.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

# ---------------------------------------------------------------------------------------------- norms


class RMSNorm(nn.Module):
    """Root-mean-square norm (Llama): ``y = x / sqrt(mean(x**2, last dim) + eps) * weight``.

    No centring and no bias, only a learned per-channel gain ``weight`` (initialised to 1).
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., dim] -> [..., dim]"""
        # F.rms_norm computes exactly the formula in the docstring, in one fused kernel (which needs the
        # weight in x's dtype: under autocast, q and k reach the qk-norm in bf16).
        return F.rms_norm(x, self.weight.shape, self.weight.to(x.dtype), self.eps)


@torch.no_grad()
def init_normal_(model: nn.Module, std: float) -> None:
    """The initialisation every model here starts from (GPT-2's and BERT's): each linear and embedding weight
    ~ N(0, std), linear biases 0, norm gains 1 (LayerNorm biases 0), module by module in ``model.modules()``
    order (so the random draws, and the weights, are the same for the same seed)."""
    for module in model.modules():
        if isinstance(module, (RMSNorm, nn.LayerNorm)):
            module.reset_parameters()
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


def make_norm(kind: str, dim: int, *, eps: float, bias: bool) -> nn.Module:
    """The norm ``kind`` over the last ``dim`` channels.

    "layernorm": ``(x - mean) / sqrt(var + eps) * weight + bias`` (bias only when ``bias``).
    "rmsnorm":   :class:`RMSNorm` (never a bias).
    """
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    return nn.LayerNorm(dim, eps=eps, bias=bias)


# ------------------------------------------------------------------------------------ rotary positions


class Rotary(nn.Module):
    """Rotary position embedding (RoPE) tables, precomputed for positions ``0 .. max_len-1``.

    Channel pair ``(i, i + D/2)`` of a head at position ``t`` is rotated by the angle
    ``t * theta ** (-2i / D)``. This is the "rotate half" layout used by Llama and Hugging Face, so
    weights imported from there need no permutation. The tables are non-persistent buffers: they follow
    ``.to(device)`` but are not saved in the state dict.
    """

    def __init__(
        self, head_dim: int, max_len: int, theta: float = 10000.0, scaling: dict | None = None
    ) -> None:
        super().__init__()
        self.head_dim, self.max_len, self.theta, self.scaling = head_dim, max_len, theta, scaling
        self.reset_buffers()

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """Compute the tables (on ``device``; default: the default device). A model built on the meta device
        gets meta tables, shapes only; lean loading (zenlm.rundir) computes them afterwards, on the CPU,
        as :func:`compute_buffers` does for every module that computes its buffers rather than loads them."""
        where = torch.device(device) if device is not None else torch.get_default_device()
        if where.type == "meta":  # shapes only: computing them on meta would import PyTorch's Python reference
            for name in ("cos", "sin"):  # kernels and the compiler (~75 MB, a second) for nothing
                self.register_buffer(name, torch.empty(self.max_len, self.head_dim, dtype=torch.float32, device=where),
                                     persistent=False)
            return
        inv_freq_D2 = rope_frequencies(self.head_dim, self.theta, self.scaling, device=device)
        t_T = torch.arange(self.max_len, dtype=torch.float64, device=device)
        angles_TD2 = torch.outer(t_T, inv_freq_D2)
        angles_TD = torch.cat([angles_TD2, angles_TD2], dim=-1)
        self.register_buffer("cos", angles_TD.cos().float(), persistent=False)  # [max_len, D]
        self.register_buffer("sin", angles_TD.sin().float(), persistent=False)  # [max_len, D]

    def forward(self, start: int, length: int) -> tuple[Tensor, Tensor]:
        """cos and sin for absolute positions ``start .. start+length-1``, each [length, D]."""
        return self.cos[start : start + length], self.sin[start : start + length]

    def at(self, pos_B: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin for one position per row, pos_B [B] -> each [B, 1, 1, D] (broadcast over heads)."""
        return self.cos[pos_B][:, None, None], self.sin[pos_B][:, None, None]


def compute_buffers(model: nn.Module, device: torch.device | str = "cpu") -> None:
    """Compute, on ``device``, the buffers that modules of ``model`` compute rather than load (those with a
    ``reset_buffers`` method, such as :class:`Rotary`) where they are still on the meta device."""
    for module in model.modules():
        if hasattr(module, "reset_buffers") and any(b.is_meta for b in module.buffers(recurse=False)):
            module.reset_buffers(device)


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None,
                     device: torch.device | str | None = None) -> Tensor:
    """The D/2 rotation frequencies ``theta ** (-2i / D)`` (float64), optionally rescaled for longer contexts:

    "linear":  every frequency divided by ``factor`` (positions interpolated);
    "llama3":  Llama 3.1's rule: wavelengths ``2*pi/f`` longer than ``original_max_position_embeddings /
               low_freq_factor`` are divided by ``factor``, those shorter than ``... / high_freq_factor`` are
               kept, and the band in between blends the two smoothly.
    """
    inv_freq_D2 = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    if scaling is None:
        return inv_freq_D2
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq_D2 / factor
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen_D2 = 2 * math.pi / inv_freq_D2
    scaled_D2 = torch.where(wavelen_D2 > old_len / low, inv_freq_D2 / factor, inv_freq_D2)
    smooth_D2 = (old_len / wavelen_D2 - low) / (high - low)
    blended_D2 = (1 - smooth_D2) * scaled_D2 / factor + smooth_D2 * scaled_D2
    medium_D2 = (wavelen_D2 >= old_len / high) & (wavelen_D2 <= old_len / low)
    return torch.where(medium_D2, blended_D2, scaled_D2)


def rotate_half(x: Tensor) -> Tensor:
    """[..., D] -> [..., D]: (x1, x2) -> (-x2, x1) where x1, x2 are the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x_BHTD: Tensor, cos_TD: Tensor, sin_TD: Tensor) -> Tensor:
    """Rotate queries or keys by their positions: ``x * cos + rotate_half(x) * sin``."""
    cos_TD, sin_TD = cos_TD.to(x_BHTD.dtype), sin_TD.to(x_BHTD.dtype)
    return x_BHTD * cos_TD + rotate_half(x_BHTD) * sin_TD


# ------------------------------------------------------------------------------------------------ MLPs


# While a compiled step is traced (zenlm.compiled), products with one row become multiply-and-sum loops
# (:func:`matvec`), unless the step is one of the batched family, whose rows must be computed exactly as at any
# other batch size: there every product stays a matrix product (see zenlm.compiled, "Batches").
_ONE_ROW_AS_SUM: contextvars.ContextVar[bool] = contextvars.ContextVar("zenlm_one_row_as_sum", default=True)


def one_row_as_sum(rows: int) -> bool:
    """True while a compiled one-sequence step is traced and a product has ``rows == 1``: use :func:`matvec`."""
    return (rows == 1 and _ONE_ROW_AS_SUM.get()
            and (torch.compiler.is_compiling() or torch.compiler.is_exporting()))


@contextlib.contextmanager
def matrix_products() -> Iterator[None]:
    """Within this block, a traced step keeps every product a matrix product, one row included."""
    token = _ONE_ROW_AS_SUM.set(False)
    try:
        yield
    finally:
        _ONE_ROW_AS_SUM.reset(token)


# A compiled one-row product sums this many blocks of W's rows side by side in one loop (see matvec).
MATVEC_BLOCKS = 8


def matvec(x: Tensor, w: Tensor) -> Tensor:
    """``x @ w^T`` for one row, written as a multiply-and-sum: x [..., K] (one row in all), w [N, K] of any
    dtype (int8 too) -> [..., N] in x's dtype, products and sums in fp32.

    Eagerly this is slower than ``F.linear`` (it builds the whole [N, K] product); it exists for
    ``torch.compile``, which fuses it into one loop that streams each row of w once and widens it to fp32 in
    registers: a matrix-vector product at memory speed (see :mod:`zenlm.compiled`). Two ways of writing it
    decide how fast that loop is. With both, compiled decoding on a 2-core Xeon went from 62 to 105 tokens/s
    (GPT-2, bf16), 78 to 128 (Llama layout, bf16), 103 to 156 and 150 to 219 (int8), and fp32 from MKL's one-row
    product to the loops (docs/BENCHMARKS.md, decode runs C and D):

    1. **Eight rows at a time.** Inductor sums a row of W in one vector accumulator, so each step of the sum
       waits for the one before (an add takes 4 cycles). W's rows are therefore cut into
       :data:`MATVEC_BLOCKS` blocks written as products of their own; Inductor fuses reductions of equal
       shape over the same x into one loop, so the loop walks 8 rows of W at once, with 8 independent
       accumulators (16 would need more registers than there are). The rows left over (N not a multiple of
       8, e.g. GPT-2's 50,257-token head) are one more product.
    2. **x read in its own dtype** (bf16 / fp16 activations): the product is written in x's dtype and summed
       in fp32, ``(x * w).sum(-1, dtype=float32)``. Inductor computes a fused expression in fp32 and rounds
       only what it stores (``emulate_precision_casts`` off, pinned in the compiled step's options), so the
       products are the fp32 ones all the same (``tests/test_compiled.py`` checks it). Written
       ``x.float() * w.float()``, the compiler stores a widened copy of x first, and a loop that reads an fp32
       x beside bf16 or int8 weights is vectorised 16 lanes wide; reading x narrow it runs 32 lanes wide.

    Both are for Inductor's C++ loops (CPU); on a GPU the product keeps its plain form.
    """
    return matvec_sums(x, w).to(x.dtype)


def matvec_sums(x: Tensor, w: Tensor) -> Tensor:
    """The fp32 sums of :func:`matvec`, before the cast back to x's dtype -> [..., N] float32."""
    if not (torch.compiler.is_compiling() or torch.compiler.is_exporting()) or w.device.type != "cpu":
        # eagerly, and on a GPU (where neither detail was measured): the plain form
        return (x.float().unsqueeze(-2) * w.float()).sum(-1)
    narrow = x.dtype in (torch.bfloat16, torch.float16)

    def product(w_part: Tensor) -> Tensor:
        if narrow:
            return (x.unsqueeze(-2) * w_part).sum(-1, dtype=torch.float32)
        return (x.float().unsqueeze(-2) * w_part.float()).sum(-1)

    N = w.shape[0]
    n = N // MATVEC_BLOCKS
    if n < 16:  # too few rows to be worth it
        return product(w)
    parts = [product(w[i * n : (i + 1) * n]) for i in range(MATVEC_BLOCKS)]
    if N > n * MATVEC_BLOCKS:
        parts.append(product(w[n * MATVEC_BLOCKS :]))
    return torch.cat(parts, -1)


# ------------------------------------------------------------------------- fp32 products at inference (CPU)
# PyTorch's CPU ``F.linear`` in fp32 calls the BLAS it was built with (MKL in the PyPI wheels). With the few rows
# of decoding that is far from the machine's speed on some CPUs: on our 2-core AMD EPYC test machine it reads a
# GPT-2 weight matrix at 5-6 GB/s for 2-16 rows (13 GB/s for one), where oneDNN's matrix product (the library
# behind PyTorch's bf16 products, ``torch.ops.mkldnn._linear_pointwise``) reads it at 12-22 GB/s (21 for one),
# and is 1.3-2x faster on prompt-sized products too (benchmarks/cpu_products.py, docs/BENCHMARKS.md). It also
# computes a row the same, bit for bit, whatever the number of rows from 2 up (the BLAS does not), so a batch
# row equals the same sequence decoded alone. One row is therefore sent as two copies of itself.
# MKL's fast kernels are Intel's own: on a 2-core Intel Xeon (AMX) the BLAS reads the weights 1.4x faster than
# oneDNN for one or two rows, and oneDNN wins at 4-16 rows (1.3-2x). So by default oneDNN takes the products on
# every CPU but Intel's, where a lone stream keeps MKL's speed; the price is that there a batch row is not bit
# for bit the same sequence alone (MKL rounds row 0 of GPT-2's matrices differently at 1-8 rows than at 16; in
# the server with oneDNN instead, one stream decoded 32% slower and 16 streams 5% faster). Except decode steps
# of ONEDNN_MIN_ROWS_INTEL rows or more (the server's and generate_batch's batches), which take oneDNN's
# products there too. $ZENLM_ONEDNN = 1 or 0 decides it either way, for every number of rows.
_ONEDNN_ENV = "ZENLM_ONEDNN"
# On an Intel CPU, decode steps of at least this many rows take oneDNN's fp32 products, fewer rows MKL's: on our
# 2-core Xeon the 48 layer matrices of GPT-2-small took, at 1 / 2 / 4 / 8 / 16 rows, 12.9 / 13.5 / 22.7 / 29.9 /
# 33.5 ms with MKL and 20.1 / 19.7 / 21.8 / 24.4 / 28.2 ms with oneDNN; in the server, oneDNN's products gave 4
# streams 14% more tokens/s than MKL's (docs/BENCHMARKS.md).
ONEDNN_MIN_ROWS_INTEL = 4


def _cpu_vendor() -> str:
    from zenlm.device import cpu_vendor  # imported here: zenlm.device is not needed to build a model

    return cpu_vendor()


def _has_onednn_products() -> bool:
    """Whether this PyTorch has oneDNN and its product with fused post-ops (``mkldnn._linear_pointwise``)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.lru_cache(maxsize=1)
def onednn_min_rows() -> int | None:
    """The fewest rows from which fp32 products at inference on CPU go through oneDNN (see above), or None for
    never: 1 when this PyTorch has oneDNN and the CPU is not an Intel one; on an Intel CPU,
    :data:`ONEDNN_MIN_ROWS_INTEL`, for decode steps only; ``$ZENLM_ONEDNN`` decides otherwise (1 / on / true /
    yes: 1 wherever oneDNN exists; 0 / off / false / no: None)."""
    if not _has_onednn_products():
        return None
    from zenlm.device import env_switch  # imported here, as in _cpu_vendor

    setting = env_switch(_ONEDNN_ENV)
    if setting is not None:
        return 1 if setting else None
    return ONEDNN_MIN_ROWS_INTEL if _cpu_vendor() == "GenuineIntel" else 1


def onednn_products() -> bool:
    """Whether every fp32 product at inference on CPU goes through oneDNN, whatever its rows (see
    :func:`onednn_min_rows`)."""
    return onednn_min_rows() == 1


def onednn_linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """``x @ w^T + b`` by oneDNN: x [..., K], w [N, K], b [N] or None, all fp32 on CPU -> [..., N]. No autograd
    (inference only). One row is computed as two equal rows (see above)."""
    return _onednn_product(x, w, b, "none", "")


def _onednn_product(x: Tensor, w: Tensor, b: Tensor | None, post_op: str, algorithm: str) -> Tensor:
    """``post_op(x @ w^T + b)`` in one oneDNN call, x [..., K] -> [..., N]; one row computed as two equal rows."""
    x_MK = x.reshape(-1, x.shape[-1])
    one = x_MK.shape[0] == 1
    if one:
        x_MK = x_MK.expand(2, -1)
    y_MN = torch.ops.mkldnn._linear_pointwise(x_MK.contiguous(), w, b, post_op, [], algorithm)
    return (y_MN[:1] if one else y_MN).reshape(*x.shape[:-1], w.shape[0])


class _OneDNNProducts(TorchFunctionMode):
    """While active, every fp32 CPU ``F.linear`` that needs no gradient runs through :func:`onednn_linear`
    (not under autocast, which picks its own dtype; a one-row product of a compiled one-sequence step is left
    to :func:`matvec`)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if (x.dtype == torch.float32 and w.dtype == torch.float32 and x.device.type == "cpu"
                    and w.dim() == 2 and w.is_contiguous() and x.dim() >= 1 and x.numel() > 0
                    and (b is None or (b.dtype == torch.float32 and b.dim() == 1))
                    and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad
                                                          or (b is not None and b.requires_grad)))
                    and not torch.is_autocast_enabled("cpu")  # autocast chooses its own dtype
                    and not one_row_as_sum(x.numel() // max(1, x.shape[-1]))):
                return onednn_linear(x, w, b)
        return func(*args, **kwargs)


def inference_products(device: torch.device, dtype: torch.dtype,
                       step_rows: int | None = None) -> contextlib.AbstractContextManager:
    """The context an inference pass runs its products in: :class:`_OneDNNProducts` for fp32 on a CPU when no
    gradient is recorded and either :func:`onednn_products`, or the pass is a decode step of ``step_rows`` rows,
    at least :func:`onednn_min_rows`; else nothing."""
    least = onednn_min_rows()
    if (device.type == "cpu" and dtype == torch.float32 and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu") and least is not None
            and (least == 1 or (step_rows is not None and step_rows >= least))):
        return _OneDNNProducts()
    return contextlib.nullcontext()


# Up to this many rows, a product with weights narrower than the activations rounds the rows to the weights'
# dtype (reading the narrow weights once); past it (prompt prefill) the weights are widened once instead.
NARROW_MAX_ROWS = 16


def mixed_linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """``x @ w^T + b`` where w may be kept in a narrower float dtype than x (bf16 weights, fp32 activations on a
    CPU without native bf16, see :func:`zenlm.device.inference_precision`) -> [..., N] in x's dtype.

    Same dtypes: ``F.linear``. Otherwise: one row in a compiled step: :func:`matvec` (fp32 sums, w widened in
    registers); up to ``NARROW_MAX_ROWS`` rows eagerly: the rows rounded to w's dtype (the product reads the
    narrow weights, which is what decoding pays for); more rows (a prompt): w widened to x's dtype once for the
    whole product.
    """
    if w.dtype == x.dtype:
        return F.linear(x, w, b)
    rows = x.numel() // x.shape[-1]
    if one_row_as_sum(rows):
        y = matvec(x, w)
    elif rows <= NARROW_MAX_ROWS:
        y = F.linear(x.to(w.dtype), w).to(x.dtype)
    else:
        y = F.linear(x, w.to(x.dtype))
    return y if b is None else y + b.to(y.dtype)


class NarrowLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters, same state-dict names) whose weight may be kept in a narrower float
    dtype than its input: ``y = x @ W^T + b`` through :func:`mixed_linear`. Loading a run with bf16 weights
    for fp32 activations swaps these in (zenlm.rundir)."""

    def forward(self, x: Tensor) -> Tensor:
        return mixed_linear(x, self.weight, self.bias)


def narrow_linears(model: nn.Module) -> nn.Module:
    """Replace every plain ``nn.Linear`` inside ``model`` by a :class:`NarrowLinear` of the same shape, on the
    same device, in place (the weights are not copied: call it before loading them); returns ``model``."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, NarrowLinear(child.in_features, child.out_features, child.bias is not None,
                                                   device=child.weight.device, dtype=child.weight.dtype))
    return model


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU with the tanh approximation (GPT-2's ``gelu_new``)."""
    return F.gelu(x, approximate="tanh")


def relu_squared(x: Tensor) -> Tensor:
    """relu(x)**2 (squared ReLU, Primer)."""
    return F.relu(x).square()


# ------------------------------------------------------------- a prompt's first feed-forward product, fused with GELU
# ATen computes GPT-2's tanh GELU about 5x slower than its erf GELU, and as a pass of its own over the [rows, F]
# product (read, then write the same size again). oneDNN's product applies an activation to each block of its
# output while the block is still in cache: ``torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "tanh")``.
# On a 2-core Xeon (AVX-512 BF16, AMX) GPT-2-small's prompt passes were 1.06-1.10x faster so in fp32 and
# 1.03-1.13x in bf16, prompts of 1 x 32 to 16 x 60 tokens (benchmarks/prefill_fusion.py, docs/BENCHMARKS.md). It
# rounds once where ATen rounds twice (bf16: the product, then GELU's output), so bf16 results differ in the
# last bit, fp32 ones by ~1e-6. Only passes over two or more positions per sequence take it (prompts, scoring,
# evaluation), whatever the number of sequences: decode steps (one position) keep their products and so their
# numbers, eager or compiled, and a prompt comes out the same alone or prefilled with others of its length
# (oneDNN computes a row the same whatever the number of rows, from 2 up).
_FUSED_GELU_ENV = "ZENLM_FUSED_GELU"


@functools.lru_cache(maxsize=1)
def _fused_gelu_dtypes() -> frozenset[torch.dtype]:
    """The dtypes whose prompt-sized GELU products go through oneDNN here: fp32 wherever this PyTorch has oneDNN,
    bf16 where the CPU computes it natively too (elsewhere oneDNN emulates bf16); none when
    ``$ZENLM_FUSED_GELU`` is 0 / off / false / no."""
    from zenlm.device import cpu_has_bf16, env_switch  # imported here, as in _cpu_vendor

    if env_switch(_FUSED_GELU_ENV) is False or not _has_onednn_products():
        return frozenset()
    return frozenset({torch.float32, torch.bfloat16} if cpu_has_bf16() else {torch.float32})


def fused_gelu_applies(x: Tensor, lin: nn.Module) -> bool:
    """Whether ``gelu_tanh(lin(x))`` may run as one oneDNN call (see above): x [..., T, C] with T >= 2, on a CPU,
    through a plain ``nn.Linear`` (not an int8, narrow or adapted one) of x's dtype, no gradient wanted, no
    autocast, and not while torch.compile or torch.export traces the model (their graphs keep the plain ops)."""
    if type(lin) is not nn.Linear:
        return False
    w = lin.weight
    return (x.device.type == "cpu" and x.dtype == w.dtype and x.dim() >= 3 and x.shape[-2] >= 2
            and w.is_contiguous()
            and x.dtype in _fused_gelu_dtypes()
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad
                                                  or (lin.bias is not None and lin.bias.requires_grad)))
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def fused_linear_gelu(x: Tensor, lin: nn.Linear) -> Tensor:
    """``gelu_tanh(x @ lin.weight^T + lin.bias)`` in one oneDNN call: x [..., C] -> [..., F]. No autograd."""
    return _onednn_product(x, lin.weight, lin.bias, "gelu", "tanh")


class MLP(nn.Module):
    """Two-layer feed-forward: ``proj(act(fc(x)))``, C -> F -> C. A prompt's ``act(fc(x))`` with GPT-2's GELU
    is one fused call at inference on a CPU (:func:`fused_gelu_applies`)."""

    def __init__(self, n_embd: int, hidden: int, bias: bool, act: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, hidden, bias=bias)
        self.act = act
        self.proj = nn.Linear(hidden, n_embd, bias=bias)

    def forward(self, x_BTC: Tensor) -> Tensor:
        """[B, T, C] -> [B, T, C]"""
        if self.act is gelu_tanh and fused_gelu_applies(x_BTC, self.fc):
            return self.proj(fused_linear_gelu(x_BTC, self.fc))
        return self.proj(self.act(self.fc(x_BTC)))


class SwiGLU(nn.Module):
    """Gated feed-forward (Llama): ``proj(silu(gate(x)) * up(x))``, C -> F -> C.

    ``gate`` and ``up`` are two separate matrices (not one fused matrix) so that each is a plain
    [F, C] weight: this maps one-to-one onto Llama's gate_proj / up_proj and lets matrix-wise
    optimisers treat them as the two independent matrices they are.
    """

    def __init__(self, n_embd: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.gate = nn.Linear(n_embd, hidden, bias=bias)
        self.up = nn.Linear(n_embd, hidden, bias=bias)
        self.proj = nn.Linear(hidden, n_embd, bias=bias)

    def forward(self, x_BTC: Tensor) -> Tensor:
        """[B, T, C] -> [B, T, C]"""
        return self.proj(F.silu(self.gate(x_BTC)) * self.up(x_BTC))


def make_mlp(kind: str, n_embd: int, hidden: int, *, bias: bool) -> nn.Module:
    """The feed-forward ``kind``, C = n_embd -> F = hidden -> C: "gelu" (GPT-2's tanh approximation),
    "relu2" (squared ReLU) or "swiglu" (Llama).

    Every variant names its output matrix ``proj`` (the GPT-2-style scaled initialisation finds it there).
    """
    if kind == "swiglu":
        return SwiGLU(n_embd, hidden, bias)
    act = gelu_tanh if kind == "gelu" else relu_squared
    return MLP(n_embd, hidden, bias, act)


__all__ = [
    "RMSNorm",
    "make_norm",
    "Rotary",
    "compute_buffers",
    "rope_frequencies",
    "rotate_half",
    "apply_rotary",
    "MLP",
    "SwiGLU",
    "make_mlp",
    "gelu_tanh",
    "relu_squared",
    "matvec",
    "one_row_as_sum",
    "matrix_products",
    "mixed_linear",
    "NarrowLinear",
    "narrow_linears",
    "NARROW_MAX_ROWS",
    "fused_gelu_applies",
    "fused_linear_gelu",
]

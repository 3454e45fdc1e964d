"""The decode step compiled by Inductor (ahead of time on CPU): one sequence's next token at memory speed.

Decoding one sequence does about 2 flops per weight and reads every weight once per token, so a step can
be no faster than (bytes of weights) / (memory bandwidth): the *bandwidth floor*. Eager PyTorch on a CPU
stays well above it. A matrix-vector product ``F.linear`` with one input row reads its weights at 10–13
GB/s on our 2-core test machine, whose memory copies run at 25–40 GB/s, and a step of a 12-layer model is
about 250 separate operator calls. :class:`CompiledDecoder` compiles the model's own step,
:meth:`GPT.decode_step <zenlm.models.gpt.GPT.decode_step>` (same modules, same formulas), into one program,
with six choices that decide its speed:

1. **Matrix-vector products as multiply-and-sum.** While tracing, every ``F.linear`` whose input has one row
   is rewritten ``y = (x[None, :] * W).sum(-1)``, products and sums in fp32, cast back to x's dtype
   (:func:`~zenlm.models.layers.matvec`). Inductor, the compiler, emits that as a loop that streams W's rows
   once with vector instructions, widening bf16 or int8 weights to fp32 in registers, the rows split across
   threads. :class:`~zenlm.models.int8.Int8Linear` does the same with its int8 matrix, and its per-channel
   scale multiplies the sums. Two details of how it is written make that loop fast: it walks 8 rows of W at
   once (8 independent sums), and it reads bf16 activations as bf16. On a 2-core Xeon the loops beat the
   wheel's BLAS (MKL) in fp32 too (a GPT-2 step 17 against 20 ms), and read bf16 and int8 weights at 25-27
   GB/s, close to the memory's speed.
2. **No recomputation inside those loops.** Left to itself, Inductor folds cheap producers into their
   consumers. For a product that means recomputing, e.g., the layer norm of x once per output row (3,072
   times for GPT-2's MLP). ``realize_opcount_threshold = 0`` makes it compute every such vector once.
3. **The cache is written in place.** Each layer's keys/values are a tensor of their own
   (:class:`~zenlm.models.cache.KVCache`), so writing the new key into layer i's cache is an in-place write into
   a program input. A slice of one big tensor would make the compiled program copy the layer's cache every
   step.
4. **One program for all positions.** The number of keys S grows by one each step. The step takes
   ``arange(S)`` as an input whose length is marked dynamic, so it compiles once, not once per length.

5. **No Python between the kernels** (backend ``"aot"``, the CPU default). ``torch.compile`` keeps a
   Python wrapper that runs the kernels one by one and, before each call, checks its guards against ~150
   weight inputs. For a small step that overhead is large: a 12-layer model with tiny matrices still takes
   1.6-2 ms per step that way. So on CPU the step is exported once (``torch.export``) and compiled ahead of
   time by AOTInductor into a shared library with a C++ wrapper; a call goes straight into it. This made an
   int8 GPT-2 step 15-20% faster here (~6.5 vs ~7.5 ms). The library holds no weights: it reads the model's
   own tensors where they are, so it is kept on disk (:func:`cache_dir`) and reused by later processes and
   by other models of the same architecture and dtypes. A call runs without Python's interpreter lock (the
   library is called through its C interface, :class:`_Program`), so other threads run during a step: the
   server's event loop reads requests and sends tokens meanwhile.
6. **Attention written out.** The step's attention is :func:`~zenlm.models.attention.decode_attention`: the
   scores, the softmax and the weighted sum as plain tensor operations in fp32, which Inductor fuses into loops
   that read a bf16 cache as bf16. The fused attention kernel (SDPA) it replaces attends a bf16 cache in fp32
   only after copying it into a new fp32 tensor on every step: on a 2-core Xeon a 16-row bf16 GPT-2 step over
   256 keys took 37.3 ms that way and 29.1 ms written out (105.9 against 42.0 ms over 512 keys;
   ``benchmarks/batched_step.py``). In fp32 the two are level. The loops over keys are planned
   for :data:`EXAMPLE_KEYS` keys, the length of the example the step is exported with.

Batches (``batched=True``: :func:`zenlm.generate.generate_batch` and the server). The multiply-and-sum form
reads W once per input row, so it serves one sequence only; a batch keeps every product a matrix product (each
weight read once for all rows). A batched program is built for a few batch sizes only, the powers of two (1, 2,
4, 8, 16, 32, ...) up to the size of the cache pool, and a step of R rows runs the next size up, its spare rows
fed token 0 at position 0 of cache rows nobody uses. What a row gets must not depend on the other rows (the
batch-invariance tests hold the compiled path to it, as the eager one): in the batched family every product is
a matrix product for every batch size, 1 included (in fp32 on a CPU through oneDNN, as eager inference does,
:func:`~zenlm.models.layers.inference_products`: it computes a row the same for any number of rows, a single
row being sent as two copies of itself; it also reads the weights 2-3x faster than the BLAS at 2-16 rows on
AMD. Intel CPUs keep the BLAS, MKL, for steps of fewer than
:data:`~zenlm.models.layers.ONEDNN_MIN_ROWS_INTEL` rows, where it is faster there, and take oneDNN from that
many rows up, where oneDNN is; MKL rounds a row differently at another number of rows at GPT-2 widths, and the
two libraries round differently from each other: there fp32 rows may differ in the last bits, and
``ZENLM_ONEDNN=1`` makes them bit-equal), and the attention's sums over keys must not split differently when the longest row is
longer. The attention's loops (point 6) keep them apart: a masked key adds an exact zero to every sum, so a row
gets the same bits whatever the other rows are and however many key slots the call reads past its own
(``tests/test_attention.py``), provided the call reads its key slots in whole blocks of :data:`KEY_BLOCK`
(S rounded up, the extra slots masked out): a vectorised loop treats a last partial block of keys on its own.
In bf16 on a CPU whose oneDNN computes bf16, a batched program's products read prepacked copies of the layer
matrices (:data:`PACKED_ENV`): oneDNN's bf16 product of a matrix as stored re-blocks it as it goes and reads it
at about half the memory's speed; prepacked once, the same product is about twice as fast (with the same bits
wherever we checked). The
program is traced with the matrices as stored and given the copies when it is loaded (:func:`_open`); the
build checks that nothing but those products reads them. The one-sequence programs (``generate``, ``chat``) use
the faster multiply-and-sum form and may differ from a batch row in the last bits. A program is specialised to its batch size and to the cache's length and dtype; another
cache length compiles again.

Costs: building a program takes about 20-45 s for a GPT-2-small model on 2 CPU cores (export ~6 s, then
AOTInductor; a one-sequence program 39-43 s on a 2-core Xeon, a batched one 22 s: ``benchmarks/program_build.py``),
its two C++ files compiled side by side (:class:`_WrapperBesideKernels`, 1.23-1.30x sooner for a one-sequence
program); loading it from the disk cache in a later process takes about a second. (The
``"dynamo"`` backend compiles in 20-30 s, 5-15 s from Inductor's disk cache, in every new process.) So by
default (``compile=None`` in :class:`~zenlm.generate.GenerationConfig`, the server, the CLI) a program that is
not on disk yet is built in the background by a separate low-priority process while the tokens are decoded
eagerly, and the step switches to the program when it is ready (:func:`decoder_for`); the build finishes even
if the process that asked for it ends first, so the next run starts compiled. Programs asked for together (a
server's batch sizes, :meth:`CompiledDecoder.prepare` with several row counts) are built one after another by
one such process, which imports PyTorch and its compiler once, and each is loaded as soon as it is on disk: the
five of a GPT-2-small server took 125-129 s instead of 156-177 s with a process each (2-core Xeon, bf16), and
about 100 s with the C++ files side by side. Such a process gives Inductor a work folder of its own in the
program cache and removes it when it ends (:func:`_work_folder`), so that no sources or objects pile up in
Inductor's shared folder; a build in this process (``compile=True``, a model the process cannot rebuild) leaves
them there, as Inductor does.
``compile=True`` waits for the build instead, ``compile=False`` (``--no-compile``) never compiles, and
``ZENLM_COMPILE=0`` in the environment makes eager the default. Compiling needs a C++ compiler on CPU (gcc or clang; without one the default decodes
eagerly after a one-line notice) and Triton on a GPU (where the default decodes eagerly). Outputs: fp32 logits
agree with eager decoding to about 1e-5 (the sums run in another order), so greedy tokens are the same except at
near-ties. The first and the last key slot of a cache (one key; a full cache) are outside the program's range
and run eagerly.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import json
import logging
import os
import platform
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
import weakref
import zipfile
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from zenlm.config import GPTConfig
from zenlm.device import env_switch, meta_build
from zenlm.errors import ConfigError
from zenlm.models.cache import KVCache
from zenlm.models.gpt import GPT
from zenlm.models.int8 import Int8Linear, quantize_int8
from zenlm.models.layers import (
    NarrowLinear,
    compute_buffers,
    inference_products,
    matrix_products,
    matvec,
    narrow_linears,
    onednn_min_rows,
)

# Inductor settings of the compiled step (names checked against the installed torch, see _options):
# realize_opcount_threshold 0: compute each intermediate vector once (point 2 above);
# size_asserts / alignment_asserts off: the generated Python wrapper otherwise checks the shape, strides and
# alignment of each of its ~150 inputs (every weight) on every call, ~0.6 ms of a 7 ms int8 GPT-2 step.
# emulate_precision_casts off (Inductor's default, pinned): a fused expression is computed in fp32 and rounded
# only where stored, which the narrow form of matvec relies on for fp32 products (zenlm.models.layers.matvec).
# always_keep_tensor_constants on: Inductor otherwise writes the values of 1-d weights of at most 8 entries (the
# q/k-norm gains of a model with 8-wide heads, a tiny model's biases) into the program's code, so that a program
# built in a background process (empty tensors) or for another model of the same shape would decode with those
# values, not the model's own (a program reads the model's tensors where they are, see point 5 above).
_INDUCTOR_OPTIONS = {"realize_opcount_threshold": 0, "size_asserts": False, "alignment_asserts": False,
                     "emulate_precision_casts": False, "always_keep_tensor_constants": True}

# A step reads its key slots in whole blocks of this many: S is rounded up (the extra slots are masked out), so
# that no loop over keys has a partial last block whose length depends on the other rows ("Batches" above).
KEY_BLOCK = 16
# The number of key slots in the example a program is exported with. Inductor plans its loops over the keys (S,
# a dynamic size) for this many: with 2, it ran the softmax of a 16-row step on one thread.
EXAMPLE_KEYS = 256
# Setting this environment variable to 0 (or off / false / no) makes eager decoding the default (compile=None).
ENV_SWITCH = "ZENLM_COMPILE"
_CANNOT_REBUILD = 3  # exit status of a build process that cannot rebuild the model from its description
_WORK_PREFIX = "inductor-work"  # a build process's folder for Inductor's work files (see _work_folder)


class _LinearsAsReductions(TorchFunctionMode):
    """While active, ``F.linear(x, W, b)`` with one row in x becomes :func:`matvec` ``+ b``.

    Only under ``torch.compile`` is this faster (it fuses into one streaming loop); run eagerly, it would
    materialise the whole product ``x * W``.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if x.numel() == x.shape[-1]:  # one row
                y = matvec(x, w)
                return y if b is None else y + b.to(y.dtype)
        return func(*args, **kwargs)


# ---------------------------------------------------------------------- prepacked bf16 layer matrices
# A batched bf16 program on a CPU multiplies by copies of the layer matrices that oneDNN has laid out once in the
# blocks its bf16 kernel reads (``torch.ops.mkldnn._reorder_linear_weight``): the same values, read about twice
# as fast. On our 2-core Xeon the 48 matrices of GPT-2-small took 7.0-7.6 ms for 1-16 rows that way against
# 15-16 ms as stored (each product re-blocks the matrix as it goes), with the same bits at every number of rows
# we tried (1-240). A batch row stays independent of the other rows either way: every batch size reads the copies.
# The copies cost the matrices' bytes again (a tied head's included). ``$ZENLM_PACKED_WEIGHTS`` = 0 (off / false /
# no) turns them off.
PACKED_ENV = "ZENLM_PACKED_WEIGHTS"


# Whether a program's call lets go of Python's interpreter lock (see :class:`_Program`): yes unless
# ``$ZENLM_RELEASE_GIL`` = 0 (off / false / no).
RELEASE_GIL_ENV = "ZENLM_RELEASE_GIL"
# Setting this environment variable to 0 compiles a program's two C++ files one after the other (see
# _WrapperBesideKernels), as Inductor does; benchmarks/program_build.py compares the two.
PARALLEL_COMPILE_ENV = "ZENLM_PARALLEL_COMPILE"


def releases_gil() -> bool:
    """Whether a compiled step runs without the interpreter lock, so that Python's other threads (the server's
    event loop) run during it: yes, unless ``$ZENLM_RELEASE_GIL`` says no. Measured on a 2-core Xeon serving
    16 streams with the step on both cores (docs/BENCHMARKS.md): the p99 time to answer GET /health fell from
    211 to 23 ms and the p99 inter-token latency from 216 to 135 ms, at the same output tokens/s."""
    return env_switch(RELEASE_GIL_ENV) is not False


def packs_weights(batched: bool, device: str, dtype: torch.dtype) -> bool:
    """Whether a program (``batched``, on ``device``, with a cache -- and activations -- of ``dtype``) multiplies
    by prepacked layer matrices: a batched bf16 program on a CPU where oneDNN computes bf16, unless
    ``$ZENLM_PACKED_WEIGHTS`` says no."""
    if not (batched and device == "cpu" and dtype == torch.bfloat16):
        return False
    if env_switch(PACKED_ENV) is False:
        return False
    mkldnn = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_reorder_linear_weight")
            and hasattr(mkldnn, "_linear_pointwise") and bool(mkldnn._is_mkldnn_bf16_supported()))


def _packable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The linear layers whose matrix a packed program reads prepacked, by the matrix's name: plain
    ``nn.Linear`` (or :class:`NarrowLinear`) layers with a 2-d bf16 weight that no other module reads (a head
    tied to the token embedding, whose matrix the embedding reads as stored, gets a copy under a name of its
    own instead: :data:`PACKED_HEAD`)."""
    linear = {f"{n}.weight": m for n, m in model.named_modules() if type(m) in (nn.Linear, NarrowLinear)}
    readers: dict[int, set[str]] = {}
    for name, t in _tensors(model).items():
        readers.setdefault(t.data_ptr(), set()).add(name)
    return {n: m for n, m in linear.items() if m.weight.dtype == torch.bfloat16 and m.weight.dim() == 2
            and readers[m.weight.data_ptr()] <= linear.keys()}


# The name of the separate matrix a packed program reads for a head tied to the token embedding (the embedding
# itself reads the matrix as stored, so the head's product gets a prepacked copy under a name of its own).
PACKED_HEAD = "packed_head"


def _tied_head(model: nn.Module) -> bool:
    """Whether ``model``'s head is its token embedding's bf16 matrix (GPT with ``tie_embeddings``)."""
    emb = getattr(model, "tok_emb", None)
    return (getattr(model, "lm_head", 0) is None and isinstance(emb, nn.Embedding)
            and emb.weight.dtype == torch.bfloat16)


def _packed_sources(model: nn.Module) -> dict[str, Tensor]:
    """The matrices a packed program reads prepacked, by the name of the program's constant that holds them
    (a layer's matrix under its own name, a tied head under :data:`PACKED_HEAD`) -> the model's tensor."""
    out = {n: m.weight for n, m in _packable_modules(model).items()}
    if _tied_head(model):
        out[PACKED_HEAD] = model.tok_emb.weight  # type: ignore[union-attr]
    return out


class _PackedProducts(TorchFunctionMode):
    """While active (tracing a packed program), ``F.linear(x, W, b)`` with W the weight of one of ``modules``
    becomes oneDNN's ``_linear_pointwise(x, W, b)``, the call that reads the prepacked W the program is given
    when it is loaded (see :func:`_open`); with ``head = (embedding, matrix)``, a product by the embedding's
    weight (a tied head) reads ``matrix`` instead, a constant of its own."""

    def __init__(self, modules: Sequence[nn.Module], head: tuple[nn.Module, Tensor] | None = None) -> None:
        super().__init__()
        self.modules = modules
        self.head = head

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if self.head is not None and w is self.head[0].weight:  # the weights as traced now
                w = self.head[1]
            elif not any(w is m.weight for m in self.modules):
                return func(*args, **kwargs)
            if x.dtype == w.dtype:
                y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), w, b, "none", [], "")
                return y.reshape(*x.shape[:-1], w.shape[0])
        return func(*args, **kwargs)


class _PackedWeights:
    """Prepacked copies of a model's layer matrices (see :data:`PACKED_ENV`), made once, and again when one of
    the matrices has changed in place since (``stale``)."""

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        self.tensors = tensors
        self.versions = {n: _version(t) for n, t in tensors.items()}
        self.packed = {n: torch.ops.mkldnn._reorder_linear_weight(t.detach(), 1) for n, t in tensors.items()}

    def stale(self) -> bool:
        return any(_version(t) != self.versions[n] for n, t in self.tensors.items())


def _version(t: Tensor) -> int | None:
    """The in-place change counter of ``t`` (None for a tensor made under inference mode, which has none)."""
    try:
        return t._version
    except RuntimeError:
        return None


def _step(model: GPT, tokens_B: Tensor, pos_B: Tensor, keys_S: Tensor, k_layers: list[Tensor],
          v_layers: list[Tensor], batched: bool = False, packed: Sequence[str] = (),
          packed_head: Tensor | None = None) -> Tensor:
    """The step a program runs: ``model.decode_step`` with the products of its family; ``packed``: the names of
    the layer matrices the program will read prepacked (a batched program, see :data:`PACKED_ENV`);
    ``packed_head``: the constant a tied head's product reads instead of the embedding's matrix."""
    if not batched:
        with _LinearsAsReductions():
            return model.decode_step(tokens_B, pos_B, k_layers, v_layers, keys_S=keys_S)
    w = model.norm_f.weight  # the batched family: fp32 products through oneDNN where eager decoding uses it
    packing: Any = nullcontext()
    if packed:
        layers = [model.get_submodule(n.removesuffix(".weight")) for n in packed if n != PACKED_HEAD]
        packing = _PackedProducts(layers, None if packed_head is None else (model.tok_emb, packed_head))
    with matrix_products(), inference_products(w.device, w.dtype, step_rows=tokens_B.shape[0]), packing:
        return model.decode_step(tokens_B, pos_B, k_layers, v_layers, keys_S=keys_S)


def _options() -> dict[str, object]:
    """The Inductor settings this torch knows (a setting that a newer torch has renamed is left out)."""
    import torch._inductor.config as inductor_config

    def known(name: str) -> bool:
        obj: object = inductor_config
        for part in name.split("."):
            if not hasattr(obj, part):
                return False
            obj = getattr(obj, part)
        return True

    return {k: v for k, v in _INDUCTOR_OPTIONS.items() if known(k)}


def cache_dir() -> Path:
    """Where built decode programs are kept: ``$ZENLM_CACHE_DIR/decode-programs``, by default
    ``~/.cache/zenlm/decode-programs`` (``$XDG_CACHE_HOME`` is honoured). A program is compiled code that
    zenlm loads and runs (as Inductor's own cache is), so the directory is created private to the user;
    deleting it is always safe (programs are built again when needed)."""
    root = os.environ.get("ZENLM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "zenlm")
    return Path(root) / "decode-programs"


@functools.lru_cache(maxsize=1)
def _source_digest() -> str:
    """A digest of zenlm's model and decoding code: a program built by another version is not reused."""
    h = hashlib.sha256()
    pkg = Path(__file__).parent
    for f in sorted([*pkg.glob("models/*.py"), pkg / "compiled.py"]):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def compiler_available() -> bool:
    """True when the C++ compiler that Inductor uses on CPU is installed: ``$CXX``, else g++ (clang++ on
    macOS); checked once per process. (Asking Inductor itself would import it, seconds before a first token.)"""
    name = os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")
    return shutil.which(name) is not None


def compile_by_default() -> bool:
    """Whether ``compile=None`` (the default) compiles: yes, unless ``$ZENLM_COMPILE`` is 0, off, false or no."""
    return env_switch(ENV_SWITCH) is not False


def bucket_for(rows: int, pool_rows: int) -> int:
    """The batch size of the batched program that decodes ``rows`` rows of a cache of ``pool_rows`` rows: the
    next power of two (1, 2, 4, 8, ...), or the whole cache when that is smaller."""
    return min(1 << max(0, rows - 1).bit_length(), pool_rows)


@dataclasses.dataclass(frozen=True)
class ProgramShape:
    """What one program is specialised to, besides the model's tensors (names, dtypes, shapes).

    batched: the batched family (every product a matrix product, see "Batches") or the one-sequence form
    rows:    the batch size B of the program (its caches are the first B rows of a cache pool)
    cache:   (n_kv_head, max_len, head_dim) of each layer's cache, and its dtype
    """

    batched: bool
    rows: int
    cache: tuple[int, int, int]
    dtype: str
    device: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ProgramShape:
        return cls(bool(d["batched"]), int(d["rows"]), tuple(d["cache"]), str(d["dtype"]), str(d["device"]))

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype.removeprefix("torch."))


class _StepModule(torch.nn.Module):
    """The step as a module, for ``torch.export`` (the model's tensors become the program's constants)."""

    def __init__(self, model: GPT, batched: bool, packed: Sequence[str] = ()) -> None:
        super().__init__()
        self.model = model
        self.batched = batched
        self.packed = list(packed)
        if PACKED_HEAD in self.packed:  # a tensor of its own: the program's constant for the tied head's product
            self.register_buffer(PACKED_HEAD, torch.empty_like(model.tok_emb.weight))

    def forward(self, tokens_B: Tensor, pos_B: Tensor, keys_S: Tensor, k_layers: list[Tensor],
                v_layers: list[Tensor]) -> Tensor:
        return _step(self.model, tokens_B, pos_B, keys_S, k_layers, v_layers, self.batched, self.packed,
                     getattr(self, PACKED_HEAD, None))


def _tensors(model: nn.Module) -> dict[str, Tensor]:
    """Every tensor a program reads from the model, by name (tied ones under each of their names)."""
    weights = dict(model.named_parameters(remove_duplicate=False))
    weights.update(model.named_buffers(remove_duplicate=False))
    return weights


def _signature(model: nn.Module) -> list[list[Any]]:
    """Names, dtypes and shapes of the model's tensors, then its module types: what a program depends on."""
    tensors = sorted([n, str(t.dtype), list(t.shape)] for n, t in _tensors(model).items())
    return [*tensors, *sorted([n, type(m).__qualname__] for n, m in model.named_modules())]


class _WrapperBesideKernels:
    """While active in a thread, a program's two C++ files compile at the same time, not one after the other.

    AOTInductor writes a program as two files: the kernels (the loops, compiled with -O3) and the wrapper (the
    host code that allocates and calls them, -O1), and compiles the wrapper, then the kernels, then links both.
    For GPT-2-small's one-sequence step on a 2-core Xeon that is 7.7 s and 12.9 s of a 45 s build; compiled
    side by side on the two cores, the same program is built 1.23-1.30x sooner (benchmarks/program_build.py).
    Inductor offers no setting for it, so this patches ``CppBuilder.build`` once per process: in a thread
    where it is active, the wrapper's compile (a builder named ``*.wrapper`` that compiles without linking)
    starts on a thread of its own, and the next build (the kernels') waits for it before it returns, so the
    link finds both objects. Where a later PyTorch names things otherwise, nothing matches and the files
    compile one after the other; ``$ZENLM_PARALLEL_COMPILE=0`` asks for that too."""

    _local = threading.local()
    _lock = threading.Lock()
    _installed = False

    def __enter__(self) -> _WrapperBesideKernels:
        self._install()
        self._local.active, self._local.pending = env_switch(PARALLEL_COMPILE_ENV) is not False, None
        return self

    def __exit__(self, *exc: object) -> None:
        self._local.active = False
        error = self._wait()
        if error is not None and exc[0] is None:  # a wrapper compile that failed, and no later build waited
            raise error

    @classmethod
    def _wait(cls) -> BaseException | None:
        """Wait for this thread's wrapper compile, if one runs -> its exception, or None."""
        pending, cls._local.pending = getattr(cls._local, "pending", None), None
        if pending is None:
            return None
        thread, failed = pending
        thread.join()
        return failed[0] if failed else None

    @classmethod
    def _install(cls) -> None:
        from torch._inductor.cpp_builder import CppBuilder

        with cls._lock:
            if cls._installed:
                return
            build = CppBuilder.build

            def build_beside(builder: Any) -> None:
                local = cls._local
                if (getattr(local, "active", False) and getattr(local, "pending", None) is None
                        and getattr(builder, "_compile_only", False)
                        and str(getattr(builder, "_name", "")).endswith(".wrapper")):
                    failed: list[BaseException] = []

                    def run() -> None:
                        try:
                            build(builder)
                        except BaseException as e:  # noqa: BLE001 - handed to the thread that waits
                            failed.append(e)

                    thread = threading.Thread(target=run, name="zenlm-compile-wrapper", daemon=True)
                    thread.start()
                    local.pending = (thread, failed)
                    return
                try:
                    build(builder)
                finally:
                    error = cls._wait()
                if error is not None:
                    raise error

            CppBuilder.build = build_beside  # type: ignore[method-assign]
            cls._installed = True


def build_program(model: GPT, path: Path, shape: ProgramShape) -> None:
    """Export the step of ``model`` for ``shape`` (S dynamic in [2, max_len - 1]), compile it with
    AOTInductor, and write the package to ``path`` whole (through a temporary file of this builder's own, so
    that two processes building the same program at once both succeed and one whole file remains)."""
    import torch._inductor

    n_layer = len(model.blocks)
    K, L, D = shape.cache
    device = torch.device(shape.device)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # compiled code: private to the user
    fresh = [torch.zeros(shape.rows, K, L, D, dtype=shape.torch_dtype, device=device) for _ in range(2 * n_layer)]
    B = shape.rows
    example = (torch.zeros(B, dtype=torch.long, device=device), torch.ones(B, dtype=torch.long, device=device),
               torch.arange(min(EXAMPLE_KEYS, L - 1), device=device), fresh[:n_layer], fresh[n_layer:])
    S = torch.export.Dim("S", min=2, max=L - 1)
    packed = sorted(_packed_sources(model)) if packs_weights(shape.batched, shape.device, shape.torch_dtype) else []
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp.pt2")  # one per builder
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecation notes while tracing
            exported = torch.export.export(_StepModule(model, shape.batched, packed), example, strict=False,
                                           dynamic_shapes=(None, None, {0: S}, [None] * n_layer, [None] * n_layer))
            _check_packed_products(exported, packed)
            with _WrapperBesideKernels():
                torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp), inductor_configs={
                    **_options(), "aot_inductor.package_constants_in_so": False})
        _check_reads_its_tensors(exported, tmp)
        os.replace(tmp, path)  # whole or not at all: a half-written package is never loaded
    finally:
        tmp.unlink(missing_ok=True)


def _check_packed_products(exported: torch.export.ExportedProgram, packed: Sequence[str]) -> None:
    """Refuse a program in which a matrix it is to read prepacked goes anywhere but into the products that read
    that layout (``_linear_pointwise``, as its weight): given the prepacked copy, any other use would read it
    as a plain matrix (RuntimeError; the decoder then falls back, see ``_program``)."""
    params = {**exported.graph_signature.inputs_to_parameters, **exported.graph_signature.inputs_to_buffers}
    wanted = {n if n == PACKED_HEAD else f"model.{n}" for n in packed}
    linear = torch.ops.mkldnn._linear_pointwise.default
    for node in exported.graph_module.graph.nodes:
        if node.op == "placeholder" and params.get(node.name) in wanted:
            if not node.users or any(u.target is not linear or u.args[1] is not node for u in node.users):
                raise RuntimeError(f"the step reads {params[node.name]} other than as a product's weight; it "
                                   "cannot read it prepacked")


def _check_reads_its_tensors(exported: torch.export.ExportedProgram, package: Path) -> None:
    """Refuse a built program that does not read, at run time, every model tensor the step uses: one whose
    values the compiler wrote into the code would decode another model, or the same model after training, with
    the values it was built from (RuntimeError naming them; the decoder then falls back, see ``_program``)."""
    from torch.export.graph_signature import InputKind

    users = {n.name: len(n.users) for n in exported.graph_module.graph.nodes if n.op == "placeholder"}
    used = {spec.target for spec in exported.graph_signature.input_specs
            if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and users.get(getattr(spec.arg, "name", ""), 0)}
    missing = sorted(used - set(_load_program(package).get_constant_fqns()))
    if missing:
        raise RuntimeError(f"the compiled program holds the values of {missing[:4]} in its code instead of "
                           "reading the model's tensors; it is not used")


def _which(shape: ProgramShape) -> str:
    """What a program decodes, for the notes: "batches of 4" or "this model shape" (one sequence)."""
    return f"batches of {shape.rows}" if shape.batched else "this model shape"


@dataclasses.dataclass(eq=False)  # a job is itself: compared by identity (its fields hold tensors)
class _Job:
    """One program to make ready in the background for one decoder."""

    decoder: weakref.ref
    key: tuple[ProgramShape, bool]
    path: Path
    weights: dict[str, Tensor]
    weights_key: tuple[object, ...]
    packed: dict[str, Tensor] | None = None  # prepacked layer matrices the program reads (see PACKED_ENV)
    done: threading.Event = dataclasses.field(default_factory=threading.Event)


class CompiledDecoder:
    """:meth:`GPT.decode_step <zenlm.models.gpt.GPT.decode_step>` for one model, compiled on the first call.

    ``decoder(tokens_B, pos_B, k_layers, v_layers)`` -> logits [B, V] (float32), the arguments and result
    of ``model.decode_step`` (rows attend over their own keys). ``batched=True`` takes the batched family of
    programs (generate_batch, the server: see "Batches" in the module docstring). :meth:`next_logits` feeds one
    token to a batch-1 :class:`KVCache` and advances it, as ``model(token, cache=cache)`` would.

    Two ways to run the compiled step (``backend``):

    - ``"aot"`` (the default on CPU): the step is exported once (``torch.export``) and compiled ahead of time
      by AOTInductor into a shared library with a C++ wrapper. A call runs that library directly: no Python
      between the kernels and no Dynamo guard checks, which on a 2-core CPU saved 15-20% of an int8 GPT-2
      step. One program serves every position (the key count is a dynamic size); it is specialised to the
      batch size and to the cache's shape and dtype. The program holds no weights: it reads the model's own
      tensors (no copy), so it is kept on disk (:func:`cache_dir`) and a later process, or another model of
      the same architecture and dtypes, loads it in about a second instead of compiling again.
    - ``"dynamo"`` (the default elsewhere): ``torch.compile``, which traces the step on each new shape and
      checks its guards on every call.

    background: False: the first call for a new shape waits for its program (building it when no earlier
    process did). True (``compile=None``, the default of generation and the server): a missing program is
    made ready on a background thread -- built by a separate, low-priority process, then loaded -- while the
    calls decode eagerly with the same formulas; :meth:`wait` waits for it.

    The weights are read where they are. Changing them in place (``load_state_dict``, an optimiser step) is
    seen at once; after replacing tensors or modules (``model.to(dtype)``, quantising), call
    :func:`compiled_decoder` again (``generate`` does so for every generation), which re-reads them.
    If a model cannot be exported, the decoder warns once and uses ``"dynamo"``.
    """

    def __init__(self, model: GPT, backend: str | None = None, *, background: bool = False) -> None:
        device = next(iter(model.parameters())).device
        backend = backend or ("aot" if device.type == "cpu" else "dynamo")
        if backend not in ("aot", "dynamo"):
            raise ConfigError(f"unknown compile backend {backend!r}: use 'aot' or 'dynamo'.")
        self.backend = backend
        self.background = background
        self._model = weakref.ref(model)  # the cache below must not keep the model alive
        self._compiled: Any = None  # torch.compile(_step), made on first use (importing it takes seconds)
        self._programs: dict[tuple[ProgramShape, bool], object] = {}
        self._pending: dict[tuple[ProgramShape, bool], _Job] = {}
        self._failed: set[tuple[ProgramShape, bool]] = set()
        self._weights: dict[str, Tensor] = {}
        self._weights_key: tuple[object, ...] = ()
        self._packs: _PackedWeights | None = None  # made on first need (a batched bf16 program on a CPU)
        self.programs_built = 0  # AOT programs compiled for this decoder (not loaded from disk)
        self.refresh()

    @property
    def model(self) -> GPT:
        model = self._model()
        if model is None:
            raise ConfigError("this CompiledDecoder's model no longer exists.")
        return model

    def refresh(self) -> None:
        """Re-read the model's tensors (after replacing some: ``model.to(dtype)``, new modules)."""
        weights = _tensors(self.model)
        key = tuple((n, t.dtype, tuple(t.shape), t.data_ptr()) for n, t in weights.items())
        if key != self._weights_key:
            # the loaded programs point at the old tensors; they are reloaded on their next call
            self._weights, self._weights_key, self._programs = weights, key, {}
            self._failed, self._packs = set(), None

    def ready(self, shape: ProgramShape) -> bool:
        """Whether the program of ``shape`` is loaded (its calls no longer decode eagerly)."""
        return (shape, self.model.training) in self._programs

    def status(self) -> dict[str, int]:
        """How many programs are loaded (their steps run compiled) and how many are being made ready."""
        return {"ready": len(self._programs), "pending": len(self._pending)}

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the programs being made ready in the background; True when none is left."""
        for job in list(self._pending.values()):
            if not job.done.wait(timeout):
                return False
        return not self._pending

    def prepare(self, k_layers: Sequence[Tensor], rows: int | Sequence[int] = 1, *, batched: bool = False) -> None:
        """Make ready the program that steps of ``rows`` rows over caches like ``k_layers`` will run before the
        first step asks for it (in the background, or here when not ``background``), so that the one-line note
        of a build comes before a reply's text, not inside it. For the ``"aot"`` backend; the ``"dynamo"`` one
        compiles on the first step. ``rows`` may list several row counts (a server's batch sizes): in the
        background, the programs missing on disk are then built one after another by one process, which
        imports PyTorch and its compiler once (about 5 s on 2 cores) instead of once per program, and each is
        loaded as soon as it is built."""
        if self.backend != "aot":
            return
        shapes = [self._shape(r, k_layers, batched) for r in ([rows] if isinstance(rows, int) else rows)]
        if not self.background:
            for shape in shapes:
                self._program(shape)
            return
        training = self.model.training
        self._start([k for k in dict.fromkeys((shape, training) for shape in shapes)
                     if k not in self._programs and k not in self._failed])

    @staticmethod
    def _shape(B: int, k_layers: Sequence[Tensor], batched: bool) -> ProgramShape:
        """The program shape a step of ``B`` rows over the caches ``k_layers`` runs."""
        k = k_layers[0]
        rows = bucket_for(B, k.shape[0]) if batched else B
        return ProgramShape(batched, rows, tuple(k.shape[1:]), str(k.dtype), k.device.type)  # type: ignore[arg-type]

    @torch.inference_mode()
    def __call__(self, tokens_B: Tensor, pos_B: Tensor | int, k_layers: Sequence[Tensor],
                 v_layers: Sequence[Tensor], *, batched: bool = False) -> Tensor:
        if isinstance(pos_B, int):  # one position for all rows: the program takes one per row
            pos_B = torch.full((tokens_B.shape[0],), pos_B, device=tokens_B.device)
        S = int(pos_B.max()) + 1
        k_layers, v_layers = list(k_layers), list(v_layers)
        if self.backend == "aot":
            logits_BV = self._run_program(tokens_B, pos_B, S, k_layers, v_layers, batched)
            if logits_BV is not None:
                return logits_BV
        if self.backend == "aot" or self.background:  # no program (yet), or no blocking torch.compile
            return self.model.decode_step(tokens_B, pos_B, k_layers, v_layers, row_attention=batched)
        keys_S = torch.arange(S, device=tokens_B.device)
        torch._dynamo.maybe_mark_dynamic(keys_S, 0)
        if self._compiled is None:
            self._compiled = torch.compile(_step, options=_options())
        try:
            return self._compiled(self.model, tokens_B, pos_B, keys_S, k_layers, v_layers, batched)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            raise ConfigError(
                f"compiling the decode step failed: {e.inner_exception!r}. torch.compile needs a working C++ "
                "compiler on CPU (install gcc or clang) and Triton on a GPU; or generate without compile."
            ) from e

    def _run_program(self, tokens_B: Tensor, pos_B: Tensor, S: int, k_layers: list[Tensor],
                     v_layers: list[Tensor], batched: bool) -> Tensor | None:
        """The step through the AOT program of its shape -> logits [B, V], or None when it runs eagerly (the
        program is not ready, or S is outside its range: the first and the last key slot of a cache)."""
        B, pool_rows, L = tokens_B.shape[0], k_layers[0].shape[0], k_layers[0].shape[2]
        S_read = min(-(-S // KEY_BLOCK) * KEY_BLOCK, L - 1)  # whole blocks of key slots
        if not 2 <= S <= S_read:
            return None
        shape = self._shape(B, k_layers, batched)
        rows = shape.rows
        if self._packs is not None and self._packs.stale():  # a matrix changed in place: pack it again
            self._packs = None
            self._programs = {k: v for k, v in self._programs.items() if not self._packing(k[0])}
        program = self._program(shape)
        if program is None:
            return None
        if rows > B:  # the bucket's spare rows: token 0 at position 0 of cache rows no sequence uses
            tokens_B = torch.cat([tokens_B, tokens_B.new_zeros(rows - B)])
            pos_B = torch.cat([pos_B, pos_B.new_zeros(rows - B)])
        if rows < pool_rows:  # the program's caches are the first rows of the pool (views: written in place)
            k_layers, v_layers = [t[:rows] for t in k_layers], [t[:rows] for t in v_layers]
        keys_S = torch.arange(S_read, device=tokens_B.device)
        logits = program(tokens_B.long(), pos_B.long(), keys_S, k_layers, v_layers)  # type: ignore[operator]
        return logits[:B]

    def _program(self, shape: ProgramShape) -> object | None:
        """The AOT program of ``shape``, loaded (or built) on first use; None while it is made ready in the
        background, or when that failed."""
        key = (shape, self.model.training)
        program = self._programs.get(key)
        if program is not None or key in self._failed:
            return program
        if self.background:
            self._start([key])
            return None
        try:
            program = self._programs[key] = self._load(key)
        except Exception as e:  # noqa: BLE001 - any export/compile failure: fall back, say why
            if isinstance(e, ConfigError):
                raise
            warnings.warn(f"zenlm.compiled: this model could not be compiled ahead of time ({e!r:.300}); "
                          "using torch.compile instead.", RuntimeWarning, stacklevel=4)
            self.backend = "dynamo"
            return None
        return program

    @staticmethod
    def _packing(shape: ProgramShape) -> bool:
        return packs_weights(shape.batched, shape.device, shape.torch_dtype)

    def _packed(self, shape: ProgramShape) -> dict[str, Tensor] | None:
        """The prepacked layer matrices the program of ``shape`` reads, by name (made on first need, on the
        calling thread), or None when it reads them as they are."""
        if not self._packing(shape):
            return None
        if self._packs is None:
            self._packs = _PackedWeights(_packed_sources(self.model))
        return self._packs.packed

    def _path(self, key: tuple[ProgramShape, bool]) -> Path:
        """Where the program of ``key`` is kept: named by a digest of everything it depends on."""
        packed = sorted(_packed_sources(self.model)) if self._packing(key[0]) else None
        digest = hashlib.sha256(repr((
            key, sorted((n, str(t.dtype), tuple(t.shape)) for n, t in self._weights.items()),
            dataclasses.asdict(self.model.config), sorted(_INDUCTOR_OPTIONS.items()), torch.__version__,
            sys.version_info[:2], platform.machine(), torch.backends.cpu.get_cpu_capability(),
            torch.get_num_threads(), _source_digest(), onednn_min_rows(), packed,
        )).encode()).hexdigest()[:32]
        return cache_dir() / f"step-{digest}.pt2"

    def _load(self, key: tuple[ProgramShape, bool]) -> object:
        """The program for ``key`` from the disk cache (built here first if missing), reading the model's
        tensors."""
        path = self._path(key)
        built = False
        if not path.exists():
            _log.info("building the decode program (once per model shape, 20-60 s for GPT-2-small; kept in %s)",
                      path.parent)
            build_program(self.model, path, key[0])
            self.programs_built, built = self.programs_built + 1, True
        try:
            return _open(path, self._weights, self._packed(key[0]))
        except Exception:
            if built:
                raise
            _log.warning("the decode program %s could not be loaded; building it again", path)
            path.unlink(missing_ok=True)  # damaged or from an incompatible build: replace it
            build_program(self.model, path, key[0])
            self.programs_built += 1
            return _open(path, self._weights, self._packed(key[0]))

    # ------------------------------------------------------------------------------------ in the background
    def _start(self, keys: list[tuple[ProgramShape, bool]]) -> None:
        """Queue the programs of ``keys`` (those not queued yet) to be made ready on the builder thread, as one
        group: one build process for those missing on disk (see :meth:`_build_elsewhere`)."""
        jobs = []
        for key in keys:
            if key in self._pending:
                continue
            path = self._path(key)
            job = _Job(weakref.ref(self), key, path, self._weights, self._weights_key, self._packed(key[0]))
            self._pending[key] = job
            jobs.append(job)
            if not path.exists():
                _log.info("compiling the decode step for %s in the background (once; 20-60 s for GPT-2-small, kept "
                          "in %s); decoding eagerly until it is ready", _which(key[0]), path.parent)
        if jobs:
            _builder().put(jobs)

    def _finish(self, jobs: list[_Job], settle: Callable[[_Job, BaseException | None], None]) -> None:
        """On the builder thread: load the programs of ``jobs`` that are on disk, build the others in a separate
        process, and load each as soon as it is built, for this decoder (unless the model's tensors were
        replaced meanwhile); ``settle(job, error)`` is called once per job that is done with, or failed."""

        def ready(job: _Job, built: bool) -> None:
            try:
                if built:
                    self.programs_built += 1
                runner = _open(job.path, job.weights, job.packed)
                current = job.packed is None or (self._packs is not None and self._packs.packed is job.packed)
                if self._weights_key == job.weights_key and current:
                    self._programs[job.key] = runner
                if built:
                    _log.info("the compiled decode step for %s is ready", _which(job.key[0]))
            except Exception as e:  # noqa: BLE001 - this program only: the others of the group go on
                settle(job, e)
            else:
                settle(job, None)

        missing = []
        for job in jobs:
            if job.path.exists():
                ready(job, False)
            else:
                missing.append(job)
        if missing:
            self._build_elsewhere(missing, lambda job: ready(job, True))

    def _build_elsewhere(self, jobs: list[_Job], built: Callable[[_Job], None]) -> None:
        """Build the programs of ``jobs``, in order, in one child process (``python -m zenlm.compiled SPEC``),
        which rebuilds the model from its config with empty tensors of the same names, dtypes and shapes, at a
        lower priority, so that eager decoding here keeps a core and the GIL; ``built(job)`` is called here as
        each program appears on disk. A model the child cannot rebuild (a subclass, other modules) is exported
        here instead. RuntimeError when the child fails (the programs it did build are kept)."""
        model = self.model
        if type(model) is not GPT:
            for job in jobs:
                build_program(model, job.path, job.key[0])
                built(job)
            return
        first = jobs[0].path
        spec = {"programs": [{"path": str(job.path), "shape": job.key[0].to_json()} for job in jobs],
                "config": model.config.to_dict(),
                "int8": any(isinstance(m, Int8Linear) for m in model.modules()),
                "narrow": any(isinstance(m, NarrowLinear) for m in model.modules()),
                "signature": _signature(model), "threads": torch.get_num_threads()}
        tag = f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
        spec_file = first.with_name(f"{first.stem}.{tag}.spec.json")
        log_file = first.with_name(f"{first.stem}.{tag}.log")
        spec["log"] = str(log_file)
        first.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        spec_file.write_text(json.dumps(spec), encoding="utf-8")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        with open(log_file, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "zenlm.compiled", str(spec_file)], stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        waiting = list(jobs)

        def arrived() -> None:
            for job in [j for j in waiting if j.path.exists()]:  # written whole (os.replace) or not at all
                waiting.remove(job)
                built(job)

        while proc.poll() is None:
            arrived()
            time.sleep(0.1)
        arrived()
        spec_file.unlink(missing_ok=True)
        rc = proc.returncode
        if rc == _CANNOT_REBUILD:
            log_file.unlink(missing_ok=True)
            for job in list(waiting):
                build_program(model, job.path, job.key[0])
                waiting.remove(job)
                built(job)
        elif rc != 0 or waiting:
            raise RuntimeError(f"the build process failed (exit status {rc}); its output is in {log_file}")
        else:
            log_file.unlink(missing_ok=True)

    def next_logits(self, token: int, cache: KVCache) -> Tensor:
        """Feed ``token`` at position ``cache.pos`` of a batch-1 cache -> logits [V]; ``cache.pos`` += 1."""
        if cache.batch_size != 1:
            raise ConfigError(f"next_logits takes a batch-1 cache, got batch size {cache.batch_size}.")
        if cache.pos >= cache.max_len:
            raise ConfigError(f"KV cache overflow: {cache.pos} positions filled of max_len {cache.max_len}; "
                              "reset() the cache and prefill a shorter context.")
        logits_1V = self(torch.tensor([token], device=cache.device), cache.pos, cache.k, cache.v)
        cache.pos += 1
        return logits_1V[0]


class _Program:
    """A built decode program, loaded and called through the C interface of its library, without the
    interpreter lock (unless :func:`releases_gil` says otherwise).

    AOTInductor packages a program as a shared library (in the ``.pt2`` zip) with a small C interface: make a
    *container*, hand it the weights, run it on the step's tensors. torch's own Python binding of its loader
    (``torch._C._aoti.AOTIModelPackageLoader``) keeps the interpreter lock for the whole call, so no other
    Python thread runs during a step: on a 2-core Xeon a thread that wakes every 0.5 ms ran once per 15 ms
    step. In the server that thread is the event loop, which reads requests and sends tokens; it waited for
    every step to end. Here the library is opened with ``ctypes``, which releases the lock for the call
    (``ctypes.PyDLL`` keeps it, with ``$ZENLM_RELEASE_GIL=0``); the tensors cross as the interface's tensor
    handles (``torch._C._aoti``'s helpers make and take them back).
    :class:`_LoaderProgram`, torch's loader, is the fallback for a package of another shape (more than one
    library, or custom operators that need its proxy executor) and for GPUs.

    ``torch._inductor.aoti_load_package`` would wrap the same loader in a module that imports the whole of
    Inductor (about 70 MB of resident memory, a second of start-up) and re-reads the input layout from JSON on
    every call; neither is needed to run a program."""

    def __init__(self, library: Path, release_gil: bool = True) -> None:
        # CDLL's calls let go of the interpreter lock, PyDLL's keep it
        lib = self.lib = (ctypes.CDLL if release_gil else ctypes.PyDLL)(str(library))
        self.release_gil = release_gil
        ptr, size = ctypes.c_void_p, ctypes.c_size_t
        self._create = _c_function(lib, "AOTInductorModelContainerCreateWithDevice", ctypes.POINTER(ptr), size,
                                   ctypes.c_char_p, ctypes.c_char_p)
        self._run = _c_function(lib, "AOTInductorModelContainerRun", ptr, ctypes.POINTER(ptr), size,
                                ctypes.POINTER(ptr), size, ptr, ptr)
        self._delete = _c_function(lib, "AOTInductorModelContainerDelete", ptr)
        self._set_constants = _c_function(lib, "AOTInductorModelContainerUpdateUserManagedConstantBufferPairs",
                                          ptr, ctypes.POINTER(_ConstantEntry), size, ctypes.c_bool, ctypes.c_bool)
        count = _c_function(lib, "AOTInductorModelContainerGetNumConstants", ptr, ctypes.POINTER(size))
        name = _c_function(lib, "AOTInductorModelContainerGetConstantName", ptr, size, ctypes.POINTER(ctypes.c_char_p))
        fqn = _c_function(lib, "AOTInductorModelContainerGetConstantOriginalFQN", ptr, size,
                          ctypes.POINTER(ctypes.c_char_p))
        outputs = _c_function(lib, "AOTInductorModelContainerGetNumOutputs", ptr, ctypes.POINTER(size))
        handle = ptr()
        _c_check(self._create(ctypes.byref(handle), 1, b"cpu", None), "making the program's container")
        self.handle = handle
        self._constants: list[int] = []  # the tensor handles the container reads (ours to free)
        self._finalizer = weakref.finalize(self, _Program._close, self._delete, handle, self._constants)
        self._finalizer.atexit = False  # at exit the process lets go of everything anyway
        n, k = size(), size()
        _c_check(count(handle, ctypes.byref(n)), "reading the program's constants")
        _c_check(outputs(handle, ctypes.byref(k)), "reading the program's outputs")
        self.n_outputs = k.value
        self.names: dict[str, bytes] = {}  # the model's name of each constant (its FQN) -> the program's name
        for i in range(n.value):
            internal, original = ctypes.c_char_p(), ctypes.c_char_p()
            _c_check(name(handle, i, ctypes.byref(internal)), "reading the program's constants")
            _c_check(fqn(handle, i, ctypes.byref(original)), "reading the program's constants")
            self.names[(original.value or b"").decode()] = internal.value or b""

    @staticmethod
    def _close(delete: Any, handle: ctypes.c_void_p, constants: list[int]) -> None:
        delete(handle)  # the container first: it reads the constants' handles
        if constants:
            _tensors_from(constants)  # frees the handles

    def get_constant_fqns(self) -> list[str]:
        return list(self.names)

    def load_constants(self, constants: dict[str, Tensor], *, check_full_update: bool, user_managed: bool) -> None:
        """Point the program at ``constants`` (by the model's names): it reads these tensors, not copies."""
        assert user_managed, "a program reads the model's own tensors"
        names = list(constants)
        handles = _pointers([constants[n] for n in names])
        entries = (_ConstantEntry * len(names))(
            *(_ConstantEntry(self.names[n], h) for n, h in zip(names, handles, strict=True)))
        old, self._constants[:] = list(self._constants), handles  # freed with the container from now on
        _c_check(self._set_constants(self.handle, entries, len(names), False, check_full_update),
                 "handing the program the model's tensors")
        if old:
            _tensors_from(old)

    def __call__(self, tokens_B: Tensor, pos_B: Tensor, keys_S: Tensor, k_layers: Sequence[Tensor],
                 v_layers: Sequence[Tensor]) -> Tensor:
        inputs = _pointers([tokens_B, pos_B, keys_S, *k_layers, *v_layers])
        handles_in = (ctypes.c_void_p * len(inputs))(*inputs)  # the call takes these handles over
        handles_out = (ctypes.c_void_p * self.n_outputs)()
        _c_check(self._run(self.handle, handles_in, len(inputs), handles_out, self.n_outputs, None, None),
                 "running the decode program")
        return _tensors_from(list(handles_out))[0]


class _ConstantEntry(ctypes.Structure):
    """``AOTInductorConstantMapEntry``: a constant's name in the program and the tensor handle it reads."""

    _fields_ = [("name", ctypes.c_char_p), ("handle", ctypes.c_void_p)]


def _pointers(tensors: Sequence[Tensor]) -> list[int]:
    """New tensor handles (``AtenTensorHandle``) of ``tensors``, as addresses: each is freed by whoever takes
    it over (a program's run takes its inputs over) or by :func:`_tensors_from`."""
    return [_CAPSULE_POINTER(c, None) for c in torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors(list(tensors))]


def _tensors_from(pointers: Sequence[int]) -> list[Tensor]:
    """The tensors of handles given as addresses, taking the handles over (they are freed)."""
    return torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs([_CAPSULE_NEW(p, None, None) for p in pointers])


# torch._C._aoti passes handles as capsules; ctypes passes addresses
_CAPSULE_POINTER = ctypes.pythonapi.PyCapsule_GetPointer
_CAPSULE_POINTER.argtypes, _CAPSULE_POINTER.restype = [ctypes.py_object, ctypes.c_char_p], ctypes.c_void_p
_CAPSULE_NEW = ctypes.pythonapi.PyCapsule_New
_CAPSULE_NEW.argtypes, _CAPSULE_NEW.restype = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p], ctypes.py_object


def _c_function(lib: ctypes.CDLL, name: str, *argtypes: Any) -> Any:
    """``lib.name`` declared as an AOTInductor interface function: these arguments, an int32 error code."""
    fn = getattr(lib, name)
    fn.argtypes, fn.restype = list(argtypes), ctypes.c_int32
    return fn


def _c_check(code: int, what: str) -> None:
    if code != 0:  # the library has printed the C++ exception's message to stderr
        raise RuntimeError(f"{what} failed (AOTInductor error {code})")


class _LoaderProgram:
    """A built decode program loaded by torch's own C++ loader (``torch._C._aoti``), called with the step's
    inputs flattened in their traced order (tokens, positions, key slots, each layer's keys, each layer's
    values) -> logits; it keeps the interpreter lock during the call (see :class:`_Program`)."""

    def __init__(self, path: Path) -> None:
        self.loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)

    def get_constant_fqns(self) -> list[str]:
        return self.loader.get_constant_fqns()

    def load_constants(self, constants: dict[str, Tensor], *, check_full_update: bool, user_managed: bool) -> None:
        self.loader.load_constants(constants, False, check_full_update, user_managed, False)

    def __call__(self, tokens_B: Tensor, pos_B: Tensor, keys_S: Tensor, k_layers: Sequence[Tensor],
                 v_layers: Sequence[Tensor]) -> Tensor:
        return self.loader.boxed_run([tokens_B, pos_B, keys_S, *k_layers, *v_layers])[0]


def _load_program(path: Path) -> _Program | _LoaderProgram:
    """The package at ``path``, loaded: through its library's C interface (:class:`_Program`) when it is a CPU
    program of one library and nothing else to run, else by torch's loader."""
    try:
        meta = torch._C._aoti.AOTIModelPackageLoader.load_metadata_from_package(str(path), "model")
        with zipfile.ZipFile(path) as z:
            files = [n for n in z.namelist() if "/data/aotinductor/model/" in n]
            libraries = [n for n in files if n.endswith(".so")]
            extern = [n for n in files if n.endswith(".json") and not n.endswith("_metadata.json")]
            if meta.get("AOTI_DEVICE_KEY") != "cpu" or len(libraries) != 1 or extern or os.name != "posix":
                return _LoaderProgram(path)
            fd, name = tempfile.mkstemp(prefix="zenlm-step-", suffix=".so")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(z.read(libraries[0]))
                return _Program(Path(name), releases_gil())
            finally:
                os.unlink(name)  # the opened library stays mapped
    except (OSError, AttributeError, zipfile.BadZipFile):
        return _LoaderProgram(path)


def _open(path: Path, weights: dict[str, Tensor], packed: dict[str, Tensor] | None = None) -> object:
    """Load the program at ``path`` so that it reads ``weights`` (the model's own tensors, not copies), those
    named in ``packed`` as their prepacked copies there (a program built to read them so)."""
    runner = _load_program(path)
    names = runner.get_constant_fqns()
    use = {**weights, **(packed or {})}
    missing = [n for n in names if n.removeprefix("model.") not in use]
    if missing:
        raise RuntimeError(f"the program needs tensors the model does not have: {missing[:3]}")
    # user_managed: the program reads the model's own tensors (no copy); the decoder keeps them alive
    runner.load_constants({n: use[n.removeprefix("model.")] for n in names},
                          check_full_update=True, user_managed=True)
    return runner


_log = logging.getLogger(__name__)
_DECODERS: weakref.WeakKeyDictionary[GPT, CompiledDecoder] = weakref.WeakKeyDictionary()
_JOBS: queue.Queue[_Job] | None = None
_JOBS_LOCK = threading.Lock()
_NOTICE_GIVEN = threading.Event()


def _builder() -> queue.Queue[list[_Job]]:
    """The queue of the one builder thread (started on first use): groups of programs, made ready one group
    at a time (see :meth:`CompiledDecoder._start`)."""
    global _JOBS
    with _JOBS_LOCK:
        if _JOBS is None:
            _JOBS = queue.Queue()
            threading.Thread(target=_build_loop, args=(_JOBS,), name="zenlm-decode-builder", daemon=True).start()
        return _JOBS


def _build_loop(groups: queue.Queue[list[_Job]]) -> None:
    while True:
        _make_ready(groups.get())


def _make_ready(jobs: list[_Job]) -> None:
    """Make the programs of one group ready (see :meth:`CompiledDecoder._finish`); every job ends done, its
    program loaded or, when that failed, its shape decoding eagerly with a warning that says why."""
    decoder = jobs[0].decoder()  # one decoder per group; None when its model is gone
    settled: set[int] = set()

    def settle(job: _Job, error: BaseException | None) -> None:
        if id(job) in settled:
            return
        settled.add(id(job))
        if decoder is not None:
            if error is not None:
                decoder._failed.add(job.key)
            decoder._pending.pop(job.key, None)
        if error is not None:
            _log.warning("the compiled decode step could not be built (%s); decoding eagerly", f"{error!r:.300}")
        job.done.set()

    try:
        if decoder is not None:
            decoder._finish(jobs, settle)
    except Exception as e:  # noqa: BLE001 - whatever went wrong: the shapes not ready decode eagerly
        for job in jobs:
            settle(job, e)
    finally:
        for job in jobs:
            settle(job, None)


def compiled_decoder(model: GPT, backend: str | None = None, *, background: bool = False) -> CompiledDecoder:
    """The model's :class:`CompiledDecoder`, made on the first call for that model and reused afterwards
    (re-reading the model's tensors, see :meth:`CompiledDecoder.refresh`). ``backend``: ``"aot"`` or
    ``"dynamo"`` (default: ``"aot"`` on CPU, else ``"dynamo"``); asking for another backend than the
    existing decoder's makes a new decoder. ``background``: see :class:`CompiledDecoder` (set on every call)."""
    decoder = _DECODERS.get(model)
    if decoder is None or (backend is not None and backend != decoder.backend):
        decoder = _DECODERS[model] = CompiledDecoder(model, backend, background=background)
    else:
        decoder.refresh()
        decoder.background = background
    return decoder


def decoder_for(model: GPT, compile: bool | None) -> CompiledDecoder | None:
    """What generation and the server decode with for a ``compile`` setting: False -> None (eager);
    True -> the model's decoder, each new shape waiting for its program; None (the default) -> the model's
    decoder with programs made ready in the background, when the model is on the CPU, a C++ compiler is
    installed and ``$ZENLM_COMPILE`` does not say 0 -- else None. Without a compiler it logs a one-line
    notice (once per process)."""
    if compile is True:
        return compiled_decoder(model)
    if compile is False or not compile_by_default():
        return None
    if next(iter(model.parameters())).device.type != "cpu":
        return None
    if not compiler_available():
        if not _NOTICE_GIVEN.is_set():
            _NOTICE_GIVEN.set()
            _log.warning("no C++ compiler found (g++ or clang++): decoding eagerly. Install gcc or clang for the "
                         "compiled decode step, several times faster per token on a CPU.")
        return None
    return compiled_decoder(model, "aot", background=True)


# ----------------------------------------------------------------------------------- the build process


def _rebuild(spec: dict[str, Any]) -> GPT | None:
    """The model a spec describes, with empty tensors of the right names, dtypes and shapes (a program reads
    none of their values while it is built); None when the result differs from the spec's signature."""
    with meta_build():
        model = GPT(GPTConfig.from_dict(spec["config"]))
        if spec["int8"]:
            quantize_int8(model, empty=True)
        if spec["narrow"]:
            narrow_linears(model)
    compute_buffers(model)  # rotary tables: real values, as the model being decoded has
    wanted = {e[0]: (getattr(torch, e[1].removeprefix("torch.")), tuple(e[2])) for e in spec["signature"]
              if len(e) == 3}
    made: dict[int, Tensor] = {}
    for name, t in _tensors(model).items():
        dtype, shape = wanted.get(name, (t.dtype, tuple(t.shape)))
        if id(t) not in made:  # tied tensors stay one tensor
            real = t.to(dtype) if not t.is_meta else torch.empty(shape, dtype=dtype)
            made[id(t)] = nn.Parameter(real, requires_grad=False) if isinstance(t, nn.Parameter) else real
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        (module._parameters if attr in module._parameters else module._buffers)[attr] = made[id(t)]
    model.eval()
    return model if json.loads(json.dumps(_signature(model))) == spec["signature"] else None


def _build_main(argv: list[str]) -> int:
    """``python -m zenlm.compiled SPEC.json``: build the programs a spec describes, in order (see
    :meth:`CompiledDecoder._build_elsewhere`) -> exit status 0, or 3 when the model cannot be rebuilt."""
    spec_file = Path(argv[0])
    spec = json.loads(spec_file.read_text(encoding="utf-8"))
    spec_file.unlink(missing_ok=True)  # read: the process that asked may exit before this one ends
    try:
        os.nice(10)  # the process that waits for this one is decoding meanwhile: it goes first
    except (AttributeError, OSError):
        pass
    torch.set_num_threads(int(spec["threads"]))
    model = _rebuild(spec)
    if model is None:
        return _CANNOT_REBUILD
    work = _work_folder(Path(spec["programs"][0]["path"]).parent)
    try:
        for program in spec["programs"]:
            path = Path(program["path"])
            if not path.exists():  # another process may have built it meanwhile
                build_program(model, path, ProgramShape.from_json(program["shape"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(spec["log"]).unlink(missing_ok=True)  # nothing to report
    return 0


def _work_folder(programs: Path) -> Path:
    """A build process's own folder for Inductor's work files, made in ``programs`` (the program cache), where
    it is removed when the process ends -> its path, also set as ``TORCHINDUCTOR_CACHE_DIR`` for this process.

    AOTInductor writes a program's C++ sources, objects and library (27-38 MB for GPT-2-small) into its cache
    folder, by default ``/tmp/torchinductor_<user>``, and leaves them there; zenlm keeps only the packaged
    program, so they would pile up with every build. What Inductor reuses from build to build stays in its own
    folder: its precompiled headers (kept there whatever this setting) and the small programs with which it
    probes the CPU's instruction sets (10 s to compile afresh; made or found here first, before the setting
    changes). Folders left by build processes that were killed are removed here too."""
    try:
        from torch._inductor.cpu_vec_isa import valid_vec_isa_list
    except ImportError:  # another torch: its probes, if any, run in the work folder (slower, still correct)
        pass
    else:
        valid_vec_isa_list()  # cached for this process from here on
    programs.mkdir(mode=0o700, parents=True, exist_ok=True)
    for old in programs.glob(f"{_WORK_PREFIX}.*"):
        try:
            os.kill(int(old.name.split(".")[1]), 0)  # the process that made it is still running
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except (ValueError, IndexError, OSError):
            pass
    work = Path(tempfile.mkdtemp(prefix=f"{_WORK_PREFIX}.{os.getpid()}.", dir=programs))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work)
    return work


__all__ = ["CompiledDecoder", "ProgramShape", "KEY_BLOCK", "bucket_for", "build_program", "cache_dir",
           "compile_by_default", "compiled_decoder", "compiler_available", "decoder_for"]


if __name__ == "__main__":
    sys.exit(_build_main(sys.argv[1:]))

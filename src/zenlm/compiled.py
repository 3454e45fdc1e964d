"""The decode step compiled with ``torch.compile``: one sequence's next token at the machine's memory speed.

Decoding one sequence does about 2 flops per weight and reads every weight once per token, so a step can
be no faster than (bytes of weights) / (memory bandwidth): the *bandwidth floor*. Eager PyTorch on a CPU
stays well above it. A matrix-vector product ``F.linear`` with one input row reads its weights at 10–13
GB/s on our 2-core test machine, whose memory copies run at 25–40 GB/s, and a step of a 12-layer model is
about 250 separate operator calls. :class:`CompiledDecoder` compiles the step of
:func:`zenlm.generate.decode_step` (same modules, same formulas) into one program, with four choices that
decide its speed:

1. **Matrix-vector products as multiply-and-sum.** While tracing, every ``F.linear`` whose input has one row
   is rewritten ``y = (x[None, :] * W).sum(-1)``, in fp32 and cast back to x's dtype
   (:func:`~zenlm.models.layers.matvec`). Inductor, the compiler, emits that as one loop per output row
   that streams the row of W once with vector instructions, the rows split across threads: 22–25 GB/s here
   for fp32, bf16 and int8 weights alike. :class:`~zenlm.models.int8.Int8Linear` does the same with its
   int8 matrix, so the widening to float happens in registers, and its per-channel scale multiplies the sums.
2. **No recomputation inside those loops.** Left to itself, Inductor folds cheap producers into their
   consumers. For a product that means recomputing, e.g., the layer norm of x once per output row (3,072
   times for GPT-2's MLP). ``realize_opcount_threshold = 0`` makes it compute every such vector once.
3. **The cache is written in place.** Each layer's keys/values are a tensor of their own
   (:class:`~zenlm.models.gpt.KVCache`), so writing the new key into layer i's cache is an in-place write into
   a program input. A slice of one big tensor would make the compiled program copy the layer's cache every
   step.
4. **One program for all positions.** The number of keys S grows by one each step. The step takes
   ``arange(S)`` as an input whose length is marked dynamic, so it compiles once, not once per length.

Rows: the multiply-and-sum form reads W once per input row, so it is used only when there is one row
(generating one sequence). With several rows the products stay matrix products (each weight is read once
for all rows), which is what a batch needs. The program is specialised to the batch size; a new batch size
compiles again. The weights are inputs of the program, so models of one architecture and dtype share it (a
second such model compiles nothing); another architecture or dtype compiles its own.

Costs: the first call compiles, which takes about 20–30 s for a GPT-2-small model on 2 CPU cores (measured
with an empty cache). Inductor keeps its results on disk, so a later process with the same model shape
starts in 5–15 s. Compiling pays off for long generations; a short answer is faster eager. Compiling needs
a C++ compiler on CPU (gcc or clang) and Triton on a GPU. Outputs: fp32 logits agree with eager decoding to
about 1e-5 (the sums run in another order), so greedy tokens are the same except at near-ties.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from zenlm.errors import ConfigError
from zenlm.generate import _decode
from zenlm.models.gpt import GPT, KVCache
from zenlm.models.layers import matvec

# Inductor settings of the compiled step (names checked against the installed torch, see _options):
# realize_opcount_threshold 0: compute each intermediate vector once (point 2 above);
# size_asserts / alignment_asserts off: the generated Python wrapper otherwise checks the shape, strides and
# alignment of each of its ~150 inputs (every weight) on every call, ~0.6 ms of a 7 ms int8 GPT-2 step.
_INDUCTOR_OPTIONS = {"realize_opcount_threshold": 0, "size_asserts": False, "alignment_asserts": False}


class _LinearsAsReductions(TorchFunctionMode):
    """While active, ``F.linear(x, W, b)`` with one row in x becomes ``(x[None, :] * W).sum(-1) + b``.

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


def _step(model: GPT, tokens_B: Tensor, pos_B: Tensor, keys_S: Tensor, k_layers: list[Tensor],
          v_layers: list[Tensor]) -> Tensor:
    with _LinearsAsReductions():
        return _decode(model, tokens_B, pos_B, keys_S, k_layers, v_layers)


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


class CompiledDecoder:
    """:func:`zenlm.generate.decode_step` for one model, compiled on the first call.

    ``decoder(tokens_B, pos_B, k_layers, v_layers)`` -> logits [B, V] (float32), the arguments and result
    of ``decode_step`` (rows attend over their own keys; the batch size is fixed per compiled program).
    :meth:`next_logits` feeds one token to a batch-1 :class:`KVCache` and advances it, as
    ``model(token, cache=cache)`` would.
    """

    def __init__(self, model: GPT) -> None:
        self._model = weakref.ref(model)  # the cache below must not keep the model alive
        self._compiled = torch.compile(_step, options=_options())

    @property
    def model(self) -> GPT:
        model = self._model()
        if model is None:
            raise ConfigError("this CompiledDecoder's model no longer exists.")
        return model

    @torch.inference_mode()
    def __call__(self, tokens_B: Tensor, pos_B: Tensor, k_layers: Sequence[Tensor],
                 v_layers: Sequence[Tensor]) -> Tensor:
        S = int(pos_B.max()) + 1
        keys_S = torch.arange(S, device=tokens_B.device)
        torch._dynamo.maybe_mark_dynamic(keys_S, 0)
        try:
            return self._compiled(self.model, tokens_B, pos_B, keys_S, list(k_layers), list(v_layers))
        except torch._dynamo.exc.BackendCompilerFailed as e:
            raise ConfigError(
                f"compiling the decode step failed: {e.inner_exception!r}. torch.compile needs a working C++ "
                "compiler on CPU (install gcc or clang) and Triton on a GPU; or generate without compile."
            ) from e

    def next_logits(self, token: int, cache: KVCache) -> Tensor:
        """Feed ``token`` at position ``cache.pos`` of a batch-1 cache -> logits [V]; ``cache.pos`` += 1."""
        if cache.batch_size != 1:
            raise ConfigError(f"next_logits takes a batch-1 cache, got batch size {cache.batch_size}.")
        if cache.pos >= cache.max_len:
            raise ConfigError(f"KV cache overflow: {cache.pos} positions filled of max_len {cache.max_len}; "
                              "reset() the cache and prefill a shorter context.")
        device = cache.device
        logits_1V = self(torch.tensor([token], device=device), torch.tensor([cache.pos], device=device),
                         cache.k, cache.v)
        cache.pos += 1
        return logits_1V[0]


_DECODERS: weakref.WeakKeyDictionary[GPT, CompiledDecoder] = weakref.WeakKeyDictionary()


def compiled_decoder(model: GPT) -> CompiledDecoder:
    """The model's :class:`CompiledDecoder`, made on the first call for that model and reused afterwards."""
    decoder = _DECODERS.get(model)
    if decoder is None:
        decoder = _DECODERS[model] = CompiledDecoder(model)
    return decoder


__all__ = ["CompiledDecoder", "compiled_decoder"]

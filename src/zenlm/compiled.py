"""The decode step compiled by Inductor (ahead of time on CPU): one sequence's next token at memory speed.

Decoding one sequence does about 2 flops per weight and reads every weight once per token, so a step can
be no faster than (bytes of weights) / (memory bandwidth): the *bandwidth floor*. Eager PyTorch on a CPU
stays well above it. A matrix-vector product ``F.linear`` with one input row reads its weights at 10–13
GB/s on our 2-core test machine, whose memory copies run at 25–40 GB/s, and a step of a 12-layer model is
about 250 separate operator calls. :class:`CompiledDecoder` compiles the model's own step,
:meth:`GPT.decode_step <zenlm.models.gpt.GPT.decode_step>` (same modules, same formulas), into one program,
with five choices that decide its speed:

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
   by other models of the same architecture and dtypes.

Rows: the multiply-and-sum form reads W once per input row, so it is used only when there is one row
(generating one sequence). With several rows the products stay matrix products (each weight is read once
for all rows), which is what a batch needs. A program is specialised to the batch size and to the cache's
length and dtype; another batch size or cache length compiles again.

Costs: building a program takes about 25-45 s for a GPT-2-small model on 2 CPU cores (export ~6 s,
AOTInductor ~20-40 s); loading it from the disk cache in a later process takes about a second. (The
``"dynamo"`` backend compiles in 20-30 s, 5-15 s from Inductor's disk cache, in every new process.)
Compiling pays off for long generations; a short answer is faster eager. Compiling needs a C++ compiler
on CPU (gcc or clang) and Triton on a GPU. Outputs: fp32 logits agree with eager decoding to about 1e-5
(the sums run in another order), so greedy tokens are the same except at near-ties. The first and the
last key slot of a cache (one key; a full cache) are outside the program's range and run eagerly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import platform
import sys
import uuid
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from zenlm.errors import ConfigError
from zenlm.models.cache import KVCache
from zenlm.models.gpt import GPT
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


def _source_digest() -> str:
    """A digest of zenlm's model and decoding code: a program built by another version is not reused."""
    h = hashlib.sha256()
    pkg = Path(__file__).parent
    for f in sorted([*pkg.glob("models/*.py"), pkg / "compiled.py"]):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


class _StepModule(torch.nn.Module):
    """The step as a module, for ``torch.export`` (the model's tensors become the program's constants)."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens_B: Tensor, pos_B: Tensor, keys_S: Tensor, k_layers: list[Tensor],
                v_layers: list[Tensor]) -> Tensor:
        return _step(self.model, tokens_B, pos_B, keys_S, k_layers, v_layers)


class CompiledDecoder:
    """:meth:`GPT.decode_step <zenlm.models.gpt.GPT.decode_step>` for one model, compiled on the first call.

    ``decoder(tokens_B, pos_B, k_layers, v_layers)`` -> logits [B, V] (float32), the arguments and result
    of ``model.decode_step`` (rows attend over their own keys). :meth:`next_logits` feeds one token to a batch-1
    :class:`KVCache` and advances it, as ``model(token, cache=cache)`` would.

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

    The weights are read where they are. Changing them in place (``load_state_dict``, an optimiser step) is
    seen at once; after replacing tensors or modules (``model.to(dtype)``, quantising), call
    :func:`compiled_decoder` again (``generate`` does so for every generation), which re-reads them.
    If a model cannot be exported, the decoder warns once and uses ``"dynamo"``.
    """

    def __init__(self, model: GPT, backend: str | None = None) -> None:
        device = next(iter(model.parameters())).device
        backend = backend or ("aot" if device.type == "cpu" else "dynamo")
        if backend not in ("aot", "dynamo"):
            raise ConfigError(f"unknown compile backend {backend!r}: use 'aot' or 'dynamo'.")
        self.backend = backend
        self._model = weakref.ref(model)  # the cache below must not keep the model alive
        self._compiled = torch.compile(_step, options=_options())
        self._programs: dict[tuple[object, ...], object] = {}
        self._weights: dict[str, Tensor] = {}
        self._weights_key: tuple[object, ...] = ()
        self.programs_built = 0  # AOT programs compiled by this decoder (not loaded from disk)
        self.refresh()

    @property
    def model(self) -> GPT:
        model = self._model()
        if model is None:
            raise ConfigError("this CompiledDecoder's model no longer exists.")
        return model

    def refresh(self) -> None:
        """Re-read the model's tensors (after replacing some: ``model.to(dtype)``, new modules)."""
        model = self.model
        weights = dict(model.named_parameters(remove_duplicate=False))
        weights.update(model.named_buffers(remove_duplicate=False))
        key = tuple((n, t.dtype, tuple(t.shape), t.data_ptr()) for n, t in weights.items())
        if key != self._weights_key:
            # the loaded programs point at the old tensors; they are reloaded on their next call
            self._weights, self._weights_key, self._programs = weights, key, {}

    @torch.inference_mode()
    def __call__(self, tokens_B: Tensor, pos_B: Tensor | int, k_layers: Sequence[Tensor],
                 v_layers: Sequence[Tensor]) -> Tensor:
        if isinstance(pos_B, int):  # one position for all rows: the program takes one per row
            pos_B = torch.full((tokens_B.shape[0],), pos_B, device=tokens_B.device)
        S = int(pos_B.max()) + 1
        keys_S = torch.arange(S, device=tokens_B.device)
        k_layers, v_layers = list(k_layers), list(v_layers)
        if self.backend == "aot":
            # one program covers 2 <= S < cache length; the first and the last key slot run eagerly
            program = self._program(tokens_B.shape[0], k_layers[0]) if 2 <= S < k_layers[0].shape[2] else None
            if program is not None:
                return program(tokens_B.long(), pos_B.long(), keys_S, k_layers, v_layers)  # type: ignore[operator]
            if self.backend == "aot":  # not switched to "dynamo" by a failed export
                return self.model.decode_step(tokens_B, pos_B, k_layers, v_layers, keys_S=keys_S)
        torch._dynamo.maybe_mark_dynamic(keys_S, 0)
        try:
            return self._compiled(self.model, tokens_B, pos_B, keys_S, k_layers, v_layers)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            raise ConfigError(
                f"compiling the decode step failed: {e.inner_exception!r}. torch.compile needs a working C++ "
                "compiler on CPU (install gcc or clang) and Triton on a GPU; or generate without compile."
            ) from e

    def _program(self, B: int, k_cache: Tensor) -> object | None:
        """The AOT program for batch size B and this cache layout, loaded (or built) on first use."""
        model = self.model
        key = (B, tuple(k_cache.shape[1:]), k_cache.dtype, k_cache.device.type, model.training)
        program = self._programs.get(key)
        if program is None:
            try:
                program = self._programs[key] = self._load(key, B, k_cache)
            except Exception as e:  # noqa: BLE001 - any export/compile failure: fall back, say why
                if isinstance(e, ConfigError):
                    raise
                warnings.warn(f"zenlm.compiled: this model could not be compiled ahead of time ({e!r:.300}); "
                              "using torch.compile instead.", RuntimeWarning, stacklevel=3)
                self.backend = "dynamo"
                return None
        return program

    def _load(self, key: tuple[object, ...], B: int, k_cache: Tensor) -> object:
        """The program for ``key`` from the disk cache (built first if missing), reading the model's tensors."""
        import torch._inductor

        model = self.model
        digest = hashlib.sha256(repr((
            key, sorted((n, str(t.dtype), tuple(t.shape)) for n, t in self._weights.items()),
            dataclasses.asdict(model.config), sorted(_options().items()), torch.__version__, sys.version_info[:2],
            platform.machine(), torch.backends.cpu.get_cpu_capability(), torch.get_num_threads(), _source_digest(),
        )).encode()).hexdigest()[:32]
        path = cache_dir() / f"step-{digest}.pt2"
        built = False
        if not path.exists():
            _log.info("building the decode program (once per model shape; kept in %s)", path.parent)
            self._build(path, B, k_cache)
            self.programs_built, built = self.programs_built + 1, True
        try:
            runner = torch._inductor.aoti_load_package(str(path))
        except Exception:
            if built:
                raise
            _log.warning("the decode program %s could not be loaded; building it again", path)
            path.unlink(missing_ok=True)  # damaged or from an incompatible build: replace it
            self._build(path, B, k_cache)
            self.programs_built += 1
            runner = torch._inductor.aoti_load_package(str(path))
        names = runner.get_constant_fqns()
        missing = [n for n in names if n.removeprefix("model.") not in self._weights]
        if missing:
            raise RuntimeError(f"the program needs tensors the model does not have: {missing[:3]}")
        # user_managed: the program reads the model's own tensors (no copy); self._weights keeps them alive
        runner.load_constants({n: self._weights[n.removeprefix("model.")] for n in names},
                              check_full_update=True, user_managed=True)
        return runner

    def _build(self, path: Path, B: int, k_cache: Tensor) -> None:
        """Export the step with example inputs (S dynamic in [2, L-1]), compile it with AOTInductor, and
        write the package to ``path`` whole (through a temporary file)."""
        import torch._inductor

        model = self.model
        n_layer, L, device = len(model.blocks), k_cache.shape[2], k_cache.device
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # compiled code: private to the user
        fresh = [torch.zeros_like(k_cache) for _ in range(2 * n_layer)]  # tracing must not touch the real cache
        example = (torch.zeros(B, dtype=torch.long, device=device), torch.ones(B, dtype=torch.long, device=device),
                   torch.arange(2, device=device), fresh[:n_layer], fresh[n_layer:])
        S = torch.export.Dim("S", min=2, max=L - 1)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp.pt2")  # one per builder
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecation notes while tracing
                exported = torch.export.export(_StepModule(model), example, strict=False, dynamic_shapes=(
                    None, None, {0: S}, [None] * n_layer, [None] * n_layer))
                torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp), inductor_configs={
                    **_options(), "aot_inductor.package_constants_in_so": False})
            os.replace(tmp, path)  # whole or not at all: a half-written package is never loaded
        finally:
            tmp.unlink(missing_ok=True)

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


_log = logging.getLogger(__name__)
_DECODERS: weakref.WeakKeyDictionary[GPT, CompiledDecoder] = weakref.WeakKeyDictionary()


def compiled_decoder(model: GPT, backend: str | None = None) -> CompiledDecoder:
    """The model's :class:`CompiledDecoder`, made on the first call for that model and reused afterwards
    (re-reading the model's tensors, see :meth:`CompiledDecoder.refresh`). ``backend``: ``"aot"`` or
    ``"dynamo"`` (default: ``"aot"`` on CPU, else ``"dynamo"``); asking for another backend than the
    existing decoder's makes a new decoder."""
    decoder = _DECODERS.get(model)
    if decoder is None or (backend is not None and backend != decoder.backend):
        decoder = _DECODERS[model] = CompiledDecoder(model, backend)
    else:
        decoder.refresh()
    return decoder


__all__ = ["CompiledDecoder", "cache_dir", "compiled_decoder"]

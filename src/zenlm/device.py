"""Device and precision are settings, not code paths.

``resolve_device("auto")`` picks CUDA, then Apple's MPS, then the CPU. ``resolve_precision("auto", device)``
picks the compute precision that the hardware runs fastest, and :func:`hardware_choices` records why, as one
line for the terminal and a dict for ``config.yaml``. ``autocast(device, precision)`` returns the context
manager that runs the forward pass in that precision (weights stay fp32 for training).

Why "auto" asks for *native* bf16 on a CPU. A bf16 matrix product is only fast where the CPU multiplies bf16
numbers in hardware: the AVX-512 BF16 instructions (``vdpbf16ps``; Cooper Lake, Sapphire Rapids, AMD Zen 4 and
later) or Intel's AMX tiles. Any other AVX-512 CPU (Skylake to Ice Lake servers, for example) still *accepts*
bf16, because oneDNN emulates it by widening to fp32, so ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is
True there; but training then runs at about half its fp32 speed (measured: 1,698 vs 3,643 tokens/s for the
demo). So "auto" chooses bf16 only where :func:`cpu_features` reports native bf16, and fp32 everywhere else.
``benchmarks/auto_choices.py`` times the chosen path against the one passed over.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import mmap
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from zenlm.errors import ConfigError

Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Weight dtypes for inference (``zenlm.load(RUN, dtype=...)``, ``--dtype``), by name.
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# What ``--dtype`` accepts for inference: "auto" keeps the weights' own precision; int8 quantises the linear
# layers when the run is loaded (per output channel, see zenlm.models.int8).
WEIGHT_DTYPES = ("auto", "fp32", "bf16", "fp16", "int8")
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


def resolve_device(name: str = "auto") -> torch.device:
    """Turn "auto" | "cpu" | "cuda" | "cuda:N" | "mps" into a ``torch.device``, checking it exists."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps.") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto.")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("--device mps was asked for but MPS is not available; use --device cpu or auto.")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device type {dev.type!r} is not supported; use auto, cpu, cuda or mps.")
    return dev


def resolve_dtype(name: str) -> torch.dtype:
    """"fp32" | "bf16" | "fp16" -> the torch dtype (ConfigError naming the choices otherwise)."""
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r} is not supported; choose fp32, bf16 or fp16.")
    return DTYPES[name]


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model's tensors live on (its first parameter's, or buffer's for a model of counts)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


# ------------------------------------------------------------------------------------ what the CPU can do


def available_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes of memory free for new tensors on ``device``: a CUDA device's free memory, else the system's
    available memory (MemAvailable of /proc/meminfo, or the physical memory where that is not readable);
    None when it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import os

        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def _torch_check(name: str) -> bool:
    """One of PyTorch's CPU feature checks (``torch.cpu._is_avx512_bf16_supported`` ...); False if absent."""
    fn = getattr(torch.cpu, name, None)
    try:
        return bool(fn()) if fn is not None else False
    except (RuntimeError, AttributeError):
        return False


def _cpuinfo_flags() -> set[str]:
    """The feature flags of the first CPU in /proc/cpuinfo ("flags" on x86, "Features" on ARM); empty elsewhere."""
    return set(_cpuinfo_field("flags", "Features").split())


def _cpuinfo_field(*keys: str) -> str:
    """The first value of one of ``keys`` in /proc/cpuinfo, or "" where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in keys:
                    return value.strip()
    except OSError:
        pass
    return ""


def _cpu_name() -> str:
    return _cpuinfo_field("model name", "Model", "Hardware") or platform.processor() or platform.machine()


def cpu_vendor() -> str:
    """The CPU's vendor string ("GenuineIntel", "AuthenticAMD", ...; /proc/cpuinfo), or "" where unknown."""
    return _cpuinfo_field("vendor_id")


@dataclass(frozen=True)
class CPUFeatures:
    """What this CPU computes natively, as far as the choice of precision is concerned.

    capability:  the SIMD level PyTorch's kernels were dispatched to ("AVX512", "AVX2", "DEFAULT", ...)
    avx512:      AVX-512 foundation instructions
    avx512_bf16: AVX-512 BF16 (bf16 dot products in hardware)
    amx_tile:    Intel AMX tiles (bf16 / int8 matrix units)
    arm_bf16:    an ARM CPU with the BF16 extension (``bf16`` in /proc/cpuinfo's Features)
    """

    name: str
    machine: str
    capability: str
    avx512: bool
    avx512_bf16: bool
    amx_tile: bool
    arm_bf16: bool

    @property
    def native_bf16(self) -> bool:
        """True when bf16 matrix products run in hardware (not emulated by widening to fp32)."""
        return self.avx512_bf16 or self.amx_tile or self.arm_bf16

    def describe(self) -> str:
        """A short phrase for the terminal, e.g. "AVX-512, no native bf16" or "AVX-512 + AMX, native bf16"."""
        simd = {"AVX512": "AVX-512", "AVX2": "AVX2", "DEFAULT": "no AVX2"}.get(self.capability, self.capability)
        if self.amx_tile:
            simd += " + AMX"
        return f"{simd}, {'native' if self.native_bf16 else 'no native'} bf16"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "machine": self.machine, "capability": self.capability, "avx512": self.avx512,
                "avx512_bf16": self.avx512_bf16, "amx_tile": self.amx_tile, "arm_bf16": self.arm_bf16,
                "native_bf16": self.native_bf16}


@functools.lru_cache(maxsize=1)
def cpu_features() -> CPUFeatures:
    """This CPU's features, read once per process from PyTorch's checks (and /proc/cpuinfo on ARM)."""
    try:
        capability = str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        capability = "unknown"
    machine = platform.machine().lower()
    arm = machine in ("aarch64", "arm64")
    return CPUFeatures(
        name=_cpu_name(),
        machine=machine,
        capability=capability,
        avx512=_torch_check("_is_avx512_supported"),
        avx512_bf16=_torch_check("_is_avx512_bf16_supported"),
        amx_tile=_torch_check("_is_amx_tile_supported"),
        arm_bf16=arm and "bf16" in _cpuinfo_flags(),
    )


def cpu_has_bf16() -> bool:
    """True when this CPU runs bf16 matrix multiplies natively (AVX-512 BF16, AMX tiles, or ARM's BF16).

    Not ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``: that is True on every AVX-512 CPU because oneDNN
    emulates bf16 there, at about half the fp32 speed (see the module docstring)."""
    return cpu_features().native_bf16


# ------------------------------------------------------------------------------- choosing the precision


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn "auto" into a concrete precision for ``device`` and refuse combinations that cannot work.

    auto: bf16 on a CUDA GPU that supports it (else fp16), bf16 on a CPU with native bf16 (else fp32), fp32 on
    MPS. This is the one place zenlm picks a compute precision from the hardware; everything calls it.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not supported; choose auto, fp32, bf16 or fp16.")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if device.type == "cpu":
            return "bf16" if cpu_has_bf16() else "fp32"
        return "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("fp16 is not supported on the CPU; use --precision bf16 or fp32.")
    return precision


@dataclass(frozen=True)
class HardwareChoices:
    """What a run resolved from the hardware: shown once at its start and saved under ``resolved:`` in
    config.yaml, so the run can be reproduced and a slow one explained."""

    device: str
    requested_precision: str
    precision: str
    threads: int | None
    hardware: str  # e.g. "AVX-512, no native bf16" or "NVIDIA H100 80GB HBM3"
    note: str = ""  # e.g. a warning that bf16 was asked for on a CPU that only emulates it

    def line(self) -> str:
        """One line, e.g. ``cpu: AVX-512, no native bf16 -> fp32, 2 threads``."""
        how = "chosen by --precision auto" if self.requested_precision == "auto" else "as asked"
        compute = "fp32" if self.precision == "fp32" else f"{self.precision} autocast"
        text = f"{self.device}: {self.hardware} -> {compute} ({how})"
        if self.threads is not None:
            text += f", {self.threads} thread{'s' if self.threads != 1 else ''}"
        return text + (f"; {self.note}" if self.note else "")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"device": self.device, "precision": self.precision,
                             "requested_precision": self.requested_precision, "hardware": self.hardware}
        if self.threads is not None:
            d["threads"] = self.threads
        if self.device == "cpu":
            d["cpu"] = cpu_features().to_dict()
        return d


def hardware_choices(device: torch.device, precision: str) -> HardwareChoices:
    """Resolve ``precision`` for ``device`` (see :func:`resolve_precision`) and describe the choice."""
    resolved = resolve_precision(precision, device)
    note = ""
    if device.type == "cpu":
        feats = cpu_features()
        hardware, threads = feats.describe(), torch.get_num_threads()
        if resolved == "bf16" and not feats.native_bf16:
            note = "this CPU only emulates bf16: expect about half the fp32 speed (--precision auto picks fp32)"
    elif device.type == "cuda":
        hardware, threads = torch.cuda.get_device_name(device), None
    else:
        hardware, threads = device.type, None
    return HardwareChoices(device=str(device), requested_precision=precision, precision=resolved,
                           threads=threads, hardware=hardware, note=note)


@dataclass(frozen=True)
class InferencePrecision:
    """How a loaded model keeps its weights and what it computes in.

    weights:     "fp32" | "bf16" | "fp16" | "int8": the dtype of the large matrices (linear layers, token
                 embedding); int8 means int8 matrices with one float scale per output channel
    activations: "fp32" | "bf16" | "fp16": the dtype the layers compute in and the KV cache is kept in; the
                 small tensors (norms, biases, scales) are kept in it too
    requested:   what was asked for (``--dtype``), "auto" included
    why:         a few words on how the activations were chosen, for the one line the CLI prints
    """

    weights: str
    activations: str
    requested: str
    why: str

    def line(self) -> str:
        """One line, e.g. ``weights bf16 (--dtype bf16), activations fp32: this CPU has no native bf16``."""
        how = "the weights' own precision, --dtype auto" if self.requested == "auto" else f"--dtype {self.requested}"
        return f"weights {self.weights} ({how}), activations {self.activations}: {self.why}"


def inference_precision(requested: str, device: torch.device, stored: str) -> InferencePrecision:
    """Decide the weights' and activations' precision for inference on ``device``.

    requested: "auto" (default: the weights stay as stored -- nothing is rounded that the file did not round),
               "fp32", "bf16", "fp16" or "int8" (see WEIGHT_DTYPES); stored: the weights' dtype in the file
               ("fp32", "bf16", "fp16", or "int8" for a quantised run, whose weights stay int8: a float dtype
               asked for then names the activations).

    The activations follow the hardware, through :func:`resolve_precision`: fp32 and fp16 weights compute in
    their own dtype; bf16 and int8 weights compute in bf16 only where bf16 runs natively (a CPU with
    AVX-512 BF16 / AMX / ARM BF16, a CUDA GPU with bf16), else in fp32. On a CPU that only emulates bf16,
    bf16 activations make every matrix product that is not a one-row decode step (prompt prefill, batches)
    about twice as slow as fp32, while bf16 *weights* still halve the bytes each decode step reads.
    """
    if requested not in WEIGHT_DTYPES:
        raise ConfigError(f"dtype {requested!r} is not supported; choose one of {', '.join(WEIGHT_DTYPES)}.")
    weights = stored if requested == "auto" else requested
    if stored == "int8" and weights != "int8":  # int8 weights stay int8; a float dtype names the activations
        return InferencePrecision("int8", weights, requested, f"--dtype {requested} on an int8 run")
    if weights == "fp16" and device.type == "cpu":
        raise ConfigError("fp16 weights are for GPUs; on a CPU use --dtype bf16 (or int8, or fp32).")
    if weights in ("fp32", "fp16"):
        return InferencePrecision(weights, weights, requested, "the weights' dtype")
    native = resolve_precision("auto", device) == "bf16"
    where = "this CPU" if device.type == "cpu" else str(device)
    why = (f"{where} computes bf16 natively" if native else
           f"{where} has no native bf16 (bf16 arithmetic would be emulated, about half the fp32 speed)")
    return InferencePrecision(weights, "bf16" if native else "fp32", requested, why)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Context manager for the forward pass in ``precision`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


_NORMAL_INITS = (torch.Tensor.normal_, torch.nn.init.normal_, torch.nn.init.trunc_normal_)


class _NoRandomInitOnMeta(TorchFunctionMode):
    """``Tensor.normal_`` on a meta tensor does nothing (a meta tensor holds no values); run, it would import
    PyTorch's Python reference kernels (sympy and some 800 modules: ~75 MB and seconds) for nothing."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func in _NORMAL_INITS:
            t = args[0] if args else kwargs.get("tensor")  # nn.init passes its tensor by keyword
            if isinstance(t, torch.Tensor) and t.is_meta:
                return t
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_build() -> Iterator[None]:
    """Build modules inside this block on the meta device: shapes and dtypes without memory or initialisation,
    to load weights into afterwards (lean loading, zenlm.rundir). Buffers a module computes rather than loads
    (rotary tables) are meta too: :func:`zenlm.models.layers.compute_buffers` computes them afterwards."""
    with torch.device("meta"), _NoRandomInitOnMeta():
        yield


def env_switch(name: str) -> bool | None:
    """An on/off setting from the environment variable ``name``: True for 1 / on / true / yes, False for
    0 / off / false / no (any case, spaces ignored), None when unset or anything else (the default applies)."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "on", "true", "yes"):
        return True
    if value in ("0", "off", "false", "no"):
        return False
    return None


@functools.lru_cache(maxsize=1)
def _gnu_openmp() -> ctypes.CDLL | None:
    """The GNU OpenMP runtime (libgomp) this process has loaded, torch's own on Linux; None elsewhere."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/libgomp" in line}
    except OSError:
        return None
    for path in sorted(paths):
        with contextlib.suppress(OSError):
            lib = ctypes.CDLL(path)  # already loaded: the same handle, nothing is loaded twice
            if hasattr(lib, "omp_pause_resource_all"):
                return lib
    return None


def release_openmp_workers() -> bool:
    """Let go of the OpenMP worker threads that the calling thread's parallel regions started. Call it on a
    thread that is done computing when another thread takes the model's work over (the server's engine
    thread); True when the workers were released.

    Why: GNU OpenMP (torch's runtime on Linux) keeps a pool of workers for every thread that has run a parallel
    region, for good. Once the pools hold more threads than the machine has CPUs, it stops spinning between
    regions: a worker sleeps at the end of every region and barrier and is woken for the next one by a system
    call. Each region then costs tens of microseconds more, and a decode step runs hundreds of them. Measured
    on a 2-core Xeon: a 16-row bf16 step of a GPT-2-small model took 41.6 ms on a second thread, after the
    main thread had loaded the model, against 23.8 ms on the main thread; an ``exp`` of 200,000 floats 70-90
    against 19 us. With the main thread's workers released first, the second thread runs as fast as the
    main one. The pool comes back if the thread runs a parallel region again. A no-op (False) where the
    runtime is not GNU OpenMP (``omp_pause_resource_all`` releases only the calling thread's pool there), or
    when ``$ZENLM_KEEP_OPENMP_WORKERS`` is 1 / on / true / yes (to measure what this saves)."""
    lib = _gnu_openmp()
    if lib is None or env_switch("ZENLM_KEEP_OPENMP_WORKERS"):
        return False
    return lib.omp_pause_resource_all(1) == 0  # omp_pause_soft; fails (-1) inside a parallel region


# A CPU tensor of at least this many bytes that :func:`lazy_zeros` makes takes pages of its own from the OS.
LAZY_ZEROS_MIN_BYTES = 1 << 16


def lazy_zeros(shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device | str | None = None) -> Tensor:
    """``torch.zeros(shape)`` whose memory costs nothing until it is written: the KV caches.

    ``torch.zeros`` writes every byte, so a cache made for a whole context is resident in full from the start
    (a pool of 16 rows of 1,024 positions for a GPT-2-small model is 604 MB in bf16). On a CPU a tensor of :data:`LAZY_ZEROS_MIN_BYTES` or more is instead an anonymous memory map: the
    OS hands out zeroed pages only when one is first written (reads of a page never written see the system's
    one page of zeros), so a cache costs about what its sequences have filled. Elsewhere, and for smaller
    tensors, plain ``torch.zeros``. The tensor keeps its map alive; the map is returned when the tensor is
    freed. Whoever knows which positions will be written reserves them before the hot loop
    (:meth:`zenlm.models.cache.KVCache.reserve`); the server reserves its whole pool at start."""
    device = torch.device("cpu" if device is None else device)
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or nbytes < LAZY_ZEROS_MIN_BYTES:
        return torch.zeros(shape, dtype=dtype, device=device)
    if not hasattr(mmap, "MAP_PRIVATE"):  # Windows: no flags to ask for
        return torch.zeros(shape, dtype=dtype, device=device)
    # private (the default, MAP_SHARED, would be shared memory, whose pages are handed out on first read too)
    pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(pages, dtype=dtype).view(shape)


# Transparent huge pages: 2 MiB pages for memory the OS is asked to back so (madvise MADV_HUGEPAGE), where the
# system allows it (/sys/kernel/mm/transparent_hugepage/enabled: "always" or "madvise"). One page-table entry then
# covers 512 small pages: a decode step that reads every key and value of a KV-cache pool misses the TLB far less.
HUGE_PAGE_BYTES = 2 << 20


@functools.lru_cache(maxsize=1)
def _libc_madvise() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def advise_huge_pages(t: Tensor) -> bool:
    """Ask the OS to back the whole 2 MiB pages inside ``t``'s memory with transparent huge pages from their first
    write on (pages written before keep their size). True when the advice was taken; False on systems without
    it (not Linux, a kernel without transparent huge pages), for tensors off the CPU or not contiguous, and for
    less than one whole huge page. Meant for memory that is written in full right after (a KV-cache pool that is
    reserved whole, :meth:`zenlm.models.cache.KVCache.reserve`): a huge page is taken whole at its first write,
    so on memory that fills slowly it would cost up to 2 MiB where small pages cost 4 KiB."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or t.device.type != "cpu" or not t.is_contiguous():
        return False
    start = t.data_ptr()
    stop = start + t.numel() * t.element_size()
    lo = -(-start // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    hi = stop // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    if hi <= lo:
        return False
    try:
        return _libc_madvise()(lo, hi - lo, advice) == 0
    except (OSError, AttributeError):
        return False


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (for honest timings); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

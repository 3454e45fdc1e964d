"""Checkpoints: safetensors for tensors, JSON for everything else, written atomically. No pickle.

Layout of ``RUN_DIR/checkpoints/step-NNNNNN/``::

    model.safetensors       model weights
    optimizer.safetensors   every tensor of every optimiser state ("opt{i}.state.{param}.{key}")
    rng.safetensors         RNG states (CPU, and CUDA when used) as uint8 tensors
    trainer.json            step, elapsed time, optimiser scalars and param-group settings, extra state

A checkpoint is written into ``.step-NNNNNN.tmp-<pid>`` and renamed into place when complete, so a
crash mid-write never leaves a directory that looks finished; a write that fails (a full disk, a read-only
directory) removes its partial copy and says which file it was writing, and the partial copies that crashed
processes left behind are removed at the next save. Loading reads and checks everything before it changes
anything: weight names, shapes, dtypes and finiteness, every optimiser tensor against the parameter it
belongs to, the RNG state and trainer.json, naming the file and the key that disagree.
:func:`load_latest_checkpoint` falls back to the previous complete checkpoint, with a warning, when the
newest one is damaged.

Saving and loading come in parts, so that a run on several processes (:mod:`zenlm.train.distributed`) can
gather the full state to process 0 before writing, and read and check on process 0 before sending it to all::

    save_checkpoint  = model_tensors + optimizer_tensors      (what a state is)   + write_checkpoint (the files)
    load_checkpoint  = read_checkpoint (read and check, change nothing)          + apply_checkpoint
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from zenlm.errors import CheckpointError, write_error
from zenlm.fileio import atomic_path, read_json_object, write_safetensors
from zenlm.models.lora import adapter_state_dict, has_lora

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d{6,})$")
TMP_DIR = re.compile(r"^\.step-(\d{6,})\.tmp-(\d+)$")  # fileio.atomic_path's temporary name


def _write_error(path: Path, e: OSError) -> CheckpointError:
    return write_error(path, e, CheckpointError, "then resume with --resume")  # type: ignore[return-value]


def tied_names(model: nn.Module) -> dict[str, str]:
    """Every state-dict name of ``model`` -> the name its tensor is saved under: itself, or the first name of
    the same tensor (a tied head -> the embedding; safetensors refuses shared tensors). Works on sharded (FSDP2)
    models too, whose tied parameters are one DTensor object."""
    first: dict[Any, str] = {}
    out: dict[str, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        key = id(t) if _is_dtensor(t) else (t.data_ptr() if t.numel() > 0 else ("empty", name))
        out[name] = first.setdefault(key, name)
    return out


def saved_names(model: nn.Module) -> list[str]:
    """The names a weights file of ``model`` holds: its state dict with every shared tensor once. A model with
    LoRA adapters saves only what it trains (the adapters, a task head): its frozen base stays in the base run."""
    names = [name for name, saved in tied_names(model).items() if name == saved]
    if has_lora(model):
        trained = set(adapter_state_dict(model))
        names = [name for name in names if name in trained]
    return names


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"  # torch.distributed.tensor.DTensor, without importing torch.distributed


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights as contiguous CPU tensors, each shared tensor once (:func:`saved_names`)."""
    sd = model.state_dict()
    return {name: sd[name].detach().contiguous().cpu() for name in saved_names(model)}


def write_weights(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write weights to ``path`` (safetensors) atomically; a failure leaves nothing and names the file."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            write_safetensors(tensors, tmp, metadata=metadata or {"format": "pt"})
    except OSError as e:
        raise _write_error(path, e) from None


def save_model(model: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Save model weights to ``path`` (safetensors) atomically."""
    write_weights(model_tensors(model), path, metadata)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; CheckpointError naming the file when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}).") from e


def check_weights(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse ``tensors`` (read from ``path``) unless they fit ``model``: the same names (tied weights once),
    the same shapes, a dtype of the same kind (floating point for floating parameters, the integer type
    of quantised buffers), and finite values — NaN or Inf weights would load silently and generate garbage."""
    check_layout(model.state_dict(), set(saved_names(model)),
                 {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}, path)
    for name, t in tensors.items():
        check_finite(name, t, path)


def check_layout(own: dict[str, torch.Tensor], names: set[str],
                 stored: dict[str, tuple[tuple[int, ...], torch.dtype]], path: Path) -> None:
    """The part of :func:`check_weights` that needs no values: ``stored`` (name -> (shape, dtype) of the file's
    tensors) has exactly the names ``names`` that the model's state dict ``own`` saves (tied weights once), with
    their shapes and a dtype of the same kind. ``own`` may hold meta tensors."""
    missing = sorted(names - set(stored))
    unexpected = sorted(set(stored) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match the model: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}. "
            "Was it written for a different config?"
        )
    for name, (shape, dtype) in stored.items():
        want = own[name]
        if tuple(want.shape) != shape:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {shape} but the model expects {tuple(want.shape)}."
            )
        if want.is_floating_point() != dtype.is_floating_point or (
                not want.is_floating_point() and want.dtype != dtype):
            raise CheckpointError(f"{path}: tensor {name!r} is {dtype} but the model expects {want.dtype}; "
                                  "the file was not written for this model.")


def check_finite(name: str, t: torch.Tensor, path: Path) -> None:
    """CheckpointError when float tensor ``t`` (``name`` in ``path``) holds NaN or Inf."""
    # the extremes are finite exactly when every value is (NaN propagates through min and max), and finding
    # them allocates no mask as large as the tensor
    if t.is_floating_point() and t.numel() and not all(bool(torch.isfinite(x)) for x in torch.aminmax(t)):
        raise CheckpointError(f"{path}: tensor {name!r} holds NaN or Inf values; the weights are damaged "
                              "(an earlier checkpoint may still be good).")


# ---------------------------------------------------------------------------- lean loading, tensor by tensor

# safetensors dtype names -> torch dtypes (the ones zenlm writes and reads)
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
READ_BLOCK_BYTES = 1 << 20  # a tensor that is converted on the way in is read this many bytes at a time


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies in a safetensors file: its dtype, its shape and its bytes ``start .. end``."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def weights_index(path: Path) -> dict[str, StoredTensor]:
    """The table of contents of a safetensors file, read from its header alone (no tensor data):
    8 bytes (little-endian length N), then N bytes of JSON ``{name: {dtype, shape, data_offsets: [a, b]}}``,
    then the data, each tensor at bytes ``a .. b`` after the header. CheckpointError naming the file when the
    header is unreadable or points outside the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist.")
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 or not 2 <= n <= size - 8:
                raise ValueError("the header length is out of range")
            header = json.loads(fh.read(n))
        index = {}
        for name, e in header.items():
            if name == "__metadata__":
                continue
            a, b = (8 + n + int(x) for x in e["data_offsets"])
            dtype, shape = _ST_DTYPES[e["dtype"]], tuple(int(d) for d in e["shape"])
            if not (8 + n <= a <= b <= size and b - a == math.prod(shape) * dtype.itemsize):
                raise ValueError(f"tensor {name!r} lies outside the file or has the wrong size")
            index[name] = StoredTensor(dtype, shape, a, b)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}).") from e
    return index


def read_blocks(fh: BinaryIO, entry: StoredTensor, block_bytes: int = READ_BLOCK_BYTES
                ) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(first_row, rows)`` blocks of a stored tensor read from ``fh``, a few rows (about
    ``block_bytes``) at a time: rows [r, *shape[1:]] in the stored dtype, a view of one reused buffer that the
    next block overwrites. A 0- or 1-dimensional tensor comes as one block."""
    rows = entry.shape[0] if len(entry.shape) >= 2 else 1
    row_shape = entry.shape[1:] if len(entry.shape) >= 2 else entry.shape
    row_bytes = math.prod(row_shape) * entry.dtype.itemsize
    per_block = max(1, block_bytes // max(1, row_bytes))
    buf = torch.empty(min(rows, per_block) * row_bytes, dtype=torch.uint8)
    fh.seek(entry.start)
    for r in range(0, rows, per_block):
        n = min(per_block, rows - r)
        view = buf[: n * row_bytes]
        _read_exactly(fh, view)
        block = view.view(entry.dtype)
        yield r, block.reshape(n, *row_shape) if len(entry.shape) >= 2 else block.reshape(entry.shape)


def _read_exactly(fh: BinaryIO, into: torch.Tensor) -> None:
    """Fill uint8 tensor ``into`` from ``fh`` (readinto writes straight into the tensor's memory)."""
    mv, done = memoryview(into.numpy()), 0
    while done < len(mv):
        got = fh.readinto(mv[done:])
        if not got:
            raise CheckpointError(f"{getattr(fh, 'name', 'the weights file')} ended early; it is truncated.")
        done += got


def read_tensor(fh: BinaryIO, entry: StoredTensor, dtype: torch.dtype) -> torch.Tensor:
    """One stored tensor as a new CPU tensor of ``dtype``: read straight into it when the dtypes match, else
    converted a block of rows at a time (never a second full copy in the stored dtype)."""
    out = torch.empty(entry.shape, dtype=dtype)
    if entry.dtype == dtype:
        if out.numel():
            fh.seek(entry.start)
            _read_exactly(fh, out.view(-1).view(torch.uint8))
        return out
    flat = out if len(entry.shape) >= 2 else out.view(entry.shape)
    for r, block in read_blocks(fh, entry):
        if len(entry.shape) >= 2:
            flat[r : r + block.shape[0]] = block
        else:
            flat.copy_(block)
    return out


def copy_weights(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy checked ``tensors`` into the model's own (converting dtype and device as needed)."""
    own = model.state_dict()
    with torch.no_grad():
        for name, t in tensors.items():
            own[name].copy_(t)


def load_model_weights(model: nn.Module, path: Path) -> None:
    """Load safetensors weights into ``model``; missing, unexpected, mis-shaped, wrongly typed or non-finite
    tensors are a CheckpointError naming the file and the tensor (and leave the model untouched)."""
    tensors = read_weights(path)
    check_weights(model, tensors, Path(path))
    copy_weights(model, tensors)


def optimizer_tensors(opts: list[torch.optim.Optimizer], state_dicts: list[dict[str, Any]] | None = None
                      ) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """The optimisers' state as (tensors for optimizer.safetensors, settings and scalars for trainer.json).

    state_dicts: the optimisers' ``state_dict()``s (parameters numbered as PyTorch numbers them: in the order of
    the param groups); None = take them from ``opts``. A sharded run passes full ones gathered on process 0."""
    tensors: dict[str, torch.Tensor] = {}
    meta: list[dict[str, Any]] = []
    for i, opt in enumerate(opts):
        sd = opt.state_dict() if state_dicts is None else state_dicts[i]
        scalars: dict[str, dict[str, Any]] = {}
        for pid, st in sd["state"].items():
            for key, val in st.items():
                if isinstance(val, torch.Tensor):
                    tensors[f"opt{i}.state.{pid}.{key}"] = val.detach().contiguous().cpu()
                else:
                    scalars.setdefault(str(pid), {})[key] = val
        meta.append({"param_groups": sd["param_groups"], "scalars": scalars, "type": type(opt).__name__})
    return tensors, meta


def _optimizer_states(
    opts: list[torch.optim.Optimizer], tensors: dict[str, torch.Tensor], meta: Any, where: Path
) -> list[dict[str, Any]]:
    """Rebuild each optimiser's state dict from the checkpoint and check it against the live optimisers: the
    number and types of optimisers, parameter groups of the same sizes, every state tensor the shape (and
    floating dtype) of the parameter it belongs to, the same state keys for every parameter (a missing
    ``exp_avg`` is caught). Nothing is applied here."""
    fname = where / "optimizer.safetensors"
    if not isinstance(meta, list) or not all(isinstance(m, dict) for m in meta):
        raise CheckpointError(f"{where / 'trainer.json'}: 'optimizers' must be a list of objects; the file is damaged.")
    if len(meta) != len(opts):
        raise CheckpointError(
            f"{where} holds {len(meta)} optimiser(s) but this run uses {len(opts)}; resume with the same --optimizer."
        )
    out: list[dict[str, Any]] = []
    prefixes = {f"opt{i}.state." for i in range(len(opts))}
    stray = [n for n in tensors if not any(n.startswith(p) for p in prefixes)]
    if stray:
        raise CheckpointError(f"{fname}: unexpected tensor {stray[0]!r}; the file was not written for this run.")
    for i, (opt, m) in enumerate(zip(opts, meta, strict=True)):
        if m.get("type") != type(opt).__name__:
            raise CheckpointError(f"{where}: optimiser {i} is {m.get('type')}, this run uses {type(opt).__name__}.")
        groups, scalars = m.get("param_groups"), m.get("scalars", {})
        if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                                   for g in groups) or not isinstance(scalars, dict):
            raise CheckpointError(f"{where / 'trainer.json'}: optimiser {i}'s settings are damaged.")
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in opt.param_groups]:
            raise CheckpointError(f"{where}: optimiser {i} has parameter groups of sizes "
                                  f"{[len(g['params']) for g in groups]}, this model's are "
                                  f"{[len(g['params']) for g in opt.param_groups]}; it was written for another model.")
        params = [p for g in opt.param_groups for p in g["params"]]
        state: dict[int, dict[str, Any]] = {}
        prefix = f"opt{i}.state."
        for name, t in tensors.items():
            if not name.startswith(prefix):
                continue
            pid_s, _, key = name[len(prefix):].partition(".")
            if not pid_s.isdigit() or not key or int(pid_s) >= len(params):
                raise CheckpointError(f"{fname}: tensor {name!r} names no parameter of optimiser {i}.")
            p = params[int(pid_s)]
            if t.ndim and (t.shape != p.shape or not t.is_floating_point()):
                raise CheckpointError(
                    f"{fname}: {name!r} is {t.dtype} {tuple(t.shape)} but its parameter is {p.dtype} "
                    f"{tuple(p.shape)}; the file is damaged or was written for another model.")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"{fname}: {name!r} holds NaN or Inf values; the file is damaged.")
            state.setdefault(int(pid_s), {})[key] = t
        for pid_s, sc in scalars.items():
            if not str(pid_s).isdigit() or int(pid_s) >= len(params) or not isinstance(sc, dict):
                raise CheckpointError(f"{where / 'trainer.json'}: optimiser {i} scalars name no parameter ({pid_s!r}).")
            state.setdefault(int(pid_s), {}).update(sc)
        key_sets = {frozenset(st) for st in state.values()}
        if len(key_sets) > 1:
            first, *rest = sorted(key_sets, key=len)
            lacking = sorted(set().union(*rest) - first)
            raise CheckpointError(f"{fname}: optimiser {i} lacks {lacking} for some parameters; the file is "
                                  "damaged.")
        if len(groups) == len(opt.param_groups):  # JSON turned tuples (betas, ...) into lists: undo that
            for saved, live in zip(groups, opt.param_groups, strict=True):
                for k, v in saved.items():
                    if isinstance(live.get(k), tuple) and isinstance(v, list):
                        saved[k] = tuple(v)
        out.append({"state": state, "param_groups": groups})
    return out


def _load_optimizers(opts: list[torch.optim.Optimizer], states: list[dict[str, Any]], where: Path) -> None:
    for opt, sd in zip(opts, states, strict=True):
        try:
            opt.load_state_dict(sd)
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{where}: optimiser state does not fit this model ({e}).") from e


def _rng_state() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda{i}"] = s
    return out


def _check_rng(tensors: dict[str, torch.Tensor], path: Path) -> None:
    cpu = tensors.get("cpu")
    if cpu is None or cpu.dtype != torch.uint8 or cpu.shape != torch.get_rng_state().shape:
        raise CheckpointError(f"{path}: the CPU random-generator state is missing or malformed; the file is damaged.")
    for k, t in tensors.items():
        if k != "cpu" and (not k.startswith("cuda") or t.dtype != torch.uint8 or t.ndim != 1):
            raise CheckpointError(f"{path}: unexpected random-generator state {k!r}; the file is damaged.")


def set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def remove_stale_partials(ckpt_root: Path) -> list[Path]:
    """Remove ``.step-N.tmp-PID`` directories left by processes that are gone (a crash or kill -9 during a
    save; each is a whole model + optimiser copy). Returns what was removed."""
    ckpt_root = Path(ckpt_root)
    removed: list[Path] = []
    if not ckpt_root.is_dir():
        return removed
    for p in ckpt_root.iterdir():
        m = TMP_DIR.match(p.name)
        if not m or not p.is_dir():
            continue
        pid = int(m.group(2))
        if pid != os.getpid() and _alive(pid):
            continue  # another process is writing it right now
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    trainer_state: dict[str, Any],
    keep: int | None = None,
) -> Path:
    """Write ``ckpt_root/step-NNNNNN`` atomically; keep only the newest ``keep`` checkpoints if given.

    A failed write (no space left, a read-only directory) removes the partial copy and raises a
    CheckpointError naming the file; older checkpoints are left as they were."""
    return write_checkpoint(ckpt_root, step, model_tensors(model), *optimizer_tensors(optimizers), trainer_state,
                            keep=keep)


def write_checkpoint(
    ckpt_root: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    opt_tensors: dict[str, torch.Tensor],
    opt_meta: list[dict[str, Any]],
    trainer_state: dict[str, Any],
    keep: int | None = None,
) -> Path:
    """Write a checkpoint from states already taken (:func:`model_tensors`, :func:`optimizer_tensors`), with
    this process's RNG state; see :func:`save_checkpoint`."""
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / f"step-{step:06d}"
    writing = ckpt_root
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        for gone in remove_stale_partials(ckpt_root):
            log.warning("removed %s, a partial checkpoint left by a process that stopped while saving", gone)
        with atomic_path(final) as tmp:
            tmp.mkdir()
            writing = tmp / "model.safetensors"
            write_safetensors(weights, writing, metadata={"format": "pt"})
            writing = tmp / "optimizer.safetensors"
            write_safetensors(opt_tensors, writing)
            writing = tmp / "rng.safetensors"
            write_safetensors(_rng_state(), writing)
            state = {"step": step, **trainer_state, "optimizers": opt_meta}
            writing = tmp / "trainer.json"
            writing.write_text(json.dumps(state, indent=1), encoding="utf-8")
            writing = final
    except OSError as e:
        raise _write_error(writing, e) from None
    if keep:
        for old in list_checkpoints(ckpt_root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoint directories under ``ckpt_root``, oldest first."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))  # type: ignore[union-attr]


def _read_trainer_state(path: Path) -> dict[str, Any]:
    state = read_json_object(path, CheckpointError, "the file is damaged")
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path}: 'step' must be a whole number >= 0, got {step!r}; the file is damaged.")
    for key in ("elapsed_s", "train_s"):
        v = state.get(key, 0.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise CheckpointError(f"{path}: {key!r} must be a number >= 0, got {v!r}; the file is damaged.")
    if "optimizers" not in state:
        raise CheckpointError(f"{path} has no 'optimizers' entry; the file is damaged.")
    return state


@dataclass
class Checkpoint:
    """A checkpoint read from disk and checked against a model and its optimisers; nothing applied yet.

    weights:          name -> tensor, as in model.safetensors (each shared tensor once)
    optimizer_states: one ``state_dict()`` per optimiser (parameters numbered in param-group order)
    rng:              RNG states ("cpu", "cuda0", ...)
    state:            trainer.json without its optimiser entries (step, elapsed_s, the recipe's extra state, ...)
    """

    path: Path
    weights: dict[str, torch.Tensor]
    optimizer_states: list[dict[str, Any]]
    rng: dict[str, torch.Tensor]
    state: dict[str, Any]


def read_checkpoint(ckpt_dir: Path, model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> Checkpoint:
    """Read every file of ``ckpt_dir`` and check it against ``model`` and ``optimizers`` (which may be sharded:
    only names, shapes and types are compared); CheckpointError naming the file and the key that disagree."""
    ckpt_dir = Path(ckpt_dir)
    for f in ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer.json"):
        if not (ckpt_dir / f).is_file():
            raise CheckpointError(f"checkpoint {ckpt_dir} is incomplete: {f} is missing.")
    state = _read_trainer_state(ckpt_dir / "trainer.json")
    weights = read_weights(ckpt_dir / "model.safetensors")
    check_weights(model, weights, ckpt_dir / "model.safetensors")
    opt_tensors = read_weights(ckpt_dir / "optimizer.safetensors")
    rng = read_weights(ckpt_dir / "rng.safetensors")
    _check_rng(rng, ckpt_dir / "rng.safetensors")
    opt_states = _optimizer_states(optimizers, opt_tensors, state.pop("optimizers"), ckpt_dir)
    return Checkpoint(ckpt_dir, weights, opt_states, rng, state)


def apply_checkpoint(ckpt: Checkpoint, model: nn.Module, optimizers: list[torch.optim.Optimizer],
                     restore_rng: bool = True) -> None:
    """Copy a checked checkpoint into the (unsharded) model and its optimisers, and restore the RNG."""
    copy_weights(model, ckpt.weights)
    _load_optimizers(optimizers, ckpt.optimizer_states, ckpt.path)
    if restore_rng:
        set_rng_state(ckpt.rng)


def load_checkpoint(
    ckpt_dir: Path, model: nn.Module, optimizers: list[torch.optim.Optimizer], restore_rng: bool = True
) -> dict[str, Any]:
    """Restore model, optimisers and RNG from ``ckpt_dir``; return the trainer state (step, elapsed, ...).

    Every file is read and checked before anything is changed, so a damaged checkpoint raises a
    CheckpointError (naming the file and the key) and leaves the model and the optimisers as they were."""
    ckpt = read_checkpoint(ckpt_dir, model, optimizers)
    apply_checkpoint(ckpt, model, optimizers, restore_rng)
    return ckpt.state


def read_latest_checkpoint(
    ckpt_root: Path, model: nn.Module, optimizers: list[torch.optim.Optimizer], *,
    warn: Callable[[str], None] | None = None,
) -> Checkpoint:
    """The newest complete checkpoint under ``ckpt_root`` that reads and checks (:func:`read_checkpoint`); a
    damaged newer one is passed over with a warning (through ``warn`` and the log).

    CheckpointError when there is none, or when every one is damaged (the newest one's problem is named)."""
    ckpts = list_checkpoints(ckpt_root)
    if not ckpts:
        raise CheckpointError(f"--resume: {ckpt_root} holds no checkpoint to resume from.")
    first_error: CheckpointError | None = None
    for ckpt in reversed(ckpts):
        try:
            return read_checkpoint(ckpt, model, optimizers)
        except CheckpointError as e:
            first_error = first_error or e
            older = [c for c in ckpts if c.name < ckpt.name]
            if older:
                msg = f"warning: {ckpt.name} cannot be resumed from ({e}); falling back to {older[-1].name}"
                log.warning(msg)
                if warn is not None:
                    warn(msg)
    assert first_error is not None
    raise first_error


def load_latest_checkpoint(
    ckpt_root: Path, model: nn.Module, optimizers: list[torch.optim.Optimizer], *,
    warn: Callable[[str], None] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Restore the newest complete checkpoint under ``ckpt_root`` that loads (see :func:`read_latest_checkpoint`).
    Returns (its directory, the trainer state)."""
    ckpt = read_latest_checkpoint(ckpt_root, model, optimizers, warn=warn)
    apply_checkpoint(ckpt, model, optimizers)
    return ckpt.path, ckpt.state

"""Checkpoints: safetensors for tensors, JSON for everything else, written atomically. No pickle.

Layout of ``RUN_DIR/checkpoints/step-NNNNNN/``::

    model.safetensors       model weights
    optimizer.safetensors   every tensor of every optimiser state ("opt{i}.state.{param}.{key}")
    rng.safetensors         RNG states (CPU, and CUDA when used) as uint8 tensors
    trainer.json            step, elapsed time, optimiser scalars and param-group settings, extra state

A checkpoint is written into ``.step-NNNNNN.tmp-<pid>`` and renamed into place when complete, so a
crash mid-write never leaves a directory that looks finished. Loading validates names and shapes
and says which key and which file disagree.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from zenlm.errors import CheckpointError
from zenlm.fileio import atomic_path

STEP_DIR = re.compile(r"^step-(\d{6,})$")


def _state_dict_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    # Tied weights share storage; safetensors refuses shared tensors, so save each name once.
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for name, t in model.state_dict().items():
        key = t.data_ptr()
        if key in seen and t.numel() > 0:
            continue
        seen[key] = name
        out[name] = t.detach().contiguous().cpu()
    return out


def save_model(model: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Save model weights to ``path`` (safetensors) atomically."""
    with atomic_path(path) as tmp:
        save_file(_state_dict_for_saving(model), str(tmp), metadata=metadata or {"format": "pt"})


def load_model_weights(model: nn.Module, path: Path) -> None:
    """Load safetensors weights into ``model``; missing, unexpected or mis-shaped keys are a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist.")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}).") from e
    own = model.state_dict()
    saved_names = set(_state_dict_for_saving(model))
    missing = sorted(saved_names - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match the model: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}. "
            "Was it written for a different config?"
        )
    for name, t in tensors.items():
        if own[name].shape != t.shape:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {tuple(t.shape)} but the model expects {tuple(own[name].shape)}."
            )
    with torch.no_grad():
        for name, t in tensors.items():
            own[name].copy_(t)


def _flatten_optimizer(opts: list[torch.optim.Optimizer]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    tensors: dict[str, torch.Tensor] = {}
    meta: list[dict[str, Any]] = []
    for i, opt in enumerate(opts):
        sd = opt.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for pid, st in sd["state"].items():
            for key, val in st.items():
                if isinstance(val, torch.Tensor):
                    tensors[f"opt{i}.state.{pid}.{key}"] = val.detach().contiguous().cpu()
                else:
                    scalars.setdefault(str(pid), {})[key] = val
        meta.append({"param_groups": sd["param_groups"], "scalars": scalars, "type": type(opt).__name__})
    return tensors, meta


def _unflatten_optimizer(
    opts: list[torch.optim.Optimizer], tensors: dict[str, torch.Tensor], meta: list[dict[str, Any]], where: Path
) -> None:
    if len(meta) != len(opts):
        raise CheckpointError(
            f"{where} holds {len(meta)} optimiser(s) but this run uses {len(opts)}; resume with the same --optimizer."
        )
    for i, (opt, m) in enumerate(zip(opts, meta, strict=True)):
        if m["type"] != type(opt).__name__:
            raise CheckpointError(f"{where}: optimiser {i} is {m['type']}, this run uses {type(opt).__name__}.")
        state: dict[int, dict[str, Any]] = {}
        prefix = f"opt{i}.state."
        for name, t in tensors.items():
            if name.startswith(prefix):
                pid, key = name[len(prefix) :].split(".", 1)
                state.setdefault(int(pid), {})[key] = t
        for pid, sc in m["scalars"].items():
            state.setdefault(int(pid), {}).update(sc)
        groups = m["param_groups"]
        if len(groups) == len(opt.param_groups):  # JSON turned tuples (betas, ...) into lists: undo that
            for saved, live in zip(groups, opt.param_groups, strict=True):
                for k, v in saved.items():
                    if isinstance(live.get(k), tuple) and isinstance(v, list):
                        saved[k] = tuple(v)
        try:
            opt.load_state_dict({"state": state, "param_groups": groups})
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{where}: optimiser state does not fit this model ({e}).") from e


def _rng_state() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda{i}"] = s
    return out


def _set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    trainer_state: dict[str, Any],
    keep: int | None = None,
) -> Path:
    """Write ``ckpt_root/step-NNNNNN`` atomically; keep only the newest ``keep`` checkpoints if given."""
    ckpt_root = Path(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:06d}"
    with atomic_path(final) as tmp:
        tmp.mkdir()
        save_file(_state_dict_for_saving(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        opt_tensors, opt_meta = _flatten_optimizer(optimizers)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(_rng_state(), str(tmp / "rng.safetensors"))
        state = {"step": step, **trainer_state, "optimizers": opt_meta}
        (tmp / "trainer.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
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


def load_checkpoint(
    ckpt_dir: Path, model: nn.Module, optimizers: list[torch.optim.Optimizer], restore_rng: bool = True
) -> dict[str, Any]:
    """Restore model, optimisers and RNG from ``ckpt_dir``; return the trainer state (step, elapsed, ...)."""
    ckpt_dir = Path(ckpt_dir)
    for f in ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer.json"):
        if not (ckpt_dir / f).is_file():
            raise CheckpointError(f"checkpoint {ckpt_dir} is incomplete: {f} is missing.")
    try:
        state = json.loads((ckpt_dir / "trainer.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{ckpt_dir / 'trainer.json'} is not valid JSON ({e}).") from e
    load_model_weights(model, ckpt_dir / "model.safetensors")
    try:
        opt_tensors = load_file(str(ckpt_dir / "optimizer.safetensors"))
        rng = load_file(str(ckpt_dir / "rng.safetensors"))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint {ckpt_dir} has an unreadable tensor file ({e}).") from e
    _unflatten_optimizer(optimizers, opt_tensors, state.pop("optimizers"), ckpt_dir)
    if restore_rng:
        _set_rng_state(rng)
    return state

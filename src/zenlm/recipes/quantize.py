"""``zenlm quantize RUN --out RUN-int8``: a run directory with int8 weight-only linear layers.

The new run directory holds the same config (plus a ``quantization`` section), the same tokenizer and a
``model.safetensors`` whose linear layers are int8 with per-output-channel scales (see
:mod:`zenlm.models.int8`); ``zenlm.load`` and every verb that loads a run read it like any other run
(:func:`zenlm.rundir.build_model_from_run` applies the ``quantization`` section).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from zenlm.errors import ConfigError
from zenlm.fileio import atomic_path
from zenlm.models.int8 import METHOD, quantize_int8
from zenlm.models.registry import architectures
from zenlm.rundir import (
    LM_TASKS,
    copy_tokenizer_files,
    load_run,
    read_run_config,
    run_architecture,
    run_task,
    write_run_config,
)
from zenlm.train.checkpoint import save_model


@dataclass
class QuantizeResult:
    out: Path
    bytes_before: int  # model.safetensors of the source run
    bytes_after: int  # model.safetensors of the quantised run


def quantize_run(run: str | Path, out: str | Path) -> QuantizeResult:
    """Write an int8 weight-only copy of run directory ``run`` to ``out`` (which must not exist yet).

    Supported: Transformer language-model runs (an architecture that can ``causal-lm`` and is not stateful, not a
    classifier), which is what int8 decoding (zenlm.generate, zenlm.compiled) is for."""
    run, out = Path(run), Path(out)
    if out.exists():
        raise ConfigError(f"{out} already exists; choose a new --out for the quantised run.")
    saved = read_run_config(run)
    if saved.get("lora"):
        raise ConfigError(f"{run} is a LoRA run; merge it first (zenlm merge-lora {run} --out MERGED), then "
                          "quantise MERGED.")
    if saved.get("quantization"):
        raise ConfigError(f"{run} is already quantised ({saved['quantization'].get('method')}).")
    arch = run_architecture(saved)
    if not arch.can("causal-lm") or arch.can("stateful") or run_task(saved) not in LM_TASKS:  # int8: Transformers
        lms = [a.name for a in architectures() if a.can("causal-lm") and not a.can("stateful")]
        raise ConfigError(f"quantisation supports language-model runs ({', '.join(lms)}); {run} holds a "
                          f"{arch.name!r} model{' fine-tuned as a classifier' if saved.get('task') else ''}.")
    model = quantize_int8(load_run(run, device="cpu", dtype="fp32").model)
    saved["quantization"] = {"method": METHOD, "scales": "per output channel", "layers": "every nn.Linear"}
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        save_model(model, tmp / "model.safetensors", metadata={"format": "pt", "quantization": METHOD})
        write_run_config(tmp, saved)
        copy_tokenizer_files(run, tmp)
    source = run / "model.safetensors"
    before = source.stat().st_size if source.is_file() else 0
    return QuantizeResult(out, before, (out / "model.safetensors").stat().st_size)


__all__ = ["quantize_run", "QuantizeResult"]

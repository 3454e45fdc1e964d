"""``zenlm quantize RUN --out RUN-int8``: a run directory with int8 weight-only linear layers.

The new run directory holds the same config (plus a ``quantization`` section), the same tokenizer and a
``model.safetensors`` whose linear layers are int8 with per-output-channel scales (see
:mod:`zenlm.models.int8`); ``zenlm.load`` and every verb that loads a run read it like any other run.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from zenlm.api import load
from zenlm.errors import ConfigError
from zenlm.models.int8 import METHOD, quantize_int8
from zenlm.rundir import TOKENIZER_FILES, read_run_config
from zenlm.train.checkpoint import atomic_write_text, save_model


@dataclass
class QuantizeResult:
    out: Path
    bytes_before: int  # model.safetensors of the source run
    bytes_after: int  # model.safetensors of the quantised run


def quantize_run(run: str | Path, out: str | Path) -> QuantizeResult:
    """Write an int8 weight-only copy of run directory ``run`` to ``out`` (which must not exist yet)."""
    run, out = Path(run), Path(out)
    if out.exists():
        raise ConfigError(f"{out} already exists; choose a new --out for the quantised run.")
    saved = read_run_config(run)
    if saved.get("quantization"):
        raise ConfigError(f"{run} is already quantised ({saved['quantization'].get('method')}).")
    if saved["model"].get("arch", "gpt") != "gpt":
        raise ConfigError(f"quantisation supports GPT runs; {run} holds a {saved['model'].get('arch')!r} model.")
    lm = load(run, device="cpu", dtype="fp32")
    model = quantize_int8(lm.model)
    saved["quantization"] = {"method": METHOD, "scales": "per output channel", "layers": "every nn.Linear"}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_model(model, tmp / "model.safetensors", metadata={"format": "pt", "quantization": METHOD})
        atomic_write_text(tmp / "config.yaml", yaml.safe_dump(saved, sort_keys=False, allow_unicode=True))
        for name in TOKENIZER_FILES:
            if (run / name).exists():
                shutil.copyfile(run / name, tmp / name)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    source = run / "model.safetensors"
    before = source.stat().st_size if source.is_file() else 0
    return QuantizeResult(out, before, (out / "model.safetensors").stat().st_size)


__all__ = ["quantize_run", "QuantizeResult"]

"""What the Hugging Face converters share: the weight-rule record that describes one tensor in both
directions, and the small steps every export takes (the output folder, JSON files, the tokenizer files, the
tensors in the chosen dtype). :mod:`zenlm.convert.hf` (GPT-2 / Llama family), :mod:`zenlm.convert.hf_bert` and
:mod:`zenlm.convert.hf_encdec` build on it, so none of them needs another's internals.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from zenlm.convert.outdir import check_out_dir
from zenlm.device import resolve_dtype
from zenlm.errors import CheckpointError, ConfigError, DataError
from zenlm.fileio import atomic_write_text, read_json_object
from zenlm.progress import ProgressFn, report
from zenlm.tokenizer import Tokenizer

HF_DTYPE_NAME = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass(frozen=True)
class WeightRule:
    """How one of our tensors relates to one or more of theirs.

    ours:      our state-dict name, e.g. ``blocks.0.attn.qkv.weight``
    theirs:    their name(s), e.g. ``("model.layers.0.self_attn.q_proj.weight", ...k_proj..., ...v_proj...)``
    transpose: their tensor is ours transposed (GPT-2's Conv1D stores [in, out])
    split:     sizes along dim 0 when several of theirs are stacked into ours (q, k, v -> qkv)
    """

    ours: str
    theirs: tuple[str, ...]
    transpose: bool = False
    split: tuple[int, ...] | None = None

    def to_ours(self, tensors: list[Tensor]) -> Tensor:
        if self.split is not None:
            return torch.cat(tensors, dim=0)
        return tensors[0].t().contiguous() if self.transpose else tensors[0]

    def to_theirs(self, t: Tensor) -> list[Tensor]:
        if self.split is not None:
            return [p.contiguous() for p in torch.split(t, list(self.split), dim=0)]
        return [t.t().contiguous() if self.transpose else t]

    def their_shapes(self, our_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        if self.split is not None:
            return [(n, *our_shape[1:]) for n in self.split]
        return [tuple(reversed(our_shape)) if self.transpose else our_shape]


def read_json(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in ``path`` (DataError when missing, naming ``what`` to do, or malformed)."""
    if not path.is_file():
        raise DataError(f"{path} is missing; {what}.")
    return read_json_object(path, DataError)


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def prepare_out(out: Path, marker: str, overwrite: bool, source: Path | None = None) -> None:
    """Make ``out`` ready for a conversion result whose marker file is ``marker``: a run directory
    (config.yaml) or a Hugging Face directory (config.json) goes through
    :func:`zenlm.convert.outdir.check_out_dir` (never its own ``source``, never another kind of directory);
    any other result (a PEFT adapter) is refused over an existing one without ``overwrite``."""
    if marker in ("config.yaml", "config.json"):
        check_out_dir(out, writes="run" if marker == "config.yaml" else "hf", sources=[source] if source else [],
                      overwrite=overwrite)
    elif (out / marker).exists() and not overwrite:
        raise ConfigError(f"{out} already holds {marker}; choose another --out or pass --overwrite.")
    out.mkdir(parents=True, exist_ok=True)


def theirs_state(model: torch.nn.Module, rules: list[WeightRule], dtype: str,
                 progress: ProgressFn | None = None) -> dict[str, Tensor]:
    """Their name -> tensor (in ``dtype``) for every rule, from ``model``'s state dict: what an export saves."""
    state = model.state_dict()
    theirs: dict[str, Tensor] = {}
    for n, rule in enumerate(rules):
        for name, t in zip(rule.theirs, rule.to_theirs(state[rule.ours].detach()), strict=True):
            theirs[name] = t.to(resolve_dtype(dtype)).contiguous()
        report(progress, "convert", done=n + 1, total=len(rules), unit="tensor")
    return theirs


def export_tokenizer_config(run: Path, tok: Tokenizer, max_length: int) -> dict[str, Any]:
    """tokenizer_config.json for an export: the run's own (imported runs keep theirs), completed with the
    special tokens and chat template zenlm uses, and ``model_max_length`` set to the model's limit."""
    tok_cfg: dict[str, Any] = {}
    if (run / "tokenizer_config.json").is_file():
        tok_cfg = read_json(run / "tokenizer_config.json", "")
    tok_cfg.update({k: v for k, v in tok.config_dict().items() if k not in tok_cfg or k == "chat_template"})
    tok_cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    tok_cfg["model_max_length"] = max_length
    return tok_cfg


def load_run_tokenizer(run: Path, vocab_size: int) -> Tokenizer:
    """The run's tokenizer, refused when absent or larger than the model's embedding table."""
    if not (run / "tokenizer.json").is_file():
        raise CheckpointError(f"{run} has no tokenizer.json; copy the tokenizer of its data directory there.")
    tok = Tokenizer.load(run)
    if tok.vocab_size > vocab_size:
        raise CheckpointError(f"{run}: the tokenizer has {tok.vocab_size} tokens, the model only {vocab_size}.")
    return tok

"""Sequence-to-sequence training: source -> target pairs (or plain text to denoise) -> run directory.

Two designs learn the same task, so they can be compared on it:

* ``arch="encdec"``: an :class:`~zenlm.models.encdec.EncoderDecoder` reads the source with its encoder and
  writes the target with its decoder (teacher forcing: the decoder sees the true previous target tokens).
* ``arch="gpt"``: a decoder-only :class:`~zenlm.models.gpt.GPT` reads ``source <|bos|> target <|eos|>`` as
  one sequence; the loss is masked on the prompt, so it learns to write the target only.

The objective is cross-entropy with label smoothing ``eps`` on the target tokens (the end token included)::

    loss = mean_t [ (1 - eps) * -log p(y_t) + eps * mean_v -log p(v) ]

(the loss functions return the sum over the target tokens; the training step divides by the number of target
tokens of the whole step, so every target token weighs the same however the rows fall into micro-batches).

``objective="denoise"`` pretrains an encoder-decoder without pairs: spans of plain text are hidden (BART text
infilling, :func:`zenlm.data.seq2seq.infill_noise`) and the model restores the text. ``init=RUN_DIR`` starts
from the weights (and tokenizer) of an earlier run, e.g. a denoising or causal-LM pretraining run; with ``lora``
that run stays frozen and only LoRA adapters on its linear layers are trained (:mod:`zenlm.models.lora`).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from zenlm import __version__
from zenlm.adapter import finish_lora_run, load_base, lora_section
from zenlm.data.batches import IGNORE_INDEX
from zenlm.data.seq2seq import (
    DenoisingBatches,
    EncodedPairs,
    Pair,
    PromptCompletionBatches,
    Seq2SeqBatches,
    collate_seq2seq,
    encode_pairs,
    pad_right,
    prompt_completion_example,
    read_pairs,
    read_texts,
    seq2seq_example,
)
from zenlm.device import resolve_device
from zenlm.errors import ConfigError
from zenlm.evaluate import perplexity
from zenlm.models.lora import LoRAConfig, apply_lora, describe_lora, weights_fingerprint
from zenlm.models.registry import build_model, get_architecture
from zenlm.progress import ProgressFn, report
from zenlm.rundir import (
    copy_tokenizer_files,
    read_run_config,
    refuse_foreign_out,
    run_architecture,
    write_run_config,
)
from zenlm.tokenizer import Tokenizer, train_tokenizer
from zenlm.train.checkpoint import list_checkpoints
from zenlm.train.loop import TrainConfig, TrainResult, apply_process_settings, config_to_dict, fit
from zenlm.train.optim import OptimConfig
from zenlm.train.step import LossOutput

Arch = Literal["encdec", "gpt"]
OBJECTIVES = {"pairs", "denoise"}
# What ``train=None`` and ``optim=None`` mean (the CLI's --max-steps, --lr, ... default to these too)
DEFAULT_TRAIN: dict[str, Any] = dict(max_steps=1000, eval_every=100, tensorboard=False)
DEFAULT_OPTIM: dict[str, Any] = dict(lr=1e-3, min_lr=1e-4, warmup_steps=50, weight_decay=0.01)


def _reads_source(arch: str) -> bool:
    """True for an encoder-decoder (reads the source with its encoder); False for a decoder-only model, which
    reads ``source <sep> target`` as one sequence."""
    return get_architecture(arch).can("seq2seq")


# ------------------------------------------------------------------------------------------ objectives


def _token_loss(logits_BTV: torch.Tensor, labels_BT: torch.Tensor, label_smoothing: float, n_tokens: int
                ) -> LossOutput:
    """Label-smoothed cross-entropy summed over the labelled positions (labels_BT != IGNORE_INDEX)."""
    loss_sum = F.cross_entropy(logits_BTV.float().flatten(0, 1), labels_BT.flatten(), ignore_index=IGNORE_INDEX,
                               label_smoothing=label_smoothing, reduction="sum")
    return LossOutput(loss_sum, int(labels_BT.ne(IGNORE_INDEX).sum()), n_tokens)


def seq2seq_loss(model: nn.Module, batch: tuple[torch.Tensor, ...], label_smoothing: float = 0.0) -> LossOutput:
    """Teacher-forced cross-entropy of an encoder-decoder, summed over the target tokens.
    batch = (src_BS, src_mask_BS, tgt_in_BT, labels_BT); input tokens: the real source and target tokens."""
    src_BS, src_mask_BS, tgt_in_BT, labels_BT = batch
    logits_BTV = model(src_BS, tgt_in_BT, src_mask_BS)
    return _token_loss(logits_BTV, labels_BT, label_smoothing, src_BS.numel() + tgt_in_BT.numel())


def prompt_completion_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], label_smoothing: float = 0.0
                           ) -> LossOutput:
    """Next-token cross-entropy of a decoder-only model on the completion only, summed over its tokens.
    batch = (x_BT, labels_BT)."""
    x_BT, labels_BT = batch
    return _token_loss(model(x_BT), labels_BT, label_smoothing, x_BT.numel())


def _val_batches(arch: Arch, data: EncodedPairs, batch_size: int, ids: dict[str, int]) -> list[tuple]:
    out = []
    for s in range(0, len(data), batch_size):
        src, tgt = data.sources[s : s + batch_size], data.targets[s : s + batch_size]
        if _reads_source(arch):
            out.append(collate_seq2seq([seq2seq_example(a, b, ids["bos"], ids["eos"]) for a, b in zip(src, tgt,
                                                                                                     strict=True)],
                                       ids["pad"]))
        else:
            ex = [prompt_completion_example(a, b, ids["sep"], ids["eos"]) for a, b in zip(src, tgt, strict=True)]
            out.append((pad_right([e[0] for e in ex], ids["pad"]), pad_right([e[1] for e in ex], IGNORE_INDEX)))
    return out


@torch.no_grad()
def evaluate_pairs(model: nn.Module, arch: Arch, batches: list[tuple], device: torch.device) -> dict[str, float]:
    """Validation loss (nats per target token, no label smoothing) and perplexity over fixed batches."""
    loss_fn = seq2seq_loss if _reads_source(arch) else prompt_completion_loss
    total, n = 0.0, 0
    for batch in batches:
        out = loss_fn(model, tuple(t.to(device) for t in batch))
        total += float(out.loss_sum)
        n += out.n_targets
    loss = total / max(n, 1)
    return {"val_loss": loss, "val_ppl": perplexity(loss)}


# --------------------------------------------------------------------------------------------- recipe


def _special_ids(tok: Tokenizer, arch: Arch, objective: str) -> dict[str, int]:
    ids = {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id, "sep": tok.bos_id}
    if objective == "denoise":
        ids["mask"] = tok.mask_id
    missing = [k for k, v in ids.items() if v is None]
    if missing:
        raise ConfigError(f"the tokenizer has no {', '.join(missing)} token(s); seq2seq training needs "
                          "<|bos|>, <|eos|>, <|pad|> (and <|mask|> to denoise). Train one with zenlm.")
    return ids  # type: ignore[return-value]


def _build_model(arch: Arch, model: str | None, overrides: dict[str, Any], vocab_size: int) -> tuple[nn.Module, Any]:
    """A fresh model of preset ``model`` (None: the architecture's default preset)."""
    architecture = get_architecture(arch)
    cfg = architecture.config(model, vocab_size=vocab_size, **overrides)
    return build_model(cfg), cfg  # (refuses a shape that would not fit in memory, before allocating)


def _length_limits(arch: Arch, cfg: Any, max_source_len: int | None, max_target_len: int | None) -> tuple[int, int]:
    """Most source and target tokens that fit. The limits count one special token each: the source is followed
    by eos (encdec) or the separator (gpt); the target is preceded by bos (encdec) or followed by eos (gpt)."""
    if _reads_source(arch):
        src = min(max_source_len or cfg.max_source_len, cfg.max_source_len) - 1
        tgt = min(max_target_len or cfg.max_target_len, cfg.max_target_len) - 1
        return src, tgt
    # decoder-only: the input is source + sep + target (the final eos is only a label)
    tgt = (max_target_len or max(2, cfg.block_size // 4)) - 1
    src = min((max_source_len or cfg.block_size) - 1, cfg.block_size - tgt - 1)
    return src, tgt


def finetune_seq2seq(
    data: str | Path,
    out: str | Path,
    *,
    arch: Arch = "encdec",
    objective: Literal["pairs", "denoise"] = "pairs",
    model: str | None = None,
    model_overrides: dict[str, Any] | None = None,
    tokenizer: str | Path | Tokenizer | None = None,
    vocab_size: int = 8192,
    init: str | Path | None = None,
    val: str | Path | None = None,
    val_fraction: float = 0.05,
    source_field: str = "source",
    target_field: str = "target",
    text_field: str = "text",
    max_source_len: int | None = None,
    max_target_len: int | None = None,
    batch_size: int = 16,
    label_smoothing: float = 0.1,
    noise_density: float = 0.3,
    train: TrainConfig | None = None,
    optim: OptimConfig | None = None,
    lora: LoRAConfig | None = None,
    progress: ProgressFn | None = None,
) -> TrainResult:
    """Train a model on source -> target pairs (or denoise plain text) and write a run directory ``out``.

    data:            ``.jsonl`` pairs (objective "pairs") or a ``.txt`` / ``.jsonl`` text file ("denoise")
    arch:            "encdec" (encoder-decoder) or "gpt" (decoder-only, loss masked on the prompt)
    model:           preset name of that architecture (``zenlm presets``; default: encdec-small for encdec,
                     demo for gpt); ignored with ``init``
    tokenizer:       a tokenizer (directory); None trains a byte-level BPE of ``vocab_size`` on the training
                     texts (with ``init``, the run's own tokenizer is used)
    init:            start from this run directory's weights, config and tokenizer
    val:             validation pairs; None holds out the last ``val_fraction`` of ``data``
    max_source_len / max_target_len: token limits (default: the model's context); longer texts are truncated
                     with a warning and a count
    label_smoothing: eps of the smoothed cross-entropy (training only; validation reports the plain loss)
    noise_density:   share of the tokens hidden by the denoising objective (BART text infilling)
    lora:            train LoRA adapters on the frozen ``init`` model instead of every weight (``init`` may then
                     be an int8 run); the run saves adapter.safetensors and records the base run
    """
    data, out = Path(data), Path(out)
    train = train or TrainConfig(**DEFAULT_TRAIN)
    optim = optim or OptimConfig(**DEFAULT_OPTIM)
    world = apply_process_settings(train)  # with torchrun: joins the other processes of the run
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective {objective!r} is not supported; choose pairs or denoise.")
    family = get_architecture(arch)  # a stateful LM (n-gram, MLP, LSTM) is not trained on prompt-masked pairs
    if not (family.can("seq2seq") or (family.can("causal-lm") and not family.can("stateful"))):
        raise ConfigError(f"arch {arch!r} cannot learn source -> target pairs; choose encdec or gpt.")
    if objective == "denoise" and not _reads_source(arch):
        raise ConfigError("the denoising objective trains encoder-decoders; use --arch encdec.")
    if not 0.0 <= label_smoothing < 1.0:
        raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
    refuse_foreign_out(out)  # a folder of other files is never written into
    if (out / "config.yaml").exists() or list_checkpoints(out / "checkpoints"):
        raise ConfigError(f"{out} already holds a run; choose another --out.")
    if lora is not None and init is None:
        raise ConfigError("LoRA adapts a trained model: give the run to adapt with --init RUN.")

    # ---- examples -------------------------------------------------------------------------------------
    if objective == "pairs":
        pairs = read_pairs(data, source_field, target_field)
        if val is not None:
            val_pairs = read_pairs(val, source_field, target_field)
        else:
            n_val = int(len(pairs) * val_fraction)
            pairs, val_pairs = pairs[: len(pairs) - n_val], pairs[len(pairs) - n_val :]
        train_texts = [t for p in pairs for t in (p.source, p.target)]
    else:
        texts = read_texts(data, text_field)
        n_val = int(len(texts) * val_fraction)
        texts, val_texts = texts[: len(texts) - n_val], texts[len(texts) - n_val :]
        train_texts = texts

    # ---- tokenizer and model --------------------------------------------------------------------------
    device = resolve_device(train.device)
    torch.manual_seed(train.seed)
    lora_run = None
    if init is not None:
        init = Path(init)
        saved = read_run_config(init)
        init_arch = run_architecture(saved).name
        if init_arch != arch:
            raise ConfigError(f"--init {init} holds a {init_arch} model but --arch is {arch}; make them agree.")
        if saved.get("task") or (saved.get("quantization") and lora is None):
            raise ConfigError(f"--init {init} is a classifier or holds int8 weights; start from the full-precision "
                              "run it was made from (int8 weights can carry LoRA adapters: --lora).")
        net, saved = load_base(init, lora=lora is not None)
        cfg = net.config
        tok = Tokenizer.load(init)
        if lora is not None:
            fingerprint = weights_fingerprint(net)
            lora = lora.with_tokens(tok)
            lora_run = lora_section(lora, apply_lora(net, lora), init, fingerprint, saved)
    else:
        if isinstance(tokenizer, Tokenizer):
            tok = tokenizer
        elif tokenizer is not None:
            tok = Tokenizer.load(tokenizer)
        else:
            report(progress, "tokenizer", message=f"training a byte-level BPE tokenizer ({vocab_size} tokens)")
            tok = train_tokenizer(train_texts, kind="bpe", vocab_size=vocab_size, progress=progress)
        net, cfg = _build_model(arch, model, dict(model_overrides or {}), tok.vocab_size)
    if cfg.vocab_size < tok.vocab_size:
        raise ConfigError(f"model vocab_size {cfg.vocab_size} is smaller than the tokenizer's {tok.vocab_size}.")
    ids = _special_ids(tok, arch, objective)
    net = net.to(device)
    src_len, tgt_len = _length_limits(arch, cfg, max_source_len, max_target_len)

    # ---- batches --------------------------------------------------------------------------------------
    if objective == "pairs":
        enc = encode_pairs(pairs, tok, src_len, tgt_len, progress=progress)
        val_batches = _val_batches(arch, encode_pairs(val_pairs, tok, src_len, tgt_len, progress=progress),
                                   batch_size, ids) \
            if val_pairs else []
        if _reads_source(arch):
            batches: Any = Seq2SeqBatches(enc, batch_size, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"],
                                          grad_accum=train.grad_accum, seed=train.seed)
        else:
            batches = PromptCompletionBatches(enc, batch_size, sep_id=ids["sep"], eos_id=ids["eos"],
                                              pad_id=ids["pad"], grad_accum=train.grad_accum, seed=train.seed)
        n_train = len(enc)
        truncated = {"sources": enc.truncated_sources, "targets": enc.truncated_targets}
    else:
        window = min(src_len, tgt_len)
        noise = dict(bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"], mask_id=ids["mask"],
                     noise_density=noise_density)
        batches = DenoisingBatches(tok.encode_batch(train_texts), batch_size, window, seed=train.seed, **noise)
        val_batches = []
        if val_texts:  # a fixed sample of corrupted validation windows
            vb = DenoisingBatches(tok.encode_batch(val_texts), batch_size, window, seed=train.seed + 1, **noise)
            val_batches = [vb.get(i) for i in range(max(1, min(8, len(vb.windows) // batch_size)))]
        n_train, truncated = len(batches.windows), {}

    # ---- run directory --------------------------------------------------------------------------------
    out.mkdir(parents=True, exist_ok=True)
    world.barrier()  # every process has checked --out before process 0 writes into it
    run_config = {
        "zenlm_version": __version__,
        "model": cfg.to_dict(),
        "objective": "seq2seq" if _reads_source(arch) and objective == "pairs" else
        ("denoise" if objective == "denoise" else "prompt-completion"),
        "seq2seq": {"arch": arch, "max_source_tokens": src_len, "max_target_tokens": tgt_len,
                    "label_smoothing": label_smoothing, "source_field": source_field, "target_field": target_field,
                    "bos_id": ids["bos"], "eos_id": ids["eos"], "pad_id": ids["pad"], "sep_id": ids["sep"],
                    "truncated": truncated, "init": str(init) if init else None},
        "batch": {"batch_size": batch_size},
        "train": config_to_dict(train),
        "optim": config_to_dict(optim),
        "data": {"path": str(data.resolve()), "examples": n_train,
                 "val_path": str(Path(val).resolve()) if val else None},
    }
    if lora_run is not None:
        run_config["lora"] = lora_run
    if world.is_main:
        tok.save(out)
        if init is not None:
            copy_tokenizer_files(init, out)  # keep the exact files of the run we started from
        write_run_config(out, run_config)

    def get_batch(step: int, micro: int) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(device, non_blocking=True) for t in batches.get(step, micro))

    def evaluate(m: nn.Module) -> dict[str, float]:
        return evaluate_pairs(m, arch, val_batches, device)

    n_params = sum(p.numel() for p in net.parameters())
    report(progress, "train", message=f"{arch} model, {n_params / 1e6:.2f}M parameters; {n_train:,} training "
           f"examples; batch {batch_size}x{train.grad_accum}; device {device}")
    if lora is not None:
        report(progress, "train", message=describe_lora(net))
    loss_fn = functools.partial(seq2seq_loss if _reads_source(arch) else prompt_completion_loss,
                                label_smoothing=label_smoothing)
    result = fit(net, get_batch, loss_fn, out, train, optim, evaluate=evaluate if val_batches else None,
                 progress=progress)
    if not world.is_main:
        return result
    try:
        from zenlm.viz import plot_loss_curve

        plot_loss_curve(out / "metrics.jsonl", out / "plots" / "loss.png", per="target token")
    except ImportError:  # pragma: no cover - matplotlib is a declared dependency
        pass
    if lora_run is not None:
        finish_lora_run(out, lora_run)
    return result


__all__ = ["finetune_seq2seq", "seq2seq_loss", "prompt_completion_loss", "evaluate_pairs", "Pair",
           "DEFAULT_TRAIN", "DEFAULT_OPTIM"]

"""CLI verbs for source -> target models (registered in :func:`zenlm.cli.build_parser`):

    zenlm finetune seq2seq --data pairs.jsonl --out RUN [--arch encdec|gpt] [--model PRESET] [--max-steps N]
    zenlm evaluate RUN --data pairs.jsonl [--num-beams 4] [--metrics bleu chrf rouge] [--out report.json]
    zenlm evaluate RUN --tasks NAMES [--include-path DIR] [--limit N] [--num-fewshot K]  (lm-eval, GPT runs)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

from zenlm.clikit import Param, params_of

# the TrainConfig and OptimConfig fields `zenlm finetune seq2seq` has flags for
_TRAIN_FLAGS = ("max_steps", "max_seconds", "eval_every", "seed", "device", "precision", "grad_accum", "strategy")
_OPTIM_FLAGS = ("lr", "warmup_steps", "weight_decay")
_SHAPE_FLAGS = ("n_layer", "n_embd", "dropout")


def finetune_seq2seq_params() -> list[Param]:
    """The flags: zenlm.recipes.finetune_seq2seq.finetune_seq2seq's own parameters, the TrainConfig and
    OptimConfig fields above with the recipe's defaults (DEFAULT_TRAIN, DEFAULT_OPTIM), and shape overrides."""
    from zenlm.cli.common import lora_params, shape_params
    from zenlm.device import Precision
    from zenlm.recipes import finetune_seq2seq as recipe
    from zenlm.train.loop import TrainConfig
    from zenlm.train.optim import OptimConfig

    return [*params_of(recipe.finetune_seq2seq, skip=("model_overrides", "train", "optim", "lora", "progress")),
            *params_of(TrainConfig, only=_TRAIN_FLAGS, defaults=recipe.DEFAULT_TRAIN, types={"precision": Precision}),
            *params_of(OptimConfig, only=_OPTIM_FLAGS, defaults=recipe.DEFAULT_OPTIM),
            *(p for p in shape_params() if p.name in _SHAPE_FLAGS), *lora_params()]


def finetune_seq2seq(**flags: Any) -> None:
    """Train an encoder-decoder (or, for comparison, a decoder-only model) on source -> target pairs.

    Teacher forcing with label-smoothed cross-entropy; the decoder-only design reads "source <|bos|> target"
    with the loss on the target only. --objective denoise pretrains an encoder-decoder on plain text
    (spans hidden, the model restores them); start a later run from it with --init.

    Args:
        data: .jsonl with one {"source": ..., "target": ...} object per line (a .txt/.jsonl text file to denoise)
        out: run directory to create
        arch: encdec (encoder-decoder) or gpt (decoder-only)
        objective: pairs (supervised) or denoise (self-supervised text infilling, encdec only)
        model: preset: encdec-tiny, encdec-small (default), t5-small, bart-base; for gpt a `zenlm presets` name
            (default demo)
        tokenizer: tokenizer directory; by default a byte-level BPE is trained on the training texts
        vocab_size: size of that BPE vocabulary
        init: start from this run directory's weights and tokenizer (with --lora: the frozen run to adapt)
        val: validation pairs file (default: the last --val-fraction of --data)
        val_fraction: share of --data held out for validation when --val is not given
        source_field: JSON field holding the source text
        target_field: JSON field holding the target text
        text_field: JSON field holding the text to denoise
        max_source_len: most source tokens (default: the model's limit); longer sources are truncated
        max_target_len: most target tokens (default: the model's limit); longer targets are truncated
        batch_size: pairs per micro-batch (a step reads --grad-accum of them)
        label_smoothing: label smoothing of the training loss
        max_steps: optimiser steps
        max_seconds: wall-time budget (the learning rate decays over whichever budget ends first)
        lr: peak learning rate (AdamW, warm-up then cosine decay to lr/10)
        warmup_steps: linear warm-up steps
        weight_decay: AdamW weight decay on matrices
        eval_every: validate every N steps
        seed: random seed
        device: auto, cpu, cuda or mps
        precision: auto, fp32, bf16 or fp16
        n_layer: layers of the decoder-only model, or of each stack (encoder and decoder) of an encdec
        n_embd: override the preset's width
        dropout: override the preset's dropout
    """
    from zenlm.cli.common import TerminalProgress, lora_config
    from zenlm.models.registry import get_architecture
    from zenlm.recipes import finetune_seq2seq as recipe
    from zenlm.train.loop import TrainConfig
    from zenlm.train.optim import OptimConfig

    train = {k: flags.pop(k) for k in _TRAIN_FLAGS}
    optim = {k: flags.pop(k) for k in _OPTIM_FLAGS}
    shape = {k: flags.pop(k) for k in _SHAPE_FLAGS}
    lora = lora_config(flags)
    out = flags["out"]
    progress = TerminalProgress()
    result = recipe.finetune_seq2seq(
        **flags, model_overrides=get_architecture(flags["arch"]).shape_overrides(**shape),
        train=TrainConfig(**{**recipe.DEFAULT_TRAIN, **train}),
        optim=OptimConfig(**{**recipe.DEFAULT_OPTIM, **optim, "min_lr": optim["lr"] / 10}),
        lora=lora, progress=progress,
    )
    progress.close()
    print(f"\nstopped by {result.stopped_by} at step {result.step} after {result.elapsed_s:.1f} s; "
          f"train loss {result.train_loss:.4f}")
    if result.val:
        print(f"validation loss {result.val['val_loss']:.4f} nats/token  |  perplexity {result.val['val_ppl']:.2f}")
    print(f"run directory: {out}\nnext: zenlm evaluate {out} --data VAL.jsonl")


def evaluate(
    run: str,
    data: str | None = None,
    tasks: list[str] | None = None,
    include_path: str | None = None,
    num_fewshot: int | None = None,
    out: str | None = None,
    metrics: tuple[str, ...] = ("bleu", "chrf", "rouge"),
    lang: Literal["auto", "en", "zh"] = "auto",
    num_beams: int = 4,
    max_new_tokens: int | None = None,
    length_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    early_stopping: bool = False,
    batch_size: int = 16,
    limit: int | None = None,
    source_field: str = "source",
    target_field: str = "target",
    text_field: str | None = None,
    label_field: str | None = None,
    device: str = "auto",
    dtype: Literal["auto", "fp32", "bf16", "fp16", "int8"] = "auto",
    log_samples: bool = False,
    bootstrap_iters: int = 1000,
) -> None:
    """Generate a target for every source in a pairs file and score it (BLEU, chrF, ROUGE-1/2/L); for a
    classifier run (`zenlm finetune classify`) score its labels instead (accuracy, macro P/R/F1, confusion
    PNG); on a language model run, lm-evaluation-harness tasks with --tasks (hellaswag, arc_easy, your own).

    Writes a JSON report (scores, settings, examples, every prediction) and prints a table.

    Args:
        run: run directory made by `zenlm finetune seq2seq` (or `zenlm finetune classify`, or any GPT-family
            run with --tasks)
        data: .jsonl with {"source": ..., "target": ...} per line; the targets are the references (for a
            classifier: .jsonl/.csv with the text and label fields it was trained with)
        tasks: lm-eval task names (needs `pip install -e ".[eval]"`); writes RUN/eval/lm-eval-TIME.json
        include_path: directory of your own lm-eval task YAML files (with --tasks)
        num_fewshot: examples in front of each question (with --tasks; default: the task's own)
        out: JSON report to write (default RUN/eval-DATA.json, or RUN/eval/lm-eval-TIME.json with --tasks)
        metrics: any of bleu, chrf, rouge (default: all three)
        lang: language of the targets: auto, en, or zh (Chinese: sacrebleu's zh tokeniser, character ROUGE)
        num_beams: beam width (1 = greedy)
        max_new_tokens: longest output (default: the longest target seen in training)
        length_penalty: beam ranking by log-prob / length ** length_penalty
        no_repeat_ngram_size: forbid repeating n-grams of this size (0 = off)
        early_stopping: stop a beam search as soon as num_beams outputs are finished
        batch_size: sources decoded together (with --tasks: requests per forward pass)
        limit: score only the first N pairs (with --tasks: the first N items of each task)
        source_field: JSON field holding the source text
        target_field: JSON field holding the reference text
        text_field: (classifier runs) field holding the text; default: the one the classifier was trained with
        label_field: (classifier runs) field holding the label; default: the one the classifier was trained with
        device: auto, cpu, cuda or mps
        dtype: weights for inference with --tasks: auto (the run's own), fp32, bf16, fp16 or int8, as for
            `zenlm generate` (an int8 run stays int8; a float dtype then sets its activations)
        log_samples: with --tasks, keep every item's requests and answers in the report
        bootstrap_iters: with --tasks, resamples for the standard errors lm-eval bootstraps (0: none)
    """
    from zenlm.cli.common import check_run_fits
    from zenlm.errors import ConfigError
    from zenlm.rundir import run_task

    if tasks:
        if data is not None:
            raise ConfigError("give either --data FILE (seq2seq and classifier runs) or --tasks NAMES "
                              "(lm-eval on a language model), not both.")
        check_run_fits(run, "evaluate --tasks")
        from zenlm.cli.lmeval import evaluate_lm_eval

        evaluate_lm_eval(run, tasks, include_path=include_path, limit=limit, num_fewshot=num_fewshot,
                         batch_size=batch_size, dtype=dtype, device=device, out=out, log_samples=log_samples,
                         bootstrap_iters=bootstrap_iters)
        return None
    if data is None:
        raise ConfigError("nothing to evaluate: give --data FILE (seq2seq and classifier runs) or --tasks "
                          "NAMES (lm-eval tasks on a language model run).")

    if run_task(check_run_fits(run, "evaluate --data")) == "classify":  # a classifier: labels, not text
        from zenlm.cli.encoder import evaluate_classify

        return evaluate_classify(run, data, out, batch_size=batch_size, device=device, text_field=text_field,
                                 label_field=label_field)
    import zenlm.seq2seq as s2s
    from zenlm.cli.common import TerminalProgress
    from zenlm.data.seq2seq import read_pairs

    pairs = read_pairs(data, source_field, target_field)[:limit]
    lm = s2s.load(run, device=device)
    progress = TerminalProgress()
    t0 = time.perf_counter()
    report = s2s.evaluate_generation(
        lm, pairs, metrics=tuple(metrics), lang=lang, progress=progress,
        num_beams=num_beams, max_new_tokens=max_new_tokens, length_penalty=length_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size, early_stopping=early_stopping, batch_size=batch_size)
    progress.close()
    report["data"] = str(Path(data).resolve())
    path = Path(out) if out else Path(run) / f"eval-{Path(data).stem}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print("| metric | score |\n|---|---:|")
    for k, v in report["metrics"].items():
        print(f"| {k} | {v:.2f} |")
    print(f"\n{report['n']} pairs, {report['lang']} targets, {num_beams} beams, "
          f"{time.perf_counter() - t0:.1f} s -> {path}")
    for ex in report["examples"][:3]:
        print(f"\nreference:  {ex['reference']}\nprediction: {ex['prediction']}")


__all__ = ["evaluate", "finetune_seq2seq", "finetune_seq2seq_params"]

"""CLI verbs for source -> target models (registered in :func:`zenlm.cli.build_parser`):

    zenlm finetune seq2seq --data pairs.jsonl --out RUN [--arch encdec|gpt] [--model PRESET] [--max-steps N]
    zenlm evaluate RUN --data pairs.jsonl [--num-beams 4] [--metrics bleu chrf rouge] [--out report.json]
    zenlm evaluate RUN --tasks NAMES [--include-path DIR] [--limit N] [--num-fewshot K]  (lm-eval, GPT runs)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal


def finetune_seq2seq(
    data: str,
    out: str,
    arch: Literal["encdec", "gpt"] = "encdec",
    objective: Literal["pairs", "denoise"] = "pairs",
    model: str | None = None,
    tokenizer: str | None = None,
    vocab_size: int = 8192,
    init: str | None = None,
    val: str | None = None,
    val_fraction: float = 0.05,
    source_field: str = "source",
    target_field: str = "target",
    text_field: str = "text",
    max_source_len: int | None = None,
    max_target_len: int | None = None,
    batch_size: int = 16,
    label_smoothing: float = 0.1,
    max_steps: int = 1000,
    max_seconds: float | None = None,
    lr: float = 1e-3,
    warmup_steps: int = 50,
    weight_decay: float = 0.01,
    eval_every: int = 100,
    seed: int = 1337,
    device: str = "auto",
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto",
    n_layer: int | None = None,
    n_embd: int | None = None,
    dropout: float | None = None,
) -> None:
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
        init: start from this run directory's weights and tokenizer
        val: validation pairs file (default: the last --val-fraction of --data)
        val_fraction: share of --data held out for validation when --val is not given
        source_field: JSON field holding the source text
        target_field: JSON field holding the target text
        text_field: JSON field holding the text to denoise
        max_source_len: most source tokens (default: the model's limit); longer sources are truncated
        max_target_len: most target tokens (default: the model's limit); longer targets are truncated
        batch_size: pairs per batch
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
    from zenlm.cli import TerminalProgress
    from zenlm.recipes.finetune_seq2seq import finetune_seq2seq as run
    from zenlm.train.loop import TrainConfig
    from zenlm.train.optim import OptimConfig

    overrides: dict[str, object] = {}
    if n_layer is not None:
        overrides.update({"n_enc_layer": n_layer, "n_dec_layer": n_layer} if arch == "encdec" else {"n_layer": n_layer})
    if n_embd is not None:
        overrides["n_embd"] = n_embd
    if dropout is not None:
        overrides["dropout"] = dropout
    progress = TerminalProgress()
    result = run(
        data, out, arch=arch, objective=objective, model=model, model_overrides=overrides, tokenizer=tokenizer,
        vocab_size=vocab_size, init=init, val_data=val, val_fraction=val_fraction, source_field=source_field,
        target_field=target_field, text_field=text_field, max_source_len=max_source_len,
        max_target_len=max_target_len, batch_size=batch_size, label_smoothing=label_smoothing,
        train=TrainConfig(max_steps=max_steps, max_seconds=max_seconds, eval_every=eval_every, seed=seed,
                          device=device, precision=precision, tensorboard=False),
        optim=OptimConfig(lr=lr, min_lr=lr / 10, warmup_steps=warmup_steps, weight_decay=weight_decay),
        progress=progress,
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
    metrics: list[str] | None = None,
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
    device: str = "auto",
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32",
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
        device: auto, cpu, cuda or mps
        dtype: weights for inference with --tasks: fp32, bf16 or fp16 (an int8 run stays int8)
        log_samples: with --tasks, keep every item's requests and answers in the report
        bootstrap_iters: with --tasks, resamples for the standard errors lm-eval bootstraps (0: none)
    """
    from zenlm.errors import ConfigError
    from zenlm.rundir import read_run_config

    if tasks:
        if data is not None:
            raise ConfigError("give either --data FILE (seq2seq and classifier runs) or --tasks NAMES "
                              "(lm-eval on a language model), not both.")
        from zenlm.cli.lmeval import evaluate_lm_eval

        evaluate_lm_eval(run, tasks, include_path=include_path, limit=limit, num_fewshot=num_fewshot,
                         batch_size=batch_size, dtype=dtype, device=device, out=out, log_samples=log_samples,
                         bootstrap_iters=bootstrap_iters)
        return None
    if data is None:
        raise ConfigError("nothing to evaluate: give --data FILE (seq2seq and classifier runs) or --tasks "
                          "NAMES (lm-eval tasks on a language model run).")

    if (read_run_config(run).get("task") or {}).get("kind") == "classify":  # a classifier: labels, not text
        from zenlm.cli.encoder import evaluate_classify

        return evaluate_classify(run, data, out, batch_size=batch_size, device=device)
    import zenlm.seq2seq as s2s
    from zenlm.cli import TerminalProgress
    from zenlm.data.seq2seq import read_pairs

    pairs = read_pairs(data, source_field, target_field)[:limit]
    lm = s2s.load(run, device=device)
    progress = TerminalProgress()
    t0 = time.perf_counter()
    report = s2s.evaluate_generation(
        lm, pairs, metrics=tuple(metrics or ("bleu", "chrf", "rouge")), lang=lang, progress=progress,
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


__all__ = ["finetune_seq2seq", "evaluate"]

"""CLI verbs for models that read texts (registered in :func:`zenlm.cli.build_parser`):

    zenlm finetune classify --base RUN --data FILE.jsonl|.csv --out RUN [--epochs 3] [--lr 5e-5]
    zenlm predict RUN "text" ... | --file FILE      labels with probabilities (one JSON object per text)
    zenlm embed RUN "text" ... | --file FILE        sentence embeddings (one JSON object per text)
    zenlm evaluate RUN --data FILE                  (classifier runs) accuracy, macro P/R/F1, confusion PNG
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from zenlm.clikit import Param, params_of

# the TrainConfig fields `zenlm finetune classify` has flags for (the recipe sets the schedule from --epochs)
_TRAIN_FLAGS = ("max_seconds", "seed", "device", "precision", "grad_accum", "strategy")


def finetune_classify_params() -> list[Param]:
    """The flags: zenlm.recipes.finetune_classify.finetune_classify's own parameters and the TrainConfig
    fields above."""
    from zenlm.cli.common import lora_params
    from zenlm.device import Precision
    from zenlm.recipes.finetune_classify import finetune_classify as recipe
    from zenlm.train.loop import TrainConfig

    return [*params_of(recipe, skip=("train", "lora", "progress")),
            *params_of(TrainConfig, only=_TRAIN_FLAGS, types={"precision": Precision}), *lora_params()]


def finetune_classify(**flags: Any) -> None:
    """Fine-tune a BERT or GPT run to classify texts; keeps the weights with the best validation macro-F1.

    Args:
        base: run directory to start from (`zenlm pretrain`, `zenlm pretrain --objective mlm`, or a BERT
            imported with `zenlm convert from-hf`)
        data: .jsonl (one object per line) or .csv (header row) with a text and a label field
        out: run directory to create (config.yaml, model.safetensors, report.json, plots/confusion.png)
        val: a separate validation file (default: a stratified --val-fraction of --data)
        val_fraction: share of each class held out for validation when --val is not given
        text_field: name of the text field
        label_field: name of the label field
        max_len: tokens per text, longer texts are cut
        pooling: auto (BERT: mean of the hidden states, GPT: last token), cls (BERT's pooler), mean or last
        dropout: dropout before the classification head
        batch_size: texts per micro-batch (a step reads --grad-accum of them)
        epochs: passes over the training data
        lr: peak AdamW learning rate (warm-up over 10% of the steps, then linear decay); default 5e-5, or 5e-4
            with --lora
        weight_decay: AdamW weight decay
        patience: stop after this many evaluations (two per epoch) without a better macro-F1; 0 = never
        max_seconds: wall-time cap
        seed: seeds the split, the head's initialisation and the batch order
        device: auto, cpu, cuda or mps
        precision: auto, fp32, bf16 or fp16
    """
    from zenlm.cli.common import TerminalProgress, lora_config
    from zenlm.recipes.finetune_classify import finetune_classify as run
    from zenlm.train.loop import TrainConfig

    train = {k: flags.pop(k) for k in _TRAIN_FLAGS}
    lora = lora_config(flags)
    out = flags["out"]
    progress = TerminalProgress()
    res = run(**flags, train=TrainConfig(**train, tensorboard=False), lora=lora, progress=progress)
    progress.close()
    print(f"\nstopped by {res.train.stopped_by} at step {res.train.step} after {res.train.elapsed_s:.1f} s; "
          f"kept the weights of step {res.train.best_step}\n")
    print(res.report.format())
    print(f"\nrun directory: {out} (report.json, plots/confusion.png)\n"
          f"next: zenlm predict {out} \"some text\"")


def _texts(texts: list[str] | None, file: str | None) -> list[str]:
    from zenlm.errors import DataError

    out = list(texts or [])
    if file:
        path = Path(file)
        if not path.is_file():
            raise DataError(f"no such file: {file}")
        out += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not out:
        raise DataError("give texts as arguments or --file FILE (one text per line).")
    return out


def predict(
    run: str,
    texts: list[str] | None = None,
    file: str | None = None,
    top_k: int = 1,
    batch_size: int = 32,
    device: str = "auto",
) -> None:
    """Classify texts with a classifier run: one JSON object per text ({"text", "label", "prob", "top"}).

    Args:
        run: run directory made by `zenlm finetune classify`
        texts: texts to classify
        file: a file with one text per line (added after the texts)
        top_k: also list the K likeliest labels with their probabilities
        batch_size: texts per forward pass
        device: auto, cpu, cuda or mps
    """
    import zenlm
    from zenlm.cli.common import check_run_fits

    check_run_fits(run, "predict")
    lm = zenlm.load(run, device=device)
    items = _texts(texts, file)
    for text, r in zip(items, lm.classify(items, batch_size=batch_size), strict=True):  # type: ignore[attr-defined]
        top = sorted(r["probs"].items(), key=lambda kv: -kv[1])[: max(top_k, 1)]
        print(json.dumps({"text": text, "label": r["label"], "prob": round(r["prob"], 4),
                          "top": [[k, round(v, 4)] for k, v in top]}, ensure_ascii=False))


def embed(
    run: str,
    texts: list[str] | None = None,
    file: str | None = None,
    normalize: bool = True,
    out: str | None = None,
    batch_size: int = 32,
    device: str = "auto",
) -> None:
    """Sentence embeddings (mean of the last hidden states): one JSON object per text ({"text", "embedding"}).

    Args:
        run: a BERT run (`zenlm pretrain --objective mlm`, `zenlm convert from-hf`), a classifier run, or a GPT
            language model (the mean of its last hidden states, as the server's /v1/embeddings)
        texts: texts to embed
        file: a file with one text per line (added after the texts)
        normalize: L2-normalise each vector (--no-normalize keeps the raw mean)
        out: write the JSON lines to this file instead of the terminal
        batch_size: texts per forward pass
        device: auto, cpu, cuda or mps
    """
    import zenlm
    from zenlm.cli.common import check_run_fits
    from zenlm.encoder import EncoderLM

    check_run_fits(run, "embed")
    lm = zenlm.load(run, device=device)
    if not isinstance(lm, EncoderLM):  # a GPT language model: the same mean of its hidden states
        lm = EncoderLM(lm.model, lm.tokenizer, Path(run))  # type: ignore[union-attr]
    items = _texts(texts, file)
    vecs = lm.embed(items, normalize=normalize, batch_size=batch_size)
    lines = [json.dumps({"text": t, "embedding": [round(x, 6) for x in v.tolist()]}, ensure_ascii=False)
             for t, v in zip(items, vecs, strict=True)]
    if out:
        from zenlm.fileio import atomic_write_text

        atomic_write_text(Path(out), "\n".join(lines) + "\n")
        print(f"{len(lines)} embeddings of size {vecs.shape[1]} -> {out}", file=sys.stderr)
    else:
        print("\n".join(lines))


def evaluate_classify(run: str, data: str, out: str | None = None, batch_size: int = 32,
                      device: str = "auto", text_field: str | None = None, label_field: str | None = None) -> None:
    """Score a classifier run on a labelled file (called by `zenlm evaluate` for classifier runs): a JSON
    report (default RUN/eval-DATA.json), a confusion-matrix PNG beside it, and a printed table. ``text_field``
    and ``label_field`` name the file's fields (None: the ones the classifier was trained with)."""
    import zenlm
    from zenlm.data.classify import read_labelled
    from zenlm.evaluate import classification_report_from_names
    from zenlm.recipes.finetune_classify import write_report
    from zenlm.rundir import read_run_config

    task = read_run_config(run).get("task") or {}
    lm = zenlm.load(run, device=device)
    examples = read_labelled(data, text_field or task.get("text_field", "text"),
                             label_field or task.get("label_field", "label"))
    preds = lm.classify([t for t, _ in examples], batch_size=batch_size)  # type: ignore[attr-defined]
    rep = classification_report_from_names([lb for _, lb in examples], [p["label"] for p in preds],
                                           task["labels"])
    path = Path(out) if out else Path(run) / f"eval-{Path(data).stem}.json"
    write_report(rep, path, path.with_suffix(".png"), extra={"data": str(Path(data).resolve()), "n": len(examples)})
    print(rep.format())
    print(f"\n{len(examples)} texts -> {path} (confusion matrix: {path.with_suffix('.png')})")


__all__ = ["embed", "evaluate_classify", "finetune_classify", "finetune_classify_params", "predict"]

"""The demo: raw text to a talking model in one call (``zenlm demo``).

On a built-in corpus it trains a byte-level BPE tokenizer, writes token shards, pretrains a small GPT for
a wall-time budget, evaluates it (nats per token and bits per byte) and leaves a complete run directory
with a loss curve. ``--lang en`` uses Shakespeare's plays, ``--lang zh`` People's Daily (January 1998).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from zenlm.data.corpus import open_corpus
from zenlm.data.shards import prepare
from zenlm.device import Precision
from zenlm.errors import ConfigError
from zenlm.progress import ProgressFn, report
from zenlm.recipes.pretrain import pretrain
from zenlm.recipes.registry import recipe_settings
from zenlm.tokenizer import train_tokenizer
from zenlm.train.loop import TrainConfig, TrainResult
from zenlm.train.optim import OptimConfig

DEMOS = {
    "en": {"corpus": "shakespeare", "vocab_size": 4096, "prompt": "ROMEO:\n"},
    "zh": {"corpus": "peoples-daily", "vocab_size": 8192, "prompt": "新华社北京"},
}
MARKER = ".zenlm-demo"


@dataclass
class DemoResult:
    run_dir: Path
    data_dir: Path
    train: TrainResult
    wall_s: float
    prompt: str


def demo(
    lang: Literal["en", "zh"] = "en",
    max_seconds: float = 300.0,
    out: str | Path | None = None,
    max_steps: int | None = None,
    model: str = "demo",
    device: str = "auto",
    precision: Precision = "auto",
    progress: ProgressFn | None = None,
) -> DemoResult:
    """Run the whole pipeline within about ``max_seconds`` of wall time; returns where it all went.

    lang:        "en" (Shakespeare's plays) or "zh" (People's Daily, January 1998)
    max_seconds: total wall-time budget
    out:         the demo folder (default runs/demo-LANG); a previous demo there is replaced, anything else is
                 refused
    max_steps:   stop training after this many optimiser steps even if time is left (None: time decides)
    model:       the GPT preset to pretrain (``zenlm presets``), with the default recipe's batch and optimiser
    device:      auto, cpu, cuda or mps
    precision:   auto, fp32, bf16 or fp16
    """
    if lang not in DEMOS:
        raise ConfigError(f"--lang {lang!r} is not available; choose one of {sorted(DEMOS)}.")
    if max_seconds < 30:
        raise ConfigError("--max-seconds must be at least 30 for the demo to train anything.")
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"--max-steps must be at least 1, got {max_steps}.")
    spec = DEMOS[lang]
    t0 = time.perf_counter()
    root = Path(out or f"runs/demo-{lang}")
    if root.exists():
        if not (root / MARKER).exists():
            raise ConfigError(f"{root} exists and is not a zenlm demo folder; choose another --out.")
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / MARKER).write_text("made by zenlm demo; replaced by the next demo run\n", encoding="utf-8")
    tok_dir, data_dir, run_dir = root / "tokenizer", root / "data", root / "run"

    corpus = open_corpus(spec["corpus"], progress=progress)
    report(progress, "demo", message=f"[1/4] training a byte-level BPE tokenizer ({spec['vocab_size']} tokens) "
           f"on {corpus.name}")
    tok = train_tokenizer(corpus.texts("train"), kind="bpe", vocab_size=spec["vocab_size"], progress=progress)
    tok.save(tok_dir)
    report(progress, "demo", message="[2/4] writing token shards")
    prepare(corpus, tok, data_dir, progress=progress)
    # Keep ~8% of the budget (at least 10 s) for the final evaluation, the plot and the sample.
    spent = time.perf_counter() - t0
    budget = max(10.0, max_seconds - spent - max(10.0, 0.08 * max_seconds))
    report(progress, "demo", message=f"[3/4] pretraining for {budget:.0f} s")
    s = recipe_settings("default", model=model)
    result = pretrain(
        data_dir, run_dir, model=s["model"], model_overrides=s["model_overrides"], batch_size=s["batch_size"],
        seq_len=s["seq_len"], eval_tokens=32768,
        train=TrainConfig(max_steps=max_steps or 1_000_000, max_seconds=budget, eval_every=100, log_every=10,
                          ckpt_every=0, device=device, precision=precision),
        optim=OptimConfig(**s["optim"]),
        progress=progress,
    )
    report(progress, "demo", message="[4/4] done training; sampling")
    return DemoResult(run_dir=run_dir, data_dir=data_dir, train=result, wall_s=time.perf_counter() - t0,
                      prompt=spec["prompt"])

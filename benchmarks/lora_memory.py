"""LoRA against full fine-tuning: trainable parameters, peak memory, step time and validation loss.

    python benchmarks/lora_memory.py                  # GPT-2-small shape (124M parameters), 30 steps each
    python benchmarks/lora_memory.py --smoke          # tiny settings: proves the script runs (seconds)
    python benchmarks/lora_memory.py --base runs/gpt2 # adapt an existing GPT run (e.g. imported GPT-2)

Every configuration continues training the same base on the same batches for the same number of steps
(``zenlm pretrain --init BASE [--lora]`` on the Shakespeare benchmark text), each in its own Python process so
that its peak resident memory is its own:

    full        every weight trained (AdamW: weights + gradients + two moments per weight)
    lora        LoRA adapters (rank 8, alpha 16, attention and MLP layers) on the frozen fp32 base
    int8+lora   the same adapters on the int8 base written by ``zenlm quantize`` (QLoRA-style, on a CPU)

"peak RSS, training" is the resident-memory high-water mark from the first step to the last (reset through
/proc/self/clear_refs once the base is loaded and the adapters are in place); "incl. loading" is the whole
process's peak. Step time is the mean of the steps after the first two. The goal for LoRA: a training peak at
most 60% of full fine-tuning's at the GPT-2-small shape.

What the peaks are made of: every configuration keeps the activations of its batch (the same in all three; at
4 x 256 tokens about half of them are the 50257-wide logits, log-probabilities and their gradient), the base
weights (fp32, or int8) and, for full fine-tuning only, a gradient and two AdamW moments per weight. With glibc's
default allocator, buffers freed during a step can stay in a fragmented heap; --malloc-mmap-threshold shows the
peaks without that effect. Without --base the base has random weights (memory and
time do not depend on them; validation losses then only compare how fast each configuration adapts).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CONFIGS = ("full", "lora", "int8+lora")
GOAL = 0.60


def _mem_mb(field: str) -> float:
    """VmRSS (current) or VmHWM (peak since the last reset) of this process, in MB."""
    with open("/proc/self/status", encoding="ascii") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1)) / 1024  # type: ignore[union-attr]


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # Linux: reset the resident-set high-water mark (VmHWM) to the current RSS


def training_peaks() -> tuple[list[float], Callable[[Any], None]]:
    """(peaks, progress): a progress callback for a training recipe that resets the RSS high-water mark at the
    first training report (the model is built by then: the training phase starts there) and appends VmHWM (MB)
    then and when training is done; max(peaks) is the training phase's peak."""
    peaks: list[float] = []

    def progress(p: Any) -> None:
        if p.task != "train":
            return
        if not peaks:
            _reset_peak()
            peaks.append(_mem_mb("VmHWM"))
        elif p.done:
            peaks.append(_mem_mb("VmHWM"))

    return peaks, progress


# ------------------------------------------------------------------------------------------- preparation


def prepare_base(args: argparse.Namespace, work: Path) -> tuple[Path, Path, Path]:
    """(data dir, base run, int8 base run) in ``work``: BPE tokenizer + shards of the Shakespeare text, a base
    run of the --model shape (random weights, or --base), and its int8 copy."""
    import torch
    import yaml

    from zenlm.data.corpus import open_corpus
    from zenlm.data.shards import prepare
    from zenlm.models.gpt import GPT
    from zenlm.presets import get_preset
    from zenlm.recipes.quantize import quantize_run
    from zenlm.tokenizer import Tokenizer, train_tokenizer
    from zenlm.train.checkpoint import save_model

    data = work / "data"
    if args.base:
        base, tok = Path(args.base), Tokenizer.load(args.base)
    else:
        base = work / "base"
        corpus = open_corpus("shakespeare-char")
        tok = train_tokenizer(corpus.texts("train"), kind="bpe", vocab_size=args.vocab_size)
        if not base.exists():
            overrides = json.loads(args.model_overrides)
            cfg = get_preset(args.model, **overrides)
            if cfg.vocab_size < tok.vocab_size:
                cfg = get_preset(args.model, **{**overrides, "vocab_size": tok.vocab_size})
            torch.manual_seed(0)
            model = GPT(cfg)
            base.mkdir(parents=True)
            tok.save(base)
            (base / "config.yaml").write_text(yaml.safe_dump({"model": cfg.to_dict(), "objective": "causal-lm"}))
            save_model(model, base / "model.safetensors")
    if not data.exists():
        prepare(open_corpus("shakespeare-char"), tok, data)
    int8 = work / "base-int8"
    if not int8.exists():
        quantize_run(base, int8)
    return data, base, int8


# ------------------------------------------------------------------------------------------------ worker


def worker(args: argparse.Namespace) -> dict:
    """Train one configuration in this process and return its measurements."""
    baseline = _mem_mb("VmRSS")
    from zenlm.models.lora import LoRAConfig
    from zenlm.recipes.pretrain import pretrain
    from zenlm.train.loop import TrainConfig
    from zenlm.train.optim import OptimConfig

    work = Path(args.work)
    out = work / f"run-{args.worker.replace('+', '-')}"
    shutil.rmtree(out, ignore_errors=True)  # a run of an earlier invocation in the same --work
    lora = None if args.worker == "full" else LoRAConfig(rank=args.rank, alpha=args.alpha,
                                                         targets=tuple(args.targets.split(",")))
    init = work / ("base-int8" if args.worker == "int8+lora" else "base")
    if args.base and args.worker != "int8+lora":
        init = Path(args.base)
    peaks, progress = training_peaks()

    lr = args.lr_full if lora is None else args.lr_lora
    t0 = time.perf_counter()
    result = pretrain(
        work / "data", out, init=init, lora=lora, batch_size=args.batch_size, seq_len=args.seq_len,
        eval_tokens=args.eval_tokens,
        train=TrainConfig(max_steps=args.steps, eval_every=0, ckpt_every=0, log_every=1, keep_checkpoints=1,
                          device="cpu", precision=args.precision, threads=args.threads, tensorboard=False,
                          seed=args.seed),
        optim=OptimConfig(name="adamw", lr=lr, min_lr=lr / 10, warmup_steps=min(5, args.steps // 5),
                          weight_decay=0.0 if lora else 0.1),
        progress=progress)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_s = [r["train_s"] for r in rows if "train_s" in r]
    step_s = [b - a for a, b in zip(train_s, train_s[1:], strict=False)][1:] or [train_s[-1]]
    weights = out / ("adapter.safetensors" if lora else "model.safetensors")
    base = Path(args.base) if args.base else work / "base"
    trainable, total = (_count(w) for w in (weights, base / "model.safetensors"))
    return {
        "config": args.worker, "trainable": trainable, "total": total,
        "peak_train_mb": round(max(peaks), 1), "peak_total_mb": round(resource.getrusage(resource.RUSAGE_SELF)
                                                                      .ru_maxrss / 1024, 1),
        "baseline_mb": round(baseline, 1), "step_s": round(sum(step_s) / len(step_s), 4),
        "val_loss": round(result.val.get("val_loss", float("nan")), 4), "train_loss": round(result.train_loss or 0, 4),
        "wall_s": round(wall, 1),
    }


def _count(path: Path) -> int:
    """Numbers stored in a safetensors file (read from its header only)."""
    from safetensors import safe_open

    n = 0
    with safe_open(str(path), "pt") as f:
        for k in f.keys():
            size = 1
            for d in f.get_slice(k).get_shape():
                size *= d
            n += size
    return n


# ------------------------------------------------------------------------------------------------ parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="gpt2-small", help="GPT preset of the base (default gpt2-small: 124M)")
    ap.add_argument("--model-overrides", default="{}", help="JSON dict of GPTConfig fields to change")
    ap.add_argument("--base", help="adapt this existing GPT run instead of a random base of --model")
    ap.add_argument("--vocab-size", type=int, default=8192, help="BPE tokenizer trained on the text")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--targets", default="all", help="LoRA targets, comma-separated (attn, mlp, all, q, k, v, ...)")
    ap.add_argument("--lr-full", type=float, default=3e-4)
    ap.add_argument("--lr-lora", type=float, default=2e-3)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                    help="run the workers with glibc's MALLOC_MMAP_THRESHOLD_=BYTES (e.g. 1000000): a fixed threshold\n"
                         "returns every larger freed buffer to the system at once, so the heap does not fragment")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"which of {', '.join(CONFIGS)} to run")
    ap.add_argument("--work", help="working directory (default: a new temporary one)")
    ap.add_argument("--json", help="also write the rows as JSON to this file")
    ap.add_argument("--smoke", action="store_true", help="tiny model, few steps: check the script runs")
    ap.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.smoke:
        args.model, args.steps, args.batch_size, args.seq_len, args.eval_tokens = "tiny", 4, 2, 32, 1024
        args.vocab_size, args.model_overrides = 512, json.dumps({"n_layer": 2, "n_embd": 64, "vocab_size": 512})
    work = Path(args.work or tempfile.mkdtemp(prefix="zenlm-lora-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    prepare_base(args, work)
    rows = []
    for config in args.configs.split(","):
        if config not in CONFIGS:
            sys.exit(f"unknown configuration {config!r}; choose from {', '.join(CONFIGS)}")
        cmd = [sys.executable, __file__, "--worker", config, "--work", str(work)] + [
            a for k, v in vars(args).items() if k not in ("worker", "work", "json", "smoke", "configs")
            and v is not None for a in (f"--{k.replace('_', '-')}", str(v))]
        env = dict(os.environ)
        if args.malloc_mmap_threshold:
            env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"{config} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{config}: done in {rows[-1]['wall_s']} s", file=sys.stderr)

    full = next((r for r in rows if r["config"] == "full"), None)
    print(f"\nbase: {args.base or args.model} ({rows[0]['total'] / 1e6:.1f}M parameters), {args.steps} steps of "
          f"{args.batch_size}x{args.seq_len} tokens, {args.precision}, {platform.processor() or platform.machine()}, "
          f"{args.threads or os.cpu_count()} threads; LoRA rank {args.rank}, alpha {args.alpha:g}, "
          f"targets {args.targets}; allocator: glibc "
          f"{f'MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}' if args.malloc_mmap_threshold else 'defaults'}\n")
    print("| configuration | trainable parameters | peak RSS, training (MB) | vs full | peak RSS incl. loading (MB) "
          "| step time (s) | validation loss |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['peak_train_mb'] / full['peak_train_mb']:.0%}" if full else "-"
        print(f"| {r['config']} | {r['trainable']:,} ({r['trainable'] / r['total']:.2%}) | {r['peak_train_mb']:,.0f} "
              f"| {ratio} | {r['peak_total_mb']:,.0f} | {r['step_s']:.3f} | {r['val_loss']:.4f} |")
    lora = next((r for r in rows if r["config"] == "lora"), None)
    if full and lora:
        ratio = lora["peak_train_mb"] / full["peak_train_mb"]
        print(f"\nLoRA's training peak is {ratio:.0%} of full fine-tuning's (goal: <= {GOAL:.0%}): "
              f"{'met' if ratio <= GOAL else 'NOT met'}.")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

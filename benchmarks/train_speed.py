"""Time-to-quality on shakespeare-char: the classic recipe against zenlm's fast recipe, same process, same CPU.

    python benchmarks/train_speed.py                  # full table (baseline, fast, 5-minute run, throughput)
    python benchmarks/train_speed.py --only baseline,fast
    python benchmarks/train_speed.py --ablate         # one lever at a time from the fast recipe

Data: zenlm's corpus "shakespeare-char" (1,115,394 characters of the shakespeare package's plays: the length of
the classic tinyshakespeare file, not that file), character vocabulary, first 90% train, last 10% validation. Evaluation: mean next-character loss (nats) over *every* non-overlapping
64-character window of the validation split, identical for all rows. Time-to-L counts training time only
(evaluation excluded), and is read at evaluation points, so it is an upper bound.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from zenlm.data.corpus import open_corpus
from zenlm.data.shards import prepare
from zenlm.recipes.pretrain import pretrain
from zenlm.recipes.registry import RECIPES, recipe_settings
from zenlm.tokenizer import train_tokenizer
from zenlm.train.loop import TrainConfig
from zenlm.train.optim import OptimConfig

EVAL_SEQ = 64
# The bf16 matrix-product rate quoted for this machine class (780-930 GFLOP/s); torch's own 1024-4096 bf16
# products measure lower on it, so the table shows the share of both.
NOMINAL_BF16 = 850.0


def matmul_gflops(dtype: torch.dtype, n: int = 1024, reps: int = 30) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def build_data(root: Path) -> Path:
    corpus = open_corpus("shakespeare-char")
    tok = train_tokenizer(corpus.texts("train"), kind="char")
    prepare(corpus, tok, root / "data")
    return root / "data"


def run(data: Path, out: Path, recipe: str, *, max_steps: int | None = None, max_seconds: float | None = None,
        eval_every: int = 0, overrides: dict | None = None) -> dict:
    """Train one recipe (+ overrides) and return its metrics."""
    s = recipe_settings(recipe, **(overrides or {}))
    train = TrainConfig(max_steps=max_steps or s["max_steps"], max_seconds=max_seconds, eval_every=eval_every,
                        log_every=50, ckpt_every=0, device="cpu", precision=s["precision"],
                        compile=s["compile"], grad_accum=s["grad_accum"], tensorboard=False, seed=1337)
    res = pretrain(data, out, model=s["model"], model_overrides=s["model_overrides"], batch_size=s["batch_size"],
                   seq_len=s["seq_len"], eval_tokens=None, eval_seq_len=EVAL_SEQ, eval_batch_size=256,
                   train=train, optim=OptimConfig(**s["optim"]))
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["train_s"] if "train_s" in r else res.train_s, r["val_loss"], r["step"]) for r in recs
             if "val_loss" in r]
    return {"recipe": recipe, "overrides": overrides or {}, "steps": res.step, "train_s": res.train_s,
            "val_loss": res.val["val_loss"], "evals": evals, "tokens_per_s": res.tokens / max(res.train_s, 1e-9)}


def time_to(evals: list[tuple[float, float, int]], target: float) -> tuple[float | None, int | None]:
    for t, loss, step in evals:
        if loss <= target:
            return t, step
    return None, None


def throughput(precision: str, compile_: bool, steps: int = 12) -> dict:
    """Tokens/s and achieved FLOP/s at a compute-bound shape (6 layers, 384 wide, context 256)."""
    from zenlm.models.gpt import GPT
    from zenlm.presets import get_preset
    from zenlm.recipes.pretrain import causal_lm_loss, causal_lm_targets
    from zenlm.train.loop import fit

    cfg = get_preset("classic-char", vocab_size=65, n_layer=6, n_head=6, n_embd=384, block_size=256)
    torch.manual_seed(0)
    model = GPT(cfg)
    B, T = 16, 256
    data = torch.randint(0, 65, (B, T + 1))

    with tempfile.TemporaryDirectory() as tmp:
        fit(model, lambda s, m: (data[:, :-1], data[:, 1:]), causal_lm_loss, Path(tmp),
            TrainConfig(max_steps=steps, eval_every=0, log_every=1, ckpt_every=0, device="cpu", precision=precision,
                        compile=compile_, tensorboard=False), OptimConfig(warmup_steps=0),
            count_targets=causal_lm_targets)
        recs = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    rates = sorted(r["tokens_per_s"] for r in recs[4:] if "tokens_per_s" in r)
    tok_s = rates[len(rates) // 2]
    n_matmul = cfg.num_params(include_embedding=False) + cfg.vocab_size * cfg.n_embd
    flops_tok = 6 * n_matmul + 12 * cfg.n_layer * cfg.n_embd * T
    return {"precision": precision, "compile": compile_, "tokens_per_s": tok_s, "gflops": tok_s * flops_tok / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="baseline,fast,five-min,throughput")
    ap.add_argument("--ablate", action="store_true", help="also run each lever of the fast recipe on its own")
    ap.add_argument("--five-min-seconds", type=float, default=300.0)
    ap.add_argument("--json", type=Path, default=None, help="append the results as JSON lines here")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="CPU threads (default: all cores; use 1 when other jobs share the machine)")
    ap.add_argument("--target", type=float, default=None,
                    help="skip the baseline and race to this validation loss (e.g. for --ablate runs)")
    args = ap.parse_args()
    parts = set(args.only.split(","))
    torch.set_num_threads(args.threads)
    lines: list[str] = []

    def say(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    say(f"# train_speed — {time.strftime('%Y-%m-%d %H:%M')} — {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    fp32, bf16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    say(f"matmul ceiling measured now: fp32 {fp32:.0f} GFLOP/s, bf16 {bf16:.0f} GFLOP/s (1024^3)")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = build_data(root)
        if args.target is not None:
            T, L = float("nan"), args.target
            say(f"\ntarget: validation loss {L} (given with --target; no baseline run)")
            say("\n| run | steps | train time (s) | val loss | time to L (s) | speed-up |")
            say("|---|---:|---:|---:|---:|---:|")
        elif "baseline" in parts or "fast" in parts:
            base = run(data, root / "baseline", "classic", eval_every=0)
            T, L = base["train_s"], base["val_loss"]
            results["baseline"] = base
            say("\n| run | steps | train time (s) | val loss | time to L (s) | speed-up |")
            say("|---|---:|---:|---:|---:|---:|")
            say(f"| classic recipe (baseline) | {base['steps']} | {T:.1f} | {L:.4f} | {T:.1f} | 1.00x |")
        if "fast" in parts:

            def row(label: str, r: dict) -> str:
                t, step = time_to(r["evals"], L)
                reached = f"{t:.1f} (step {step})" if t is not None else "not reached"
                speedup = f"{T / t:.2f}x" if t and math.isfinite(T) else "-"
                return f"| {label} | {r['steps']} | {r['train_s']:.1f} | {r['val_loss']:.4f} | {reached} | {speedup} |"

            results["fast"] = run(data, root / "fast", "fast", eval_every=RECIPES["fast"].eval_every)
            say(row("fast recipe", results["fast"]))
            if args.ablate:
                for name, ov in RECIPES["fast"].ablations.items():
                    r = run(data, root / f"abl-{name}", "fast", eval_every=RECIPES["fast"].eval_every, overrides=ov)
                    results[f"fast, {name}"] = r
                    say(row(f"fast, {name}", r))
        if "five-min" in parts:
            five = run(data, root / "five", "five-min", max_seconds=args.five_min_seconds, eval_every=0)
            results["five-min"] = five
            say(f"\nbest validation loss in {args.five_min_seconds:.0f} s of training (recipe five-min): "
                f"{five['val_loss']:.4f} after {five['steps']} steps ({five['tokens_per_s']:,.0f} tokens/s)")
    if "throughput" in parts:
        say("\n| compute-bound shape (6 layers, 384 wide, context 256, batch 16) | tokens/s | GFLOP/s | "
            "share of bf16 matmul measured now | share of 850 GFLOP/s |")
        say("|---|---:|---:|---:|---:|")
        for prec, comp in (("fp32", False), ("bf16", False), ("bf16", True)):
            r = throughput(prec, comp)
            results[f"throughput-{prec}-{comp}"] = r
            say(f"| {prec}{' + compile' if comp else ''} | {r['tokens_per_s']:,.0f} | {r['gflops']:.0f} | "
                f"{r['gflops'] / bf16:.0%} | {r['gflops'] / NOMINAL_BF16:.0%} |")
    if args.json:
        with args.json.open("a") as f:
            f.write(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "results": results}, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())

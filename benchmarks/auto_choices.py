"""Is `--precision auto` the fastest choice on this machine? Time what it chose against what it passed over.

    python benchmarks/auto_choices.py                 # demo and fast-recipe shapes, fp32 vs bf16, best of 3
    python benchmarks/auto_choices.py --steps 12 --repeats 2 --threads 1

zenlm picks a compute precision from the hardware in one place (``zenlm.device.resolve_precision``): bf16
autocast on a CPU only where it computes bf16 natively (AVX-512 BF16, AMX or ARM's BF16 extension), fp32
elsewhere. This script prints the CPU's capability flags, the matrix-product rate of both dtypes (the cause),
and training tokens/s of both precisions at the shapes of ``zenlm demo`` (the ``default`` recipe) and of
``--recipe fast`` (the effect), each through zenlm's own training loop with the recipe's optimiser. Rows are
interleaved and each is the best of ``--repeats`` runs, so a busy moment on a shared machine hurts both
alike. Goal: the chosen precision is never more than 5% slower than the best alternative.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from zenlm.device import cpu_features, resolve_precision
from zenlm.models.gpt import GPT
from zenlm.presets import get_preset
from zenlm.recipes.pretrain import causal_lm_loss
from zenlm.recipes.registry import recipe_settings
from zenlm.train.loop import TrainConfig, fit
from zenlm.train.optim import OptimConfig

# The training shapes that "auto" decides for: the demo (default recipe, the demo's 4096-token BPE) and the
# fast recipe on shakespeare-char (82 ids: its 77 characters and the special tokens).
SHAPES = {
    "demo (default recipe)": ("default", 4096),
    "fast recipe": ("fast", 82),
}


def matmul_gflops(dtype: torch.dtype, n: int, reps: int) -> float:
    """Best-of-3 rate of an n x n x n product in ``dtype`` (GFLOP/s)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t) / 1e9)
    return best


def train_tokens_per_s(recipe: str, vocab_size: int, precision: str, steps: int) -> float:
    """Median training tokens/s over the last steps of a short run of ``recipe``'s model, batch and optimiser."""
    s = recipe_settings(recipe)
    cfg = get_preset(s["model"], vocab_size=vocab_size, **s["model_overrides"])
    seq_len = s["seq_len"] or cfg.block_size
    torch.manual_seed(0)
    model = GPT(cfg)
    data = torch.randint(0, vocab_size, (s["batch_size"], seq_len + 1))
    with tempfile.TemporaryDirectory() as tmp:
        fit(model, lambda step, micro: (data[:, :-1], data[:, 1:]), causal_lm_loss, Path(tmp),
            TrainConfig(max_steps=steps, eval_every=0, log_every=1, ckpt_every=0, device="cpu",
                        precision=precision, tensorboard=False),
            OptimConfig(**{**s["optim"], "warmup_steps": 0}))
        recs = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in recs[3:] if "tokens_per_s" in r]  # the first steps warm up
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="training steps per measurement (first 3 not timed)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs per row; each row shows its best")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    feats = cpu_features()
    try:
        onednn_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn_bf16 = False
    auto = resolve_precision("auto", torch.device("cpu"))
    print(f"# auto_choices — {time.strftime('%Y-%m-%d %H:%M')} — {feats.name} ({platform.machine()}), "
          f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"\nCPU flags: kernel dispatch {feats.capability}; AVX-512 {feats.avx512}; AVX-512 BF16 "
          f"{feats.avx512_bf16}; AMX tiles {feats.amx_tile}; ARM BF16 {feats.arm_bf16}; oneDNN accepts bf16 "
          f"(native or emulated) {onednn_bf16}")
    print(f"native bf16: {'yes' if feats.native_bf16 else 'no'} -> `--precision auto` chooses **{auto}**")

    print("\n| matrix product | fp32 GFLOP/s | bf16 GFLOP/s | bf16 / fp32 |")
    print("|---|---:|---:|---:|")
    for n, reps in ((256, 200), (1024, 20)):
        f32, b16 = matmul_gflops(torch.float32, n, reps), matmul_gflops(torch.bfloat16, n, reps)
        print(f"| {n} x {n} x {n} | {f32:.0f} | {b16:.0f} | {b16 / f32:.2f}x |", flush=True)

    best: dict[tuple[str, str], float] = {}
    for _ in range(args.repeats):  # interleaved: a busy moment hurts every row alike
        for shape, (recipe, vocab) in SHAPES.items():
            for prec in ("fp32", "bf16"):
                rate = train_tokens_per_s(recipe, vocab, prec, args.steps)
                best[(shape, prec)] = max(best.get((shape, prec), 0.0), rate)

    print("\n| training shape | fp32 tokens/s | bf16 tokens/s | auto chose | auto / best | goal (>= 0.95) |")
    print("|---|---:|---:|---|---:|---|")
    for shape in SHAPES:
        f32, b16 = best[(shape, "fp32")], best[(shape, "bf16")]
        ratio = best[(shape, auto)] / max(f32, b16)
        print(f"| {shape} | {f32:,.0f} | {b16:,.0f} | {auto} | {ratio:.2f} | {'met' if ratio >= 0.95 else 'MISSED'} |")


if __name__ == "__main__":
    main()

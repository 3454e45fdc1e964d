"""Training throughput and model FLOP utilisation (MFU) of zenlm's real training loop on one GPU.

    python benchmarks/gpu_train.py                  # GPT-2 small shape, bf16, torch.compile, fused AdamW
    python benchmarks/gpu_train.py --no-compile     # the same without compilation

Random tokens (throughput does not depend on the text). FLOPs per token follow the usual count for a
decoder: 6 * (parameters that take part in matrix products, the output head included) for the forward and
backward passes, plus 12 * layers * width * context for attention scores and values. MFU is achieved
FLOP/s over (a) the datasheet dense bf16 peak and (b) a large bf16 matrix product measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from zenlm.models.gpt import GPT
from zenlm.presets import get_preset
from zenlm.recipes.pretrain import causal_lm_loss, causal_lm_targets
from zenlm.train.loop import TrainConfig, apply_process_settings, fit
from zenlm.train.optim import OptimConfig

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def matmul_ceiling(device: torch.device, n: int = 8192, reps: int = 20) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def flops_per_token(cfg) -> float:
    n_matmul = cfg.num_params(include_embedding=False) + cfg.vocab_size * cfg.n_embd
    return 6 * n_matmul + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt2-small")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--optimizer", default="adamw")
    ap.add_argument("--out", default=None, help="write the result row as JSON here")
    args = ap.parse_args()

    device = torch.device("cuda")
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), float("nan"))
    ceiling = matmul_ceiling(device)
    cfg = get_preset(args.model, vocab_size=50304)
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    B, T = args.batch_size, cfg.block_size
    data = torch.randint(0, cfg.vocab_size, (64, B, T + 1), device=device)

    def get_batch(step: int, micro: int):
        w = data[step % 64]
        return w[:, :-1], w[:, 1:]

    train = TrainConfig(max_steps=args.steps, eval_every=0, log_every=10, ckpt_every=0, device="cuda",
                        precision="bf16", compile=args.compile, tensorboard=False)
    apply_process_settings(train)  # TF32 matmuls
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = fit(model, get_batch, causal_lm_loss, Path(tmp), train, OptimConfig(name=args.optimizer, warmup_steps=10),
                  count_targets=causal_lm_targets)
        wall = time.perf_counter() - t0
        recs = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    steady = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r][2:]  # skip compile / warm-up
    tok_s = sorted(steady)[len(steady) // 2]
    achieved = tok_s * flops_per_token(cfg)
    row = {
        "gpu": name, "torch": torch.__version__, "model": args.model, "params_M": round(cfg.num_params() / 1e6, 1),
        "batch": f"{B}x{T}", "compile": args.compile, "optimizer": args.optimizer,
        "tokens_per_s": round(tok_s), "achieved_TFLOPs": round(achieved / 1e12, 1),
        "mfu_vs_datasheet": round(achieved / peak, 3) if not math.isnan(peak) else None,
        "matmul_ceiling_TFLOPs": round(ceiling / 1e12, 1), "share_of_measured_ceiling": round(achieved / ceiling, 3),
        "wall_s_incl_compile": round(wall, 1), "final_loss": round(res.train_loss or float("nan"), 3),
    }
    print(json.dumps(row))
    if args.out:
        Path(args.out).write_text(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

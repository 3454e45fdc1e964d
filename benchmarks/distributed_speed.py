"""Training throughput on several processes (DDP / FSDP2 through zenlm's fit), against one process.

    python benchmarks/distributed_speed.py --mode cpu        # 1 vs 2 processes, 1 thread each, gloo
    python benchmarks/distributed_speed.py --mode gpu        # one GPU: plain vs DDP vs FSDP2 at world size 1
    python benchmarks/distributed_speed.py --mode gpu --device cpu --model tiny --steps 6    # a smoke run

CPU: the compute-bound shape of benchmarks/train_speed.py (6 layers, 384 wide, context 256, micro-batches of 16)
and the same work per optimiser step on any number of processes: ``--grad-accum`` micro-batches per step in all
(default 2), shared by the processes. Scaling efficiency = tokens/s of W processes / (W x tokens/s of one). Each
process gets ``--threads`` threads, so W processes need W x threads cores to scale.

GPU: the GPT-2-small shape in bf16 on one GPU, as ``zenlm pretrain`` runs it with ``--strategy none``, ``ddp`` and
``fsdp`` under ``torchrun --nproc-per-node 1``: what the wrapper costs when there is nothing to share. MFU counts
FLOPs as benchmarks/gpu_train.py does (6 x matmul parameters + attention, per token) against the datasheet peak.

Each configuration runs in fresh processes started like torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT); random tokens; tokens/s is the median over the logged steps after the first few.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from zenlm.config import GPTConfig
from zenlm.models.gpt import GPT
from zenlm.presets import get_preset
from zenlm.recipes.pretrain import causal_lm_loss, causal_lm_targets
from zenlm.train.loop import TrainConfig, apply_process_settings, fit
from zenlm.train.optim import OptimConfig

sys.path.insert(0, str(Path(__file__).parent))
from gpu_train import PEAK_BF16, flops_per_token  # noqa: E402  # the FLOP count of the one-GPU benchmark

WARMUP_RECORDS = 3  # logged steps left out of the median (allocation, first all-reduces, compilation)


def model_config(args: argparse.Namespace) -> GPTConfig:
    if args.model is not None:  # a preset (smoke runs)
        return get_preset(args.model, vocab_size=512)
    if args.mode == "gpu":
        return get_preset("gpt2-small", vocab_size=50304)
    return get_preset("classic-char", vocab_size=65, n_layer=6, n_head=6, n_embd=384, block_size=256)


def worker(args: argparse.Namespace) -> None:
    """One process of a configuration: train ``args.steps`` steps on random tokens; rank 0 writes the result."""
    cfg = model_config(args)
    on_gpu = args.device.startswith("cuda")
    train = TrainConfig(max_steps=args.steps, eval_every=0, log_every=1, ckpt_every=0, device=args.device,
                        precision="bf16" if on_gpu else "fp32", compile=args.compile, tensorboard=False,
                        grad_accum=args.grad_accum, strategy=args.strategy,
                        threads=None if on_gpu else args.threads, seed=0)
    world = apply_process_settings(train)
    torch.manual_seed(0)
    model = GPT(cfg).to(args.device)
    B, T = args.batch_size, cfg.block_size
    data = torch.randint(0, cfg.vocab_size, (8, B, T + 1), generator=torch.Generator().manual_seed(0))
    data = data.to(args.device)

    def get_batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = data[(step * args.grad_accum + micro) % len(data)]  # the same batches on any number of processes
        return w[:, :-1], w[:, 1:]

    out = Path(args.out)
    res = fit(model, get_batch, causal_lm_loss, out, train, OptimConfig(name="adamw", warmup_steps=2),
              count_targets=causal_lm_targets)
    if world.is_main:
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        rates = sorted(r["tokens_per_s"] for r in recs[WARMUP_RECORDS:] if "tokens_per_s" in r)
        (out / "result.json").write_text(json.dumps({
            "tokens_per_s": rates[len(rates) // 2], "final_loss": res.train_loss,
            "gpu": torch.cuda.get_device_name() if on_gpu else None}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(args: argparse.Namespace, processes: int, strategy: str) -> dict:
    """Start ``processes`` workers as torchrun would and return rank 0's result."""
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        cmd = [sys.executable, __file__, "--worker", "--mode", args.mode, "--strategy", strategy, "--out", tmp,
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--grad-accum",
               str(args.grad_accum), "--threads", str(args.threads), "--compile" if args.compile else "--no-compile",
               "--device", args.device, *(["--model", args.model] if args.model else [])]
        env = {**os.environ, "WORLD_SIZE": str(processes), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": str(args.threads)}
        procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(processes)]
        codes = [p.wait() for p in procs]
        if any(codes):
            raise SystemExit(f"{processes} process(es) with {strategy}: exit codes {codes}")
        return json.loads((Path(tmp) / "result.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--steps", type=int, default=None, help="optimiser steps per configuration (cpu 12, gpu 40)")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch")
    ap.add_argument("--grad-accum", type=int, default=None,
                    help="micro-batches per step over all processes (cpu 2, gpu 1)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    ap.add_argument("--processes", type=int, default=2, help="cpu: the largest number of processes to try")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument("--device", default=None, help="default: cpu in cpu mode, cuda in gpu mode")
    ap.add_argument("--model", default=None, help="a preset instead of the mode's shape (for a smoke run)")
    ap.add_argument("--json", type=Path, default=None, help="append the rows as JSON lines here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--strategy", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.steps = args.steps or (40 if args.mode == "gpu" else 12)
    args.grad_accum = args.grad_accum or (1 if args.mode == "gpu" else 2)
    args.device = args.device or ("cuda" if args.mode == "gpu" else "cpu")
    if args.worker:
        worker(args)
        return

    cfg = model_config(args)
    rows: list[dict] = []
    if args.mode == "cpu":
        print(f"# distributed_speed (cpu) - {time.strftime('%Y-%m-%d %H:%M')} - {os.cpu_count()} cores, torch "
              f"{torch.__version__}; {cfg.n_layer} layers, {cfg.n_embd} wide, context {cfg.block_size}, "
              f"{args.grad_accum} micro-batches of {args.batch_size} per step, {args.threads} thread(s) per process\n")
        print("| processes | strategy | tokens/s | scaling efficiency |\n|---:|---|---:|---:|")
        one = None
        for w in [n for n in range(1, args.processes + 1) if args.grad_accum % n == 0]:
            strategy = "none" if w == 1 else "ddp"
            r = run(args, w, strategy)
            one = one or r["tokens_per_s"]
            eff = r["tokens_per_s"] / (w * one)
            rows.append({"mode": "cpu", "processes": w, "strategy": strategy, **r, "efficiency": round(eff, 3)})
            print(f"| {w} | {strategy} | {r['tokens_per_s']:,.0f} | {eff:.0%} |", flush=True)
    else:
        flops = flops_per_token(cfg)
        print(f"# distributed_speed (gpu) - {time.strftime('%Y-%m-%d %H:%M')} - torch {torch.__version__}; "
              f"{args.model or 'gpt2-small'} shape, batch {args.batch_size}x{cfg.block_size}, compile "
              f"{args.compile}, {args.device}\n")
        print("| strategy (1 process) | tokens/s | MFU | vs plain |\n|---|---:|---:|---:|")
        plain = None
        for strategy in ("none", "ddp", "fsdp"):
            r = run(args, 1, strategy)
            peak = next((v for k, v in PEAK_BF16.items() if k in (r["gpu"] or "")), float("nan"))
            mfu = r["tokens_per_s"] * flops / peak
            plain = plain or r["tokens_per_s"]
            rows.append({"mode": "gpu", "strategy": strategy, **r, "mfu": None if math.isnan(mfu) else round(mfu, 3)})
            print(f"| {strategy} | {r['tokens_per_s']:,.0f} | {mfu:.1%} | {r['tokens_per_s'] / plain:.2f}x |",
                  flush=True)
    if args.json:
        with args.json.open("a", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

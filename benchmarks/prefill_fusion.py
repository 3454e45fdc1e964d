"""A prompt's forward pass with the feed-forward's first product and GPT-2's GELU as one oneDNN call, against
the two ATen calls (``zenlm.models.layers.fused_linear_gelu``; ``ZENLM_FUSED_GELU=0`` is the baseline).

Every prompt a model reads goes through this pass: the prefill before the first generated token (``generate``,
``chat``, the server's prompts), scoring and evaluation. A GPT-2-small model (random weights, ``--vocab`` tokens)
runs it over prompts of several shapes (batch x tokens), logits of the last position only, as prefill does. Both
sides run in this process, alternating, ``--repeats`` times; the table gives the median time of a pass, prompt
tokens/s, the ratio (unfused time over fused) and the largest difference between the two sides' logits.
bf16 rows only where the CPU computes bf16 natively (elsewhere zenlm does not use bf16 activations).

    python benchmarks/prefill_fusion.py [--threads 2] [--shapes 1x32,4x60,1x512,16x60] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from datetime import datetime, timezone

import torch

from zenlm.config import GPTConfig
from zenlm.device import cpu_features
from zenlm.models import layers
from zenlm.models.gpt import GPT


def fused(on: bool) -> None:
    """Turn the fused call on or off for the passes that follow."""
    os.environ["ZENLM_FUSED_GELU"] = "1" if on else "0"
    layers._fused_gelu_dtypes.cache_clear()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--n-layer", type=int, default=12)
    ap.add_argument("--shapes", default="1x32,4x60,1x512,16x60", help="prompts as BATCHxTOKENS, comma-separated")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    try:
        shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
        assert all(len(s) == 2 and min(s) > 0 for s in shapes)
    except (ValueError, AssertionError):
        ap.error(f"--shapes takes BATCHxTOKENS pairs like 4x60, got {args.shapes!r}")
    torch.set_num_threads(args.threads)
    feats = cpu_features()
    dtypes = [torch.float32] + ([torch.bfloat16] if feats.native_bf16 else [])
    print(f"# prefill_fusion -- {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC -- {feats.name or platform.processor()}"
          f" ({feats.describe()}), {args.threads} threads, torch {torch.__version__}")
    print(f"# GPT-2-small shape, {args.n_layer} layers, vocab {args.vocab}, random weights; median of "
          f"{args.repeats} alternating runs per side\n")
    print("| weights | prompt (batch x tokens) | ATen: fc, then GELU (ms) | fused (ms) | prompt tokens/s, fused | "
          "speed-up | max logit difference |")
    print("|---|---|---:|---:|---:|---:|---:|")
    cfg = GPTConfig(vocab_size=args.vocab, block_size=1024, n_layer=args.n_layer, n_head=12, n_embd=768)
    for dtype in dtypes:
        torch.manual_seed(0)
        model = GPT(cfg).eval().to(dtype)
        for B, T in shapes:
            ids = torch.randint(0, args.vocab, (B, T), generator=torch.Generator().manual_seed(B * 1000 + T))
            cache = model.make_cache(B, T, dtype=dtype)

            def one(model=model, ids=ids, cache=cache) -> torch.Tensor:
                cache.reset()
                return model(ids, cache=cache, last_only=True)

            times: dict[bool, list[float]] = {False: [], True: []}
            logits = {}
            with torch.inference_mode():
                for side in (False, True):
                    fused(side)
                    one()
                    logits[side] = one().float()
                for _ in range(args.repeats):
                    for side in (False, True):
                        fused(side)
                        t = time.perf_counter()
                        one()
                        times[side].append(time.perf_counter() - t)
            base, new = statistics.median(times[False]), statistics.median(times[True])
            diff = (logits[True] - logits[False]).abs().max().item()
            name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
            print(f"| {name} | {B} x {T} | {base * 1e3:,.1f} | {new * 1e3:,.1f} | {B * T / new:,.0f} | "
                  f"**{base / new:.2f}x** | {diff:.1e} |", flush=True)
    fused(True)


if __name__ == "__main__":
    main()

"""The batched compiled decode step on its own (what the server runs for R streams): ms per step of R rows over
S key slots, with the KV cache filled with random values (an untouched cache reads as zero pages, which makes
attention look free), for a GPT-2-small-shaped model (12 layers, 12 heads of 64, vocabulary 8,192, as
serve_load.py). Two things decide its speed on a CPU, and the script measures each against its alternative in the
same run:

- the attention the program runs: ``decode_attention`` (written out, zenlm's default) or the fused SDPA kernel
  (the programs of each are built in a directory of their own);
- the thread that calls it: the main thread; a second thread while the main thread keeps the OpenMP workers of
  its own parallel regions (what the server did before ``release_openmp_workers``); a second thread after the
  main thread released them (the server now);
- the pages of the KV-cache pool (a second table): 4 KiB pages, or transparent huge pages (2 MiB), which a pool
  reserved whole asks for (``KVCache.reserve``, as the server's is). The two pools hold the same values and
  take turns, ``--rounds`` times; the median of each.

    python benchmarks/batched_step.py [--dtypes bf16,fp32] [--rows 16] [--keys 128,256,512] [--threads 2]
                                      [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import threading
import time

import torch

import zenlm.models.attention as attention_module
from zenlm.compiled import CompiledDecoder
from zenlm.config import GPTConfig
from zenlm.device import cpu_features, release_openmp_workers
from zenlm.models.gpt import GPT

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def step_ms(decoder: CompiledDecoder, cache, rows: int, keys: int, steps: int) -> float:
    tokens = torch.randint(0, 8192, (rows,))
    pos = torch.full((rows,), keys - 1)
    with torch.inference_mode():
        for _ in range(3):
            decoder(tokens, pos, cache.k, cache.v, batched=True)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(steps):
                decoder(tokens, pos, cache.k, cache.v, batched=True)
            best = min(best, (time.perf_counter() - t0) / steps)
    return best * 1e3


def on_thread(fn):
    out: list = []
    th = threading.Thread(target=lambda: out.append(fn()))
    th.start()
    th.join()
    return out[0]


def row(args: argparse.Namespace, keys: list[int], name: str, label: str, thread: str, decoder: CompiledDecoder,
        cache, call) -> None:
    cells = " | ".join(f"{call(lambda k=k: step_ms(decoder, cache, args.rows, k, args.steps)):.1f}" for k in keys)
    print(f"| {name} | {label} | {thread} | {cells} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--keys", default="128,256,512", help="key slots a step reads (multiples of 16)")
    ap.add_argument("--steps", type=int, default=10, help="steps per timing (fastest of 3 timings)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rounds", type=int, default=7, help="turns of each pool in the pages table")
    args = ap.parse_args()
    dtypes = [d.strip() for d in args.dtypes.split(",")]
    if not dtypes or any(d not in DTYPES for d in dtypes):
        ap.error(f"--dtypes: a comma-separated list of {', '.join(DTYPES)}, got {args.dtypes!r}")
    try:
        keys = [int(k) for k in args.keys.split(",")]
    except ValueError:
        ap.error(f"--keys: comma-separated whole numbers, got {args.keys!r}")
    if any(k < 16 or k % 16 or k > 1008 for k in keys):
        ap.error(f"--keys: multiples of 16 from 16 to 1008 (the cache holds 1,024 positions), got {args.keys!r}")
    if args.rows < 1 or args.steps < 1 or args.threads < 1 or args.rounds < 1:
        ap.error("--rows, --steps, --threads and --rounds must be at least 1")
    torch.set_num_threads(args.threads)
    feats = cpu_features()
    print(f"# batched_step -- {time.strftime('%Y-%m-%d %H:%M')} UTC -- {feats.name} ({feats.describe()}), "
          f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}; {args.rows} rows")
    print()
    print("| weights | attention | calling thread | " + " | ".join(f"{k} keys (ms)" for k in keys) + " |")
    print("|---|---|---|" + "---:|" * len(keys))
    cfg = GPTConfig(vocab_size=8192, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    root = tempfile.mkdtemp(prefix="zenlm-batched-step-")
    pools = {}
    for name in dtypes:
        torch.manual_seed(0)
        model = GPT(cfg).eval().to(DTYPES[name])
        cache = model.make_cache(args.rows, cfg.block_size)
        for t in [*cache.k, *cache.v]:
            t.normal_()
        for written in (True, False):
            attention_module.WRITTEN_DECODE_ATTENTION = written
            os.environ["ZENLM_CACHE_DIR"] = os.path.join(root, "written" if written else "sdpa")
            decoder = CompiledDecoder(model)  # compile=True: the first call builds the program and waits

            label = "decode_attention (default)" if written else "fused SDPA kernel"
            step_ms(decoder, cache, args.rows, keys[0], 1)  # build (or load) the program first
            row(args, keys, name, label, "main", decoder, cache, lambda f: f())
            if written:
                row(args, keys, name, label, "second, main keeps its OpenMP workers", decoder, cache, on_thread)
                release_openmp_workers()
                row(args, keys, name, label, "second, main released them (the server)", decoder, cache, on_thread)
        attention_module.WRITTEN_DECODE_ATTENTION = True
        pools[name] = (model, cache)
    print()
    print("| weights | KV-cache pages | " + " | ".join(f"{k} keys (ms)" for k in keys) + " |")
    print("|---|---|" + "---:|" * len(keys))
    notes = []
    for name, (model, small) in pools.items():
        os.environ["ZENLM_CACHE_DIR"] = os.path.join(root, "written")
        decoder = CompiledDecoder(model)
        huge = model.make_cache(args.rows, cfg.block_size)
        huge.reserve(slice(None), 0, cfg.block_size)  # reserved whole: huge pages where the system gives them
        for t, u in zip([*huge.k, *huge.v], [*small.k, *small.v], strict=True):
            t.copy_(u)
        notes.append(f"{name}: {anon_huge_mb():,.0f} MB of this process in huge pages with the pool reserved")
        times: dict[str, dict[int, list[float]]] = {"small": {k: [] for k in keys}, "huge": {k: [] for k in keys}}
        for _ in range(args.rounds):
            for k in keys:
                for side, cache in (("small", small), ("huge", huge)):
                    times[side][k].append(step_ms(decoder, cache, args.rows, k, args.steps))
        med = {side: {k: statistics.median(v) for k, v in ts.items()} for side, ts in times.items()}
        print(f"| {name} | 4 KiB | " + " | ".join(f"{med['small'][k]:.1f}" for k in keys) + " |")
        print(f"| {name} | 2 MiB (reserved whole) | "
              + " | ".join(f"{med['huge'][k]:.1f} ({med['small'][k] / med['huge'][k]:.2f}x)" for k in keys) + " |",
              flush=True)
        del huge
    for note in notes:
        print(f"\n<!-- {note} -->")


def anon_huge_mb() -> float:
    """MB of this process's memory in transparent huge pages (0 where /proc does not say)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            return next((int(line.split()[1]) / 1024 for line in f if line.startswith("AnonHugePages:")), 0.0)
    except OSError:
        return 0.0


if __name__ == "__main__":
    main()

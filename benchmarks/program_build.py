"""How long a compiled decode program takes to build: its two C++ files compiled side by side (the default) or one
after the other (``ZENLM_PARALLEL_COMPILE=0``, as AOTInductor does by itself).

    python benchmarks/program_build.py                            # GPT-2-small shape, fp32 / bf16 / int8, 2 rounds
    python benchmarks/program_build.py --dtypes bf16 --rows 16 --rounds 1    # a batched program of 16 rows

A program is written by AOTInductor as two C++ files, the kernels (the loops, -O3) and the wrapper (the host code
that calls them, -O1), which it compiles one after the other before linking them; zenlm compiles the two at the
same time (``zenlm.compiled._WrapperBesideKernels``). Each build here runs in a fresh process with an empty
program cache, the two settings taking turns, on a GPT-2-small-shaped model (12 layers x 768, vocabulary
--vocab) with random weights: the time of ``CompiledDecoder.prepare`` (export, Inductor, the compiles, the link),
as a first ``zenlm generate`` (one-sequence program, --rows 0) or ``zenlm serve`` (batched programs, --rows N)
spends it in its background build. Inductor's own cache (its CPU checks and precompiled headers) is shared, as on a
machine that has built a program before. The table keeps the fastest round of each and checks that both settings
built the same program (the same logits).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, os, sys, time
import torch
from zenlm.compiled import CompiledDecoder
from zenlm.config import GPTConfig
from zenlm.models.gpt import GPT
from zenlm.models.int8 import quantize_int8

spec = json.loads(sys.argv[1])
torch.manual_seed(0)
model = GPT(GPTConfig(vocab_size=spec["vocab"], block_size=1024, n_layer=spec["n_layer"], n_head=12, n_embd=768)).eval()
if spec["dtype"] == "int8":
    model = quantize_int8(model)
dtype = torch.float32 if spec["dtype"] == "fp32" else torch.bfloat16
model = model.to(dtype)
rows, batched = max(spec["rows"], 1), spec["rows"] > 0
cache = model.make_cache(rows, 256, dtype=dtype)
decoder = CompiledDecoder(model, background=False)
t0 = time.perf_counter()
decoder.prepare(cache.k, rows, batched=batched)
build_s = time.perf_counter() - t0
with torch.inference_mode():
    logits = decoder(torch.full((rows,), 5), torch.full((rows,), 3), cache.k, cache.v, batched=batched)
print(json.dumps({"build_s": build_s, "built": decoder.programs_built,
                  "logits": float(logits.float().abs().sum())}))
"""


def build_once(spec: dict, parallel: bool) -> dict:
    """One build in a fresh process with an empty program cache -> its JSON line."""
    with tempfile.TemporaryDirectory(prefix="zenlm-build-bench-") as cache:
        env = {**os.environ, "ZENLM_CACHE_DIR": cache, "ZENLM_PARALLEL_COMPILE": "1" if parallel else "0"}
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], env=env, capture_output=True,
                             text=True, timeout=1200)
    if out.returncode != 0:
        raise SystemExit(f"a build failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["built"] != 1:
        raise SystemExit(f"expected one program built, got {result['built']}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="fp32,bf16,int8", help="weights (comma-separated): fp32, bf16, int8")
    ap.add_argument("--rows", type=int, default=0,
                    help="0: the one-sequence program of `zenlm generate`; N: the batched program of N rows")
    ap.add_argument("--rounds", type=int, default=2, help="builds of each setting (they take turns)")
    ap.add_argument("--n-layer", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=8192)
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in ("fp32", "bf16", "int8")]
    if bad or not dtypes:
        ap.error(f"--dtypes takes fp32, bf16 and int8, got {args.dtypes!r}")

    import torch

    from zenlm.device import cpu_features

    program = "one-sequence" if args.rows == 0 else f"batched, {args.rows} rows"
    print(f"# program_build -- {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} -- "
          f"{cpu_features().name}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"{args.n_layer} layers x 768, vocabulary {args.vocab}, {program} program, {args.rounds} round(s)\n")
    print("| weights | program | one after the other (s) | side by side (s) | faster | same logits |")
    print("|---|---|---:|---:|---:|---|")
    for dtype in dtypes:
        spec = {"dtype": dtype, "rows": args.rows, "n_layer": args.n_layer, "vocab": args.vocab}
        runs: dict[bool, list[dict]] = {False: [], True: []}
        for _ in range(args.rounds):
            for parallel in (False, True):
                runs[parallel].append(build_once(spec, parallel))
                print(f"[{dtype}] {'side by side' if parallel else 'one after the other'}: "
                      f"{runs[parallel][-1]['build_s']:.1f} s", file=sys.stderr, flush=True)
        seq = min(r["build_s"] for r in runs[False])
        par = min(r["build_s"] for r in runs[True])
        same = len({r["logits"] for rs in runs.values() for r in rs}) == 1
        print(f"| {dtype} | {program} | {seq:.1f} | {par:.1f} | {seq / par:.2f}x | {'yes' if same else 'NO'} |",
              flush=True)


if __name__ == "__main__":
    main()

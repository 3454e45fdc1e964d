"""fp32 matrix products with few rows on this CPU: PyTorch's default ``F.linear`` (the BLAS of the wheel)
against oneDNN's (``zenlm.models.layers.onednn_linear``, what zenlm's inference uses for fp32 on a CPU).

Decoding multiplies a few rows (one per sequence) by every weight matrix, so what counts is how fast a product
reads the weights: GB/s of weights for 1, 2, 4, 8 and 16 rows, and GFLOP/s for prompt-sized products (32 to 512
rows). Matrices of a GPT-2-small model: the tied head (50,257 x 768) and the 12 layers' weights as one
(147,456 x 768, so that nothing stays in the caches between calls). Both sides run in this process, alternating,
fastest of 3; the table's last column is oneDNN's speed over F.linear's.

A third column, for 1-16 rows where the wheel has MKL: MKL's product on weights packed beforehand for that number
of rows (``torch.ops.mkl._mkl_reorder_linear_weight`` / ``_mkl_linear``, what Inductor's weight prepacking
uses), with the packed copy's size over the weights' (zenlm does not use it: the copy is extra memory, and a
row's result changes with the number of rows; see docs/BENCHMARKS.md).

    python benchmarks/cpu_products.py [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from zenlm.device import cpu_features
from zenlm.models.layers import onednn_linear, onednn_min_rows


def best_time(fn, repeats: int = 3, calls: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        raise SystemExit("this PyTorch has no oneDNN (mkldnn): nothing to compare")
    packs = torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")
    print(f"# cpu_products -- {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC -- {cpu_features().name} ({cpu_features().describe()}), "
          f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}\n")
    least = onednn_min_rows()
    print("zenlm's fp32 products at inference here: " + ("F.linear" if least is None else "oneDNN" if least == 1 else
          f"F.linear, and oneDNN for decode steps of {least} rows or more") + "\n")
    print("| matrix (N x K) | rows | F.linear | oneDNN | oneDNN vs F.linear | MKL, packed weights (copy size) |")
    print("|---|---:|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    for name, (N, K) in (("head", (50257, 768)), ("12 layers", (147456, 768))):
        W = torch.randn(N, K, generator=g)
        gb = W.numel() * 4 / 1e9
        for rows in (1, 2, 4, 8, 16, 32, 128, 512):
            if rows > 16 and name == "head":
                continue
            x = torch.randn(rows, K, generator=g)
            a = best_time(lambda: F.linear(x, W))  # noqa: B023
            b = best_time(lambda: onednn_linear(x, W))  # noqa: B023
            packed = "--"
            if rows <= 16 and packs:
                P = torch.ops.mkl._mkl_reorder_linear_weight(W, rows)
                c = best_time(lambda: torch.ops.mkl._mkl_linear(x, P, W, None, rows))  # noqa: B023
                packed = f"{gb / c:.1f} GB/s ({P.numel() * P.element_size() / (W.numel() * 4):.2f}x)"
                del P
            if rows <= 16:
                cells = f"{gb / a:.1f} GB/s | {gb / b:.1f} GB/s"
            else:
                cells = f"{2 * rows * N * K / a / 1e9:.0f} GFLOP/s | {2 * rows * N * K / b / 1e9:.0f} GFLOP/s"
            print(f"| {name} ({N:,} x {K}) | {rows} | {cells} | {a / b:.2f}x | {packed} |", flush=True)


if __name__ == "__main__":
    main()

"""lm-evaluation-harness speed: the four local tasks through `zenlm serve` vs in-process, at batch 1 and 8.

    python benchmarks/lm_eval_speed.py                          # GPT-2-small shape, CPU, tasks x 4
    python benchmarks/lm_eval_speed.py --run runs/gpt2          # a run directory of yours instead
    python benchmarks/lm_eval_speed.py --layers 2 --width 64 --copies 1 --repeats 1    # a quick smoke run

Paths timed (each one a full lm-eval `simple_evaluate` of the tasks in tests/lmeval_tasks/: multiple choice,
loglikelihood, rolling perplexity and generate-until, every item repeated --copies times):

    in-process   `zenlm evaluate --tasks` (zenlm.lmeval.ZenlmLM): requests batched into forward passes
    server       lm-eval's `local-completions` model against `zenlm serve` (uvicorn on 127.0.0.1, this
                 process), remote tokenizer (/tokenize); --batch_size N sends N prompts per HTTP request

The model is GPT-2-small-shaped (12 layers, 12 heads, width 768, context 1024) with random weights and a
byte-level BPE tokenizer trained here on Shakespeare (--vocab, default 8192), unless --run names a run.
Every row is the fastest of --repeats runs; the in-process batch-1 row is the baseline of the ratio column.
The last column is the largest difference of any item's log-likelihood from the baseline's (the paths must
agree; multiple choice, loglikelihood and rolling items).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = ROOT / "tests" / "lmeval_tasks"
TASKS = ["zenlm_mc", "zenlm_ll", "zenlm_rolling", "zenlm_gen"]


def copy_tasks(copies: int, out: Path) -> Path:
    """The local tasks with every data line repeated ``copies`` times, their YAML pointing at the copies."""
    for f in TASK_DIR.glob("*.jsonl"):
        lines = f.read_text(encoding="utf-8").splitlines(keepends=True)
        (out / f.name).write_text("".join(lines * copies), encoding="utf-8")
    for f in TASK_DIR.glob("*.yaml"):
        (out / f.name).write_text(f.read_text(encoding="utf-8").replace("tests/lmeval_tasks/", f"{out}/"),
                                  encoding="utf-8")
    return out


def item_logprobs(results: dict) -> list[float]:
    """Every scored request's log-likelihood, in task and document order."""
    out = []
    for task in ("zenlm_mc", "zenlm_ll", "zenlm_rolling"):
        for item in sorted(results["samples"][task], key=lambda s: s["doc_id"]):
            for resp in item["resps"]:
                r = resp[0]
                out.append(float(r[0] if isinstance(r, (list, tuple)) else r))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", help="run directory of a causal LM (default: a random GPT-2-small-shaped model)")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--copies", type=int, default=4, help="repeat every task item this many times")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--repeats", type=int, default=2, help="runs per row; the fastest counts")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local task files only
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import logging

    from lm_eval import simple_evaluate

    import zenlm
    from zenlm.api import LM
    from zenlm.config import GPTConfig
    from zenlm.lmeval import ZenlmLM, task_manager
    from zenlm.models.gpt import GPT
    from zenlm.serve.app import ServerThread, create_app
    from zenlm.tokenizer import train_tokenizer

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    if args.run:
        lm = zenlm.load(args.run, device=args.device, dtype=args.dtype)
        what = f"run {args.run}"
    else:
        from zenlm.data.corpus import shakespeare_char_text

        tok = train_tokenizer([shakespeare_char_text()], kind="bpe", vocab_size=args.vocab)
        cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=1024, n_layer=args.layers,
                        n_head=max(1, args.width // 64), n_embd=args.width)
        torch.manual_seed(0)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        lm = LM(GPT(cfg).to(args.device, dtype=dtype).eval(), tok)
        what = (f"random GPT ({args.layers} layers, width {args.width}, context 1024, "
                f"vocab {tok.vocab_size}, {lm.model.num_params() / 1e6:.1f}M params)")
    block = lm.config.block_size
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="zenlm-lmeval-bench-"))
    os.environ.setdefault("HF_DATASETS_CACHE", str(tmp / "datasets"))
    task_dir = copy_tasks(args.copies, tmp)
    tm = task_manager(TASKS, task_dir)
    app = create_app(lm.model, lm.tokenizer, model_id="bench", max_concurrency=max(sizes),
                     max_queue=max(sizes))

    rows: list[tuple[str, int, float, int, list[float]]] = []
    with ServerThread(app) as srv:
        def run(path: str, bs: int, limit: int | None = None) -> tuple[float, dict]:
            if path == "in-process":
                model, model_args = ZenlmLM(lm, batch_size=bs), None
            else:
                model = "local-completions"
                model_args = {"model": "bench", "base_url": srv.url + "/v1/completions", "max_length": block,
                              "max_retries": 1, "timeout": 3600,  # texts start after end-of-text:
                              "custom_prefix_token_id": ZenlmLM(lm).prefix_token_id}
            t0 = time.perf_counter()
            res = simple_evaluate(model=model, model_args=model_args, tasks=TASKS, task_manager=tm,
                                  batch_size=bs, limit=limit, log_samples=True, bootstrap_iters=0)
            return time.perf_counter() - t0, res

        run("in-process", 1, limit=1)  # warm-up: datasets cache, imports, first forward passes
        run("server", 1, limit=1)
        for path in ("in-process", "server"):
            for bs in sizes:
                best, res = math.inf, {}
                for _ in range(args.repeats):
                    dt, res = run(path, bs)
                    best = min(best, dt)
                n_req = sum(len(item["arguments"]) for v in res["samples"].values() for item in v)
                rows.append((path, bs, best, n_req, item_logprobs(res)))

    print(f"\nlm-eval {', '.join(TASKS)} (items x {args.copies}) — {what}, {args.device} {args.dtype}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads"
          + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""))
    print("\n| path | batch | seconds | requests | requests/s | speed vs in-process batch 1 | "
          "max abs Δ log-lik (nats) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base_s, base_lp = rows[0][2], rows[0][4]
    for path, bs, s, n_req, lp in rows:
        delta = max(abs(a - b) for a, b in zip(lp, base_lp, strict=True))
        print(f"| {path} | {bs} | {s:.2f} | {n_req} | {n_req / s:.1f} | {base_s / s:.2f}x | {delta:.2e} |")


if __name__ == "__main__":
    main()

"""llama.cpp end-to-end check of ``zenlm convert to-gguf``: llama.cpp loads the file, tokenizes like zenlm and
decodes the same greedy tokens.

    python benchmarks/gguf_check.py                                     # llama_cpp importable here
    python benchmarks/gguf_check.py --llama-python /path/to/venv/bin/python   # llama_cpp in another venv
    python benchmarks/gguf_check.py --steps 20 --tokens 8 --archs llama   # a quick smoke run

For each layout (Llama with grouped-query attention, Qwen2 with q/k/v biases, Qwen3 with qk-norm, GPT-2) it
pretrains a small model on Shakespeare with zenlm's own recipe (a byte-level BPE tokenizer trained first),
exports it with every ``--outtype`` and asks llama.cpp (the ``llama-cpp-python`` package, which builds
llama.cpp from source: ``pip install llama-cpp-python``) to

* tokenize the prompts (the ids must equal zenlm's: the pre-tokenizer and merges are right),
* give the logits of the prompt's last position (max |difference| to zenlm's fp32 logits is printed),
* decode ``--tokens`` tokens greedily (argmax at every step, no sampler), compared with zenlm's greedy tokens.

f32 files should agree token for token (only float summation order differs); f16, bf16 and q8_0 files round
the weights, and the table shows how much of the output survives that. Exit status 1 when a tokenization
differs or an f32 file decodes differently, so the script can serve as a check.

llama_cpp runs in a child process (``--llama-python``), so it can live in a virtual environment of its own
without torch; the child only needs llama_cpp and numpy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPTS = [
    "ROMEO:\n",
    "To be, or not to be, that is the question:",
    "I'll say it's 2024 -- isn't it?  ",
    "KING HENRY V:\nOnce more unto the breach, dear friends,\n\n",
    "'S 'T 'Re 'VE, naïve café 中文 😀",
]
ARCHS = {  # GPTConfig fields on top of the tiny shape below; the layouts llama.cpp has graphs for
    "llama": dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2, tie_embeddings=False),
    "qwen2": dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, qkv_bias=True, n_kv_head=2,
                  tie_embeddings=True, rope_theta=1e6),
    "qwen3": dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, qk_norm=True, n_kv_head=2,
                  tie_embeddings=False, norm_eps=1e-6, rope_theta=1e6),
    "gpt2": dict(pos="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True),
}
SHAPE = dict(n_layer=2, n_head=4, n_embd=128, block_size=128, mlp_hidden=256)

# Runs with the llama_cpp interpreter: reads a job from stdin, prints one JSON object.
CHILD = r"""
import json, sys
import numpy as np
from llama_cpp import Llama

job = json.load(sys.stdin)
out = []
for f in job["files"]:
    llm = Llama(model_path=f, n_ctx=job["n_ctx"], n_threads=job["threads"], n_batch=job["n_ctx"],
                logits_all=True, verbose=False)
    res = {"file": f, "tokenized": [], "greedy": [], "first_logits": []}
    for text, ids in zip(job["prompts"], job["prompt_ids"]):
        res["tokenized"].append(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))
        llm.reset()
        llm.eval(ids)
        res["first_logits"].append(np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64).tolist())
        new = []
        for _ in range(job["tokens"]):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            new.append(nxt)
            llm.eval([nxt])
        res["greedy"].append(new)
    out.append(res)
    del llm
json.dump(out, sys.stdout)
"""


def train_runs(root: Path, archs: list[str], steps: int, threads: int) -> dict[str, Path]:
    from zenlm.data.corpus import open_corpus
    from zenlm.data.shards import prepare
    from zenlm.recipes.pretrain import pretrain
    from zenlm.tokenizer import train_tokenizer
    from zenlm.train.loop import TrainConfig
    from zenlm.train.optim import OptimConfig

    corpus = open_corpus("shakespeare")
    tok = train_tokenizer(corpus.texts("train"), kind="bpe", vocab_size=1024)
    prepare(corpus, tok, root / "data")
    runs = {}
    for arch in archs:
        t = time.perf_counter()
        runs[arch] = root / arch
        res = pretrain(root / "data", runs[arch], model="llama-tiny", batch_size=8, seq_len=64, eval_tokens=4096,
                       model_overrides={**SHAPE, **ARCHS[arch]},
                       train=TrainConfig(max_steps=steps, eval_every=0, log_every=max(1, steps), ckpt_every=0,
                                         device="cpu", precision="fp32", tensorboard=False, threads=threads),
                       optim=OptimConfig(name="adamw", lr=3e-3, warmup_steps=max(1, steps // 10)))
        print(f"trained {arch}: {steps} steps, final train loss {res.train_loss:.3f}, {time.perf_counter() - t:.0f} s",
              flush=True)
    return runs


def zenlm_side(run: Path, n_tokens: int) -> tuple[list[list[int]], list[list[int]], list[torch.Tensor]]:
    """(prompt ids, greedy continuations, last-position fp32 logits) from zenlm itself."""
    import zenlm
    from zenlm.generate import GenerationConfig, generate_ids

    lm = zenlm.load(run, device="cpu")
    ids = [lm.tokenizer.encode(p) for p in PROMPTS]
    greedy, logits = [], []
    for p in ids:
        greedy.append(list(generate_ids(lm.model, p, GenerationConfig(max_new_tokens=n_tokens, temperature=0.0,
                                                                      stop_at_eos=False))))
        with torch.no_grad():
            logits.append(lm.model(torch.tensor([p]))[0, -1].double())
    return ids, greedy, logits


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-python", default=sys.executable,
                    help="a Python interpreter that can import llama_cpp (default: this one)")
    ap.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--outtypes", nargs="+", default=["f32", "f16", "bf16", "q8_0"],
                    choices=["f32", "f16", "bf16", "q8_0"])
    ap.add_argument("--steps", type=int, default=150, help="pretraining steps per model (8 x 64 tokens each)")
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", default=None, help="keep the runs and .gguf files in this folder")
    args = ap.parse_args()

    from zenlm.convert.gguf import export_gguf

    torch.set_num_threads(args.threads)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="zenlm-gguf-check-"))
    root.mkdir(parents=True, exist_ok=True)
    runs = train_runs(root, args.archs, args.steps, args.threads)
    failed = False
    print(f"\n{'layout':<7} {'outtype':<7} {'MB':>6} {'same ids':>9} {'max |dlogit|':>13} "
          f"{'same greedy':>12} {'tokens agreeing':>16}")
    for arch, run in runs.items():
        ids, ours, our_logits = zenlm_side(run, args.tokens)
        files = [str(export_gguf(run, root / f"{arch}-{o}.gguf", outtype=o, overwrite=True)) for o in args.outtypes]
        job = {"files": files, "prompts": PROMPTS, "prompt_ids": ids, "tokens": args.tokens,
               "n_ctx": SHAPE["block_size"], "threads": args.threads}
        proc = subprocess.run([args.llama_python, "-c", CHILD], input=json.dumps(job), capture_output=True,
                              text=True, check=False)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"llama.cpp failed on {arch} (is llama_cpp importable by {args.llama_python}?)")
        for outtype, res in zip(args.outtypes, json.loads(proc.stdout), strict=True):
            same_ids = sum(a == b for a, b in zip(res["tokenized"], ids, strict=True))
            dlogit = max(float((torch.tensor(t, dtype=torch.float64) - o).abs().max())
                         for t, o in zip(res["first_logits"], our_logits, strict=True))
            same = sum(a == b for a, b in zip(res["greedy"], ours, strict=True))
            agree = sum(next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
                        for a, b in zip(res["greedy"], ours, strict=True))
            mb = Path(res["file"]).stat().st_size / 1e6
            print(f"{arch:<7} {outtype:<7} {mb:>6.2f} {same_ids:>4}/{len(ids):<4} {dlogit:>13.2e} "
                  f"{same:>7}/{len(ids):<4} {agree:>10}/{len(ids) * args.tokens:<5}")
            failed |= same_ids != len(ids) or (outtype == "f32" and same != len(ids))
    print("\ntokens agreeing: greedy tokens before the first difference, summed over the prompts. "
          f"Files in {root}" if args.keep else "")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

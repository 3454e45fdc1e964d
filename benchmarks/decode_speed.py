"""Decode speed and memory: zenlm against `transformers` and llama.cpp, same weights, same CPU, one fresh
process per row.

    # the whole table (GPT-2 and Llama layouts of GPT-2-small's size; fp32 / bf16 / int8 weights; batch 1 and 8)
    python benchmarks/decode_speed.py --threads 2 --llama-cpp-python /work/llamacpp-venv/bin/python
    # the same, the GGUF files written by llama.cpp's own converter instead of zenlm convert to-gguf
    python benchmarks/decode_speed.py --threads 2 --llama-cpp-python /work/llamacpp-venv/bin/python \\
        --gguf-converter /work/llamacpp-src/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py
    # on a machine whose speed drifts: each row 3 times, the engines taking turns, the fastest kept
    python benchmarks/decode_speed.py --threads 2 --llama-cpp-python /work/llamacpp-venv/bin/python --rounds 3
    # a quick check that everything runs (tiny settings; the numbers mean nothing)
    python benchmarks/decode_speed.py --n-layer 2 --vocab 4096 --new-tokens 8 --prefill-tokens 32 --repeats 1 \\
        --batches 1 --threads 2 --llama-cpp-python /work/llamacpp-venv/bin/python

What is compared, for each layout (``gpt2``: learned positions, LayerNorm, GELU, tied head, 50257 tokens;
``llama``: rotary, RMSNorm, SwiGLU, 12 query / 4 key-value heads, untied head, 32000 tokens; both 12 x 768):

- ``zenlm`` -- what a user gets with no options: ``zenlm.load(RUN, dtype=...)`` and ``generate_ids`` /
  ``generate_batch`` with the default ``compile=None``, i.e. the compiled decode step (its program built
  beforehand by this script, as a first run would have left it on disk; the build time is printed apart);
- ``zenlm eager`` -- the same with ``compile=False`` (``--no-compile``);
- ``transformers`` -- ``AutoModelForCausalLM.from_pretrained`` of the run exported by ``zenlm convert to-hf``,
  ``generate()`` greedy with its KV cache (fp32 and bf16; it has no int8 counterpart here);
- ``llama.cpp`` -- ``llama-cpp-python`` (run by ``--llama-cpp-python``, a Python that has it, in its own
  process) on GGUF files of the same weights, f32, bf16 and q8_0 opposite zenlm's fp32, bf16 and int8, written
  by ``zenlm convert to-gguf`` or, with ``--gguf-converter``, by llama.cpp's own ``convert_hf_to_gguf.py`` (from
  the llama-cpp-python source package) from the Hugging Face export. That converter runs with this Python (it
  needs torch and transformers) and its own bundled ``gguf-py``; the model's tokenizer is trained here, so the
  converter is told its pre-tokenizer is GPT-2's (the benchmark feeds token ids; the tokenizer takes no part).

Every row decodes ``--new-tokens`` tokens greedily after a ``--prompt-tokens`` prompt of random ids, the
fastest of ``--repeats`` runs (tokens/s of all sequences; time to first token = prefill + one token), then the
time to first token of a ``--prefill-tokens`` prompt (best of the repeats). "peak MB" is the peak resident memory
of the row's whole process after loading and decoding (before the long prefill), next to a bare
``python -c "import torch"``. The floor: the read bandwidth measured just before the row (a large sum, best of
3; this machine's bandwidth drifts) over the bytes of weights one decode step reads; "share of read floor" is
tokens/s per sequence over it. The header prints the CPU features that decide the precision (AVX-512 BF16, AMX)
and the bandwidth, so that rows from different machines can be read side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROW = "--row"  # this script run as one row's fresh process: the spec follows as JSON
GGUF_TYPES = {"fp32": "f32", "bf16": "bf16", "int8": "q8_0"}


# --------------------------------------------------------------------------------------- measurements


def copy_bandwidth(mb: int = 256, reps: int = 10, trials: int = 3) -> float:
    """Bytes moved per second by a large tensor copy (read + write), best of ``trials``."""
    a = torch.empty(mb * 2**20, dtype=torch.uint8).fill_(1)
    b = torch.empty_like(a)
    b.copy_(a)
    best = 0.0
    for _ in range(trials):
        t = time.perf_counter()
        for _ in range(reps):
            b.copy_(a)
        best = max(best, 2 * a.numel() * reps / (time.perf_counter() - t))
    return best


def read_bandwidth(mb: int = 256, reps: int = 10, trials: int = 3) -> float:
    """Bytes read per second by a sum over a large fp32 tensor, best of ``trials`` (a decode step only reads its
    weights, and a read-only stream runs faster than a copy)."""
    a = torch.ones(mb * 2**20 // 4)
    a.sum()
    best = 0.0
    for _ in range(trials):
        t = time.perf_counter()
        for _ in range(reps):
            a.sum()
        best = max(best, a.numel() * 4 * reps / (time.perf_counter() - t))
    return best


# Token embedding tables: a step reads one row of them, unless the output head is the same matrix (tied)
EMBEDDINGS = ("tok_emb.", "transformer.wte.", "model.embed_tokens.")


def step_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter/buffer once, except position tables and an untied
    token embedding (one row of it is read)."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    heads = {t.data_ptr() for k, t in named if not k.startswith(EMBEDDINGS)}  # transformers: a tied head is a name
    tied = bool(getattr(getattr(model, "config", None), "tie_embeddings", False))  # zenlm: the config says it
    seen: set[int] = set()
    total = 0
    for k, t in named:
        if k.startswith(("pos_emb", "transformer.wpe", "rotary")) or k.endswith(("attn.bias", "masked_bias")):
            continue
        if k.startswith(EMBEDDINGS) and not tied and t.data_ptr() not in heads:
            continue
        if t.data_ptr() not in seen:  # a tied output head reads the embedding matrix once
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def gguf_step_bytes(path: Path, converter: str | None) -> int:
    """The same for a GGUF file: its tensors' bytes, less the position table and an untied token embedding (read with the `gguf` package, the
    converter's own when there is one)."""
    if converter:
        sys.path.insert(0, str(Path(converter).parent / "gguf-py"))
    import gguf

    reader = gguf.GGUFReader(str(path))
    names = {t.name for t in reader.tensors}
    untied = "output.weight" in names  # without an output matrix the head is the token embedding
    return sum(int(t.n_bytes) for t in reader.tensors
               if not t.name.startswith("position_embd") and not (untied and t.name.startswith("token_embd")))


def peak_mb() -> float:
    """This process's peak resident memory in MB: VmHWM of /proc/self/status, which starts afresh at exec
    (``ru_maxrss`` does not: a child started by a large parent inherits the parent's peak)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------- one row, one process


def zenlm_row(spec: dict[str, Any]) -> dict[str, Any]:
    """Load the run (lean, in the row's dtype) and decode with the library's own generation functions."""
    import zenlm
    from zenlm.generate import GenerationConfig, generate_batch, generate_ids

    t0 = time.perf_counter()
    lm = zenlm.load(spec["run"], device="cpu", dtype=spec["dtype"])
    load_s = time.perf_counter() - t0
    model, prompts, new = lm.model, spec["prompts"], spec["new_tokens"]
    compile_ = None if spec["engine"] == "zenlm" else False

    def cfg(n: int) -> GenerationConfig:
        return GenerationConfig(max_new_tokens=n, temperature=0, stop_at_eos=False, compile=compile_)

    def once(batch: list[list[int]], n: int) -> tuple[float, float, list[list[int]]]:
        t = time.perf_counter()
        if len(batch) == 1:
            tokens = generate_ids(model, batch[0], cfg(n))
            first = next(tokens)
            ttft = time.perf_counter() - t
            ids = [[first, *tokens]]
        else:
            generate_batch(model, batch, cfg(1))
            ttft = time.perf_counter() - t
            t = time.perf_counter()
            ids = generate_batch(model, batch, cfg(n))
        return ttft, time.perf_counter() - t, ids

    if spec["engine"] == "zenlm-build":  # build the program the row's decoding runs (same shapes), then stop
        t0 = time.perf_counter()
        build = GenerationConfig(max_new_tokens=new, temperature=0, stop_at_eos=False, compile=True)
        if len(prompts) == 1:
            list(generate_ids(model, prompts[0], build))
        else:
            generate_batch(model, prompts, build)
        return {"build_s": time.perf_counter() - t0}
    once(prompts, 4)  # warm-up (untimed), as for every engine; the default path loads its program meanwhile
    if compile_ is None:
        from zenlm.compiled import compiled_decoder

        compiled_decoder(model, background=True).wait()
    runs = [once(prompts, new) for _ in range(spec["repeats"])]
    peak = peak_mb()
    ttft, total, ids = min(runs, key=lambda r: r[1])
    long_ttft = min(once([spec["long_prompt"]], 1)[0] for _ in range(spec["repeats"]))
    return {"ttft": ttft, "total": total, "ids": ids, "long_ttft": long_ttft, "load_s": load_s, "peak_mb": peak,
            "step_bytes": step_bytes(model), "precision": lm.precision.line() if lm.precision else ""}


def transformers_row(spec: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["hf"], dtype={"fp32": torch.float32,
                                                                    "bf16": torch.bfloat16}[spec["dtype"]]).eval()
    load_s = time.perf_counter() - t0
    kw = dict(do_sample=False, pad_token_id=0, use_cache=True)

    @torch.no_grad()
    def once(prompt_BT: torch.Tensor, n: int) -> tuple[float, float, list[list[int]]]:
        t = time.perf_counter()
        model.generate(prompt_BT, max_new_tokens=1, min_new_tokens=1, **kw)
        ttft = time.perf_counter() - t
        t = time.perf_counter()
        ids = model.generate(prompt_BT, max_new_tokens=n, min_new_tokens=n, **kw)
        return ttft, time.perf_counter() - t, ids[:, prompt_BT.shape[1]:].tolist()

    prompt = torch.tensor(spec["prompts"])
    once(prompt, 4)  # warm-up (untimed)
    runs = [once(prompt, spec["new_tokens"]) for _ in range(spec["repeats"])]
    peak = peak_mb()
    ttft, total, ids = min(runs, key=lambda r: r[1])
    long_ttft = min(once(torch.tensor([spec["long_prompt"]]), 1)[0] for _ in range(spec["repeats"]))
    return {"ttft": ttft, "total": total, "ids": ids, "long_ttft": long_ttft, "load_s": load_s, "peak_mb": peak,
            "step_bytes": step_bytes(model)}


# Run by --llama-cpp-python (its own environment, which has llama_cpp and nothing of zenlm's).
LLAMA_CPP_ROW = r"""
import json, sys, time
from llama_cpp import Llama
spec = json.loads(sys.argv[1])
t0 = time.perf_counter()
llm = Llama(model_path=spec["gguf"], n_ctx=max(len(spec["prompts"][0]) + spec["new_tokens"],
            len(spec["long_prompt"]) + 8), n_batch=512, n_threads=spec["threads"], n_threads_batch=spec["threads"],
            verbose=False)
load_s = time.perf_counter() - t0

def once(prompt, n):
    llm.reset()  # no prefix of an earlier run reused: every run prefills its whole prompt
    t = time.perf_counter()
    ids, ttft = [], 0.0
    for tok in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        if not ids:
            ttft = time.perf_counter() - t
        ids.append(tok)
        if len(ids) == n:
            break
    return ttft, time.perf_counter() - t, [ids]

once(spec["prompts"][0], 4)  # warm-up (untimed)
runs = [once(spec["prompts"][0], spec["new_tokens"]) for _ in range(spec["repeats"])]
with open("/proc/self/status") as fh:  # VmHWM: this process's own peak (ru_maxrss inherits the parent's)
    peak = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024
ttft, total, ids = min(runs, key=lambda r: r[1])
long_ttft = min(once(spec["long_prompt"], 1)[0] for _ in range(spec["repeats"]))
print(json.dumps({"ttft": ttft, "total": total, "ids": ids, "long_ttft": long_ttft, "load_s": load_s,
                  "peak_mb": peak}))
"""


def run_row(spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """One row in a fresh process -> its JSON result (an "error" key when it failed)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if spec["engine"] == "llama.cpp":
        cmd = [args.llama_cpp_python, "-c", LLAMA_CPP_ROW, json.dumps(spec)]
    else:
        cmd = [sys.executable, __file__, ROW, json.dumps(spec)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.row_timeout)
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def row_main(spec: dict[str, Any]) -> None:
    torch.set_num_threads(spec["threads"])
    out = transformers_row(spec) if spec["engine"] == "transformers" else zenlm_row(spec)
    print(json.dumps(out))


# ---------------------------------------------------------------------------------------- preparing


LAYOUTS = {
    "gpt2": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    "llama": dict(vocab_size=32000, block_size=1024, n_layer=12, n_head=12, n_kv_head=4, n_embd=768,
                  pos="rope", norm="rmsnorm", mlp="swiglu", mlp_hidden=2048, bias=False, qk_norm=False,
                  tie_embeddings=False),
}


def make_run(layout: str, args: argparse.Namespace, root: Path) -> tuple[Path, Path]:
    """A zenlm run of the layout with random weights and a byte-level BPE tokenizer, and its Hugging Face export
    (``zenlm convert to-hf``) -> (run directory, HF directory)."""
    import yaml

    from zenlm.config import GPTConfig
    from zenlm.convert.hf import export_hf
    from zenlm.data.corpus import shakespeare_char_text
    from zenlm.models.gpt import GPT
    from zenlm.tokenizer import train_tokenizer
    from zenlm.train.checkpoint import save_model

    shape = dict(LAYOUTS[layout])
    if args.n_layer:
        shape["n_layer"] = args.n_layer
    if args.vocab:
        shape["vocab_size"] = args.vocab
    run, hf = root / f"{layout}-run", root / f"{layout}-hf"
    if not (run / "model.safetensors").is_file():
        tok = train_tokenizer([shakespeare_char_text()[:300_000]], kind="bpe", vocab_size=min(4096, shape["vocab_size"]))
        torch.manual_seed(0)
        model = GPT(GPTConfig(**shape))
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.yaml").write_text(yaml.safe_dump({"model": model.config.to_dict()}, sort_keys=False))
        tok.save(run)
        save_model(model, run / "model.safetensors")
        del model
    if not (hf / "config.json").is_file():
        export_hf(run, hf, dtype="fp32", overwrite=True)
    return run, hf


# The converter as a module, told that the tokenizer's pre-tokenizer is GPT-2's (it only knows released ones)
# and that there is no SentencePiece model (the export's tokenizer is byte-level BPE; the Llama converter tries
# SentencePiece first, and fails on a missing `sentencepiece` package before it looks for the file).
CONVERT = r"""
import sys
sys.path.insert(0, sys.argv[1])
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
def no_sentencepiece(self):
    raise FileNotFoundError("no tokenizer.model")
base.TextModel._set_vocab_sentencepiece = no_sentencepiece
import convert_hf_to_gguf as convert
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
convert.main()
"""


def make_gguf(run: Path, hf: Path, outtype: str, args: argparse.Namespace) -> Path:
    """The GGUF file of the run (made once): by ``zenlm convert to-gguf``, or, with ``--gguf-converter``, by
    llama.cpp's own converter from the Hugging Face export."""
    if not args.gguf_converter:
        from zenlm.convert.gguf import export_gguf

        out = run.with_name(f"{run.name}-zenlm-{outtype}.gguf")
        if not out.is_file():
            export_gguf(run, out, outtype=outtype)
        return out
    out = hf.with_name(f"{hf.name}-{outtype}.gguf")
    if not out.is_file():
        conv = Path(args.gguf_converter)
        res = subprocess.run([sys.executable, "-c", CONVERT, str(conv.parent), str(hf), "--outtype", outtype,
                              "--outfile", str(out)], capture_output=True, text=True, timeout=1800,
                             env={**os.environ, "PYTHONPATH": str(conv.parent / "gguf-py")})
        if res.returncode != 0 or not out.is_file():
            raise RuntimeError(f"convert_hf_to_gguf failed: {res.stderr.strip()[-500:]}")
    return out


def bare_torch_mb() -> float:
    res = subprocess.run([sys.executable, "-c", "import torch; print(next(int(line.split()[1]) for line in "
                          "open('/proc/self/status') if line.startswith('VmHWM')) / 1024)"],
                         capture_output=True, text=True, timeout=300)
    return float(res.stdout.strip())


# --------------------------------------------------------------------------------------------- table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", default="gpt2,llama")
    ap.add_argument("--dtypes", default="fp32,bf16,int8", help="zenlm --dtype (llama.cpp: f32, bf16, q8_0)")
    ap.add_argument("--engines", default="transformers,zenlm eager,zenlm,llama.cpp")
    ap.add_argument("--batches", default="1,8", help="batch sizes (llama.cpp rows: batch 1 only)")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prefill-tokens", type=int, default=512, help="the long prompt of the TTFT column")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per row; the fastest is reported")
    ap.add_argument("--rounds", type=int, default=1,
                    help="fresh processes per row, the engines of a group taking turns (every other round in "
                         "reverse order); the fastest is reported. On a machine whose speed drifts, 3 or more "
                         "keep one engine's slow minute from deciding a ratio")
    ap.add_argument("--n-layer", type=int, default=None, help="blocks (default: 12)")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary (default: the layout's)")
    ap.add_argument("--llama-cpp-python", default=None, help="a Python with llama_cpp (llama-cpp-python)")
    ap.add_argument("--gguf-converter", default=None, help="llama.cpp's convert_hf_to_gguf.py, to write the GGUF "
                    "files with it (default: zenlm convert to-gguf)")
    ap.add_argument("--workdir", default=None, help="where the runs, exports and GGUF files go (kept); "
                    "default: a temporary directory")
    ap.add_argument("--row-timeout", type=int, default=3600)
    args = ap.parse_args()
    for name in ("repeats", "rounds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    engines = [e.strip() for e in args.engines.split(",")]
    if "llama.cpp" in engines and not args.llama_cpp_python:
        print("(no --llama-cpp-python: the llama.cpp rows are left out)", file=sys.stderr)
        engines.remove("llama.cpp")
    root = Path(args.workdir or tempfile.mkdtemp(prefix="zenlm-decode-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    os.environ["ZENLM_CACHE_DIR"] = str(root / "programs")  # the rows' processes build and load programs here
    os.environ.pop("ZENLM_COMPILE", None)

    from zenlm.device import cpu_features

    feats = cpu_features()
    print(f"# decode_speed -- {time.strftime('%Y-%m-%d %H:%M')} -- {feats.name}, {platform.machine()}, "
          f"{os.cpu_count()} cores, {args.threads} threads, torch {torch.__version__}")
    print(f"CPU: {feats.describe()} (AVX-512 BF16: {feats.avx512_bf16}, AMX: {feats.amx_tile}, ARM BF16: "
          f"{feats.arm_bf16}); memory bandwidth: copy {copy_bandwidth() / 1e9:.1f} GB/s, read "
          f"{read_bandwidth() / 1e9:.1f} GB/s; a bare `python -c 'import torch'` peaks at {bare_torch_mb():.0f} MB")
    print(f"{args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, greedy, fastest of {args.repeats}"
          f"{f' x {args.rounds} rounds (engines taking turns)' if args.rounds > 1 else ''}; "
          f"TTFT long: a {args.prefill_tokens}-token prompt; random weights; work files in {root}")
    print("\n| layout | batch | weights | engine | tokens/s | TTFT (ms) | TTFT long (ms) | peak MB | load (s) | "
          "step MB | read GB/s | share of read floor | vs llama.cpp | vs transformers |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    g = torch.Generator().manual_seed(1)
    notes: list[str] = []
    for layout in args.layouts.split(","):
        run, hf = make_run(layout, args, root)
        for B in [int(b) for b in args.batches.split(",")]:
            prompts = torch.randint(0, 4096, (B, args.prompt_tokens), generator=g).tolist()
            long_prompt = torch.randint(0, 4096, (args.prefill_tokens,), generator=g).tolist()
            for dtype in args.dtypes.split(","):
                base = dict(run=str(run), hf=str(hf), dtype=dtype, prompts=prompts, long_prompt=long_prompt,
                            new_tokens=args.new_tokens, repeats=args.repeats, threads=args.threads)
                specs: dict[str, dict[str, Any]] = {}
                for engine in engines:
                    if (engine == "transformers" and dtype == "int8") or (engine == "llama.cpp" and B > 1):
                        continue
                    spec = {**base, "engine": engine}
                    if engine == "llama.cpp":
                        try:
                            gguf_path = make_gguf(run, hf, GGUF_TYPES[dtype], args)
                        except RuntimeError as e:
                            notes.append(f"{layout} {dtype}: {e}")
                            continue
                        spec["gguf"] = str(gguf_path)
                    if engine == "zenlm":  # as a first run would leave it: the programs on disk
                        built = run_row({**spec, "engine": "zenlm-build"}, args)
                        notes.append(f"{layout} batch {B} {dtype}: compiled programs built in "
                                     f"{built.get('build_s', float('nan')):.0f} s {built.get('error', '')}")
                    specs[engine] = spec
                results: dict[str, dict[str, Any]] = {}
                for rnd in range(args.rounds):  # the engines take turns, every other round in reverse order
                    for engine in (list(specs) if rnd % 2 == 0 else list(reversed(specs))):
                        read_bw = read_bandwidth()
                        r = run_row(specs[engine], args)
                        if "error" in r:
                            notes.append(f"{layout} batch {B} {dtype} {engine}: failed: {r['error']}")
                            continue
                        if engine == "llama.cpp":
                            r["step_bytes"] = gguf_step_bytes(Path(specs[engine]["gguf"]), args.gguf_converter)
                        r["read_bw"] = read_bw
                        results[engine] = best_of(results.get(engine), r)
                for engine, r in results.items():  # after the group: every row can be set against the others
                    print(table_row(layout, B, dtype, engine, r, results, args), flush=True)
                agreement(layout, B, dtype, results, notes)
    print()
    for note in notes:
        print(f"<!-- {note} -->")


def best_of(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """One engine's row over several rounds: the fastest round (its tokens, TTFT and the bandwidth read before
    it), the shortest long-prompt TTFT and the largest peak memory of all rounds."""
    if old is None:
        return new
    kept = dict(new if new["total"] < old["total"] else old)
    kept["long_ttft"] = min(old["long_ttft"], new["long_ttft"])
    kept["peak_mb"] = max(old["peak_mb"], new["peak_mb"])
    return kept


def table_row(layout: str, B: int, dtype: str, engine: str, r: dict[str, Any], results: dict[str, Any],
              args: argparse.Namespace) -> str:
    tps = B * args.new_tokens / r["total"]
    floor = r["read_bw"] / r["step_bytes"]

    def vs(other: str) -> str:
        o = results.get(other)
        return f"{tps / (B * args.new_tokens / o['total']):.2f}x" if o and other != engine else "--"

    label = {"fp32": "fp32 / f32", "bf16": "bf16", "int8": "int8 / q8_0"}[dtype]
    return (f"| {layout} | {B} | {label} | {engine} | {tps:,.1f} | {r['ttft'] * 1000:,.0f} | "
            f"{r['long_ttft'] * 1000:,.0f} | {r['peak_mb']:,.0f} | {r['load_s']:.1f} | {r['step_bytes'] / 1e6:,.0f} | "
            f"{r['read_bw'] / 1e9:.1f} | {tps / B / floor:.0%} | {vs('llama.cpp')} | {vs('transformers')} |")


def agreement(layout: str, B: int, dtype: str, results: dict[str, Any], notes: list[str]) -> None:
    """How many greedy tokens each engine shares with zenlm's default (random weights: near-ties are common)."""
    ref = results.get("zenlm")
    if not ref:
        return
    want = torch.tensor(ref["ids"])
    for engine, r in results.items():
        got = torch.tensor(r["ids"])
        if engine != "zenlm" and got.shape == want.shape:
            same = (got == want).float().mean().item()
            notes.append(f"{layout} batch {B} {dtype}: {same:.0%} of greedy tokens of {engine} equal zenlm's")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == ROW:
        row_main(json.loads(sys.argv[2]))
    else:
        main()

"""Decode speed: zenlm's GPT with its KV cache against `transformers` `generate()`, same weights, same CPU.

    python benchmarks/decode_speed.py                 # GPT-2-small shape, 32-token prompt, 128 new tokens
    python benchmarks/decode_speed.py --new-tokens 64 --threads 2
    python benchmarks/decode_speed.py --n-layer 2 --new-tokens 8 --repeats 1   # a quick check that it runs

Both sides decode greedily with a KV cache from the same random weights (copied with zenlm's GPT-2 weight
map). Rows: fp32 and bf16 weights for both, and zenlm's int8 weight-only model (bf16 activations). Batch 1 is
zenlm's GPT with its cache in a plain loop, eager and with the compiled decode step (``zenlm.compiled``,
both backends: ``torch.compile`` and AOTInductor; the compile time is printed apart, not counted); a batch of several prompts goes through the library's batched
generation, ``zenlm.generate.generate_batch`` (each prompt prefilled on its own, then one batched decode step
per token), as ``generate()`` does on the transformers side. Time to first token is the prefill of the
prompt(s) plus one token. The bandwidth floor is the memory bandwidth measured
in this run divided by the bytes of weights one decode step reads; "share of floor" is tokens/s (per
sequence) over that floor, for the copy bandwidth (read + write bytes of a large copy) and for the read
bandwidth (a large sum), each the best of 3 trials measured just before the row (this shared machine's
bandwidth drifts by 30% and more within minutes). A step only reads, so it can pass the copy floor.
The time to first token is also given as a share of the copy floor of one pass over the weights. Every
row is the fastest of ``--repeats`` (default 3) timed runs, for transformers and zenlm alike.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import time

import torch

from zenlm.compiled import compiled_decoder
from zenlm.convert.hf import gpt2_weight_map
from zenlm.generate import GenerationConfig, generate_batch
from zenlm.models.gpt import GPT
from zenlm.models.int8 import quantize_int8
from zenlm.presets import get_preset


def copy_bandwidth(mb: int = 256, reps: int = 10, trials: int = 3) -> float:
    """Bytes moved per second by a large tensor copy (read + write), best of ``trials`` (the machine is
    shared: the best trial is the closest to what the memory system can do)."""
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
    """Bytes read per second by a sum over a large fp32 tensor, best of ``trials``. A decode step only reads
    its weights, and a read-only stream runs faster than a copy (which also writes, and reads the destination
    lines before writing them), so a step can beat the copy floor."""
    a = torch.ones(mb * 2**20 // 4)
    a.sum()
    best = 0.0
    for _ in range(trials):
        t = time.perf_counter()
        for _ in range(reps):
            a.sum()
        best = max(best, a.numel() * 4 * reps / (time.perf_counter() - t))
    return best


def step_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter/buffer except position tables and caches."""
    seen: set[int] = set()
    total = 0
    for k, t in model.state_dict().items():
        if k.startswith(("pos_emb", "transformer.wpe")) or k.endswith(("attn.bias", "masked_bias")):
            continue
        if t.data_ptr() in seen:  # a tied output head reads the embedding matrix once
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


@torch.inference_mode()
def zenlm_decode(model: GPT, prompt_BT: torch.Tensor, new: int) -> tuple[float, float, torch.Tensor]:
    """(time to first token, total time, ids [B, new]) for greedy decoding with a preallocated KV cache: the
    prompt through ``model(...)``, then one ``model.decode_step`` per token, as ``generate`` does."""
    B, T = prompt_BT.shape
    cache = model.make_cache(B, T + new)
    out = torch.empty(B, new, dtype=torch.long)
    t0 = time.perf_counter()
    logits = model(prompt_BT, cache=cache, last_only=True)
    tok = logits[:, -1].argmax(-1)
    out[:, 0] = tok
    ttft = time.perf_counter() - t0
    for i in range(1, new):
        tok = model.decode_step(tok, cache.pos, cache.k, cache.v).argmax(-1)
        cache.pos += 1
        out[:, i] = tok
    return ttft, time.perf_counter() - t0, out


@torch.inference_mode()
def zenlm_compiled_decode(model: GPT, prompt_BT: torch.Tensor, new: int, backend: str
                          ) -> tuple[float, float, torch.Tensor, float, tuple[float, float]]:
    """As :func:`zenlm_decode` with every decode step through ``zenlm.compiled`` -> (..., compile seconds,
    (copy, read) bandwidth measured after compiling, just before the timed run).

    The compile happens first, on a throwaway cache (a few steps, so the program for a dynamic number of keys
    exists too); its time is reported on its own, not as time to first token."""
    B, T = prompt_BT.shape
    t0 = time.perf_counter()
    decoder = compiled_decoder(model, backend)
    cache = model.make_cache(B, T + new)
    tok = model(prompt_BT, cache=cache, last_only=True)[:, -1].argmax(-1)
    for _ in range(3):
        tok = decoder(tok, torch.full((B,), cache.pos), cache.k, cache.v).argmax(-1)
        cache.pos += 1
    compile_s = time.perf_counter() - t0
    bws = copy_bandwidth(), read_bandwidth()

    cache = model.make_cache(B, T + new)
    out = torch.empty(B, new, dtype=torch.long)
    t0 = time.perf_counter()
    tok = model(prompt_BT, cache=cache, last_only=True)[:, -1].argmax(-1)
    out[:, 0] = tok
    ttft = time.perf_counter() - t0
    for i in range(1, new):
        tok = decoder(tok, torch.full((B,), cache.pos), cache.k, cache.v).argmax(-1)
        cache.pos += 1
        out[:, i] = tok
    return ttft, time.perf_counter() - t0, out, compile_s, bws


def zenlm_batch_decode(model: GPT, prompt_BT: torch.Tensor, new: int) -> tuple[float, float, torch.Tensor]:
    """(time to first token, total time, ids [B, new]) for greedy decoding with ``generate_batch``."""
    prompts = prompt_BT.tolist()
    t0 = time.perf_counter()
    generate_batch(model, prompts, GenerationConfig(max_new_tokens=1, temperature=0))
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    ids = generate_batch(model, prompts, GenerationConfig(max_new_tokens=new, temperature=0))
    return ttft, time.perf_counter() - t0, torch.tensor(ids)


@torch.no_grad()
def hf_decode(model, prompt_BT: torch.Tensor, new: int) -> tuple[float, float, torch.Tensor]:
    kw = dict(do_sample=False, pad_token_id=0, use_cache=True)
    t0 = time.perf_counter()
    model.generate(prompt_BT, max_new_tokens=1, min_new_tokens=1, **kw)
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    ids = model.generate(prompt_BT, max_new_tokens=new, min_new_tokens=new, **kw)
    return ttft, time.perf_counter() - t0, ids[:, prompt_BT.shape[1]:]


def best_of(repeats: int, fn, *args):  # noqa: ANN001, ANN202 - returns fn's own tuple
    """The run of ``fn(*args)`` with the shortest total time (element 1 of its result), of ``repeats`` runs:
    the same rule as the bandwidth floors (best of 3), so the machine's drift does not favour either side."""
    return min((fn(*args) for _ in range(repeats)), key=lambda r: r[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per row; the fastest is reported")
    ap.add_argument("--n-layer", type=int, default=None, help="blocks of the GPT-2-small shape (default: its 12)")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled rows (each compiles ~20-30 s with an empty cache)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = get_preset("gpt2-small", **({} if args.n_layer is None else {"n_layer": args.n_layer}))
    torch.manual_seed(0)
    ours = GPT(cfg).eval()
    theirs = GPT2LMHeadModel(GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                                        n_layer=cfg.n_layer, n_head=cfg.n_head)).eval()
    sd, their_sd = ours.state_dict(), {}
    for rule in gpt2_weight_map(cfg):
        for name, t in zip(rule.theirs, rule.to_theirs(sd[rule.ours]), strict=True):
            their_sd[name] = t
    missing = theirs.load_state_dict(their_sd, strict=False)
    assert not [k for k in missing.missing_keys if not k.endswith(("attn.bias", "masked_bias", "lm_head.weight"))]
    theirs.tie_weights()

    print(f"# decode_speed — {time.strftime('%Y-%m-%d %H:%M')} — {platform.machine()}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"GPT-2-small shape, {cfg.n_layer} layers ({cfg.num_params() / 1e6:.1f}M parameters, random weights), "
          f"{args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, greedy. The machine's bandwidth drifts "
          "while it runs, so each row's floors use the copy / read bandwidth measured just before that row.")
    print("\n| batch | weights | engine | tokens/s (all sequences) | time to first token (ms) | bytes/step (MB) | "
          "copy / read GB/s | share of copy floor | share of read floor | time to first token: share of copy floor | "
          "vs transformers (same weights; int8 vs its bf16) |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(1)
    for B in [int(b) for b in args.batches.split(",")]:
        prompt = torch.randint(0, cfg.vocab_size, (B, args.prompt_tokens), generator=g)
        base: dict[str, float] = {}
        for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("int8", None)):
            rows = []
            if dtype is not None:
                m = theirs.to(dtype)
                bws = copy_bandwidth(), read_bandwidth()
                ttft, total, hf_ids = best_of(args.repeats, hf_decode, m, prompt, args.new_tokens)
                base[dtype_name] = B * args.new_tokens / total
                rows.append(("transformers generate()", ttft, total, step_bytes(m), bws))
                z = ours.to(dtype)
            else:
                z = quantize_int8(copy.deepcopy(ours).float()).to(torch.bfloat16)
            decode = zenlm_decode if B == 1 else zenlm_batch_decode
            bws = copy_bandwidth(), read_bandwidth()
            ttft_z, total_z, z_ids = best_of(args.repeats, decode, z, prompt, args.new_tokens)
            if dtype == torch.float32:
                agree = (z_ids == hf_ids).float().mean().item()
                print(f"<!-- fp32 batch {B}: {agree:.0%} of greedy tokens identical to transformers -->")
            rows.append(("zenlm" if B == 1 else "zenlm generate_batch()", ttft_z, total_z, step_bytes(z), bws))
            for backend in () if B > 1 or args.no_compile else ("dynamo", "aot"):
                runs = [zenlm_compiled_decode(z, prompt, args.new_tokens, backend) for _ in range(args.repeats)]
                compile_s = runs[0][3]  # the first run compiles (or loads); later ones find the program made
                built = compiled_decoder(z, backend).programs_built if backend == "aot" else 1
                ttft_c, total_c, c_ids, _, bws = min(runs, key=lambda r: r[1])
                same = (c_ids == z_ids).float().mean().item()
                how = "compiled" if built else "loaded from the disk cache"
                print(f"<!-- {dtype_name} batch {B}, {backend}: {how} in {compile_s:.0f} s; {same:.0%} of greedy "
                      "tokens identical to zenlm eager -->")
                label = "AOTInductor" if backend == "aot" else "torch.compile"
                rows.append((f"zenlm compiled ({label})", ttft_c, total_c, step_bytes(z), bws))
            for engine, ttft, total, nbytes, (bw, rbw) in rows:
                tps = B * args.new_tokens / total
                ref = base.get(dtype_name) or base["bf16"]
                print(f"| {B} | {dtype_name} | {engine} | {tps:,.1f} | {ttft * 1000:,.0f} | {nbytes / 1e6:,.0f} | "
                      f"{bw / 1e9:.1f} / {rbw / 1e9:.1f} | {tps / B / (bw / nbytes):.0%} | "
                      f"{tps / B / (rbw / nbytes):.0%} | {nbytes / bw / ttft:.0%} | {tps / ref:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

"""Load test of `zenlm serve`: 1, 4, 16 and 32 concurrent streaming clients against one server.

    python benchmarks/serve_load.py                       # GPT-2-small shape, CPU
    python benchmarks/serve_load.py --dtype bf16            # bf16 weights and KV cache
    python benchmarks/serve_load.py --device cuda --levels 1,4,16,32,64

The model is GPT-2-small-shaped (12 layers, 12 heads, width 768, learned positions, context 1024) with random
weights and a byte-level BPE tokenizer trained here on Shakespeare (vocabulary --vocab, default 8192; GPT-2's is
50257). Its end-of-text embedding is zeroed so that replies run to max_tokens. Everything is loopback:
the server runs in this process (uvicorn on a thread, 127.0.0.1), each client is the official async `openai`
client streaming chat completions with `stream_options.include_usage`.

Per level: every client sends --requests requests one after another. Reported: requests/s, output tokens/s
(from the exact usage counts), p50/p99 time to first token (request sent -> first text chunk) and p50/p99
inter-token latency (gaps between text chunks), and errors. The single-client row is the baseline; the last
column is each row's output tokens/s divided by it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import time

import openai
import torch

from zenlm.config import GPTConfig
from zenlm.models.gpt import GPT
from zenlm.serve.app import ServerThread, create_app
from zenlm.tokenizer import train_tokenizer


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def client(url: str, prompt: str, n_req: int, max_tokens: int, stats: dict) -> None:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600) as ac:
        for _ in range(n_req):
            t0 = time.perf_counter()
            last = None
            try:
                stream = await ac.chat.completions.create(
                    model="bench", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                    temperature=0.8, stream=True, stream_options={"include_usage": True})
                async for chunk in stream:
                    now = time.perf_counter()
                    if chunk.usage is not None:
                        stats["tokens"] += chunk.usage.completion_tokens
                    if chunk.choices and chunk.choices[0].delta.content:
                        if last is None:
                            stats["ttft"].append(now - t0)
                        else:
                            stats["itl"].append(now - last)
                        last = now
                stats["done"] += 1
            except openai.OpenAIError:
                stats["errors"] += 1


def run_level(url: str, clients: int, n_req: int, max_tokens: int, prompt: str) -> dict:
    stats: dict = {"ttft": [], "itl": [], "tokens": 0, "done": 0, "errors": 0}

    async def main() -> None:
        await asyncio.gather(*(client(url, prompt, n_req, max_tokens, stats) for _ in range(clients)))

    t0 = time.perf_counter()
    asyncio.run(main())
    stats["wall"] = time.perf_counter() - t0
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--levels", default="1,4,16,32")
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights and KV cache")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    from zenlm.data.corpus import shakespeare_char_text

    text = shakespeare_char_text()
    tok = train_tokenizer([text], kind="bpe", vocab_size=args.vocab)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    model = GPT(cfg).to(args.device, dtype=dtype).eval()
    with torch.no_grad():
        model.tok_emb.weight[tok.eos_id] = 0
    prompt = text[1000:1150]
    app = create_app(model, tok, model_id="bench", max_concurrency=max(levels), max_queue=max(levels))
    rows = []
    with ServerThread(app) as srv:
        run_level(srv.url, 1, 1, 8, prompt)  # warm-up
        for c in levels:
            s = run_level(srv.url, c, args.requests, args.max_tokens, prompt)
            rows.append((c, s))

    print(f"\nzenlm serve load test — GPT-2-small shape ({model.num_params() / 1e6:.0f}M params, vocab "
          f"{tok.vocab_size}), {args.device} {args.dtype}, {args.requests} requests/client x {args.max_tokens} tokens, "
          f"prompt {len(tok.encode(prompt))} tokens + chat template")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads"
          + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""))
    print("\n| clients | requests/s | output tokens/s | p50 TTFT (s) | p99 TTFT (s) | p50 ITL (ms) | "
          "p99 ITL (ms) | errors | tokens/s vs 1 client |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = None
    for c, s in rows:
        tps = s["tokens"] / s["wall"]
        base = base or tps
        print(f"| {c} | {s['done'] / s['wall']:.2f} | {tps:.1f} | {pct(s['ttft'], 50):.3f} | "
              f"{pct(s['ttft'], 99):.3f} | {1000 * pct(s['itl'], 50):.1f} | {1000 * pct(s['itl'], 99):.1f} | "
              f"{s['errors']} | {tps / base:.2f}x |")


if __name__ == "__main__":
    main()

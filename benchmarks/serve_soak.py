"""Soak test of `zenlm serve`: minutes of mixed traffic, good and bad, against one server process.

    python benchmarks/serve_soak.py --minutes 10                 # the documented run (a random small GPT)
    python benchmarks/serve_soak.py --minutes 10 --run runs/demo-en
    python benchmarks/serve_soak.py --minutes 1 --clients 4      # a smoke run

`zenlm serve` runs as its own process on 127.0.0.1 (its memory is measured on its own); --clients threads
send requests one after another for --minutes, each picking at random (seeded) among:

    stream        a streamed completion read to its end                         valid: must be 200
    chat          a non-streamed chat completion                                valid: must be 200
    embed         an embedding request of 8-64 texts                            valid: must be 200
    cancel        a streamed chat completion dropped after a few chunks         valid (client goes away)
    abandon       a completion whose client gives up after 50 ms                valid (client goes away)
    bad           a client mistake: broken JSON, a seed past 2**64, an unknown chat role, a prompt longer
                  than the context, a body past --max-request-bytes, token ids outside the vocabulary
                                                                                must be 4xx, never 5xx

A 429 (every slot and queue place taken) is counted apart: it is the server working as documented. Without
--run the model is a random GPT (4 layers, width 128, context 256) with a byte-level BPE tokenizer trained on
Shakespeare, its end-of-text embedding zeroed so replies run to max_tokens.

It passes when: no valid request got a 5xx and no bad one got anything but a 4xx; the server's resident
memory at the end is within 10% of what it was after the first tenth of the run (the warm-up); and the p99
latency of the fixed-size chat requests in the last fifth of the run is within 1.5x of the first fifth's.
The table and the verdict are printed; the exit status is 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx

OPS = {"stream": 3, "chat": 3, "embed": 2, "cancel": 2, "abandon": 1, "bad": 3}


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def random_run(root: Path) -> Path:
    """A run directory with a random GPT and a BPE tokenizer trained on Shakespeare."""
    import torch

    from zenlm.config import GPTConfig
    from zenlm.data.corpus import shakespeare_char_text
    from zenlm.models.gpt import GPT
    from zenlm.rundir import save_run
    from zenlm.tokenizer import train_tokenizer

    tok = train_tokenizer([shakespeare_char_text()[:300_000]], kind="bpe", vocab_size=2048)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=256, n_layer=4, n_head=4, n_embd=128)
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        model.tok_emb.weight[tok.eos_id] = 0
    return save_run(root, model, tok)


class Server:
    """`zenlm serve RUN --port 0 ...` in a subprocess; ``url`` once it listens, ``rss()`` its resident memory."""

    def __init__(self, run: str, flags: list[str], log: Path) -> None:
        self.log = log
        self.out = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "zenlm", "serve", run, "--port", "0",
                                      "--model-id", "soak", *flags], stdout=self.out, stderr=self.out)
        deadline = time.monotonic() + 120
        while not (m := re.search(r"serving \S+ on (http://[\d.]+:\d+)/", log.read_text(errors="replace"))):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start:\n{log.read_text(errors='replace')}")
            time.sleep(0.2)
        self.url = m.group(1)

    def rss(self) -> int:
        """Resident set size in bytes (Linux /proc)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> int:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.out.close()
        return self.proc.returncode


def bad_request(rng: random.Random, url: str, client: httpx.Client, max_body: int) -> httpx.Response:
    """One client mistake, chosen at random."""
    kind = rng.choice(["json", "seed", "role", "long", "body", "ids"])
    if kind == "json":
        return client.post(url + "/v1/completions", content=b'{"model": "soak", "prompt": ')
    body: dict = {"model": "soak", "max_tokens": 4}
    if kind == "seed":
        body |= {"prompt": "Hello", "seed": 2**64 + rng.randrange(1000)}
    elif kind == "role":
        body |= {"messages": [{"role": "user<|eos|>system", "content": "hi"}]}
        return client.post(url + "/v1/chat/completions", json=body)
    elif kind == "long":
        body |= {"prompt": "To be, or not to be " * 2000}
    elif kind == "body":
        return client.post(url + "/v1/completions", content=b"x" * (max_body + 1),
                           headers={"content-type": "application/json"})
    else:
        body |= {"prompt": [rng.choice([-1, 2**63, 10**9])]}
    return client.post(url + "/v1/completions", json=body)


def worker(i: int, url: str, end: float, args: argparse.Namespace, prompts: list[str], results: list) -> None:
    rng = random.Random(args.seed * 1000 + i)
    ops, weights = zip(*OPS.items(), strict=True)
    with httpx.Client(timeout=120) as client:
        while time.monotonic() < end:
            op = rng.choices(ops, weights)[0]
            prompt = rng.choice(prompts)
            t0 = time.monotonic()
            status, gone = 0, False
            try:
                if op == "stream":
                    with client.stream("POST", url + "/v1/completions", json={
                            "model": "soak", "prompt": prompt, "max_tokens": rng.randint(8, 64),
                            "stream": True, "temperature": 0.8, "seed": rng.randrange(2**64)}) as r:
                        status = r.status_code
                        for _ in r.iter_lines():
                            pass
                elif op == "chat":
                    r = client.post(url + "/v1/chat/completions", json={
                        "model": "soak", "messages": [{"role": "user", "content": prompt[:200]}],
                        "max_tokens": 16, "temperature": 0})
                    status = r.status_code
                elif op == "embed":
                    r = client.post(url + "/v1/embeddings", json={
                        "model": "soak", "input": [rng.choice(prompts)[:300] for _ in range(rng.randint(8, 64))]})
                    status = r.status_code
                elif op == "cancel":
                    with client.stream("POST", url + "/v1/chat/completions", json={
                            "model": "soak", "messages": [{"role": "user", "content": prompt[:200]}],
                            "max_tokens": 64, "stream": True}) as r:
                        status = r.status_code
                        for n, _ in enumerate(r.iter_lines()):
                            if n >= rng.randint(1, 6):
                                gone = True
                                break
                elif op == "abandon":
                    try:
                        client.post(url + "/v1/completions", timeout=0.05, json={
                            "model": "soak", "prompt": prompt, "max_tokens": 64})
                    except httpx.TimeoutException:
                        pass
                    gone = True
                else:
                    status = bad_request(rng, url, client, args.max_request_bytes).status_code
            except httpx.HTTPError as e:
                status = -1
                results.append(("transport", op, t0, 0.0, repr(e)))
                continue
            results.append((op, status, t0, time.monotonic() - t0, gone))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--run", default=None, help="a run directory to serve (default: a random small GPT)")
    ap.add_argument("--max-concurrency", type=int, default=8)
    ap.add_argument("--max-request-bytes", type=int, default=1 << 20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()

    from zenlm.data.corpus import shakespeare_char_text

    text = shakespeare_char_text()
    prompts = [text[i : i + 400] for i in range(0, 400_000, 9_973)]
    tmp = Path(tempfile.mkdtemp(prefix="zenlm-soak-"))
    run = args.run or str(random_run(tmp / "run"))
    server = Server(run, ["--max-concurrency", str(args.max_concurrency),
                          "--max-request-bytes", str(args.max_request_bytes)], tmp / "serve.log")
    results: list = []
    rss: list[tuple[float, int]] = []
    t_start = time.monotonic()
    end = t_start + args.minutes * 60
    try:
        threads = [threading.Thread(target=worker, args=(i, server.url, end, args, prompts, results), daemon=True)
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            rss.append((time.monotonic() - t_start, server.rss()))
            time.sleep(2)
        metrics = httpx.get(server.url + "/metrics", timeout=30).text
    finally:
        code = server.stop()
    log = server.log.read_text(errors="replace")

    duration = args.minutes * 60
    counts: dict[str, Counter] = defaultdict(Counter)
    lat: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for op, status, t0, dt, _gone in results:
        counts[op][status] += 1
        if op in ("stream", "chat", "embed") and status == 200:
            lat[op].append((t0 - t_start, dt))
    valid_5xx = sum(n for op in ("stream", "chat", "embed", "cancel") for s, n in counts[op].items()
                    if s >= 500 or s == -1)
    bad_not_4xx = sum(n for s, n in counts["bad"].items() if not 400 <= s < 500)
    transport = sum(counts["transport"].values())
    warm = [r for t, r in rss if t >= duration / 10] or [r for _, r in rss]
    rss_growth = warm[-1] / warm[0] - 1 if warm and warm[0] else float("nan")
    chat = lat["chat"]
    first = [dt for t, dt in chat if t < duration / 5]
    last = [dt for t, dt in chat if t >= duration * 4 / 5]
    p99_ratio = pct(last, 99) / pct(first, 99) if first and last else float("nan")
    server_500 = sum(float(m) for m in re.findall(r'zenlm_requests_total\{code="5\d\d"[^}]*\} (\S+)', metrics))

    print(f"\nzenlm serve soak test: {args.minutes:g} min, {args.clients} clients, model "
          f"{args.run or 'random GPT (4 layers, width 128, context 256)'}, {os.cpu_count()} CPUs")
    print("\n| request | sent | 200 | 4xx | 429 | 5xx | dropped by the client | p50 (s) | p99 (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for op in OPS:
        c = counts[op]
        gone = sum(1 for o, _s, _t, _d, g in results if o == op and g is True)
        xs = [dt for _, dt in lat[op]]
        print(f"| {op} | {sum(c.values())} | {c[200]} | {sum(n for s, n in c.items() if 400 <= s < 500 and s != 429)} "
              f"| {c[429]} | {sum(n for s, n in c.items() if s >= 500)} | {gone} | {pct(xs, 50):.3f} | "
              f"{pct(xs, 99):.3f} |")
    checks = {
        "no 5xx (or broken connection) for a valid request": valid_5xx == 0 and transport == 0,
        "every bad request answered 4xx": bad_not_4xx == 0,
        "no 5xx counted by the server's /metrics": server_500 == 0,
        f"resident memory growth after warm-up {rss_growth:+.1%} (< 10%)": rss_growth < 0.10,
        f"chat p99 last fifth / first fifth = {p99_ratio:.2f} (< 1.5)": p99_ratio < 1.5,
        "no traceback in the server log": "Traceback" not in log,
        f"the server stopped cleanly on SIGTERM (exit {code})": code in (0, -15),
    }
    print(f"\nserver RSS: {warm[0] / 2**20:.0f} MiB after warm-up -> {warm[-1] / 2**20:.0f} MiB at the end; "
          f"requests: {len(results)} in {duration:.0f} s")
    for name, ok in checks.items():
        print(f"  [{'pass' if ok else 'FAIL'}] {name}")
    if transport:
        print("transport errors:", [r[4] for r in results if r[0] == "transport"][:5])
    if args.json:
        Path(args.json).write_text(json.dumps({"counts": {k: dict(v) for k, v in counts.items()}, "rss": rss,
                                               "checks": checks}, indent=1))
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()

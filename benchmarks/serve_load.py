"""Load test of `zenlm serve`, compiled and eager engines: 1, 4 and 16 concurrent streaming clients.

    python benchmarks/serve_load.py                            # GPT-2-small shape, CPU, fp32 weights
    python benchmarks/serve_load.py --dtype int8 --levels 1,16,32
    python benchmarks/serve_load.py --n-layer 2 --levels 1,4 --requests 1 --max-tokens 8   # a quick check

The model is GPT-2-small-shaped (12 layers, 12 heads, width 768, learned positions, context 1024) with random
weights and a byte-level BPE tokenizer trained here on Shakespeare (vocabulary --vocab, default 8192; GPT-2's is
50257), written as a run directory and loaded as `zenlm serve` loads it (``zenlm.load(RUN, dtype=--dtype)``).
Its end-of-text embedding is zeroed so that replies run to max_tokens. Everything is loopback (127.0.0.1). The
server is `zenlm serve RUN` in a process of its own (--server process, the default), as it is deployed, or
uvicorn on a thread of this process (--server thread), where the clients share its interpreter lock. Each client
streams chat completions with `stream_options.include_usage`; all of them run in this process, on the same cores
as the server, so the CPU time a client spends on each streamed token is taken from the server's steps. --client
chooses the load generator: ``raw`` (default) writes the requests and reads the server-sent events by hand over a
kept-alive connection, the lightest (about 0.25 ms of CPU a token on a 2-core Xeon, against 0.7 ms for the
openai client), as clients on other machines would leave the server's cores to it; ``openai``, the official
async `openai` client, which parses every chunk into its models (a check that the official client reads the
stream, and what a test on one machine with it costs); ``sse``, httpx reading the raw events.

Engines (--engines): ``compiled``, the default of `zenlm serve` (batched compiled decode programs; here all
batch sizes are built before the clients start, as a server that has run before finds them on disk; the build
time is printed apart; a server process loads them at its start and the clients wait until GET /health counts
them all ready), and ``eager`` (`zenlm serve --no-compile`). Per level: every client sends --requests
requests one after another. Reported: requests/s, output tokens/s (from the exact usage counts), p50/p99 time
to first token (request sent -> first text chunk), p50/p99 inter-token latency (gaps between text chunks), the
p99 time the server took to answer GET /health, asked every 20 ms meanwhile (how long anything else waits for
it), and errors. Each engine's single-client row is its baseline; the last column is each row's output tokens/s
over it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
import torch
import yaml

import zenlm
from zenlm.config import GPTConfig
from zenlm.device import cpu_features
from zenlm.models.gpt import GPT
from zenlm.serve.app import ServerThread, create_app
from zenlm.tokenizer import train_tokenizer
from zenlm.train.checkpoint import save_model


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def text_chunk(stats: dict, t0: float, last: float | None, now: float) -> float:
    """Count a chunk with text that arrived at ``now``: the time to first token of a request sent at ``t0``, or
    the gap since the ``last`` one. -> now."""
    stats["ttft" if last is None else "itl"].append(now - (t0 if last is None else last))
    return now


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
                        last = text_chunk(stats, t0, last, now)
                stats["done"] += 1
            except openai.OpenAIError:
                stats["errors"] += 1


def _body(prompt: str, max_tokens: int) -> dict:
    """The JSON body of every request of :func:`sse_client` and :func:`raw_client` (:func:`client`'s own)."""
    return {"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.8, "stream": True, "stream_options": {"include_usage": True}}


async def sse_client(url: str, prompt: str, n_req: int, max_tokens: int, stats: dict) -> None:
    """The same requests as :func:`client`, read as raw server-sent events (httpx, one ``json.loads`` per
    event): a load generator that takes less of the CPU it shares with the server than the openai client."""
    body = _body(prompt, max_tokens)
    async with httpx.AsyncClient(base_url=url, timeout=600) as hc:
        for _ in range(n_req):
            t0 = time.perf_counter()
            last = None
            try:
                async with hc.stream("POST", "/v1/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        await r.aread()
                        stats["errors"] += 1
                        continue
                    async for line in r.aiter_lines():
                        last = _event(line.encode(), stats, t0, last)
                stats["done"] += 1
            except httpx.HTTPError:
                stats["errors"] += 1


async def _chunks(reader: asyncio.StreamReader, headers: dict[str, str]):
    """The body of an HTTP/1.1 response whose ``headers`` were read: its chunks as they arrive (chunked transfer
    coding), or the whole body at once (Content-Length)."""
    if headers.get("transfer-encoding", "").lower() != "chunked":
        yield await reader.readexactly(int(headers.get("content-length", "0")))
        return
    while size := int((await reader.readline()).split(b";")[0], 16):
        yield (await reader.readexactly(size + 2))[:-2]  # the chunk, without its CRLF
    while await reader.readline() not in (b"\r\n", b""):  # the trailer
        pass


def _event(line: bytes, stats: dict, t0: float, last: float | None) -> float | None:
    """Count one server-sent-event line of a streamed chat completion (see :func:`client`). -> the time of the
    latest text chunk."""
    if not line.startswith(b"data: ") or line == b"data: [DONE]":
        return last
    now = time.perf_counter()
    chunk = json.loads(line[6:])
    if chunk.get("usage"):
        stats["tokens"] += chunk["usage"]["completion_tokens"]
    choices = chunk.get("choices")
    return text_chunk(stats, t0, last, now) if choices and choices[0]["delta"].get("content") else last


async def raw_client(url: str, prompt: str, n_req: int, max_tokens: int, stats: dict) -> None:
    """The same requests as :func:`client`, written and read by hand over one kept-alive connection (HTTP/1.1 on
    asyncio streams, chunked transfer coding, one ``json.loads`` per event): the load generator that takes the
    least of the CPU it shares with the server, about a third of the openai client's time per streamed token."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    body = json.dumps(_body(prompt, max_tokens)).encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
               f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    for _ in range(n_req):
        t0, last = time.perf_counter(), None
        try:
            if conn is None:
                conn = await asyncio.open_connection(host, int(port))
            reader, writer = conn
            writer.write(request)
            status = (await reader.readline()).split(b" ", 2)
            if status == [b""]:  # the server closed the kept-alive connection: a new one for the next request
                raise ConnectionResetError("the server closed the connection")
            headers = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            ok, rest = len(status) > 1 and status[1] == b"200", b""
            async for data in _chunks(reader, headers):
                if ok:
                    *lines, rest = (rest + data).split(b"\n")
                    for line in lines:
                        last = _event(line.rstrip(b"\r"), stats, t0, last)
            stats["done" if ok else "errors"] += 1
            if headers.get("connection", "").lower() == "close":
                writer.close()
                conn = None
        except (OSError, ValueError, asyncio.IncompleteReadError):
            stats["errors"] += 1
            if conn is not None:
                conn[1].close()
            conn = None
    if conn is not None:
        conn[1].close()


CLIENTS = {"raw": "HTTP and server-sent events read by hand", "openai": "the openai client",
           "sse": "raw server-sent events (httpx)"}


def run_level(url: str, clients: int, n_req: int, max_tokens: int, prompt: str, kind: str = "raw") -> dict:
    stats: dict = {"ttft": [], "itl": [], "tokens": 0, "done": 0, "errors": 0, "health": []}
    one = {"openai": client, "sse": sse_client, "raw": raw_client}[kind]

    async def probe(done: asyncio.Event) -> None:
        """GET /health every 20 ms while the clients run: how long the server takes to answer anything."""
        async with httpx.AsyncClient(base_url=url, timeout=60) as hc:
            while not done.is_set():
                t = time.perf_counter()
                await hc.get("/health")
                stats["health"].append(time.perf_counter() - t)
                await asyncio.sleep(0.02)

    async def main() -> None:
        done = asyncio.Event()
        prober = asyncio.create_task(probe(done))
        await asyncio.gather(*(one(url, prompt, n_req, max_tokens, stats) for _ in range(clients)))
        done.set()
        await prober

    t0 = time.perf_counter()
    asyncio.run(main())
    stats["wall"] = time.perf_counter() - t0
    return stats


def write_run(root: Path, args: argparse.Namespace, text: str) -> Path:
    """A GPT-2-small-shaped run directory with random weights (end-of-text embedding zeroed)."""
    tok = train_tokenizer([text], kind="bpe", vocab_size=args.vocab)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=1024, n_layer=args.n_layer, n_head=12, n_embd=768)
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        model.tok_emb.weight[tok.eos_id] = 0
    run = root / "run"
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": cfg.to_dict()}, sort_keys=False))
    tok.save(run)
    save_model(model, run / "model.safetensors")
    return run


class ServerProcess:
    """`zenlm serve RUN` in a process of its own on a free loopback port, started when entered, ready once GET
    /health answers (and counts ``programs`` compiled programs ready, when given), stopped with Ctrl+C's signal
    when left. Its output goes to ``log``."""

    def __init__(self, run: Path, args: list[str], log: Path, programs: int | None) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "zenlm", "serve", str(run), "--port", str(self.port), *args]
        self.log, self.programs = log, programs

    def __enter__(self) -> ServerProcess:
        env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the programs' thread count
        self.proc = subprocess.Popen(self.cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"zenlm serve exited ({self.proc.returncode}); see {self.log}")
            try:
                health = httpx.get(self.url + "/health", timeout=5).json()
                progs = health.get("decode_programs") or {}
                if self.programs is None or (progs.get("ready", 0) >= self.programs and not progs.get("pending")):
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise SystemExit(f"zenlm serve was not ready in 600 s; see {self.log}")

    def memory_mb(self) -> dict[str, float]:
        """The server's resident memory now (VmRSS) and its peak so far (VmHWM), in MB (Linux; else empty)."""
        try:
            with open(f"/proc/{self.proc.pid}/status", encoding="ascii") as fh:
                return {line.split(":")[0]: int(line.split()[1]) / 1024 for line in fh
                        if line.startswith(("VmRSS", "VmHWM"))}
        except OSError:
            return {}

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default="1,4,16")
    ap.add_argument("--engines", default="compiled,eager")
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--n-layer", type=int, default=12)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16", "int8"],
                    help="weights, as `zenlm serve --dtype` (the run is written in fp32)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=True,
                    help="as `zenlm serve --no-batch-invariant`: a lone stream takes the one-sequence program")
    ap.add_argument("--max-prefill-tokens", type=int, default=None,
                    help="as `zenlm serve --max-prefill-tokens` (default: the server's, 1024)")
    ap.add_argument("--client", default="raw", choices=["raw", "openai", "sse"],
                    help="the load generator: requests written and server-sent events read by hand (raw, default: "
                         "the least CPU taken from the server's cores), the official openai client, or httpx")
    ap.add_argument("--server", default="process", choices=["process", "thread"],
                    help="zenlm serve in a process of its own (as deployed), or on a thread of this process")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    levels = [int(x) for x in args.levels.split(",")]
    root = Path(tempfile.mkdtemp(prefix="zenlm-serve-bench-"))
    os.environ["ZENLM_CACHE_DIR"] = str(root / "cache")  # programs built here, for this run only
    os.environ.pop("ZENLM_COMPILE", None)

    from zenlm.data.corpus import shakespeare_char_text

    text = shakespeare_char_text()
    run = write_run(root, args, text)
    lm = zenlm.load(run, device=args.device, dtype=args.dtype)
    prompt = text[1000:1150]
    rows, notes = [], []
    for engine in args.engines.split(","):
        app = create_app(lm.model, lm.tokenizer, model_id="bench", max_concurrency=max(levels),
                         max_queue=max(levels), compile=None if engine == "compiled" else False,
                         invariant=args.batch_invariant, max_prefill_tokens=args.max_prefill_tokens)
        eng = app.state.engine
        programs = None
        if engine == "compiled":
            t0 = time.perf_counter()
            eng.prepare()  # every batch size, built in the background ...
            if eng.decoder is None or not eng.decoder.wait():  # ... and waited for
                notes.append("compiled: no compiled programs (no C++ compiler?); the engine decoded eagerly")
            else:
                programs = eng.decoder.status()["ready"]
            notes.append(f"compiled: programs for batch sizes up to {max(levels)} built in "
                         f"{time.perf_counter() - t0:.0f} s")
        if args.server == "process":
            eng.close()  # the programs are on disk now, for the server process
            server = ServerProcess(run, ["--model-id", "bench", "--max-concurrency", str(max(levels)),
                                         "--max-queue", str(max(levels)), "--dtype", args.dtype,
                                         "--device", args.device]
                                   + ([] if engine == "compiled" else ["--no-compile"])
                                   + ([] if args.batch_invariant else ["--no-batch-invariant"])
                                   + ([] if args.max_prefill_tokens is None
                                      else ["--max-prefill-tokens", str(args.max_prefill_tokens)]),
                                   root / f"serve-{engine}.log", programs)
        else:
            server = ServerThread(app)
        with server as srv:
            started = srv.memory_mb() if args.server == "process" else {}
            run_level(srv.url, 1, 1, 8, prompt)  # warm-up
            for c in levels:
                rows.append((engine, c, run_level(srv.url, c, args.requests, args.max_tokens, prompt, args.client)))
            if started:
                end = srv.memory_mb()
                notes.append(f"{engine}: server resident memory {started.get('VmRSS', 0):,.0f} MB when ready, "
                             f"{end.get('VmRSS', 0):,.0f} MB after the last level, peak {end.get('VmHWM', 0):,.0f} MB")

    feats = cpu_features()
    # weights however stored (int8 ones are buffers, not parameters), a tied matrix once, int8 scales left out
    n_weights = sum({t.data_ptr(): t.numel() for n, t in lm.model.state_dict().items()
                     if not n.endswith(".scale")}.values())
    print(f"\nzenlm serve load test -- {time.strftime('%Y-%m-%d %H:%M')} -- GPT-2-small shape "
          f"({n_weights / 1e6:.0f}M weights, {args.n_layer} layers, vocab {lm.tokenizer.vocab_size}), "
          f"{args.device}, {lm.precision.line() if lm.precision else args.dtype}; {args.requests} requests/client x "
          f"{args.max_tokens} tokens, prompt {len(lm.tokenizer.encode(prompt))} tokens + chat template")
    print(f"machine: {feats.name} ({feats.describe()}), {os.cpu_count()} CPUs, {platform.machine()}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; server: "
          f"{'zenlm serve in its own process' if args.server == 'process' else 'a thread of the clients process'}"
          f"; clients: {CLIENTS[args.client]}"
          + ("" if args.batch_invariant else ", --no-batch-invariant")
          + ("" if args.max_prefill_tokens is None else f", --max-prefill-tokens {args.max_prefill_tokens}")
          + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""))
    print("\n| engine | clients | requests/s | output tokens/s | p50 TTFT (s) | p99 TTFT (s) | p50 ITL (ms) | "
          "p99 ITL (ms) | p99 /health (ms) | errors | tokens/s vs 1 client |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base: dict[str, float] = {}
    for engine, c, s in rows:
        tps = s["tokens"] / s["wall"]
        base.setdefault(engine, tps)
        print(f"| {engine} | {c} | {s['done'] / s['wall']:.2f} | {tps:.1f} | {pct(s['ttft'], 50):.3f} | "
              f"{pct(s['ttft'], 99):.3f} | {1000 * pct(s['itl'], 50):.1f} | {1000 * pct(s['itl'], 99):.1f} | "
              f"{1000 * pct(s['health'], 99):.1f} | {s['errors']} | {tps / base[engine]:.2f}x |")
    for note in notes:
        print(f"<!-- {note} -->")


if __name__ == "__main__":
    main()

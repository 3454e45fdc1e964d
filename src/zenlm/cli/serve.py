"""CLI verbs ``zenlm serve`` and ``zenlm chat`` (registered in zenlm.cli.build_parser)."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any, Literal


def served_run(run: str, verb: str) -> tuple[Path, str, dict[str, Any]]:
    """The run directory behind RUN, the model's name and its config.yaml, for `zenlm serve` / `zenlm chat`.

    The folder `zenlm demo` writes (it holds ``.zenlm-demo`` and the run in ``run/``) stands for its run, and
    the model is named after that folder (``runs/demo-en`` and ``runs/demo-en/run`` both serve "demo-en");
    any other run is named after its directory. A run whose model cannot write text (a classifier, a BERT
    encoder, an encoder-decoder) is refused with the verb that fits it."""
    from zenlm.recipes.demo import MARKER
    from zenlm.rundir import read_run_config

    path = Path(run)
    if (path / MARKER).is_file() and (path / "run" / "config.yaml").is_file():
        run_dir, name = path / "run", path.resolve().name
    elif path.resolve().name == "run" and (path.resolve().parent / MARKER).is_file():
        run_dir, name = path, path.resolve().parent.name
    else:
        run_dir, name = path, path.resolve().name
    saved = read_run_config(run_dir)
    _check_writes_text(run, saved, verb)
    return run_dir, name, saved


def _check_writes_text(run: str, saved: dict[str, Any], verb: str) -> None:
    """ConfigError naming the verb that fits, unless the run's model continues text (a GPT language model)."""
    from zenlm.errors import ConfigError
    from zenlm.rundir import run_architecture, run_task

    arch = run_architecture(saved)
    if run_task(saved) == "classify":
        raise ConfigError(f"{run} holds a {arch.title} classifier, which labels text but does not write it; "
                          f"`zenlm {verb}` needs a language model. Use `zenlm predict {run} \"TEXT\"` (or "
                          f"`zenlm evaluate {run} --data FILE`).")
    if arch.can("causal-lm") and arch.can("generate"):
        return
    if arch.can("seq2seq"):
        raise ConfigError(f"{run} holds an {arch.title} model, which writes a target for a source text rather "
                          f"than continuing a conversation; `zenlm {verb}` needs a language model. Use `zenlm "
                          f"generate {run} \"SOURCE\"` (or `zenlm evaluate {run} --data FILE`).")
    if arch.can("embed"):
        raise ConfigError(f"{run} holds a {arch.title}, which reads text but does not write it; `zenlm {verb}` "
                          f"needs a language model. Use `zenlm embed {run} \"TEXT\"` for vectors, or "
                          f"`zenlm finetune classify --base {run} ...` for a classifier.")
    raise ConfigError(f"{run} holds a {arch.title} model, which cannot write text; `zenlm {verb}` needs a "
                      "language model (a GPT run from `zenlm pretrain`, `zenlm demo` or `zenlm convert from-hf`).")


def serve(
    run: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_concurrency: int = 8,
    max_queue: int | None = None,
    model_id: str | None = None,
    device: str = "auto",
    dtype: Literal["auto", "fp32", "bf16", "fp16", "int8"] = "auto",
    compile: bool | None = None,
    batch_invariant: bool = True,
    max_prefill_tokens: int | None = None,
    public_metrics: bool = False,
    max_request_bytes: int = 4 << 20,
    request_timeout: float = 30.0,
    max_connections: int = 512,
    max_embedding_inputs: int = 2048,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API, with a chat page at http://HOST:PORT/.

    Args:
        run: run directory (made by `zenlm pretrain` or `zenlm convert from-hf`), or the folder of `zenlm demo`
        host: address to bind (default: this machine only; use 0.0.0.0 to accept other machines)
        port: TCP port
        api_key: require `Authorization: Bearer KEY` on every /v1 route, on /tokenize, /detokenize,
            /tokenizer_info and on /metrics (default: env ZENLM_API_KEY if set)
        max_concurrency: sequences decoded together in one batch
        max_queue: requests allowed to wait for a free slot before the server answers 429 (default: max-concurrency)
        model_id: the model name clients send (default: the run directory's name; for a demo, the demo
            folder's, e.g. demo-en)
        device: auto, cpu, cuda or mps
        dtype: the weights: auto keeps the run's own precision (lossless); bf16 or int8 (quantised while
            loading) for less memory and faster decoding; fp16 on GPUs. bf16 and int8 compute in bf16 where the
            CPU has native bf16, else in fp32 (the first line on stderr says what was chosen). In bf16 the
            batched steps read prepacked copies of the layer matrices (about twice as fast a product, the
            matrices' bytes again in memory; ZENLM_PACKED_WEIGHTS=0 turns them off)
        compile: decode with the batched compiled programs (default: yes where a C++ compiler is installed;
            at start the program of each batch size 1, 2, 4, ... up to --max-concurrency is loaded from
            ~/.cache/zenlm, or built in the background the first time, 20-60 s each for GPT-2-small, while
            the steps run eagerly; GET /health counts them). --no-compile: eager; --compile: the server
            starts once every program is built
        batch_invariant: what a request gets does not depend on which requests share its decode steps (the
            default). --no-batch-invariant: while one stream runs alone it takes the faster program of
            `zenlm generate` (up to 2.3x per token on a CPU), whose last bits differ from a batched step's
        max_prefill_tokens: prompt tokens prefilled between two decode steps of the running streams. Each
            such prefill pauses them: lower makes a long prompt's pauses shorter (it goes in pieces of this many,
            one per step) but spreads a burst of requests over more pauses; higher gets a burst its first tokens
            sooner, in fewer pauses (default: 1024 for a Transformer; see docs/BENCHMARKS.md for 256 against
            1024 under 16 clients)
        public_metrics: leave GET /metrics open without the API key (for a Prometheus scraper)
        max_request_bytes: largest request body; a larger one is answered 413 without being read
        request_timeout: seconds a client has to send a request's headers, and again its body (then 408)
        max_connections: open connections at once; more are answered 503 at once (kept below the
            process's file-descriptor limit, `ulimit -n`)
        max_embedding_inputs: inputs per /v1/embeddings request
    """
    import os

    import zenlm
    from zenlm.cli.common import StderrHandler, show_inference_notes
    from zenlm.errors import ConfigError
    from zenlm.serve.app import create_app
    from zenlm.serve.chat import model_kind
    from zenlm.serve.server import Limits, bind, make_server

    if max_prefill_tokens is not None and max_prefill_tokens < 1:
        raise ConfigError(f"--max-prefill-tokens must be at least 1, got {max_prefill_tokens}.")
    api_key = api_key or os.environ.get("ZENLM_API_KEY") or None
    limits = Limits(max_request_bytes=max_request_bytes, request_timeout=request_timeout,
                    max_connections=max_connections, max_embedding_inputs=max_embedding_inputs)
    run_dir, name, saved = served_run(run, "serve")
    sock = bind(host, port)  # a port in use is refused before the model loads
    try:
        lm = zenlm.load(run_dir, device=device, dtype=dtype)
        show_inference_notes(lm)
        app = create_app(lm.model, lm.tokenizer, model_id=model_id or name, api_key=api_key,
                         max_concurrency=max_concurrency, max_queue=max_queue, public_metrics=public_metrics,
                         limits=limits, model_kind=model_kind(saved), compile=compile,
                         invariant=batch_invariant, max_prefill_tokens=max_prefill_tokens)
        app.state.engine.prepare()  # every batch size's program made ready now (loaded, or built in the background)
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True,
                            handlers=[StderrHandler()])
        logging.getLogger("zenlm.serve").setLevel(logging.INFO)
        port = sock.getsockname()[1]
        print(f"serving {model_id or name} on http://{host}:{port}/  (OpenAI base_url http://{host}:{port}/v1"
              f"{', API key required' if api_key else ''}); Ctrl+C stops", file=sys.stderr)
        make_server(app, limits).run(sockets=[sock])
    finally:
        sock.close()


def chat(
    run: str,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float | None = 0.95,
    seed: int | None = None,
    system: str | None = None,
    device: str = "auto",
    dtype: Literal["auto", "fp32", "bf16", "fp16", "int8"] = "auto",
    compile: bool | None = None,
) -> None:
    """Chat with a model in the terminal: replies stream as they are generated; /reset, /quit.

    Args:
        run: run directory, or the folder of `zenlm demo`
        max_new_tokens: longest reply in tokens
        temperature: 0 for greedy decoding; higher is more random
        top_p: sample only among the most likely tokens whose probabilities sum to P
        seed: random seed for reproducible replies
        system: an optional system message that starts every conversation
        device: auto, cpu, cuda or mps
        dtype: the weights: auto keeps the run's own precision (lossless); bf16 or int8 (quantised while
            loading) for less memory and faster replies; fp16 on GPUs. bf16 and int8 compute in bf16 where the
            CPU has native bf16, else in fp32 (the first line on stderr says what was chosen)
        compile: decode with the compiled step, 1.4-3x faster per token on a CPU (default: yes where a C++
            compiler is installed; the first time for a model shape it is built in the background, 20-60 s,
            while the first replies come eagerly, and kept in ~/.cache/zenlm). --no-compile: eager;
            --compile: the first reply waits for the build
    """
    import zenlm
    from zenlm.cli.common import show_inference_notes, write_text
    from zenlm.generate import GenerationConfig
    from zenlm.serve.chat import chat_loop, model_kind, warm_up

    run_dir, name, saved = served_run(run, "chat")
    lm = zenlm.load(run_dir, device=device, dtype=dtype)
    show_inference_notes(lm)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                           compile=compile)
    if compile:  # build (or load) the compiled step now rather than inside the first reply; a build says so
        t0 = time.perf_counter()
        warm_up(lm.model, lm.tokenizer, cfg, system)  # the shape of the first reply (its cache length)
        print(f"compiled decode step ready in {time.perf_counter() - t0:.0f} s", flush=True)

    def read() -> str | None:
        try:
            return input("you: ")
        except EOFError:
            return None

    chat_loop(lm.model, lm.tokenizer, read, write_text, cfg, system=system, name=name, kind=model_kind(saved))

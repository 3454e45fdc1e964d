"""CLI verbs ``zenlm serve`` and ``zenlm chat`` (registered in zenlm.cli.build_parser)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Literal


def serve(
    run: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_concurrency: int = 8,
    max_queue: int | None = None,
    model_id: str | None = None,
    device: str = "auto",
    dtype: str = "fp32",
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API, with a chat page at http://HOST:PORT/.

    Args:
        run: run directory (made by `zenlm pretrain`, `zenlm demo` or `zenlm convert from-hf`)
        host: address to bind (default: this machine only; use 0.0.0.0 to accept other machines)
        port: TCP port
        api_key: require `Authorization: Bearer KEY` on every /v1 route and on /tokenize, /detokenize and
            /tokenizer_info (default: env ZENLM_API_KEY if set)
        max_concurrency: sequences decoded together in one batch
        max_queue: requests allowed to wait for a free slot before the server answers 429 (default: max-concurrency)
        model_id: the model name clients send (default: the run directory's name)
        device: auto, cpu, cuda or mps
        dtype: fp32, bf16 or fp16 weights
    """
    import os

    import uvicorn

    import zenlm
    from zenlm.serve.app import create_app

    api_key = api_key or os.environ.get("ZENLM_API_KEY") or None
    lm = zenlm.load(run, device=device, dtype=dtype)
    name = model_id or Path(run).resolve().name
    app = create_app(lm.model, lm.tokenizer, model_id=name, api_key=api_key, max_concurrency=max_concurrency,
                     max_queue=max_queue)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("zenlm.serve").setLevel(logging.INFO)
    print(f"serving {name} on http://{host}:{port}/  (OpenAI base_url http://{host}:{port}/v1"
          f"{', API key required' if api_key else ''}); Ctrl+C stops", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


def chat(
    run: str,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float | None = 0.95,
    seed: int | None = None,
    system: str | None = None,
    device: str = "auto",
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32",
    compile: bool = False,
) -> None:
    """Chat with a model in the terminal: replies stream as they are generated; /reset, /quit.

    Args:
        run: run directory
        max_new_tokens: longest reply in tokens
        temperature: 0 for greedy decoding; higher is more random
        top_p: sample only among the most likely tokens whose probabilities sum to P
        seed: random seed for reproducible replies
        system: an optional system message that starts every conversation
        device: auto, cpu, cuda or mps
        dtype: weights for inference: fp32, bf16 or fp16
        compile: decode with the compiled step (2-3x faster per token on a CPU; the first reply for a new
            model shape waits 25-45 s for the compile, later ones load it from ~/.cache/zenlm in about a
            second; needs a C++ compiler)
    """
    import zenlm
    from zenlm.generate import GenerationConfig
    from zenlm.serve.chat import chat_loop

    lm = zenlm.load(run, device=device, dtype=dtype)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                           compile=compile)

    def read() -> str | None:
        try:
            return input("you: ")
        except EOFError:
            return None

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    chat_loop(lm.model, lm.tokenizer, read, write, cfg, system=system)

"""The HTTP server: OpenAI-compatible routes over the batching engine, plus a chat page at ``/``.

    GET  /health                 public liveness probe
    GET  /metrics                Prometheus text (requests, tokens, queue depth, latency histograms); needs
                                 the API key when there is one, unless public_metrics
    GET  /                       the chat page (static/index.html, no build step, works offline)
    GET  /v1/models[/{id}]       the one model this server holds
    POST /v1/completions         text in, text out (prompt or a batch of prompts, echo, logprobs 0..5;
                                 echo + logprobs also scores the prompt's own tokens, as lm-eval asks)
    POST /v1/chat/completions    messages in, rendered with the tokenizer's Jinja chat template
    POST /v1/embeddings          mean of the last hidden states (after the final norm) over the input tokens
    POST /tokenize, /detokenize  text <-> token ids; GET /tokenizer_info: the tokenizer's configuration
                                 (the shapes vLLM uses, which lm-eval's remote tokenizer reads)

Streaming answers are server-sent events in OpenAI's chunk format ending with ``data: [DONE]``. A client
that disconnects cancels its sequences (the engine frees their slots at the next step). With an API key,
every ``/v1`` route, the tokenizer routes and ``/metrics`` need ``Authorization: Bearer KEY`` (compared in
constant time; ``public_metrics`` leaves ``/metrics`` open to a scraper without the key).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import html
import json
import logging
import struct
import time
import uuid
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from zenlm.chat_template import TemplateError, TemplateWorker
from zenlm.errors import ConfigError
from zenlm.models.gpt import GPT
from zenlm.sampling import SEED_LIMIT
from zenlm.serve.chat import KIND_HINTS, KIND_LABELS
from zenlm.serve.engine import (
    EmbedJob,
    Engine,
    ErrorEvent,
    FinishEvent,
    Overloaded,
    PromptEvent,
    Sequence,
    TokenEvent,
)
from zenlm.serve.metrics import Metrics
from zenlm.serve.schema import (
    APIError,
    GenerationRequest,
    parse_chat,
    parse_completion,
    parse_detokenize,
    parse_embeddings,
    parse_json,
    parse_tokenize,
)
from zenlm.serve.server import Limits, ServerThread
from zenlm.serve.stateful_engine import StatefulEngine
from zenlm.stateful import is_stateful
from zenlm.tokenizer import (
    CHAT_TEMPLATE,
    END_PROBE_MESSAGES,
    LEGACY_CHAT_TEMPLATE,
    Tokenizer,
    end_of_turn_in,
    render_chat,
    template_tokens,
)

log = logging.getLogger("zenlm.serve")


def _bearer_ok(header: str | None, key: str) -> bool:
    given = header[7:] if header and header[:7].lower() == "bearer " else ""
    return hmac.compare_digest(given.encode(), key.encode())


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _busy(engine: Engine, e: Overloaded) -> APIError:
    """The 429 for a request the engine has no room for (counted in zenlm_rejected_requests_total)."""
    engine.metrics.inc("zenlm_rejected_requests_total")
    return APIError(429, str(e), code="rate_limit_exceeded")


class _Job:
    """The sequences of one request (``n`` choices per prompt; choice ``p * n + i`` is prompt p's i-th) and
    the asyncio queue their events arrive on. All are submitted at once, so the engine decodes them
    together."""

    def __init__(self, engine: Engine, prompts: list[list[int]], req: GenerationRequest) -> None:
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self.seqs = []
        capacity = engine.max_concurrency + engine.max_queue
        if len(prompts) * req.n > capacity:
            raise APIError(400, f"this request asks for {len(prompts) * req.n} sequences (prompts x n) but "
                           f"the server holds at most {capacity} at once (--max-concurrency + --max-queue); "
                           "send fewer prompts per request.", param="prompt", code="invalid_value")
        for p, prompt_ids in enumerate(prompts):
            for i in range(req.n):
                params = req.params
                if req.n > 1 and params.seed is not None:  # distinct but reproducible choices
                    params = type(params)(**{**params.__dict__, "seed": (params.seed + i) % SEED_LIMIT})

                def emit(ev: Any, index: int = p * req.n + i) -> None:
                    loop.call_soon_threadsafe(self.queue.put_nowait, (index, ev))

                # chat replies never show special tokens (they could not be sent back in the next turn)
                self.seqs.append(Sequence(prompt_ids, params, emit, skip_special=bool(req.messages)))
        try:
            engine.submit(self.seqs)
        except Overloaded as e:
            raise _busy(engine, e) from None
        except ConfigError as e:
            code = "context_length_exceeded" if "context" in str(e) else "invalid_value"
            raise APIError(400, str(e), param="prompt" if req.messages == [] else "messages", code=code) from None
        self.open = len(self.seqs)

    async def events(self, request: Request | None = None) -> AsyncIterator[tuple[int, Any]]:
        """Events of all choices until each has finished. With ``request`` (a non-streamed answer), a
        client that disconnects while waiting cancels the work (streams are cancelled by the server)."""
        checked = time.monotonic()
        while self.open:
            if request is not None and time.monotonic() - checked > 0.25:
                checked = time.monotonic()
                if await request.is_disconnected():
                    self.cancel()
                    return
            if request is None:
                i, ev = await self.queue.get()
            else:
                try:
                    i, ev = await asyncio.wait_for(self.queue.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    continue
            if isinstance(ev, (FinishEvent, ErrorEvent)):
                self.open -= 1
            yield i, ev

    def cancel(self) -> None:
        for s in self.seqs:
            s.cancel()


class _Choice:
    """Accumulates one choice's text, tokens and log-probs (and its prompt's scores, when asked for)."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.tokens: list[TokenEvent] = []
        self.prompt: PromptEvent | None = None
        self.finish: FinishEvent | None = None


def create_app(
    model: GPT, tokenizer: Tokenizer, *, model_id: str = "zenlm", api_key: str | None = None,
    max_concurrency: int = 8, max_queue: int | None = None, public_metrics: bool = False,
    limits: Limits | None = None, model_kind: str | None = None, compile: bool | None = None,
    invariant: bool = True, max_prefill_tokens: int | None = None,
) -> FastAPI:
    """The FastAPI application serving ``model`` under the name ``model_id``.

    With ``api_key``, every ``/v1`` route, the tokenizer routes and ``/metrics`` (unless ``public_metrics``)
    need ``Authorization: Bearer KEY``; ``/health`` and the chat page stay public. ``limits``: request size,
    time and connection limits (:class:`zenlm.serve.server.Limits`; the app keeps the size and body-time ones,
    the server the others). ``model_kind`` ("chat", "base" or "imported", see
    :func:`zenlm.serve.chat.model_kind`) is shown on the chat page, with a hint for a base model. ``compile``:
    how the engine decodes (None: the batched compiled programs, built in the background; False: eagerly);
    ``invariant``: False lets a lone stream take the faster one-sequence program; ``max_prefill_tokens``: prompt
    tokens prefilled between two decode steps (default ``PREFILL_CHUNK``); see :class:`~zenlm.serve.engine.Engine`."""
    limits = limits or Limits()
    metrics = Metrics()
    engine_class = StatefulEngine if is_stateful(model) else Engine  # n-gram, MLP, LSTM: a state row per sequence
    engine = engine_class(model, tokenizer, max_concurrency=max_concurrency, max_queue=max_queue, metrics=metrics,
                          compile=compile, invariant=invariant, max_prefill_tokens=max_prefill_tokens)
    created = int(time.time())
    app = FastAPI(title="zenlm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.limits = limits
    app.router.on_shutdown.append(engine.close)

    # ------------------------------------------------------------------------------ errors and logging
    def error_response(err: APIError) -> JSONResponse:
        # a body too large or too slow is not read to its end: the connection closes after the answer
        headers = {"connection": "close"} if err.status in (408, 413) else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    # the model's chat template runs in a worker process with a deadline (zenlm.chat_template): a hostile
    # template cannot stop the server or take its memory
    templates = TemplateWorker(tokenizer.chat_template, template_tokens(tokenizer), timeout=limits.template_timeout,
                               max_chars=4 * limits.max_request_bytes)
    app.router.on_shutdown.append(templates.close)
    app.state.templates = templates
    engine.stop_ids = frozenset({end_of_turn(tokenizer, templates)} - {None})  # chat replies end at end-of-turn

    def chat_prompt(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text of ``messages`` from the tokenizer's chat template: a 400 when the template refuses
        or fails on them, a 500 when it runs past its bounds (the model's template is at fault)."""
        try:
            return templates.render(messages, add_generation_prompt)
        except TemplateError as e:
            if e.kind != "limit":
                raise APIError(400, f"{e}.", param="messages") from None
            log.warning("the chat template was stopped: %s", e)
            raise APIError(500, f"{e}; the model's chat template is at fault, not this request.",
                           code="chat_template_failed") from None

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, err: APIError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, err: StarletteHTTPException) -> JSONResponse:
        msg = "no such route; see GET /v1/models" if err.status_code == 404 else str(err.detail)
        return error_response(APIError(err.status_code, msg))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, err: RequestValidationError) -> JSONResponse:
        return error_response(APIError(400, f"invalid request: {err.errors()}"))

    app.add_middleware(_AuthAndLog, api_key=api_key, metrics=metrics, public_metrics=public_metrics)

    # ----------------------------------------------------------------------------------- plain routes
    @app.get("/health")
    async def health() -> dict[str, Any]:
        decoder = getattr(engine, "decoder", None)  # None: eager steps (or a stateful model's engine)
        return {"status": "ok", "model": model_id, "running": engine.running, "waiting": len(engine.waiting),
                "decode_programs": decoder.status() if decoder is not None else None}

    @app.get("/metrics")
    async def metrics_route() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    page = resources.files("zenlm.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    for key, value in (("MODEL_KIND", KIND_LABELS.get(model_kind or "", "")),
                       ("KIND_HINT", KIND_HINTS.get(model_kind or "", "")), ("MODEL_ID", model_id)):
        page = page.replace("{{" + key + "}}", html.escape(value))

    @app.get("/")
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    def model_card() -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "zenlm",
                "context_length": engine.max_len}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict[str, Any]:
        check_model(name)
        return model_card()

    def check_ids(ids: list[int], param: str) -> None:
        """400 unless ``ids`` is a non-empty list of ids of this model's vocabulary."""
        V = model.config.vocab_size
        if not ids or min(ids) < 0 or max(ids) >= V:
            raise APIError(400, f"token ids must be in 0..{V - 1}.", param=param, code="invalid_value")

    def check_model(name: str) -> None:
        if name != model_id:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{model_id}'.",
                           param="model", code="model_not_found")

    # ------------------------------------------------------------------------------------- generation
    def token_str(token_id: int) -> str:
        return tokenizer.decode([token_id])

    def top_dict(top: list[tuple[int, float]]) -> dict[str, float]:
        out: dict[str, float] = {}
        for i, lp in top:  # best first: two ids with one text (partial UTF-8 bytes) keep the better log-prob
            out.setdefault(token_str(i), lp)
        return out

    def completion_logprobs(tokens: list[TokenEvent], offset0: int,
                            prompt: PromptEvent | None = None) -> dict[str, Any]:
        """The ``logprobs`` object of a completion choice: the prompt's tokens first when it was scored
        (echo), whose first entry is null (nothing comes before it), then the generated tokens."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

        def add(token_id: int, lp: float | None, top: dict[str, float] | None, offset: int) -> int:
            s = token_str(token_id)
            for key, value in (("tokens", s), ("token_logprobs", lp), ("top_logprobs", top),
                               ("text_offset", offset)):
                out[key].append(value)
            return offset + len(s)

        offset = 0
        if prompt is not None:
            for i, lp, top in zip(prompt.token_ids, prompt.logprobs, prompt.top_logprobs, strict=True):
                offset = add(i, lp, None if top is None else top_dict(top), offset)
        offset = offset0
        for t in tokens:
            offset = add(t.token_id, t.logprob, top_dict(t.top_logprobs or []), offset)
        return out

    def chat_logprobs(tokens: list[TokenEvent]) -> dict[str, Any]:
        def entry(i: int, lp: float) -> dict[str, Any]:
            s = token_str(i)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

        return {"content": [{**entry(t.token_id, t.logprob or 0.0),
                             "top_logprobs": [entry(i, lp) for i, lp in (t.top_logprobs or [])]}
                            for t in tokens]}

    def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def read_body(request: Request) -> dict[str, Any]:
        """The JSON body: 413 past limits.max_request_bytes (refused from Content-Length before reading), 408
        when it takes longer than limits.request_timeout to arrive; parsed on a worker thread."""
        cap = limits.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            raise _too_large(int(declared), cap)
        chunks: list[bytes] = []
        size = 0

        async def read() -> None:
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > cap:
                    raise _too_large(size, cap)
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), timeout=limits.request_timeout)
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {limits.request_timeout:g} s "
                           "(--request-timeout).", code="request_timeout") from None
        return await run_in_threadpool(parse_json, b"".join(chunks))

    async def run_job(request: Request, req: GenerationRequest, prompts: list[list[int]], chat: bool,
                      echo_texts: list[str]) -> Response:
        job = _Job(engine, prompts, req)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        now = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        want_lp = req.params.logprobs is not None
        n_choices = len(prompts) * req.n
        echo_of = [echo_texts[i // req.n] for i in range(n_choices)]  # choice -> its prompt's echoed text
        n_prompt = sum(len(p) for p in prompts)

        if not req.stream:
            choices = [_Choice() for _ in range(n_choices)]
            try:
                async for i, ev in job.events(request):
                    if isinstance(ev, ErrorEvent):
                        raise APIError(500, ev.message, code="generation_failed")
                    if isinstance(ev, PromptEvent):
                        choices[i].prompt = ev
                    elif isinstance(ev, TokenEvent):
                        choices[i].text.append(ev.text)
                        choices[i].tokens.append(ev)
                    else:
                        choices[i].text.append(ev.text)
                        choices[i].finish = ev
            finally:
                job.cancel()  # no-op for finished sequences; frees the work if this handler was cancelled
            if any(c.finish is None for c in choices):  # the client went away; nobody reads this
                return Response(status_code=CLIENT_GONE)
            out = []
            for i, c in enumerate(choices):
                assert c.finish is not None
                text = "".join(c.text)
                lp = None
                if want_lp:
                    lp = (chat_logprobs(c.tokens) if chat
                          else completion_logprobs(c.tokens, len(echo_of[i]), c.prompt))
                if chat:
                    out.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": lp, "finish_reason": c.finish.finish_reason})
                else:
                    out.append({"index": i, "text": echo_of[i] + text, "logprobs": lp,
                                "finish_reason": c.finish.finish_reason})
            n_out = sum(c.finish.completion_tokens for c in choices if c.finish)
            return JSONResponse({"id": rid, "object": kind, "created": now, "model": model_id,
                                 "choices": out, "usage": usage(n_prompt, n_out),
                                 "system_fingerprint": None})

        chunk_kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(i: int, text: str | None, finish: str | None, lp: Any = None,
                  first: bool = False) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {}
                if first:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}
            else:
                choice = {"index": i, "text": text or "", "logprobs": lp, "finish_reason": finish}
            body: dict[str, Any] = {"id": rid, "object": chunk_kind, "created": now, "model": model_id,
                                    "choices": [choice]}
            if req.include_usage:
                body["usage"] = None
            return body

        async def stream() -> AsyncIterator[str]:
            n_out = 0
            scored = req.params.prompt_logprobs is not None  # the echo chunk waits for the prompt's scores
            try:
                for i in range(n_choices):
                    if chat:
                        yield _sse(chunk(i, "", None, first=True))
                    elif echo_of[i] and not scored:
                        yield _sse(chunk(i, echo_of[i], None))
                async for i, ev in job.events():
                    if isinstance(ev, ErrorEvent):
                        yield _sse(APIError(500, ev.message, code="generation_failed").body())
                        break
                    if isinstance(ev, PromptEvent):
                        yield _sse(chunk(i, echo_of[i], None, completion_logprobs([], 0, ev)))
                    elif isinstance(ev, TokenEvent):
                        lp = None
                        if want_lp:
                            lp = chat_logprobs([ev]) if chat else completion_logprobs([ev], 0)
                        if ev.text or lp is not None:
                            yield _sse(chunk(i, ev.text, None, lp))
                    else:
                        n_out += ev.completion_tokens
                        if ev.text:
                            yield _sse(chunk(i, ev.text, None))
                        yield _sse(chunk(i, None if chat else "", ev.finish_reason))
                else:
                    if req.include_usage:
                        yield _sse({"id": rid, "object": chunk_kind, "created": now, "model": model_id,
                                    "choices": [], "usage": usage(n_prompt, n_out)})
                yield "data: [DONE]\n\n"
            finally:
                job.cancel()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def encode_bounded(text: str, param: str, allow_special: bool = False) -> list[int]:
        """Token ids of ``text``; a 400 before any tokenising when it is certainly longer than the context
        (Tokenizer.min_tokens), so the work done for one text stays bounded by the context."""
        least = tokenizer.min_tokens(text)
        if least > engine.max_len:
            raise APIError(400, f"'{param}' has at least {least} tokens but the model's context is "
                           f"{engine.max_len} tokens; shorten it.", param=param, code="context_length_exceeded")
        return tokenizer.encode(text, allow_special=allow_special)

    def encode_prompt(text: str) -> list[int]:
        ids = encode_bounded(text, "prompt")
        if not ids:  # an empty prompt starts from end-of-text, as documents do in pretraining
            start = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.bos_id
            ids = [start] if start is not None else []
        return ids

    def completion_prompts(req: GenerationRequest) -> tuple[list[list[int]], list[str]]:
        """Prompt ids and echoed texts of a completion request (runs on a worker thread)."""
        prompts, echo_texts = [], []
        for p in req.prompts:
            if isinstance(p, list):
                check_ids(p, "prompt")
        for p in req.prompts:  # token ids are taken as they are, special ids included
            prompts.append(p if isinstance(p, list) else encode_prompt(p))
            echo_texts.append("" if not req.echo else p if isinstance(p, str) else tokenizer.decode(p))
        return prompts, echo_texts

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = parse_completion(await read_body(request))
        check_model(req.model)
        prompts, echo_texts = await run_in_threadpool(completion_prompts, req)
        return await run_job(request, req, prompts, chat=False, echo_texts=echo_texts)

    def chat_prompt_ids(messages: list[dict[str, str]]) -> list[int]:
        """The prompt ids of a chat request (runs on a worker thread)."""
        for i, m in enumerate(messages):  # the template's special tokens come from the template only
            for part in ("role", "content"):
                bad = next((t for t in tokenizer.special_tokens if t in m[part]), None)
                if bad is not None:
                    raise APIError(400, f"messages[{i}].{part} contains the special token {bad!r}; remove it.",
                                   param="messages", code="invalid_value")
        return encode_bounded(chat_prompt(messages), "messages", allow_special=True)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = parse_chat(await read_body(request))
        check_model(req.model)
        ids = await run_in_threadpool(chat_prompt_ids, req.messages)
        return await run_job(request, req, [ids], chat=True, echo_texts=[""])

    def embedding_inputs(inputs: list[str | list[int]]) -> list[list[int]]:
        """The ids of each input, each within the context (runs on a worker thread)."""
        batch = [encode_bounded(x, "input") if isinstance(x, str) else x for x in inputs]
        for x in batch:
            check_ids(x, "input")
            if len(x) > engine.max_len:
                raise APIError(400, f"an input has {len(x)} tokens; the model's context is {engine.max_len}.",
                               param="input", code="context_length_exceeded")
        return batch

    async def embed(request: Request, batch: list[list[int]]) -> list[list[float]]:
        """The vectors of ``batch``, embedded by the engine between its decode steps; the work is dropped
        when the client disconnects."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()

        def done(result: Any) -> None:
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(result))

        job = EmbedJob(batch, done)
        try:
            engine.submit_embeddings(job)
        except Overloaded as e:
            raise _busy(engine, e) from None
        except ConfigError as e:  # a model that gives no embeddings (a stateful LM)
            raise APIError(400, str(e), param="input", code="invalid_value") from None
        try:
            while not fut.done():
                await asyncio.wait([fut], timeout=0.25)
                if not fut.done() and await request.is_disconnected():
                    raise ClientDisconnect()
        finally:
            job.cancel()  # no-op once finished
        result = fut.result()
        if isinstance(result, Exception):
            raise APIError(500, f"embedding failed: {type(result).__name__}: {result}", code="embedding_failed")
        return result

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        req = parse_embeddings(await read_body(request))
        check_model(req.model)
        if len(req.inputs) > limits.max_embedding_inputs:
            raise APIError(400, f"'input' has {len(req.inputs)} items; this server embeds at most "
                           f"{limits.max_embedding_inputs} per request (--max-embedding-inputs).", param="input",
                           code="invalid_value")
        batch = await run_in_threadpool(embedding_inputs, req.inputs)
        vectors = await embed(request, batch)
        data = []
        for i, vec in enumerate(vectors):
            emb: Any = vec
            if req.encoding_format == "base64":
                emb = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode("ascii")
            data.append({"object": "embedding", "index": i, "embedding": emb})
        n = sum(len(x) for x in batch)
        return JSONResponse({"object": "list", "data": data, "model": model_id,
                             "usage": {"prompt_tokens": n, "total_tokens": n}})

    # ------------------------------------------------------------------------------------ tokenizer
    # Special-token strings in text become their ids here (as in Hugging Face tokenizers, which clients such
    # as lm-eval's remote tokenizer expect: it finds the end-of-text id by tokenizing the eos_token string).
    # zenlm tokenizers add no BOS/EOS around a text, so add_special_tokens changes nothing.
    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        req = parse_tokenize(await read_body(request))
        if req.model is not None:
            check_model(req.model)

        def encode() -> list[int]:
            text = req.prompt if req.messages is None else chat_prompt(req.messages, req.add_generation_prompt)
            return tokenizer.encode(text, allow_special=True)

        ids = await run_in_threadpool(encode)
        body: dict[str, Any] = {"count": len(ids), "max_model_len": engine.max_len, "tokens": ids}
        if req.return_token_strs:
            body["token_strs"] = [tokenizer.id_to_token(i) for i in ids]
        return JSONResponse(body)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        req = parse_detokenize(await read_body(request), model.config.vocab_size)
        if req.model is not None:
            check_model(req.model)
        return JSONResponse({"prompt": await run_in_threadpool(tokenizer.decode, req.tokens)})

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        """tokenizer_config.json (special tokens, chat template), with the context this server allows and
        the ids of the special tokens (``eos_token_id``, ...)."""
        ids = {f"{role}_token_id": getattr(tokenizer, f"{role}_id") for role in tokenizer.role_tokens
               if getattr(tokenizer, f"{role}_id", None) is not None}
        return {**tokenizer.config_dict(), "model_max_length": engine.max_len, **ids}

    return app


def end_of_turn(tokenizer: Tokenizer, templates: TemplateWorker) -> int | None:
    """The chat template's end-of-turn token (:func:`zenlm.tokenizer.end_of_turn_in`): zenlm's own templates
    end a turn with the end-of-text token; any other template is asked in its worker process (it may be hostile)."""
    if tokenizer.chat_template in (CHAT_TEMPLATE, LEGACY_CHAT_TEMPLATE):
        return tokenizer.eos_id
    try:
        return end_of_turn_in(tokenizer, templates.render(END_PROBE_MESSAGES, add_generation_prompt=False))
    except TemplateError:
        return None


class _AuthAndLog:
    """ASGI middleware: the API key check on ``/v1`` routes, one log line and the metrics of every request.

    (A plain ASGI middleware rather than ``@app.middleware("http")``, which would hide client disconnects
    from the handlers.)
    """

    def __init__(self, app: Any, api_key: str | None, metrics: Metrics, public_metrics: bool = False) -> None:
        self.app, self.api_key, self.metrics = app, api_key, metrics
        self.protected_routes = _TOKENIZER_ROUTES | (set() if public_metrics else {"/metrics"})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        path, method = scope["path"], scope["method"]
        status = {"code": 500, "started": False}

        async def send_and_watch(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            await send(message)

        protected = path.startswith("/v1") or path in self.protected_routes
        if self.api_key is not None and protected and not _bearer_ok(
            Headers(scope=scope).get("authorization"), self.api_key
        ):
            err = APIError(401, "invalid or missing API key; send 'Authorization: Bearer KEY'.",
                           code="invalid_api_key")
            await JSONResponse(err.body(), status_code=401)(scope, receive, send_and_watch)
        else:
            try:
                await self.app(scope, receive, send_and_watch)
            except (ClientDisconnect, OSError) as e:  # the client went away (mid-body, or while answered):
                if not isinstance(e, ClientDisconnect):  # not an error of the server, nobody to answer
                    log.info("%s %s: the connection failed (%s)", method, path, e)
                status["code"] = CLIENT_GONE
            except Exception:  # a bug: answer 500 in the OpenAI shape, log the traceback
                log.exception("error handling %s %s", method, path)
                if not status["started"]:
                    err = APIError(500, "internal server error", code="internal_error")
                    await JSONResponse(err.body(), status_code=500)(scope, receive, send_and_watch)
        dt = time.perf_counter() - t0
        route = path if path in _ROUTES else "other"
        self.metrics.inc("zenlm_requests_total", labels={"route": route, "code": str(status["code"])})
        self.metrics.observe("zenlm_request_seconds", dt, labels={"route": route})
        log.info("%s %s %d %.1f ms", method, path, status["code"], dt * 1000)


_TOKENIZER_ROUTES = {"/tokenize", "/detokenize", "/tokenizer_info"}
CLIENT_GONE = 499  # the status logged and counted for a request whose client disconnected (nginx's convention)


def _too_large(size: int, cap: int) -> APIError:
    return APIError(413, f"the request body has {size} bytes or more; this server takes at most {cap} "
                    "(--max-request-bytes).", code="request_too_large")
_ROUTES = {"/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions",
           "/v1/embeddings", *_TOKENIZER_ROUTES}


__all__ = ["create_app", "render_chat", "ServerThread"]

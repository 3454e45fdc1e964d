"""The batching engine: many requests decoded together by one GPT, one token per sequence per step.

Continuous batching, in the simplest form that is still correct:

    slots:   a pool of ``max_concurrency`` KV-cache rows, k/v [n_layer, slots, n_kv_head, max_len, head_dim]
    admit:   a waiting request takes the lowest free slot; its prompt is run through ``GPT.forward`` with a
             cache that is a view of that slot (prefill), and its first token is sampled. One loop prefills
             at most ``max_prefill_tokens`` prompt tokens (always at least one prompt's worth), so a burst of
             prompts is spread over several loops with a decode step for the running sequences in between
    chunks:  a prompt that fits one loop's budget is prefilled whole, in the first loop with room left for
             all of it (cut to fit the rest of a budget, its pieces would each run the model for a few rows,
             several times slower per token); a prompt longer than a whole budget starts in a loop of its own
             and is prefilled in chunks, one per loop, each written into its slot after the ones before
             (chunked prefill): the running sequences take a decode step between the chunks, so a long prompt
             does not stall their tokens
    score:   a sequence with ``prompt_logprobs`` set keeps the final hidden states of every prompt position
             from that same prefill and receives each prompt token's log-prob (and the k best) in a
             :class:`PromptEvent` before its first token; with ``max_tokens=0`` it ends right there
             (this is how ``echo`` + ``logprobs`` score a text, as evaluation harnesses ask). The head and
             the log-softmax run over a piece of positions at a time
             (:func:`~zenlm.scoring.map_logits`): a 1,024-token GPT-2 prompt's logits alone would be
             206 MB of float32, and as much again for their log-softmax
    step:    every running sequence feeds its newest token at its own position in one batched forward
             pass (:meth:`GPT.decode_step <zenlm.models.gpt.GPT.decode_step>`): each row writes its key/value at its own position
             and attends only to its own positions ``0 .. pos_b``, so sequences of different lengths share
             one matrix multiply per layer. By default (``compile=None``) the step runs the batched compiled
             programs of :mod:`zenlm.compiled` (batch sizes 1, 2, 4, 8, ... up to the slots; each built in
             the background the first time it is needed, eager steps until then); either way a sequence's
             tokens do not depend on which others share its steps
    retire:  a finished or cancelled sequence frees its slot at once; a waiting request takes it on the
             next loop
    embed:   embedding requests (:class:`EmbedJob`) wait in their own queue; each loop embeds inputs worth
             at most ``max_prefill_tokens`` (at least one input) between the prefill and the decode step, so
             a request with thousands of inputs slows the running streams by one such forward pass per
             token instead of stopping them until it is done

The engine runs on its own thread. Callers submit :class:`Sequence` objects and receive events through
the sequence's ``emit`` callback (called on the engine thread): :class:`TokenEvent` per sampled token, then
exactly one :class:`FinishEvent` or :class:`ErrorEvent` (a scored prompt's :class:`PromptEvent` comes
first). Setting ``seq.cancel()`` (a client went away) frees the work at the next step.

Sampling per sequence is :mod:`zenlm.sampling`'s pipeline (a :class:`~zenlm.sampling.Sampler` per sequence),
in OpenAI's order: penalties on the raw logits (``logits -= frequency_penalty * count + presence_penalty *
(count > 0)`` over generated tokens), log-probs from that distribution, then greedy (temperature 0) or
temperature, top-k, top-p and a draw from the sequence's own seeded generator.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from zenlm.compiled import bucket_for, decoder_for
from zenlm.device import release_openmp_workers
from zenlm.errors import ConfigError
from zenlm.generate import split_at_stop
from zenlm.models.cache import KVCache
from zenlm.models.gpt import GPT
from zenlm.sampling import Sampler, SamplingConfig
from zenlm.scoring import map_logits, score_tokens
from zenlm.serve.metrics import Metrics
from zenlm.tokenizer import Tokenizer

log = logging.getLogger("zenlm.serve.engine")

# Prompt tokens prefilled per loop by default (chunked prefill, see the module docstring). Each loop's prefill
# pauses the running streams once: a smaller budget makes each pause shorter but spreads a burst of prompts over
# more loops, and a stream then waits through several of them. Serving GPT-2-small to 16 clients at once on a
# 2-core Xeon (benchmarks/serve_load.py, docs/BENCHMARKS.md), 1024 against 256: p99 inter-token latency 62
# against 132 ms (bf16) and 152 against 317 ms (fp32), p99 time to first token 0.90 against 1.04 s and 1.38
# against 1.57 s, the same tokens/s. A 1024-token prompt arriving while streams run pauses them for its whole
# prefill (about 0.25 s in bf16, 0.7 s in fp32 there); --max-prefill-tokens sets it.
PREFILL_CHUNK = 1024


class Overloaded(Exception):
    """Every slot is busy and the waiting queue is full (HTTP 429)."""


@dataclass
class SamplingParams:
    """How one sequence picks its tokens and when it ends (validated by zenlm.serve.schema)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's log-prob and the k best
    prompt_logprobs: int | None = None  # None: none; k >= 0: score the prompt too (a PromptEvent), k best

    def sampling(self) -> SamplingConfig:
        """The settings of the sampling pipeline (validated: a bad value raises ConfigError)."""
        return SamplingConfig(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=self.seed,
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                              logprobs=self.logprobs)


@dataclass
class TokenEvent:
    """One sampled token: the text it completed (may be "" while held back) and optional log-probs."""

    token_id: int
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class PromptEvent:
    """The prompt's own tokens scored (``SamplingParams.prompt_logprobs``): for each prompt token its
    log-prob given the tokens before it and the k most likely tokens there. The first token has nothing
    before it: its entries are None. Token and top log-probs are read from one float32 tensor, so a
    token that is the most likely one has exactly the value of the best top entry."""

    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]


@dataclass
class FinishEvent:
    finish_reason: str  # "stop" | "length"
    text: str  # text released at the end (held-back text that turned out not to start a stop string)
    prompt_tokens: int
    completion_tokens: int


@dataclass
class ErrorEvent:
    message: str


Event = PromptEvent | TokenEvent | FinishEvent | ErrorEvent


class EmbedJob:
    """The inputs of one embedding request and where its vectors go.

    ``done(result)`` is called once, on the engine thread: with one vector per input (n_embd floats, the
    mean of the final-norm hidden states over the input's tokens), or with the exception that failed it.
    ``cancel()`` (the client went away) drops the inputs not embedded yet."""

    def __init__(self, inputs: list[list[int]], done: Callable[[list[list[float]] | Exception], None]) -> None:
        self.inputs = inputs
        self.done = done
        self.vectors: list[list[float]] = []  # of inputs[: len(vectors)]
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()


class Sequence:
    """One generation request (one choice): prompt ids, sampling parameters and where events go."""

    def __init__(
        self, prompt_ids: list[int], params: SamplingParams, emit: Callable[[Event], None], *,
        skip_special: bool = False,
    ) -> None:
        self.prompt_ids = list(prompt_ids)
        self.skip_special = skip_special  # leave special tokens (e.g. <|bos|>) out of the text
        self.params = params
        self.emit = emit
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()
        # engine state
        self.slot = -1
        self.pos = 0  # positions filled in this sequence's cache row
        self.n_generated = 0
        self.last_token = 0
        self.next_logits: Tensor | None = None
        self.prefilled = 0  # prompt positions already in the cache row (a prompt prefilled in chunks)
        self.prefilling = False  # True while a chunked prefill is under way (no decode steps yet)
        self.sampler: Sampler | None = None
        self.decoder = None
        self.pending = ""
        self.last_token_time = 0.0
        self.done = False  # its FinishEvent or ErrorEvent was sent

    def cancel(self) -> None:
        """Stop generating (e.g. the client disconnected); the slot is freed at the next step."""
        self.cancelled.set()


class Engine:
    """Continuous-batching generation over one GPT on a background thread (see the module docstring).

    max_concurrency: sequences decoded together (KV-cache slots); max_queue: sequences allowed to wait
    for a slot (default: max_concurrency); beyond both, :meth:`submit` raises :class:`Overloaded`.
    max_len: positions per slot (default: the model's block_size). max_prefill_tokens: prompt tokens prefilled
    per loop before the running sequences take their next step (default: ``PREFILL_CHUNK``; a prompt that fits
    it is prefilled whole, in one loop; a longer one in chunks of it, one per loop). compile: how decode steps run (see
    :func:`zenlm.compiled.decoder_for`): None (default) the batched compiled programs, built in the
    background; True the same, each waiting for its build on first use; False eager. invariant: True (default):
    every step goes through the batched programs, so what a request gets does not depend on which requests share
    its steps; False: a step with one running stream (in slot 0) takes the one-sequence program that
    ``generate`` uses (its own loops: faster, up to 2.3x on a CPU), whose sums round differently from a batched
    step's in the last bits, so a request's tokens can then depend, at near-ties, on whether it ran alone.
    A sequence stops at the tokenizer's end-of-text token and at any of ``stop_ids`` (the chat template's
    end-of-turn token, set by the app).
    """

    stop_ids: frozenset[int] = frozenset()

    def __init__(
        self, model: GPT, tokenizer: Tokenizer, *, max_concurrency: int = 8, max_queue: int | None = None,
        max_len: int | None = None, metrics: Metrics | None = None, max_prefill_tokens: int | None = None,
        compile: bool | None = None, invariant: bool = True,
    ) -> None:
        if max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be >= 1, got {max_concurrency}.")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_concurrency = max_concurrency
        self.max_queue = max_concurrency if max_queue is None else max_queue
        if self.max_queue < 0:
            raise ConfigError(f"max_queue must be >= 0, got {self.max_queue}.")
        self.max_len = model.config.block_size if max_len is None else min(max_len, model.config.block_size)
        self.max_prefill_tokens = PREFILL_CHUNK if max_prefill_tokens is None else max_prefill_tokens
        if self.max_prefill_tokens < 1:
            raise ConfigError(f"max_prefill_tokens must be >= 1, got {self.max_prefill_tokens}.")
        self.decoder = decoder_for(self.model, compile)  # None: eager steps
        self.invariant = invariant
        self.metrics = metrics or Metrics()
        self.pool = model.make_cache(max_concurrency, self.max_len)  # row i = slot i
        # All of the pool's memory now (a CPU cache takes it only as it is written, KVCache.reserve): a server that
        # starts can hold every slot it admits, rather than running out of memory under load; and a slot's first
        # requests do not wait for the OS to hand out its pages (on our 2-core VM they decoded up to 20% slower).
        if isinstance(self.pool, KVCache):
            self.pool.reserve(slice(None), 0, self.max_len)
        self.row0 = ([t[:1] for t in self.pool.k], [t[:1] for t in self.pool.v])  # slot 0 alone (views)
        self.device = self.pool.device
        self.slots: list[Sequence | None] = [None] * max_concurrency
        self.waiting: deque[Sequence] = deque()
        self.embed_jobs: deque[EmbedJob] = deque()
        self.lock = threading.Lock()  # guards waiting/slots bookkeeping
        self.model_lock = threading.Lock()  # one user of the model at a time (decode loop, embeddings)
        self.wake = threading.Condition(self.lock)
        self.steps = 0  # batched decode steps taken (tests read it)
        self.max_batch_seen = 0
        self._stop = False
        self._calls: deque[tuple[Callable[[], None], threading.Event, list[BaseException]]] = deque()
        # The engine's thread is to be the process's only computing thread: the OpenMP workers of the thread that
        # built the model would otherwise make every parallel region of the engine's steps sleep and wake
        # (zenlm.device.release_openmp_workers; a 16-row step 1.75x slower on a 2-core CPU).
        release_openmp_workers()
        self._thread = threading.Thread(target=self._loop, name="zenlm-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------- public API
    @property
    def running(self) -> int:
        return sum(s is not None for s in self.slots)

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue sequences (all or none). Raises Overloaded when they do not fit, ConfigError when a
        prompt leaves no room in the context (a prompt that is only scored, ``max_tokens=0``, may fill it)."""
        for s in seqs:
            if not s.prompt_ids:
                raise ConfigError("the prompt is empty; send at least one token.")
            T = len(s.prompt_ids)
            if T > self.max_len or (T == self.max_len and s.params.max_tokens > 0):
                raise ConfigError(
                    f"the prompt has {len(s.prompt_ids)} tokens but the model's context is {self.max_len} "
                    "tokens (prompt and completion together); shorten the prompt."
                )
            if max(s.prompt_ids) >= self.model.config.vocab_size or min(s.prompt_ids) < 0:
                raise ConfigError(f"prompt token ids must be in 0..{self.model.config.vocab_size - 1}.")
            s.params.sampling()  # refused here, not inside the loop where it would fail the other sequences
        with self.lock:
            if len(self.waiting) + self.running + len(seqs) > self.max_concurrency + self.max_queue:
                raise Overloaded("the server is busy: every slot and queue place is taken; retry shortly.")
            self.waiting.extend(seqs)
            self.metrics.set_gauge("zenlm_queue_depth", len(self.waiting))
            self.wake.notify()

    def submit_embeddings(self, job: EmbedJob) -> None:
        """Queue an embedding request (its inputs: non-empty id lists of at most max_len ids, checked by
        the caller). Raises Overloaded when max_concurrency + max_queue requests already wait."""
        with self.lock:
            if self._stop:
                raise Overloaded("the server is shutting down.")
            if len(self.embed_jobs) >= self.max_concurrency + self.max_queue:
                raise Overloaded("the server is busy: too many embedding requests wait; retry shortly.")
            self.embed_jobs.append(job)
            self.wake.notify()

    def prepare(self) -> None:
        """Make the compiled programs of every batch size this engine can step (1, 2, 4, ... up to its slots)
        ready now rather than on first need, as a server start may (like capturing CUDA graphs): built or
        loaded in the background unless ``compile=True``; ``engine.decoder.wait()`` waits for them. The
        warm-up steps write into free slots only; call it before submitting. A no-op when decoding eagerly."""
        decoder = getattr(self, "decoder", None)  # an engine of another kind (stateful models) has none
        if decoder is None:
            return

        def warm_up() -> None:
            sizes = sorted({bucket_for(rows, self.max_concurrency) for rows in range(1, self.max_concurrency + 1)})
            # queued together, the programs missing on disk are built by one process, not one process each
            decoder.prepare(self.pool.k, sizes, batched=True)
            for rows in sizes:
                ones_B = torch.ones(rows, dtype=torch.long, device=self.device)
                decoder(ones_B, ones_B, self.pool.k, self.pool.v, batched=True)
            if not self.invariant:  # the lone stream's one-sequence program
                decoder.prepare(self.row0[0])

        self._on_engine_thread(warm_up)

    def _on_engine_thread(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the engine's thread, between its steps, and wait for it (its exception is raised here):
        the model computes on that thread only (see ``release_openmp_workers`` in ``__init__``)."""
        if threading.current_thread() is self._thread:  # already there (e.g. from an event callback)
            with torch.inference_mode():
                fn()
            return
        done, error = threading.Event(), []
        with self.lock:
            if self._stop:
                raise RuntimeError("the engine is closed.")
            self._calls.append((fn, done, error))
            self.wake.notify()
        done.wait()
        if error:
            raise error[0]

    def embed(self, batch: list[list[int]]) -> list[list[float]]:
        """Embed ``batch`` through the queue and wait: one vector of n_embd floats per id list."""
        result: list = []
        finished = threading.Event()
        self.submit_embeddings(EmbedJob(batch, lambda r: (result.append(r), finished.set())))
        finished.wait()
        if isinstance(result[0], Exception):
            raise result[0]
        return result[0]

    def close(self) -> None:
        """Stop the engine thread; running and waiting sequences get an ErrorEvent."""
        with self.lock:
            self._stop = True
            self.wake.notify()
        self._thread.join(timeout=10)

    # -------------------------------------------------------------------------------------- the loop
    def _loop(self) -> None:
        while True:
            with self.lock:
                while (not self._stop and not self.waiting and self.running == 0 and not self.embed_jobs
                       and not self._calls):
                    self.wake.wait()
                if self._stop:
                    pending = list(self.waiting) + [s for s in self.slots if s is not None]
                    self.waiting.clear()
                    jobs = list(self.embed_jobs)
                    self.embed_jobs.clear()
                    calls = list(self._calls)
                    self._calls.clear()
                    break
                call = self._calls.popleft() if self._calls else None
                if call is None:
                    chunks = self._plan_chunks()  # prompts already under way first
                    admit, chunked = self._admit(self.max_prefill_tokens - sum(n for _, n in chunks))
                    chunks += chunked
                    self.metrics.set_gauge("zenlm_queue_depth", len(self.waiting))
            if call is not None:  # work handed over by _on_engine_thread
                fn, done, error = call
                try:
                    with self.model_lock, torch.inference_mode():
                        fn()
                except BaseException as e:  # raised again in the caller, who waits for it
                    error.append(e)
                done.set()
                continue
            try:
                with self.model_lock:
                    by_len: dict[tuple[int, bool], list[Sequence]] = {}  # (length, scored) -> prompts
                    for seq in admit:
                        if not seq.cancelled.is_set():
                            key = (len(seq.prompt_ids), seq.params.prompt_logprobs is not None)
                            by_len.setdefault(key, []).append(seq)
                    for group in by_len.values():
                        self._prefill(group)
                    for seq, n in chunks:
                        if not seq.cancelled.is_set():
                            self._isolated(seq, self._prefill_chunk, seq, n)
                    self._embed_some()
                    self._retire_cancelled()
                    if self.running:
                        self._decode()
                    self._retire_cancelled()
                self.metrics.set_gauge("zenlm_running_sequences", self.running)
            except Exception as e:  # the batched decode step itself failed (a bug, out of memory): no one
                log.exception("engine step failed")  # sequence is to blame, so every running one fails
                for seq in [s for s in self.slots if s is not None]:
                    self._fail(seq, e)
        for seq in pending:
            seq.emit(ErrorEvent("the server is shutting down."))
        for job in jobs:
            job.done(RuntimeError("the server is shutting down."))
        for _, done, error in calls:
            error.append(RuntimeError("the engine is closed."))
            done.set()

    # ------------------------------------------------------------------------------------ embeddings
    def _embed_some(self) -> None:
        """Embed the next inputs of the first embedding request, worth at most max_prefill_tokens tokens
        (at least one input); inputs of one length share a forward pass. A request whose work raises gets
        the exception; the others go on."""
        with self.lock:
            while self.embed_jobs and self.embed_jobs[0].cancelled.is_set():
                self.embed_jobs.popleft()
            if not self.embed_jobs:
                return
            job = self.embed_jobs[0]
        start = len(job.vectors)
        end, budget = start, self.max_prefill_tokens
        while end < len(job.inputs) and (end == start or len(job.inputs[end]) <= budget):
            budget -= len(job.inputs[end])
            end += 1
        try:
            job.vectors.extend(self._embed_rows(job.inputs[start:end]))
        except Exception as e:
            log.exception("embedding failed")
            self._end_embed_job(job, e)
            return
        if len(job.vectors) == len(job.inputs):
            self._end_embed_job(job, job.vectors)

    def _end_embed_job(self, job: EmbedJob, result: list[list[float]] | Exception) -> None:
        with self.lock:
            if self.embed_jobs and self.embed_jobs[0] is job:
                self.embed_jobs.popleft()
        job.done(result)

    @torch.inference_mode()
    def _embed_rows(self, inputs: list[list[int]]) -> list[list[float]]:
        """Mean of the final-norm hidden states over each input's tokens -> one vector of n_embd floats each
        (inputs of one length in one forward pass)."""
        captured: list[Tensor] = []
        hook = self.model.norm_f.register_forward_hook(lambda _m, _i, out: captured.append(out))
        out: dict[int, list[float]] = {}
        by_len: dict[int, list[int]] = {}
        for i, ids in enumerate(inputs):
            by_len.setdefault(len(ids), []).append(i)
        try:
            for rows in by_len.values():
                captured.clear()
                self.model(torch.tensor([inputs[i] for i in rows], device=self.device))
                for b, vec in zip(rows, captured[-1].float().mean(1).tolist(), strict=True):
                    out[b] = vec
        finally:
            hook.remove()
        return [out[i] for i in range(len(inputs))]

    def _plan_chunks(self) -> list[tuple[Sequence, int]]:
        """The next chunk of each prompt whose chunked prefill is under way, oldest first, within one loop's
        budget of prompt tokens -> [(sequence, tokens)]. Called with the lock held."""
        budget, out = self.max_prefill_tokens, []
        for seq in sorted((s for s in self.slots if s is not None and s.prefilling), key=lambda s: s.submitted):
            if budget <= 0:
                break
            n = min(len(seq.prompt_ids) - seq.prefilled, budget)
            out.append((seq, n))
            budget -= n
        return out

    def _admit(self, budget: int) -> tuple[list[Sequence], list[tuple[Sequence, int]]]:
        """Give waiting sequences free slots, in order, while ``budget`` prompt tokens are left -> (prompts
        prefilled whole, [(prompt, first chunk)] prefilled in chunks). The first prompt of a loop that prefills
        nothing else is always taken: whole when it fits the budget or is scored (a scored prompt keeps its
        logits), else in chunks of the budget. After it, a prompt is taken only when all of it fits what is
        left; the first that does not waits for the next loop, and so do the ones behind it (first come, first
        served). Called with the lock held."""
        first = budget == self.max_prefill_tokens  # nothing prefilled yet in this loop
        whole: list[Sequence] = []
        chunked: list[tuple[Sequence, int]] = []
        for i in range(self.max_concurrency):
            if self.slots[i] is not None or not self.waiting:
                continue
            seq = self.waiting[0]
            T, scored = len(seq.prompt_ids), seq.params.prompt_logprobs is not None
            if T > budget and not first:
                break
            self.waiting.popleft()
            seq.slot, self.slots[i] = i, seq
            if T <= budget or scored:
                whole.append(seq)
            else:
                seq.prefilling = True
                chunked.append((seq, budget))  # a whole loop's budget: it is the loop's first
            budget -= T
            first = False
        return whole, chunked

    def _retire_cancelled(self) -> None:
        with self.lock:
            for i, seq in enumerate(self.slots):
                if seq is not None and seq.cancelled.is_set():
                    self.slots[i] = None
                    self.metrics.inc("zenlm_cancelled_sequences_total")

    # ---------------------------------------------------------------------- one sequence's failure
    # What one sequence asks for (its seed, its sampling settings, its prompt) can make only its own work
    # raise: its set-up, its prefill and its token choice run inside _isolated, so the exception ends that
    # sequence with an ErrorEvent and the others go on.
    def _fail(self, seq: Sequence, e: BaseException) -> None:
        """End ``seq`` with an ErrorEvent (once) and free its slot."""
        self._free(seq)
        if not seq.done:
            seq.done = True
            try:
                seq.emit(ErrorEvent(f"generation failed: {type(e).__name__}: {e}"))
            except Exception:  # the sequence's own receiver is what failed: nobody left to tell
                log.exception("could not report a failed sequence")

    def _isolated(self, seq: Sequence, fn: Callable[..., None], *args: object) -> bool:
        """``fn(*args)``, the work of ``seq`` alone; when it raises, only ``seq`` fails. True when it ran."""
        try:
            fn(*args)
            return True
        except Exception as e:
            log.exception("sequence failed; the others go on")
            self._fail(seq, e)
            return False

    def _free(self, seq: Sequence) -> None:
        with self.lock:
            if 0 <= seq.slot < len(self.slots) and self.slots[seq.slot] is seq:
                self.slots[seq.slot] = None

    @torch.inference_mode()
    def _prefill_chunk(self, seq: Sequence, n: int) -> None:
        """Prefill the next ``n`` prompt tokens of ``seq`` into its slot, after the ``seq.prefilled`` already
        there; after the last chunk, sample its first token (it joins the decode steps). The work of ``seq``
        alone: the loop runs it isolated (an exception fails only this sequence)."""
        if seq.prefilled == 0:
            if seq.params.max_tokens == 0:  # nothing to generate (a scored prompt never comes here)
                seq.prefilling = False
                self._start(seq)
                self._finish(seq, "length")
                return
            self._start(seq)
        start, T = seq.prefilled, len(seq.prompt_ids)
        cache = self.pool.row(seq.slot)
        cache.pos = start
        ids_1N = torch.tensor([seq.prompt_ids[start : start + n]], device=self.device)
        logits_1NV = self.model(ids_1N, cache=cache, last_only=True)
        seq.prefilled = start + ids_1N.shape[1]
        if seq.prefilled == T:
            seq.prefilling, seq.pos = False, T
            self._advance(seq, logits_1NV[0, -1])

    @torch.inference_mode()
    def _prefill(self, group: list[Sequence]) -> None:
        """Run the prompts of ``group`` (all of one length T, all scored or none) through the model in one
        batch, copy their keys/values into their slots, and sample each one's first token (scoring the
        prompts first when asked)."""
        group = [seq for seq in group if self._isolated(seq, self._start, seq)]
        todo = [s for s in group if s.params.max_tokens > 0 or s.params.prompt_logprobs is not None]
        for seq in group:
            if seq not in todo:
                self._finish(seq, "length")
        if todo:
            self._prefill_rows(todo, todo[0].params.prompt_logprobs is not None)

    def _start(self, seq: Sequence) -> None:
        """Set up the sampling state of ``seq`` as it leaves the queue: its sampler (seeded generator, counts)
        and its stream decoder."""
        seq.sampler = Sampler(seq.params.sampling(), self.model.config.vocab_size, device=self.device)
        seq.decoder = self.tokenizer.stream_decoder(skip_special=seq.skip_special)
        self.metrics.observe("zenlm_queue_seconds", time.perf_counter() - seq.submitted)
        self.metrics.inc("zenlm_prompt_tokens_total", len(seq.prompt_ids))

    def _prefill_rows(self, todo: list[Sequence], scored: bool) -> None:
        """One forward pass over the prompts ``todo`` (one length T); see :meth:`_prefill`. When the batched
        pass raises, the prompts are run one at a time, so only a prompt that fails alone fails."""
        T = len(todo[0].prompt_ids)
        events: list[PromptEvent | None] = [None] * len(todo)
        try:
            if len(todo) == 1:  # write straight into the slot
                cache = self.pool.row(todo[0].slot)
            else:
                cache = self.model.make_cache(len(todo), T, device=self.device, dtype=self.pool.dtype)
            ids_BT = torch.tensor([s.prompt_ids for s in todo], device=self.device)
            if scored:  # the head runs over a piece of positions at a time, here
                events, last_BV = self._score_prompts(todo, ids_BT, self.model.features(ids_BT, cache=cache))
            else:
                last_BV = self.model(ids_BT, cache=cache, last_only=True)[:, -1]
        except Exception as e:
            if len(todo) == 1:
                log.exception("prefill failed")
                self._fail(todo[0], e)
            else:
                for seq in todo:
                    self._prefill_rows([seq], scored)
            return
        for b, seq in enumerate(todo):
            self._isolated(seq, self._first_token, seq, b, cache, T, last_BV[b], events[b], len(todo) > 1)

    def _first_token(self, seq: Sequence, b: int, cache: KVCache, T: int, last_V: Tensor,
                     event: PromptEvent | None, copy: bool) -> None:
        """After the prefill: send the prompt's scores (``event``, when asked), copy row ``b`` of a batch
        ``cache`` into the slot of ``seq`` (when ``copy``) and sample its first token from ``last_V``."""
        if event is not None:
            seq.emit(event)
            if seq.params.max_tokens == 0:
                self._finish(seq, "length")
                return
        if copy:
            for pool_layer, layer in zip(self.pool.k + self.pool.v, cache.k + cache.v, strict=True):
                pool_layer[seq.slot, :, :T] = layer[b]
        seq.pos = T
        self._advance(seq, last_V)

    def _score_prompts(self, todo: list[Sequence], ids_BT: Tensor,
                       h_BTC: Tensor) -> tuple[list[PromptEvent | None], Tensor]:
        """Score the prompts of one prefill (B rows of T positions) from their final hidden states ``h_BTC``:
        the head and the log-softmax run over a piece of positions at a time, across the rows (the head's
        matrix is read once a piece, not once a prompt) -> (each prompt's :class:`PromptEvent`, the last
        position's logits of each row [B, V])."""
        B, T, C = h_BTC.shape
        k = max(seq.params.prompt_logprobs or 0 for seq in todo)
        targets_N = ids_BT.roll(-1, dims=1).reshape(-1)  # position t predicts token t + 1 (a row's last: unused)

        def score(rows: slice, logits_nV: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            scores = score_tokens(logits_nV, targets_N[rows], k)
            ends = torch.arange(rows.start, rows.start + len(logits_nV), device=logits_nV.device) % T == T - 1
            return scores.logprob_T, scores.top_logprob_TK, scores.top_id_TK, logits_nV[ends]  # (a copy)

        lp, top_lp, top_id, last = zip(*map_logits(self.model.inference_head, h_BTC.reshape(B * T, C),
                                                   self.model.config.vocab_size, score), strict=True)
        lp_BT, top_lp_BTK, top_id_BTK = torch.cat(lp).view(B, T), torch.cat(top_lp).view(B, T, -1), \
            torch.cat(top_id).view(B, T, -1)
        events: list[PromptEvent | None] = [
            self._prompt_event(seq, lp_BT[b], top_lp_BTK[b], top_id_BTK[b]) for b, seq in enumerate(todo)]
        return events, torch.cat(last)

    @staticmethod
    def _prompt_event(seq: Sequence, lp_T: Tensor, top_lp_TK: Tensor, top_id_TK: Tensor) -> PromptEvent:
        """The :class:`PromptEvent` of ``seq`` from its positions' scores (:func:`~zenlm.scoring.score_tokens`
        of position t against prompt token t + 1; a last position's entry, if any, is left out): token t
        has nothing before it at t = 0, and the k best there as its ``prompt_logprobs`` asks."""
        T, k = len(seq.prompt_ids), seq.params.prompt_logprobs or 0
        # JSON has no -inf: a token the model rules out gets -9999, in both lists alike (they stay equal)
        lp = torch.nan_to_num(lp_T[: T - 1], neginf=-9999.0).tolist()
        ids, lps = top_id_TK[: T - 1, :k].tolist(), torch.nan_to_num(top_lp_TK[: T - 1, :k], neginf=-9999.0).tolist()
        top = [list(zip(i, p, strict=True)) for i, p in zip(ids, lps, strict=True)]
        return PromptEvent(list(seq.prompt_ids), [None, *lp], [None, *top])

    @torch.inference_mode()
    def _decode(self) -> None:
        hi = max(i for i, s in enumerate(self.slots) if s is not None) + 1  # rows 0..hi-1 (free rows idle)
        active = [(i, s) for i, s in enumerate(self.slots[:hi]) if s is not None and not s.prefilling]
        if not active:
            return
        tokens = [0] * hi
        positions = [0] * hi
        for i, s in enumerate(self.slots[:hi]):
            if s is not None and s.prefilling:  # idle this step: write where its next chunk writes over
                positions[i] = s.prefilled
        for i, s in active:
            tokens[i], positions[i] = s.last_token, s.pos
        tokens_B = torch.tensor(tokens, device=self.device)
        pos_B = torch.tensor(positions, device=self.device)
        logits_BV = self._step(tokens_B, pos_B)
        self.steps += 1
        self.max_batch_seen = max(self.max_batch_seen, len(active))
        for i, s in active:
            s.pos += 1
            self._isolated(s, self._advance, s, logits_BV[i])

    def _step(self, tokens_B: Tensor, pos_B: Tensor) -> Tensor:
        """One decode step of pool rows 0..B-1 -> logits [B, V]: through the batched compiled programs (eager
        until the one for this batch size is ready), or eagerly. Either way each row attends over exactly its
        own keys and its logits do not depend on the other rows, so what a request gets does not depend on
        which requests share its steps (with one masked eager call, bf16 rows would differ in the last bits).
        Except fp32 on an Intel CPU, whose products are MKL's (faster for a lone stream): a row's last bits
        there change with the number of rows; ``ZENLM_ONEDNN=1`` makes them bit-equal (zenlm.models.layers)."""
        if self.decoder is not None:
            if not self.invariant and tokens_B.shape[0] == 1:  # one stream, in slot 0: generate's program
                return self.decoder(tokens_B, pos_B, *self.row0)
            return self.decoder(tokens_B, pos_B, self.pool.k, self.pool.v, batched=True)
        return self.model.decode_step(tokens_B, pos_B, self.pool.k, self.pool.v, row_attention=True)

    def _advance(self, seq: Sequence, logits_V: Tensor) -> None:
        """Sample the next token of ``seq`` from logits_V [V], emit it, and finish the sequence if done."""
        p = seq.params
        assert seq.sampler is not None and seq.decoder is not None
        choice = seq.sampler.choose(logits_V)
        token = choice.token
        seq.n_generated += 1
        seq.last_token = token
        now = time.perf_counter()
        if seq.n_generated == 1:
            self.metrics.observe("zenlm_time_to_first_token_seconds", now - seq.submitted)
        else:
            self.metrics.observe("zenlm_inter_token_seconds", now - seq.last_token_time)
        seq.last_token_time = now
        self.metrics.inc("zenlm_completion_tokens_total")

        lp, top = choice.logprob, choice.top_logprobs
        if lp is not None and math.isinf(lp):
            lp = -9999.0  # JSON has no -inf

        eos = self.tokenizer.eos_id
        if (eos is not None and token == eos) or token in self.stop_ids:
            seq.emit(TokenEvent(token, "", lp, top))
            self._finish(seq, "stop")
            return
        seq.pending += seq.decoder.push(token)
        ready, seq.pending, stopped = split_at_stop(seq.pending, p.stop, final=False)
        seq.emit(TokenEvent(token, ready, lp, top))
        if stopped:
            self._finish(seq, "stop", flush=False)
        elif seq.n_generated >= p.max_tokens or seq.pos >= self.max_len:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str, flush: bool = True) -> None:
        tail = ""
        if flush and seq.decoder is not None:
            tail, _, stopped = split_at_stop(seq.pending + seq.decoder.flush(), seq.params.stop, final=True)
            reason = "stop" if stopped else reason
        seq.pending = ""
        self._free(seq)
        self.metrics.inc("zenlm_finished_sequences_total", labels={"finish_reason": reason})
        seq.done = True
        seq.emit(FinishEvent(reason, tail, len(seq.prompt_ids), seq.n_generated))


__all__ = ["EmbedJob", "Engine", "Sequence", "SamplingParams", "PromptEvent", "TokenEvent", "FinishEvent",
           "ErrorEvent", "Overloaded"]

"""The batching engine for stateful language models (n-gram, MLP, LSTM / GRU): one state row per sequence.

A stateful model has no KV cache and no context window: ``logits_BTV, state = model(ids_BT, state)``, and the
state holds all it keeps of a text (:mod:`zenlm.stateful`). So its continuous batching is simpler than a GPT's:

    slots:   a pool of ``max_concurrency`` state rows, ``model.init_state(max_concurrency)`` (every state
             tensor has the batch first; row i = slot i)
    admit:   a waiting request takes the lowest free slot; its prompt is read in chunks of ``PREFILL_CHUNK``
             tokens with the state passed on (its end state goes into the slot's row) and its first token is
             sampled. One loop admits prompts worth at most ``max_prefill_tokens`` (always at least one)
    score:   a prompt with ``prompt_logprobs`` keeps the logits of all its positions and receives each prompt
             token's log-prob (and the k best) in a PromptEvent before its first token
    step:    the newest tokens of all running sequences go through the model in one call, with the state rows
             of their slots gathered into one batch; the new states are written back to the same rows
    retire:  a finished or cancelled sequence frees its slot (its row is overwritten by the next prefill)

The public interface is :class:`~zenlm.serve.engine.Engine`'s (``submit``, ``close``, ``running``, the same
:class:`~zenlm.serve.engine.Sequence` objects and events), and so is the per-sequence work it inherits:
sampling, stop strings, log-probs, finishing and failing one sequence alone. What differs is only the loop
above, kept apart from the KV-cache engine's decode path. Embeddings are refused: these models have no hidden
states to pool into a text vector.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

import torch
from torch import Tensor

from zenlm.device import model_device, release_openmp_workers
from zenlm.errors import ConfigError
from zenlm.scoring import score_tokens
from zenlm.serve.engine import EmbedJob, Engine, ErrorEvent, Sequence
from zenlm.serve.metrics import Metrics
from zenlm.stateful import select_rows
from zenlm.tokenizer import Tokenizer

log = logging.getLogger("zenlm.serve.engine")

# Positions of one sequence (prompt and completion) by default. A stateful model has no window, so this only
# bounds the work one request can ask for (and is the context length the server reports).
STATEFUL_MAX_LEN = 1 << 16
# Prompt tokens read per call while prefilling (the logits of a chunk, [1, T, V] floats, are what costs memory)
PREFILL_CHUNK = 1024


class StatefulEngine(Engine):
    """Continuous batching of a stateful LM on a background thread (see the module docstring).

    max_concurrency: sequences decoded together (state rows); max_queue: sequences allowed to wait for a slot
    (default: max_concurrency); beyond both, :meth:`submit` raises :class:`~zenlm.serve.engine.Overloaded`.
    max_len: positions per sequence, prompt and completion (default STATEFUL_MAX_LEN). max_prefill_tokens:
    prompt tokens admitted per loop before the running sequences take their next step (default PREFILL_CHUNK).
    compile: only None or False (a stateful model decodes eagerly).
    """

    def __init__(
        self, model: torch.nn.Module, tokenizer: Tokenizer, *, max_concurrency: int = 8, max_queue: int | None = None,
        max_len: int | None = None, metrics: Metrics | None = None, max_prefill_tokens: int | None = None,
        compile: bool | None = None, invariant: bool = True,
    ) -> None:
        # Engine.__init__ is not called: it builds a KV-cache pool and decoding programs this model has no use for.
        if max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be >= 1, got {max_concurrency}.")
        if compile:
            raise ConfigError("compile builds the KV-cache decode step of Transformer models; a stateful model "
                              "(n-gram, MLP, LSTM) decodes through its state: serve it without compiling.")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_concurrency = max_concurrency
        self.max_queue = max_concurrency if max_queue is None else max_queue
        if self.max_queue < 0:
            raise ConfigError(f"max_queue must be >= 0, got {self.max_queue}.")
        self.max_len = STATEFUL_MAX_LEN if max_len is None else max_len
        self.max_prefill_tokens = PREFILL_CHUNK if max_prefill_tokens is None else max_prefill_tokens
        self.metrics = metrics or Metrics()
        self.device = model_device(model)
        with torch.inference_mode():
            self.pool = model.init_state(max_concurrency, self.device)  # row i = slot i
        self.slots: list[Sequence | None] = [None] * max_concurrency
        self.waiting: deque[Sequence] = deque()
        self.embed_jobs: deque[EmbedJob] = deque()  # stays empty: embeddings are refused
        self.lock = threading.Lock()
        self.model_lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.steps = 0
        self.max_batch_seen = 0
        self._stop = False
        release_openmp_workers()  # the engine's thread is the one that computes (see Engine.__init__)
        self._thread = threading.Thread(target=self._loop, name="zenlm-stateful-engine", daemon=True)
        self._thread.start()

    def submit_embeddings(self, job: EmbedJob) -> None:
        """Refused (ConfigError): a stateful LM gives no text embeddings."""
        raise ConfigError(f"this model ({type(self.model).__name__}, a stateful language model) gives no "
                          "embeddings; /v1/embeddings needs a GPT or BERT model.")

    # -------------------------------------------------------------------------------------- the loop
    def _loop(self) -> None:
        while True:
            with self.lock:
                while not self._stop and not self.waiting and self.running == 0:
                    self.wake.wait()
                if self._stop:
                    pending = list(self.waiting) + [s for s in self.slots if s is not None]
                    self.waiting.clear()
                    break
                admit: list[Sequence] = []
                budget = self.max_prefill_tokens  # prompt tokens this loop may read (at least one prompt)
                for i in range(self.max_concurrency):
                    if self.slots[i] is None and self.waiting:
                        if admit and len(self.waiting[0].prompt_ids) > budget:
                            break
                        budget -= len(self.waiting[0].prompt_ids)
                        seq = self.waiting.popleft()
                        seq.slot, self.slots[i] = i, seq
                        admit.append(seq)
                self.metrics.set_gauge("zenlm_queue_depth", len(self.waiting))
            try:
                with self.model_lock:
                    for seq in admit:
                        if not seq.cancelled.is_set():
                            self._isolated(seq, self._prefill_one, seq)
                    self._retire_cancelled()
                    if self.running:
                        self._decode()
                    self._retire_cancelled()
                self.metrics.set_gauge("zenlm_running_sequences", self.running)
            except Exception as e:  # the batched step itself failed: every running sequence fails
                log.exception("engine step failed")
                for seq in [s for s in self.slots if s is not None]:
                    self._fail(seq, e)
        for seq in pending:
            seq.emit(ErrorEvent("the server is shutting down."))

    @torch.inference_mode()
    def _prefill_one(self, seq: Sequence) -> None:
        """Read the prompt of ``seq`` into its slot's state row (chunk by chunk, the state passed on), score it when
        asked, and sample its first token."""
        self._start(seq)
        p = seq.params
        if p.max_tokens == 0 and p.prompt_logprobs is None:
            self._finish(seq, "length")
            return
        ids_T = torch.tensor(seq.prompt_ids, device=self.device)
        state, kept = None, []
        for i in range(0, len(ids_T), PREFILL_CHUNK):
            logits_1TV, state = self.model(ids_T[None, i : i + PREFILL_CHUNK], state)
            kept.append(logits_1TV[0] if p.prompt_logprobs is not None else logits_1TV[0, -1:])
        logits_TV = torch.cat(kept)
        if p.prompt_logprobs is not None:
            scores = score_tokens(logits_TV[:-1], ids_T[1:], p.prompt_logprobs)
            seq.emit(self._prompt_event(seq, scores.logprob_T, scores.top_logprob_TK, scores.top_id_TK))
            if p.max_tokens == 0:
                self._finish(seq, "length")
                return
        for row_BS, new_1S in zip(self.pool, state, strict=True):
            row_BS[seq.slot] = new_1S[0]
        seq.pos = len(ids_T)
        self._advance(seq, logits_TV[-1])

    @torch.inference_mode()
    def _decode(self) -> None:
        """One step of every running sequence: their newest tokens and state rows in one batched call."""
        active = [(i, s) for i, s in enumerate(self.slots) if s is not None]
        rows_B = torch.tensor([i for i, _ in active], device=self.device)
        tokens_B1 = torch.tensor([[s.last_token] for _, s in active], device=self.device)
        logits_B1V, state = self.model(tokens_B1, select_rows(self.pool, rows_B))
        for pool_t, new_t in zip(self.pool, state, strict=True):
            pool_t[rows_B] = new_t
        self.steps += 1
        self.max_batch_seen = max(self.max_batch_seen, len(active))
        logits_BV: Tensor = logits_B1V[:, -1]
        for b, (_, s) in enumerate(active):
            s.pos += 1
            self._isolated(s, self._advance, s, logits_BV[b])


__all__ = ["PREFILL_CHUNK", "STATEFUL_MAX_LEN", "StatefulEngine"]

"""The Python API: ``lm = zenlm.load(RUN_DIR)`` then ``lm.generate(...)``, ``lm.stream(...)``,
``lm.perplexity(texts)``; for BERT and classifier runs ``lm.embed(texts)`` / ``lm.classify(texts)``
(an :class:`zenlm.encoder.EncoderLM`), for encoder-decoders ``lm.generate(source)`` (zenlm.seq2seq).
Which of these a run loads as follows from what its architecture can do (:func:`user_object`).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from zenlm.config import GPTConfig
from zenlm.device import InferencePrecision, model_device
from zenlm.encoder import EncoderLM
from zenlm.errors import ConfigError
from zenlm.evaluate import bits_per_byte, perplexity
from zenlm.generate import GenerationConfig, generate_text, generate_text_batch
from zenlm.models.gpt import GPT
from zenlm.rundir import LoadedRun, load_run
from zenlm.scoring import map_logits
from zenlm.seq2seq import Seq2SeqLM
from zenlm.stateful import is_stateful, sum_nll
from zenlm.tokenizer import Tokenizer


class LM:
    """A trained language model with its tokenizer, ready to generate and score text."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, run_dir: Path | None = None,
                 precision: InferencePrecision | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.run_dir = run_dir
        self.precision = precision  # how zenlm.load chose the weights' and activations' dtypes (None: not loaded)

    @property
    def config(self) -> GPTConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    def stream(self, prompt: str, **kwargs) -> Iterator[str]:
        """Yield the continuation of ``prompt`` piece by piece. Keyword arguments: see GenerationConfig
        (max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, seed, use_cache)."""
        yield from generate_text(self.model, self.tokenizer, prompt, GenerationConfig(**kwargs))

    def generate(self, prompt: str, **kwargs) -> str:
        """The continuation of ``prompt`` as one string (same keyword arguments as :meth:`stream`)."""
        return "".join(self.stream(prompt, **kwargs))

    def generate_batch(self, prompts: Sequence[str], **kwargs) -> list[str]:
        """The continuations of several prompts (any lengths), decoded together in one batch -> one
        string per prompt, in order. Same keyword arguments as :meth:`stream` (use_cache must stay True).

        Greedy (temperature=0) gives each prompt what :meth:`generate` gives it alone; with sampling,
        prompt i draws with seed ``seed + i``. See :func:`zenlm.generate.generate_batch`.
        """
        return generate_text_batch(self.model, self.tokenizer, prompts, GenerationConfig(**kwargs))

    @torch.inference_mode()
    def nll(self, texts: str | Sequence[str]) -> tuple[float, int, int]:
        """Summed negative log-likelihood (nats), token count and UTF-8 byte count of ``texts``.

        Each text is scored on its own, conditioned on an end-of-text token in front (as documents follow
        one another in pretraining); texts longer than the context are scored in consecutive windows (a
        stateful model, which has no context limit, reads the whole text with its state carried).
        """
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise ConfigError("perplexity needs at least one non-empty text.")
        start = self.tokenizer.eos_id if self.tokenizer.eos_id is not None else self.tokenizer.bos_id
        stateful = is_stateful(self.model)
        T = 0 if stateful else self.config.block_size
        total, n_tok, n_bytes = 0.0, 0, 0
        for text in texts:
            ids = self.tokenizer.encode(text)
            if not ids:
                continue
            n_bytes += len(text.encode("utf-8", errors="replace"))
            seq = ([start] if start is not None else []) + ids
            if start is None:  # nothing to condition the first token on: it is not scored
                n_tok -= 1
            n_tok += len(ids)
            if stateful:  # the whole text, its state carried from window to window (no context limit)
                total += sum_nll(self.model, seq)
                continue
            for i in range(0, len(seq) - 1, T):
                total += self._window_nll(torch.tensor(seq[i : i + T + 1], device=self.device))
        if n_tok <= 0:
            raise ConfigError("perplexity needs at least one non-empty text.")
        return total, n_tok, n_bytes

    def _window_nll(self, ids_N: torch.Tensor) -> float:
        """Summed NLL of ``ids_N[1:]``, each token given the ids before it in this window. A GPT applies its head
        and the log-softmax to a piece of positions at a time (at most :data:`~zenlm.scoring.SCORING_LOGITS`
        logits), so a window of GPT-2 holds 64 MiB of logits, not 0.2 GB and as much again for the softmax."""
        if not isinstance(self.model, GPT):
            logits = self.model(ids_N[None, :-1])[0].float()
            return F.cross_entropy(logits, ids_N[1:], reduction="sum").item()
        targets_T = ids_N[1:]
        return sum(map_logits(self.model.inference_head, self.model.features(ids_N[None, :-1])[0], self.model.config.vocab_size,
                              lambda piece, logits_nV: F.cross_entropy(logits_nV, targets_T[piece],
                                                                       reduction="sum").item()))

    def perplexity(self, texts: str | Sequence[str]) -> float:
        """exp(mean negative log-likelihood per token) of ``texts``."""
        total, n_tok, _ = self.nll(texts)
        return perplexity(total / n_tok)

    def bits_per_byte(self, texts: str | Sequence[str]) -> float:
        """Summed NLL in bits divided by the UTF-8 bytes of ``texts`` (tokenizer-independent)."""
        total, n_tok, n_bytes = self.nll(texts)
        return bits_per_byte(total / n_tok, max(n_bytes, 1) / n_tok)


def load(run_dir: str | Path, *, device: str = "auto", dtype: str = "auto") -> LM | EncoderLM | Seq2SeqLM:
    """Load a run directory (config.yaml, tokenizer.json, model.safetensors) as the object its model is used
    through: an :class:`LM` (text generators), an :class:`~zenlm.encoder.EncoderLM` (encoders, classifiers) or a
    :class:`~zenlm.seq2seq.Seq2SeqLM` (encoder-decoders); see :func:`user_object`.

    When ``model.safetensors`` is absent (a run that was stopped hard) the newest checkpoint is used.
    dtype: auto | fp32 | bf16 | fp16 | int8 — the weights for inference. "auto" keeps the weights' own
    precision (lossless); bf16 halves and int8 quarters the bytes of an fp32 run (int8: linear layers
    quantised per output channel while loading). The activations follow the hardware: bf16 and int8 weights
    compute in bf16 where the CPU (or GPU) has native bf16, in fp32 elsewhere (``lm.precision`` says what was
    chosen, see :func:`zenlm.device.inference_precision`). Loading reads each tensor once, straight into its
    final dtype (:func:`zenlm.rundir.load_run`).
    """
    return user_object(load_run(run_dir, device=device, dtype=dtype))


def user_object(run: LoadedRun) -> Any:
    """What ``zenlm.load`` returns for a loaded run, decided by what its model can do (the first rule that
    applies; capabilities come from the architecture registry, zenlm.models.registry):

        a classifier run (task.kind classify)   EncoderLM with the run's labels   (classify, embed)
        the architecture names its own ``api``  whatever that function returns
        "seq2seq", or trained on pairs          Seq2SeqLM                         (source -> target; a
                                                (config.yaml has a seq2seq section)  decoder-only one too)
        "causal-lm"                             LM                                (generate, perplexity)
        "embed"                                 EncoderLM                         (embed, fill_mask)
    """
    task = run.saved.get("task") or {}
    if run.task == "classify":
        return EncoderLM(run.model, run.tokenizer, run.run_dir, labels=task.get("labels"), max_len=task.get("max_len"))
    if run.arch.api:
        module, _, name = run.arch.api.partition(":")
        return getattr(importlib.import_module(module), name)(run)
    if run.arch.can("seq2seq") or run.saved.get("seq2seq"):  # `finetune seq2seq --arch gpt` writes a target too
        return Seq2SeqLM.from_run(run)
    if run.arch.can("causal-lm"):
        return LM(run.model, run.tokenizer, run.run_dir, run.precision)
    if run.arch.can("embed"):
        return EncoderLM(run.model, run.tokenizer, run.run_dir)
    raise ConfigError(f"{run.run_dir} holds a {run.arch.title} model, which zenlm.load cannot open: it can "
                      f"{', '.join(sorted(run.arch.capabilities))} but none of seq2seq, causal-lm or embed.")

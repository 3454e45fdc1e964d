"""The Python API: ``lm = zenlm.load(RUN_DIR)`` then ``lm.generate(...)``, ``lm.stream(...)``,
``lm.perplexity(texts)``; for BERT and classifier runs ``lm.embed(texts)`` / ``lm.classify(texts)``
(an :class:`zenlm.encoder.EncoderLM`), for encoder-decoders ``lm.generate(source)`` (zenlm.seq2seq).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from zenlm.config import GPTConfig
from zenlm.device import resolve_device
from zenlm.errors import CheckpointError, ConfigError
from zenlm.generate import GenerationConfig, generate_text, generate_text_batch
from zenlm.models.gpt import GPT
from zenlm.rundir import build_model_from_run, load_run_weights
from zenlm.tokenizer import Tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class LM:
    """A trained language model with its tokenizer, ready to generate and score text."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, run_dir: Path | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.run_dir = run_dir

    @property
    def config(self) -> GPTConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

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
        one another in pretraining); texts longer than the context are scored in consecutive windows.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise ConfigError("perplexity needs at least one non-empty text.")
        start = self.tokenizer.eos_id if self.tokenizer.eos_id is not None else self.tokenizer.bos_id
        T = self.config.block_size
        total, n_tok, n_bytes = 0.0, 0, 0
        for text in texts:
            ids = self.tokenizer.encode(text)
            if not ids:
                continue
            n_bytes += len(text.encode("utf-8", errors="replace"))
            seq = ([start] if start is not None else []) + ids
            if start is None:  # nothing to condition the first token on: it is not scored
                n_tok -= 1
            for i in range(0, len(seq) - 1, T):
                chunk = torch.tensor(seq[i : i + T + 1], device=self.device)
                logits = self.model(chunk[None, :-1])[0].float()
                total += F.cross_entropy(logits, chunk[1:], reduction="sum").item()
            n_tok += len(ids)
        if n_tok <= 0:
            raise ConfigError("perplexity needs at least one non-empty text.")
        return total, n_tok, n_bytes

    def perplexity(self, texts: str | Sequence[str]) -> float:
        """exp(mean negative log-likelihood per token) of ``texts``."""
        total, n_tok, _ = self.nll(texts)
        return math.exp(total / n_tok)

    def bits_per_byte(self, texts: str | Sequence[str]) -> float:
        """Summed NLL in bits divided by the UTF-8 bytes of ``texts`` (tokenizer-independent)."""
        total, _, n_bytes = self.nll(texts)
        return total / math.log(2) / max(n_bytes, 1)


def load(run_dir: str | Path, *, device: str = "auto", dtype: str = "fp32") -> LM:
    """Load a run directory (config.yaml, tokenizer.json, model.safetensors) as an :class:`LM`.

    When ``model.safetensors`` is absent (a run that was stopped hard) the newest checkpoint is used.
    dtype: fp32 | bf16 | fp16 — the dtype of the weights for inference.
    """
    run_dir = Path(run_dir)
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; choose fp32, bf16 or fp16.")
    model, _, saved = build_model_from_run(run_dir)
    if saved["model"].get("arch") == "encdec":  # source -> target: see zenlm.seq2seq.Seq2SeqLM
        from zenlm.seq2seq import load as load_seq2seq

        return load_seq2seq(run_dir, device=device, dtype=dtype)  # type: ignore[return-value]
    task = saved.get("task") or {}
    if saved["model"].get("arch") == "bert" or task.get("kind") == "classify":  # texts -> vectors or labels
        from zenlm.encoder import EncoderLM

        _load_weights(model, run_dir)
        tokenizer = _load_tokenizer(run_dir)
        model = model.to(resolve_device(device), dtype=DTYPES[dtype])
        return EncoderLM(model, tokenizer, run_dir, labels=task.get("labels"),  # type: ignore[return-value]
                         max_len=task.get("max_len"))
    quant = saved.get("quantization") or {}
    if quant:
        from zenlm.models.int8 import METHOD, quantize_int8

        if quant.get("method") != METHOD:
            raise CheckpointError(f"{run_dir}/config.yaml names quantization {quant.get('method')!r}; this "
                                  f"version reads {METHOD!r}.")
        quantize_int8(model, empty=True)  # int8 layers, filled from model.safetensors below
    _load_weights(model, run_dir)
    tokenizer = _load_tokenizer(run_dir)
    model = model.to(resolve_device(device), dtype=DTYPES[dtype])
    return LM(model, tokenizer, run_dir)


def _load_weights(model: torch.nn.Module, run_dir: Path) -> None:
    """model.safetensors of ``run_dir``, else its newest checkpoint's weights, into ``model``."""
    load_run_weights(run_dir, model)


def _load_tokenizer(run_dir: Path) -> Tokenizer:
    if not (run_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"{run_dir} has no tokenizer.json; copy the tokenizer of its data directory there.")
    return Tokenizer.load(run_dir)

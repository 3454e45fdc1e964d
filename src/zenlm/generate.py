"""Text generation: logits -> next token -> text, streamed.

The pipeline for one new token, in order (each step is a pure function below, tested on its own):

    logits_V = model(context)[-1]                       # scores of every possible next token
    logits_V = apply_repetition_penalty(logits_V, ...)  # CTRL: make tokens already seen less likely
    if temperature == 0: next = argmax(logits_V)        # greedy
    else:
        logits_V = logits_V / temperature               # < 1 sharpens, > 1 flattens
        logits_V = top_k_filter(logits_V, k)            # keep the k best tokens
        logits_V = top_p_filter(logits_V, p)            # keep the smallest set holding probability >= p
        next = sample(softmax(logits_V))

With ``use_cache`` the prompt is run through the model once (prefill) and every later step feeds only the
newest token, reading the earlier keys/values from the model's KV cache.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from zenlm.errors import ConfigError

if TYPE_CHECKING:
    from zenlm.models.gpt import GPT, KVCache


@dataclass
class GenerationConfig:
    """How to pick each new token and when to stop.

    max_new_tokens:     generate at most this many tokens
    temperature:        divide the logits by this before sampling; 0 means greedy (always the best token)
    top_k:              sample only among the k most likely tokens (None: no limit)
    top_p:              nucleus sampling: sample only among the most likely tokens whose probabilities add
                        up to at least p (None or 1.0: no limit)
    repetition_penalty: > 1 discourages tokens that already occur in the prompt or the output (CTRL)
    stop:               stop strings; generation ends when one appears and the stop string is not returned
    seed:               random seed for sampling (None: different every call)
    use_cache:          reuse past keys/values (fast); False recomputes the whole context each step
    stop_at_eos:        end when the model emits the end-of-text token (which is not returned)
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    use_cache: bool = True
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise ConfigError(f"max_new_tokens must be an integer, got {self.max_new_tokens!r}.")
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}.")
        if not self.temperature >= 0:
            raise ConfigError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}.")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise ConfigError(f"top_k must be an integer >= 1 (or None for no limit), got {self.top_k!r}.")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1] (or None for no limit), got {self.top_p}.")
        if not self.repetition_penalty > 0:
            raise ConfigError(
                f"repetition_penalty must be > 0 (1.0 means none), got {self.repetition_penalty}."
            )
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ConfigError(f"stop strings must be non-empty strings, got {s!r}.")


# ------------------------------------------------------------------------------ logits -> next token


def _penalise(logits_V: Tensor, seen_V: Tensor, penalty: float) -> Tensor:
    """CTRL repetition penalty given a boolean mask of seen tokens [V]."""
    penalised_V = torch.where(logits_V > 0, logits_V / penalty, logits_V * penalty)
    return torch.where(seen_V, penalised_V, logits_V)


def apply_repetition_penalty(logits_V: Tensor, prev_ids: Sequence[int] | Tensor, penalty: float) -> Tensor:
    """CTRL-style repetition penalty: for every token id in ``prev_ids``, divide its logit by ``penalty``
    if positive, multiply it if negative (so penalty > 1 always makes it less likely).

    logits_V: [V] float; prev_ids: ids seen so far (any order, repeats allowed). Returns a new [V] tensor.
    """
    if penalty == 1.0 or len(prev_ids) == 0:
        return logits_V
    ids = torch.as_tensor(prev_ids, dtype=torch.long, device=logits_V.device)
    seen_V = torch.zeros(logits_V.shape[-1], dtype=torch.bool, device=logits_V.device)
    seen_V[ids] = True
    return _penalise(logits_V, seen_V, penalty)


def top_k_filter(logits_V: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest logits, set the rest to -inf. logits_V: [V] -> [V].

    Tokens tied with the k-th largest logit are kept too.
    """
    if k >= logits_V.shape[-1]:
        return logits_V
    kth_value = torch.topk(logits_V, k).values[-1]
    return logits_V.masked_fill(logits_V < kth_value, float("-inf"))


def top_p_filter(logits_V: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probabilities sum to >= ``p``;
    set the rest to -inf. The most likely token is always kept. logits_V: [V] -> [V].
    """
    if p >= 1.0:
        return logits_V
    sorted_V, order_V = torch.sort(logits_V, descending=True)
    probs_V = torch.softmax(sorted_V, dim=-1)
    mass_before_V = torch.cumsum(probs_V, dim=-1) - probs_V  # probability of all better tokens
    drop_sorted_V = mass_before_V >= p  # the better tokens already hold p: this one is not needed
    drop_sorted_V[0] = False
    drop_V = torch.empty_like(drop_sorted_V).scatter_(0, order_V, drop_sorted_V)
    return logits_V.masked_fill(drop_V, float("-inf"))


def _sample(
    logits_V: Tensor, cfg: GenerationConfig, generator: torch.Generator | None, seen_V: Tensor | None
) -> int:
    logits_V = logits_V.float()
    if seen_V is not None and cfg.repetition_penalty != 1.0:
        logits_V = _penalise(logits_V, seen_V, cfg.repetition_penalty)
    if cfg.temperature == 0:
        return int(torch.argmax(logits_V).item())
    logits_V = logits_V / cfg.temperature
    if cfg.top_k is not None:
        logits_V = top_k_filter(logits_V, cfg.top_k)
    if cfg.top_p is not None:
        logits_V = top_p_filter(logits_V, cfg.top_p)
    probs_V = torch.softmax(logits_V, dim=-1)
    return int(torch.multinomial(probs_V, 1, generator=generator).item())


def sample_next(
    logits_V: Tensor,
    cfg: GenerationConfig,
    generator: torch.Generator | None = None,
    prev_ids: Sequence[int] | Tensor | None = None,
) -> int:
    """Pick the next token id from logits_V [V]: repetition penalty (over ``prev_ids``), then greedy if
    ``cfg.temperature == 0``, else temperature, top-k, top-p and a draw from ``generator``."""
    seen_V = None
    if prev_ids is not None and len(prev_ids) > 0 and cfg.repetition_penalty != 1.0:
        seen_V = torch.zeros(logits_V.shape[-1], dtype=torch.bool, device=logits_V.device)
        seen_V[torch.as_tensor(prev_ids, dtype=torch.long, device=logits_V.device)] = True
    return _sample(logits_V, cfg, generator, seen_V)


# ----------------------------------------------------------------------------------- ids -> ids


@torch.inference_mode()
def _last_logits(model: GPT, ids: list[int], cache: KVCache | None, device: torch.device) -> Tensor:
    """Feed ``ids`` (one sequence) and return the logits after its last token, [V]."""
    idx_1T = torch.tensor([ids], dtype=torch.long, device=device)
    return model(idx_1T, cache=cache, last_only=True)[0, -1]


@torch.inference_mode()
def _step(logits_V: Tensor, cfg: GenerationConfig, generator: torch.Generator, seen_V: Tensor | None) -> int:
    token = _sample(logits_V, cfg, generator, seen_V)
    if seen_V is not None:
        seen_V[token] = True
    return token


def generate_ids(
    model: GPT, prompt_ids: Sequence[int], cfg: GenerationConfig, *, eos_id: int | None = None
) -> Generator[int, None, None]:
    """Yield new token ids one at a time, continuing ``prompt_ids`` (a non-empty list of ids).

    Stops after ``cfg.max_new_tokens`` tokens, or when ``eos_id`` is drawn and ``cfg.stop_at_eos`` (the
    eos id is then not yielded). The model is put in eval mode while generating (its previous mode
    is restored when the iterator finishes or is closed). Bad arguments raise here, before the first token.

    Longer than the context: without the cache each step sees the last ``block_size`` tokens. With the
    cache, a prompt longer than the context is cropped to its last ``block_size`` tokens; when the cache
    is full, it is refilled from the last ``block_size // 2`` tokens, which buys ``block_size // 2`` more
    cheap steps before the next refill.
    """
    prompt_ids = [int(i) for i in prompt_ids]
    if not prompt_ids:
        raise ConfigError(
            "generation needs at least one prompt token (for example the tokenizer's bos or eos id)."
        )
    vocab_size = model.config.vocab_size
    if min(prompt_ids) < 0 or max(prompt_ids) >= vocab_size:
        raise ConfigError(f"prompt token ids must be in 0..{vocab_size - 1} (the model's vocabulary).")
    return _generate_ids(model, prompt_ids, cfg, eos_id)


def _generate_ids(
    model: GPT, prompt_ids: list[int], cfg: GenerationConfig, eos_id: int | None
) -> Generator[int, None, None]:
    if cfg.max_new_tokens == 0:
        return
    vocab_size, block_size = model.config.vocab_size, model.config.block_size
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if cfg.seed is None:
        generator.seed()
    else:
        generator.manual_seed(cfg.seed)

    was_training = model.training
    model.eval()
    try:
        ids = list(prompt_ids)
        seen_V = None
        if cfg.repetition_penalty != 1.0:
            seen_V = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            seen_V[torch.tensor(ids, device=device)] = True
        cache = model.make_cache(1) if cfg.use_cache else None
        logits_V = _last_logits(model, ids[-block_size:], cache, device)  # prefill
        for n in range(cfg.max_new_tokens):
            token = _step(logits_V, cfg, generator, seen_V)
            if cfg.stop_at_eos and eos_id is not None and token == eos_id:
                return
            yield token
            ids.append(token)
            if n + 1 == cfg.max_new_tokens:
                return
            if cache is None:
                logits_V = _last_logits(model, ids[-block_size:], None, device)
            elif cache.pos >= cache.max_len:  # full: refill from the recent half of the context
                cache.reset()
                logits_V = _last_logits(model, ids[-max(1, block_size // 2) :], cache, device)
            else:
                logits_V = _last_logits(model, [token], cache, device)
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------- ids -> text


class _StreamDecoder(Protocol):
    def push(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


class TextTokenizer(Protocol):
    """What generation needs from a tokenizer (:class:`zenlm.tokenizer.Tokenizer` provides it)."""

    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def stream_decoder(self) -> _StreamDecoder: ...


def _split_at_stop(text: str, stops: Sequence[str], final: bool) -> tuple[str, str, bool]:
    """Split pending text into (safe to emit, keep holding, stop string found).

    The stop string that is complete first (smallest end; the longest if several end together) wins, as
    if the text had arrived one character at a time, so the result does not depend on how the text is
    split into tokens. Text is held back while its end could still be the beginning of a stop string.
    """
    found = [(i + len(s), i) for s in stops if (i := text.find(s)) >= 0]
    if found:
        return text[: min(found)[1]], "", True
    if final:
        return text, "", False
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), hold, -1):  # longest suffix of text = prefix of s
            if text.endswith(s[:n]):
                hold = n
                break
    return text[: len(text) - hold], text[len(text) - hold :], False


def generate_text(
    model: GPT, tokenizer: TextTokenizer, prompt: str, cfg: GenerationConfig
) -> Generator[str, None, None]:
    """Yield the continuation of ``prompt`` as text pieces, as soon as they are complete.

    Pieces never split a UTF-8 character. A stop string in ``cfg.stop`` ends generation even when it spans
    several tokens; the text before it is yielded and the stop string itself is not. Text that might be
    the start of a stop string is held back until it is known not to be. Bad arguments raise here, before
    the first piece.

    An empty prompt (or one that encodes to no tokens) starts from the tokenizer's end-of-text token, the
    token every document follows in pretraining data (or its bos token when there is no eos).
    """
    ids = tokenizer.encode(prompt)
    if not ids:
        start = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.bos_id
        if start is None:
            raise ConfigError("the prompt is empty and the tokenizer has no bos/eos token to start from; "
                              "give a non-empty prompt.")
        ids = [start]
    tokens = generate_ids(model, ids, cfg, eos_id=tokenizer.eos_id)
    return _stream_text(tokens, tokenizer.stream_decoder(), cfg.stop)


def _stream_text(
    tokens: Generator[int, None, None], decoder: _StreamDecoder, stops: list[str]
) -> Generator[str, None, None]:
    pending = ""
    try:
        for token in tokens:
            pending += decoder.push(token)
            if not pending:
                continue
            ready, pending, stopped = _split_at_stop(pending, stops, final=False)
            if ready:
                yield ready
            if stopped:
                return
        pending += decoder.flush()
        ready, _, _ = _split_at_stop(pending, stops, final=True)
        if ready:
            yield ready
    finally:
        tokens.close()  # end the token generator now (restores the model's mode)


__all__ = [
    "GenerationConfig",
    "apply_repetition_penalty",
    "top_k_filter",
    "top_p_filter",
    "sample_next",
    "generate_ids",
    "generate_text",
    "TextTokenizer",
]

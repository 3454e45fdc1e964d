"""Stateful causal LMs at inference: generation and scoring through a carried state instead of a KV cache.

A stateful LM (the registry's "stateful" capability: the n-gram, MLP and LSTM / GRU rungs of the ladder) is
called as ``logits_BTV, state = model(ids_BT, state)``; the state holds all the model keeps of the text read so
far, so a text fed in pieces with the state passed on gives what it gives fed whole. Generation therefore reads
the prompt once and then feeds one token at a time::

    logits_1TV, state = model(prompt_1T)                # prefill: the prompt read once, its end state kept
    logits_V = logits_1TV[0, -1]
    repeat:
        token = sampler.choose(logits_V).token          # zenlm.sampling: the pipeline every decoder uses
        logits_11V, state = model([[token]], state)     # one new token; nothing grows with the length

Nothing limits the length: there is no window to fall out of, and no cache to refill. Many prompts decode
together with one state row each (every state tensor has the batch first, so finished rows leave the batch by
indexing). Scoring a text reads it window by window with the state carried, so every token is predicted from
all of the text before it.

:mod:`zenlm.generate` (``generate_ids``, ``generate_batch``), :class:`zenlm.api.LM` (``perplexity``,
``bits_per_byte``), ``zenlm chat``, lm-eval and the server reach these functions when the model is stateful;
a GPT never does.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zenlm.device import model_device
from zenlm.errors import ConfigError
from zenlm.models.registry import architecture_of
from zenlm.sampling import Sampler

if TYPE_CHECKING:
    from zenlm.generate import GenerationConfig

State = tuple[Tensor, ...]

# Tokens read per forward pass when a text is scored: the logits of a window, [1, T, V] floats, are what
# costs memory (the state carries everything across windows, so the window length does not change the result).
SCORE_WINDOW = 1024


def is_stateful(model: nn.Module) -> bool:
    """True when ``model`` is a stateful causal LM (its architecture has the "stateful" capability)."""
    config = getattr(model, "config", None)
    try:
        return config is not None and architecture_of(config).can("stateful")
    except ConfigError:  # a config of no registered family (a wrapper, a toy model in a test)
        return False


def _check_options(cfg: GenerationConfig) -> None:
    if cfg.compile:
        raise ConfigError("compile builds the KV-cache decode step of Transformer models; a stateful model (n-gram, "
                          "MLP, LSTM) decodes one token at a time through its state: drop compile.")


def select_rows(state: State, rows: Sequence[int] | Tensor) -> State:
    """The state of rows ``rows`` of a batch (every state tensor has the batch first)."""
    index = torch.as_tensor(rows, device=state[0].device) if state else rows
    return tuple(t[index] for t in state)


def stack_rows(states: Sequence[State]) -> State:
    """One batch state from the states of single rows (or smaller batches), in order."""
    return tuple(torch.cat(parts) for parts in zip(*states, strict=True))


# ---------------------------------------------------------------------------------------------- generation
@torch.inference_mode()
def _feed(model: nn.Module, ids: Sequence[int], state: State | None, device: torch.device) -> tuple[Tensor, State]:
    """Feed one sequence's ``ids`` after ``state`` -> (the logits after its last id [V], the new state)."""
    logits_1TV, state = model(torch.tensor([list(ids)], dtype=torch.long, device=device), state)
    return logits_1TV[0, -1], state


def generate_ids(model: nn.Module, prompt_ids: list[int], cfg: GenerationConfig,
                 eos_id: int | None) -> Generator[int, None, None]:
    """Yield new ids continuing ``prompt_ids`` (non-empty, checked by the caller), one at a time: the prompt is
    read once and every drawn token is fed alone with the state. Stops after ``cfg.max_new_tokens`` or at
    ``eos_id`` when ``cfg.stop_at_eos`` (not yielded). ``cfg.use_cache=False`` reads the whole text again from the
    start state at every step instead (slow; it gives the same tokens, which the tests check). The model is in
    eval mode while generating."""
    _check_options(cfg)
    return _generate_ids(model, list(prompt_ids), cfg, eos_id)


def _generate_ids(model: nn.Module, ids: list[int], cfg: GenerationConfig,
                  eos_id: int | None) -> Generator[int, None, None]:
    if cfg.max_new_tokens == 0:
        return
    device = model_device(model)
    sampler = Sampler(cfg.sampling(), model.config.vocab_size, device=device, prompt_ids=ids)
    was_training = model.training
    model.eval()
    try:
        logits_V, state = _feed(model, ids, None, device)  # prefill
        for n in range(cfg.max_new_tokens):
            token = sampler.choose(logits_V).token
            if cfg.stop_at_eos and eos_id is not None and token == eos_id:
                return
            yield token
            ids.append(token)
            if n + 1 == cfg.max_new_tokens:
                return
            if cfg.use_cache:
                logits_V, state = _feed(model, [token], state, device)
            else:
                logits_V, _ = _feed(model, ids, None, device)
    finally:
        model.train(was_training)


@torch.inference_mode()
def generate_batch(model: nn.Module, prompts: list[list[int]], cfg: GenerationConfig, eos_id: int | None,
                   on_token: Callable[[int, int], bool] | None) -> list[list[int]]:
    """The decoding of :func:`zenlm.generate.generate_batch` for a stateful model (which checks the prompts and
    settings and puts the model in eval mode first): each prompt is read alone into its own state row, then every
    step feeds the newest token of every unfinished row in one batched call; a finished row leaves the batch.
    Row i samples with seed ``cfg.seed + i``, so row 0 draws what :func:`generate_ids` draws, and a row's tokens
    do not depend on the other rows (greedy rows give :func:`generate_ids`'s tokens)."""
    device = model_device(model)
    sampling = cfg.sampling()
    samplers = [Sampler(sampling, model.config.vocab_size, device=device, prompt_ids=ids, seed_offset=i)
                for i, ids in enumerate(prompts)]
    firsts, states = zip(*(_feed(model, ids, None, device) for ids in prompts), strict=True)  # prefill, one by one
    logits_RV, state = torch.stack(firsts), stack_rows(states)
    live = list(range(len(prompts)))  # batch row r decodes prompt live[r]
    out: list[list[int]] = [[] for _ in prompts]
    for n in range(cfg.max_new_tokens):
        if sampling.argmax_only:
            tokens = logits_RV.argmax(dim=-1).tolist()
        else:
            tokens = [samplers[i].choose(logits_RV[r]).token for r, i in enumerate(live)]
        keep: list[int] = []
        for r, (i, token) in enumerate(zip(live, tokens, strict=True)):
            if cfg.stop_at_eos and eos_id is not None and token == eos_id:
                continue
            out[i].append(token)
            ended = on_token is not None and on_token(i, token)
            if not ended and n + 1 < cfg.max_new_tokens:
                keep.append(r)
        if not keep:
            break
        if len(keep) < len(live):  # finished rows leave the batch
            state = select_rows(state, keep)
            live = [live[r] for r in keep]
            tokens = [tokens[r] for r in keep]
        logits_R1V, state = model(torch.tensor(tokens, device=device)[:, None], state)
        logits_RV = logits_R1V[:, -1]
    return out


# ---------------------------------------------------------------------------------------------- scoring
@torch.inference_mode()
def sum_nll(model: nn.Module, ids: Sequence[int], window: int = SCORE_WINDOW) -> float:
    """Summed negative log-likelihood (nats) of ``ids[1:]``, each id predicted from all the ids before it: the
    sequence is read ``window`` ids at a time with the state carried, so the result does not depend on
    ``window``."""
    device = model_device(model)
    ids_T = torch.tensor(list(ids), dtype=torch.long, device=device)
    state: Any = None
    total = 0.0
    for i in range(0, len(ids_T) - 1, window):
        chunk = ids_T[i : i + window + 1]
        logits_1TV, state = model(chunk[None, :-1], state)
        total += F.cross_entropy(logits_1TV[0].float(), chunk[1:], reduction="sum").item()
    return total


__all__ = ["SCORE_WINDOW", "generate_batch", "generate_ids", "is_stateful", "select_rows", "stack_rows", "sum_nll"]

"""The lower rungs of the ladder wired to zenlm's data and training loop: n-gram, MLP and LSTM/GRU LMs.

All three models speak one stateful protocol, ``logits_BTV, state = model(idx_BT, state)`` (see
:mod:`zenlm.models.rnn`). On top of it this module provides what a recipe needs:

* **Truncated BPTT.** :class:`zenlm.data.streams.StreamBatches` gives consecutive windows of B parallel streams;
  :class:`StateCarrier` wraps the model and carries the state from one window into the next; :func:`tbptt_loss`
  is the objective for :func:`zenlm.train.loop.fit`. One optimiser step with ``grad_accum`` micro-batches::

      for micro in range(grad_accum):
          x, reset, y = batches.get(step, micro)            # window w = step·grad_accum + micro
          state = zeros if reset else carried                # carried = the end state of window w−1, detached
          logits, carried = lm(x, state)
          (sum of cross-entropies(logits, y) / targets of the step).backward()

  Gradients stop at the window's start (the carried state is detached), but the state still holds everything
  the model read before it.

* **Exact resume.** Batches are a pure function of the step, but the carried state is not: it depends on the
  weights at every earlier step, so it cannot be re-derived without replaying the run (running the current
  weights over the previous tokens gives a *different* state). It is therefore saved: :class:`StateCarrier`
  keeps it in buffers (``carry_0``, ``carry_1``), which the training loop writes into every checkpoint's
  ``model.safetensors`` with the weights and restores on ``--resume``. A resumed run continues with the very
  state, weights, optimiser moments, RNG and window an uninterrupted run would have had, so its losses and
  final weights are equal. (The carried state is training state: :func:`save_lm_weights` writes a run's final
  ``model.safetensors`` with the model's own weights only.)

* **Evaluation with the same definitions as** :func:`zenlm.recipes.pretrain.evaluate_causal_lm`: the same
  validation tokens (the first ``n_windows · seq_len`` predicted ids of the split), reported as ``val_loss``
  (nats per token), ``val_ppl = exp(val_loss)`` and ``val_bpb = val_loss / ln 2 · tokens / bytes``. A recurrent
  model reads them as B consecutive streams carrying its state (:func:`evaluate_stateful_lm`); the n-gram model
  gives every token its full n−1-token history (:func:`evaluate_ngram`).

* **Sampling**: :func:`generate_stateful` feeds one token at a time with the returned state, through the same
  sampling rules as the GPT (temperature, top-k, top-p, repetition penalty, seeds).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from zenlm.data.batches import IGNORE_INDEX, eval_window_count
from zenlm.data.shards import TokenShards
from zenlm.data.streams import StreamBatches
from zenlm.errors import CheckpointError, ConfigError
from zenlm.evaluate import bits_per_byte, perplexity
from zenlm.generate import GenerationConfig
from zenlm.models.ngram import NGramConfig, NGramLM
from zenlm.rundir import read_run_config, write_run_config
from zenlm.sampling import Sampler
from zenlm.train.checkpoint import save_model
from zenlm.train.step import LossOutput

StatefulBatch = tuple[Tensor, bool, Tensor]


# ---------------------------------------------------------------------------------------------- training
class StateCarrier(nn.Module):
    """A stateful LM plus the state carried between consecutive training windows (truncated BPTT).

    ``carrier(x_BT, reset) -> logits_BTV``: runs ``lm`` from the carried state (from its start state when
    ``reset``), then keeps the end state, detached, for the next call. The state lives in buffers ``carry_i`` so
    that checkpoints hold it (see the module docstring); its batch size is fixed at construction.
    """

    def __init__(self, lm: nn.Module, batch_size: int) -> None:
        super().__init__()
        self.lm = lm
        start = lm.init_state(batch_size, _device(lm))
        self.n_state = len(start)
        for i, t in enumerate(start):
            self.register_buffer(f"carry_{i}", t.clone())

    def carried(self) -> tuple[Tensor, ...]:
        """The carried state (the buffers themselves)."""
        return tuple(getattr(self, f"carry_{i}") for i in range(self.n_state))

    def forward(self, x_BT: Tensor, reset: bool = False) -> Tensor:
        # clones: autograd keeps the start state for the backward pass, and the buffers change below
        state = None if reset else tuple(t.clone() for t in self.carried())
        logits_BTV, new = self.lm(x_BT, state)
        with torch.no_grad():
            for buf, t in zip(self.carried(), new, strict=True):
                buf.copy_(t)
        return logits_BTV


def tbptt_loss(model: nn.Module, batch: StatefulBatch) -> LossOutput:
    """Next-token cross-entropy of one TBPTT window, summed. model: a :class:`StateCarrier`; batch = (x_BT, reset,
    y_BT) from :class:`StreamBatches`; returns the loss contract of :func:`zenlm.train.loop.fit` (the sum, the
    number of targets, the number of input tokens)."""
    x_BT, reset, y_BT = batch
    logits_BTV = model(x_BT, reset)
    loss_sum = F.cross_entropy(logits_BTV.float().flatten(0, 1), y_BT.flatten(), reduction="sum")
    return LossOutput(loss_sum, y_BT.numel(), x_BT.numel())


def stream_task(shards: TokenShards, batch_size: int, seq_len: int, *, grad_accum: int = 1, seed: int = 0,
                device: torch.device | str = "cpu") -> Any:
    """``get_batch(step, micro) -> (x_BT, reset, y_BT)`` on ``device``, for :func:`zenlm.train.loop.fit`."""
    batches = StreamBatches(shards, batch_size, seq_len, grad_accum=grad_accum, seed=seed)

    def get_batch(step: int, micro: int) -> StatefulBatch:
        x_BT, reset, y_BT = batches.get(step, micro)
        return x_BT.to(device, non_blocking=True), reset, y_BT.to(device, non_blocking=True)

    return get_batch


def save_lm_weights(model: nn.Module, path: str | Path) -> None:
    """Write the weights of the LM inside ``model`` (unwrapping a :class:`StateCarrier` or a compiled module),
    without the carried state, to ``path`` (safetensors, atomically)."""
    save_model(unwrap_lm(model), Path(path))


def unwrap_lm(model: nn.Module) -> nn.Module:
    """The stateful LM inside ``model``: through ``torch.compile``'s wrapper and a :class:`StateCarrier`."""
    model = getattr(model, "_orig_mod", model)
    return model.lm if isinstance(model, StateCarrier) else model


# ---------------------------------------------------------------------------------------------- n-gram files
def save_ngram(model: NGramLM, out_dir: str | os.PathLike[str]) -> Path:
    """Write an n-gram model as a run-style directory: ``model.safetensors`` (its tables, the module's state
    dict) and ``config.yaml`` (``model:`` = the config, and the discounts), each written atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, out / "model.safetensors")
    write_run_config(out, {"model": model.config.to_dict(), "discounts": model.discounts()})
    return out


def load_ngram(run_dir: str | os.PathLike[str]) -> NGramLM:
    """Load a directory written by :func:`save_ngram`; CheckpointError when it is not one or is damaged."""
    saved = read_run_config(run_dir)
    if not isinstance(saved["model"], dict) or saved["model"].get("arch") != "ngram":
        raise CheckpointError(f"{run_dir} does not hold an n-gram model (its config.yaml has no arch: ngram).")
    weights = Path(run_dir) / "model.safetensors"
    try:
        tables = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights} is not a readable safetensors file ({e}).") from None
    return NGramLM(NGramConfig.from_dict(saved["model"]), tables)


# ---------------------------------------------------------------------------------------------- evaluation
def lm_metrics(loss_sum: float, n: int, bytes_per_token: float) -> dict[str, float]:
    """val_loss (nats per token), val_ppl and val_bpb from a summed loss over n tokens, as evaluate_causal_lm
    reports them."""
    loss = loss_sum / max(n, 1)
    return {"val_loss": loss, "val_ppl": perplexity(loss), "val_bpb": bits_per_byte(loss, bytes_per_token)}


def eval_targets(shards: TokenShards, seq_len: int, max_tokens: int | None) -> int:
    """How many ids evaluate_causal_lm predicts: whole windows of ``seq_len``, all of the split or the first
    ``max_tokens`` (at least one window). The targets are ids 1 .. that number of the split."""
    return eval_window_count(shards, seq_len, max_tokens) * seq_len


@torch.no_grad()
def evaluate_stateful_lm(model: nn.Module, shards: TokenShards, batch_size: int, seq_len: int,
                         max_tokens: int | None, bytes_per_token: float,
                         device: torch.device | str = "cpu") -> dict[str, float]:
    """Validation loss, perplexity and bits per byte of a stateful LM (or a :class:`StateCarrier`, whose carried
    training state is left alone) over the tokens :func:`eval_targets` names.

    The M targets are cut into ``batch_size`` consecutive streams (the last one padded and the padding not
    scored); each stream is read window by window of ``seq_len``, its state carried across windows, so every
    token but the first of each stream is predicted with all of its stream before it.
    """
    lm = unwrap_lm(model)
    M = eval_targets(shards, seq_len, max_tokens)
    ids = torch.from_numpy(shards.window(0, M + 1))
    B = max(1, min(batch_size, M))
    L = -(-M // B)  # tokens per stream
    x_BL = torch.zeros(B * L, dtype=torch.long)
    y_BL = torch.full((B * L,), IGNORE_INDEX, dtype=torch.long)
    x_BL[:M], y_BL[:M] = ids[:-1], ids[1:]
    x_BL, y_BL = x_BL.view(B, L).to(device), y_BL.view(B, L).to(device)
    state, total = None, 0.0
    for t in range(0, L, seq_len):
        logits_BTV, state = lm(x_BL[:, t:t + seq_len], state)
        total += F.cross_entropy(logits_BTV.float().flatten(0, 1), y_BL[:, t:t + seq_len].flatten(),
                                 ignore_index=IGNORE_INDEX, reduction="sum").item()
    return lm_metrics(total, M, bytes_per_token)


@torch.no_grad()
def evaluate_ngram(model: NGramLM, shards: TokenShards, seq_len: int, max_tokens: int | None,
                   bytes_per_token: float, chunk: int = 1 << 16) -> dict[str, float]:
    """Validation metrics of an n-gram model over the tokens :func:`eval_targets` names, each predicted from its
    n−1 preceding ids in the split (fewer at the very start)."""
    M = eval_targets(shards, seq_len, max_tokens)
    ids = torch.from_numpy(shards.window(0, M + 1)).to(_device(model))
    J = model.config.order - 1
    total = 0.0
    for lo in range(0, M, chunk):  # targets lo+1 .. hi, with up to J ids of history before each
        hi = min(lo + chunk, M)
        first = max(0, lo - J + 1) if J else lo
        logp = model.log_prob_targets(ids[first:hi + 1])
        total -= logp[lo - first:].sum().item()
    return lm_metrics(total, M, bytes_per_token)


# ---------------------------------------------------------------------------------------------- sampling
def _device(model: nn.Module) -> torch.device:
    t = next(itertools.chain(model.parameters(), model.buffers()), None)
    return t.device if t is not None else torch.device("cpu")


@torch.inference_mode()
def generate_stateful(model: nn.Module, prompt_ids: Sequence[int], cfg: GenerationConfig, *,
                      eos_id: int | None = None) -> list[int]:
    """New token ids continuing ``prompt_ids`` (non-empty) with a stateful LM: the prompt is read in one call,
    then every drawn token is fed alone with the returned state. Sampling follows ``cfg`` (temperature, top-k,
    top-p, repetition penalty, seed); stops after ``cfg.max_new_tokens`` or at ``eos_id`` (not returned)."""
    lm = unwrap_lm(model)
    prompt = [int(i) for i in prompt_ids]
    V = lm.config.vocab_size
    if not prompt:
        raise ConfigError("generation needs at least one prompt token (for example the tokenizer's eos id).")
    if min(prompt) < 0 or max(prompt) >= V:
        raise ConfigError(f"prompt token ids must be in 0..{V - 1} (the model's vocabulary).")
    device = _device(lm)
    sampler = Sampler(cfg.sampling(), V, device=device, prompt_ids=prompt)  # the seeded pipeline of zenlm.sampling
    was_training = lm.training
    lm.eval()
    try:
        logits_BTV, state = lm(torch.tensor([prompt], device=device))
        out: list[int] = []
        for _ in range(cfg.max_new_tokens):
            token = sampler.choose(logits_BTV[0, -1]).token
            if cfg.stop_at_eos and eos_id is not None and token == eos_id:
                break
            out.append(token)
            logits_BTV, state = lm(torch.tensor([[token]], device=device), state)
    finally:
        lm.train(was_training)
    return out


__all__ = ["StateCarrier", "tbptt_loss", "stream_task", "save_lm_weights", "unwrap_lm", "save_ngram", "load_ngram",
           "lm_metrics",
           "eval_targets", "evaluate_stateful_lm", "evaluate_ngram", "generate_stateful"]

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

* **Pretraining** (:func:`zenlm.recipes.pretrain.pretrain` hands a stateful model over to this module): the
  neural rungs train through :func:`zenlm.train.loop.fit` with :func:`stateful_task` (stream batches, the TBPTT
  loss, the stateful evaluation) on a :class:`StateCarrier`; the n-gram rung is counted by
  :func:`count_run` (no optimiser, no steps: one pass over the training ids) and written as a run directory
  like any other. ``--init-embeddings`` copies word vectors into a new model's embeddings
  (:func:`init_from_vectors`).

Generation and scoring of a trained rung are not here: ``zenlm.load(RUN)`` gives an :class:`zenlm.api.LM`
whose ``generate``, ``stream`` and ``perplexity`` go through :mod:`zenlm.stateful`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zenlm.data.batches import IGNORE_INDEX, eval_window_count
from zenlm.data.shards import TokenShards
from zenlm.data.streams import StreamBatches
from zenlm.device import model_device
from zenlm.errors import ConfigError, DataError
from zenlm.evaluate import bits_per_byte, perplexity
from zenlm.fileio import atomic_write_text
from zenlm.models.ngram import NGramLM
from zenlm.models.registry import Architecture
from zenlm.progress import ProgressFn, report
from zenlm.rundir import read_run_config, write_run_config
from zenlm.tokenizer import Tokenizer
from zenlm.train.checkpoint import save_model
from zenlm.train.loop import TrainResult
from zenlm.train.step import LossOutput

StatefulBatch = tuple[Tensor, bool, Tensor]
# (get_batch, loss function, count_targets, evaluate): what fit needs from an objective (as in recipes.pretrain)
Task = tuple[Callable[[int, int], Any], Callable[[nn.Module, Any], LossOutput], Callable[[Any], int],
             Callable[[nn.Module], dict[str, float]]]

STATEFUL_SEQ_LEN = 64  # the TBPTT window when neither --seq-len nor a recipe gives one


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
        start = lm.init_state(batch_size, model_device(lm))
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


def tbptt_targets(batch: StatefulBatch) -> int:
    """The targets of a TBPTT window, B*T (read from the shape)."""
    return batch[2].numel()


def stream_task(shards: TokenShards, batch_size: int, seq_len: int, *, grad_accum: int = 1, seed: int = 0,
                device: torch.device | str = "cpu") -> Any:
    """``get_batch(step, micro) -> (x_BT, reset, y_BT)`` on ``device``, for :func:`zenlm.train.loop.fit`."""
    batches = StreamBatches(shards, batch_size, seq_len, grad_accum=grad_accum, seed=seed)

    def get_batch(step: int, micro: int) -> StatefulBatch:
        x_BT, reset, y_BT = batches.get(step, micro)
        return x_BT.to(device, non_blocking=True), reset, y_BT.to(device, non_blocking=True)

    return get_batch


def stateful_task(data: Path, index: dict[str, Any], batch_size: int, seq_len: int, eval_batch_size: int,
                  eval_seq_len: int, eval_tokens: int | None, seed: int, device: torch.device,
                  grad_accum: int = 1) -> Task:
    """What :func:`zenlm.train.loop.fit` needs to pretrain a stateful LM (wrapped in a :class:`StateCarrier` of
    ``batch_size`` streams) on the shards in ``data``: TBPTT windows of ``seq_len`` from the training split, the
    summed next-token loss, and the validation metrics of :func:`evaluate_stateful_lm` (``eval_batch_size``
    streams read ``eval_seq_len`` tokens at a time) over the tokens the GPT's evaluation scores."""
    val = TokenShards.open(data, "val")
    val_info = index["splits"]["val"]
    bytes_per_token = max(val_info["bytes"], 1) / max(val_info["tokens"], 1)
    get_batch = stream_task(TokenShards.open(data, "train"), batch_size, seq_len, grad_accum=grad_accum, seed=seed,
                            device=device)
    eval_targets(val, eval_seq_len, eval_tokens)  # raises now, before anything is written, when val is too small

    def evaluate(m: nn.Module) -> dict[str, float]:
        return evaluate_stateful_lm(m, val, eval_batch_size, eval_seq_len, eval_tokens, bytes_per_token, device)

    return get_batch, tbptt_loss, tbptt_targets, evaluate


def check_one_process(world_size: int) -> None:
    """Truncated BPTT carries the state from one window into the next on one process: the windows of a step's
    micro-batches are consecutive only there (under torchrun process r would read windows r, r+W, ...)."""
    if world_size > 1:
        raise ConfigError(f"the n-gram, MLP and LSTM rungs train on one process (truncated BPTT carries each "
                          f"stream's state from window to window), not {world_size}; run `zenlm pretrain` "
                          "without torchrun, with --grad-accum for larger batches.")


def save_lm_weights(model: nn.Module, path: str | Path) -> None:
    """Write the weights of the LM inside ``model`` (unwrapping a :class:`StateCarrier` or a compiled module),
    without the carried state, to ``path`` (safetensors, atomically)."""
    save_model(unwrap_lm(model), Path(path))


def unwrap_lm(model: nn.Module) -> nn.Module:
    """The stateful LM inside ``model``: through ``torch.compile``'s wrapper and a :class:`StateCarrier`."""
    model = getattr(model, "_orig_mod", model)
    return model.lm if isinstance(model, StateCarrier) else model


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
    ids = torch.from_numpy(shards.window(0, M + 1)).to(model_device(model))
    J = model.config.order - 1
    total = 0.0
    for lo in range(0, M, chunk):  # targets lo+1 .. hi, with up to J ids of history before each
        hi = min(lo + chunk, M)
        first = max(0, lo - J + 1) if J else lo
        logp = model.log_prob_targets(ids[first:hi + 1])
        total -= logp[lo - first:].sum().item()
    return lm_metrics(total, M, bytes_per_token)


# ---------------------------------------------------------------------------------------------- counting
def count_run(arch: Architecture, cfg: Any, data: Path, index: dict[str, Any], out: Path, *, eval_seq_len: int,
              eval_tokens: int | None, resume: bool = False, progress: ProgressFn | None = None) -> TrainResult:
    """The "training" of a counted family (``arch.count``: the n-gram model): count the whole training split
    once, evaluate it with the same definitions as a trained model (:func:`evaluate_ngram`), and write what a
    training run writes: ``model.safetensors`` (the count tables), ``metrics.jsonl`` (one record, step 0),
    ``plots/loss.png`` and, in config.yaml, the discounts. ``config.yaml`` and the tokenizer files are written
    by the caller. There is nothing to resume: ``resume`` is refused."""
    assert arch.count is not None
    if resume:
        raise ConfigError(f"{out} holds an {arch.title} run, which is counted in one pass, not trained in "
                          "steps: there is nothing to resume. Count it again into another --out.")
    train = TokenShards.open(data, "train")
    val = TokenShards.open(data, "val")
    val_info = index["splits"]["val"]
    bytes_per_token = max(val_info["bytes"], 1) / max(val_info["tokens"], 1)
    eval_targets(val, eval_seq_len, eval_tokens)  # a validation split too small is refused before counting
    report(progress, "count", message=f"{arch.title}: counting {len(train):,} training tokens")
    t0 = time.perf_counter()
    model = arch.count(train.window(0, len(train)), cfg)
    count_s = time.perf_counter() - t0
    assert isinstance(model, NGramLM), "the counted family is the n-gram model"
    val_metrics = evaluate_ngram(model, val, eval_seq_len, eval_tokens, bytes_per_token)
    elapsed = time.perf_counter() - t0
    save_model(model, out / "model.safetensors")
    tokens_per_s = len(train) / max(count_s, 1e-9)
    record = {"step": 0, "elapsed_s": round(elapsed, 3), "train_s": round(count_s, 3), "tokens": len(train),
              "tokens_per_s": round(tokens_per_s, 1), **val_metrics}
    atomic_write_text(out / "metrics.jsonl", json.dumps(record) + "\n")
    counted = {"tokens": len(train), "seconds": round(count_s, 3), "table_entries": model.num_entries()}
    write_run_config(out, {**read_run_config(out), "counted": counted, "discounts": model.discounts()})
    return TrainResult(step=0, elapsed_s=elapsed, tokens=len(train), stopped_by="counted", train_loss=None,
                       val=val_metrics, tokens_per_s=tokens_per_s, train_s=count_s)


# ---------------------------------------------------------------------------------------------- word vectors
def input_embedding(model: nn.Module, vocab_size: int) -> nn.Embedding:
    """The token embedding of ``model``: its first ``nn.Embedding`` with a row for every id (a GPT's
    ``tok_emb``, the rungs' ``emb``)."""
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module.num_embeddings >= vocab_size:
            return module
    raise ConfigError(f"{type(model).__name__} has no token embedding to initialise from word vectors.")


def init_from_vectors(model: nn.Module, tokenizer: Tokenizer, vectors: str | Path) -> dict[str, Any]:
    """Copy the vectors in the file ``vectors`` (word2vec text or binary, fastText .vec, GloVe; see
    :func:`zenlm.wordvec.read_vectors`) into the token embedding of a new ``model``, one row per vocabulary entry
    found (scaled to the rows' initial spread, :func:`zenlm.wordvec.init_embeddings`). Returns what config.yaml
    records: the file and the vocabulary coverage. DataError when the vectors cover no entry at all."""
    from zenlm.wordvec import init_embeddings, read_vectors

    path = Path(vectors)
    if path.is_dir() and (path / "vectors.bin").is_file():  # a directory made by `zenlm wordvec train`
        path = path / "vectors.bin"
    kv = read_vectors(path)
    coverage = init_embeddings(input_embedding(model, tokenizer.vocab_size).weight, tokenizer, kv)
    if coverage.found == 0:
        raise DataError(f"the vectors in {path} cover none of the tokenizer's {coverage.words:,} vocabulary entries "
                        "(e.g. a character tokenizer and word vectors); use a word tokenizer (`zenlm tokenizer "
                        "train --kind word`) or vectors of its vocabulary.")
    return {"file": str(path.resolve()), "line": coverage.line(), **coverage.to_dict()}


__all__ = ["StateCarrier", "tbptt_loss", "tbptt_targets", "stream_task", "stateful_task", "check_one_process",
           "save_lm_weights", "unwrap_lm", "lm_metrics", "eval_targets", "evaluate_stateful_lm", "evaluate_ngram",
           "count_run", "input_embedding", "init_from_vectors", "STATEFUL_SEQ_LEN"]

"""Pretraining: token shards -> GPT (causal LM) or BERT (masked LM) -> run directory.

``objective="causal-lm"`` (the default) is next-token prediction. For a window of tokens ``t_0 .. t_T`` the
model sees ``x = t_0 .. t_{T-1}`` and is scored on ``y = t_1 .. t_T``::

    loss = -1/(B*T) * sum_{b,t} log softmax(logits[b, t])[y[b, t]]          (nats per token)

(the loss function returns the sum; the training step divides it by the number of targets of the whole
step, so gradient accumulation over micro-batches gives the gradient of the whole batch: zenlm.train.step).

Validation also reports perplexity ``exp(loss)`` and bits per byte
``loss / ln 2 * tokens / bytes`` (tokens and UTF-8 bytes of the validation text), which compares runs
that use different tokenizers.

``objective="mlm"`` is BERT's masked-LM pretraining. A row is ``[CLS] t_1 .. t_{T-2} [SEP]`` in which about
15% of the ordinary tokens were chosen and (mostly) replaced by [MASK] (see
:class:`zenlm.data.batches.MLMMasking`); M is the set of chosen positions and the model predicts the
original token at each of them, seeing the whole row in both directions::

    loss = -1/|M| * sum_{(b,t) in M} log softmax(mlm_logits(h[b, t]))[t_orig[b, t]]   (nats per masked token)

Only the |M| (about 0.15*B*T) rows of hidden states are sent through the vocabulary-sized output head.
Validation reports that loss, its perplexity ``exp(loss)`` (val_mlm_ppl) and the masked-token accuracy
(val_masked_acc: how often the arg-max prediction is the original token).

A stateful causal LM (the registry's "stateful" capability: the MLP and LSTM / GRU rungs) learns the same
next-token objective from consecutive windows with its state carried across them (truncated BPTT), and the
n-gram rung is counted instead of trained; both are wired in :mod:`zenlm.recipes.ladder`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from zenlm import __version__
from zenlm.adapter import finish_lora_run, load_base, lora_section
from zenlm.config import dataclass_from_dict
from zenlm.data.batches import IGNORE_INDEX, CausalBatches, MLMBatches, eval_batches, mlm_eval_batches
from zenlm.data.shards import TokenShards, data_fingerprint, load_index
from zenlm.device import resolve_device, resolve_precision
from zenlm.errors import CheckpointError, ConfigError, DataError
from zenlm.evaluate import bits_per_byte, perplexity
from zenlm.fileio import file_sha256
from zenlm.models.lora import LoRAConfig, apply_lora, describe_lora, weights_fingerprint
from zenlm.models.registry import architecture_of, build_model, config_from_dict, find_preset, list_presets
from zenlm.progress import ProgressFn, report
from zenlm.recipes import ladder
from zenlm.recipes.registry import DEFAULT_RECIPE, default_recipe, recipe_settings
from zenlm.rundir import (
    build_model_from_run,
    clear_run_dir,
    config_error,
    copy_tokenizer_files,
    read_run_config,
    refuse_foreign_out,
    run_architecture,
    run_dir_state,
    write_run_config,
)
from zenlm.tokenizer import Tokenizer
from zenlm.train.checkpoint import list_checkpoints
from zenlm.train.head_loss import next_token_loss
from zenlm.train.loop import TrainConfig, TrainResult, apply_process_settings, config_to_dict, fit
from zenlm.train.optim import OptimConfig
from zenlm.train.step import LossOutput


def causal_lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> LossOutput:
    """Summed next-token cross-entropy. batch = (x_BT, y_BT) int64: every position of y_BT is a target."""
    x_BT, y_BT = batch
    loss_sum = next_token_loss(model, x_BT, y_BT, masked=False)  # the head in chunks at a large vocabulary
    return LossOutput(loss_sum, y_BT.numel(), x_BT.numel())


def causal_lm_targets(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
    """The targets of a causal-LM batch, B*T (read from the shape: no wait for the device)."""
    return batch[1].numel()


@torch.no_grad()
def evaluate_causal_lm(
    model: nn.Module, shards: TokenShards, batch_size: int, seq_len: int, max_tokens: int | None,
    bytes_per_token: float, device: torch.device,
) -> dict[str, float]:
    """Validation loss (nats/token), perplexity and bits per byte over the first ``max_tokens`` of a split."""
    total, n = 0.0, 0
    for x_BT, y_BT in eval_batches(shards, batch_size, seq_len, max_tokens):
        x_BT, y_BT = x_BT.to(device, non_blocking=True), y_BT.to(device, non_blocking=True)
        total += next_token_loss(model, x_BT, y_BT, masked=False).item()
        n += y_BT.numel()
    loss = total / max(n, 1)
    return {
        "val_loss": loss,
        "val_ppl": perplexity(loss),
        "val_bpb": bits_per_byte(loss, bytes_per_token),
    }


OBJECTIVES = ("causal-lm", "mlm")
# what each objective needs the model to do (zenlm.models.registry capabilities)
OBJECTIVE_CAPABILITY = {"causal-lm": "causal-lm", "mlm": "masked-lm"}
MASK_PROB = 0.15  # fraction of ordinary tokens a masked-LM row asks the model to predict


# ---------------------------------------------------------------------------------------------- masked LM
def mlm_targets(labels_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scored positions of a masked-LM batch: labels_BT [B, T] (-100 = not scored) ->
    (pos_N, target_N), the flat indices into B*T of the N masked positions and their original ids."""
    flat = labels_BT.flatten()
    pos_N = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    return pos_N, flat[pos_N]


def masked_lm_logits(model: nn.Module, ids_BT: torch.Tensor, pos_N: torch.Tensor) -> torch.Tensor:
    """Encode ids_BT [B, T], keep the hidden states of the flat positions pos_N [N] and only then apply the
    vocabulary-sized MLM head: -> float32 logits [N, V] (never [B, T, V])."""
    h_BTC = model(ids_BT)
    h_NC = h_BTC.flatten(0, 1).index_select(0, pos_N)
    return model.mlm_logits(h_NC)


def masked_lm_loss(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> LossOutput:
    """Summed cross-entropy over the N masked positions. batch = (ids_BT, pos_N, target_N) int64 (see
    :func:`mlm_targets`); N targets, B*T input tokens."""
    ids_BT, pos_N, target_N = batch
    logits_NV = masked_lm_logits(model, ids_BT, pos_N)
    return LossOutput(F.cross_entropy(logits_NV, target_N, reduction="sum"), target_N.numel(), ids_BT.numel())


def masked_lm_targets(batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> int:
    """The targets of a masked-LM batch: its N masked positions."""
    return batch[2].numel()


def masked_lm_scores(logits_NV: torch.Tensor, target_N: torch.Tensor) -> tuple[float, int]:
    """(summed cross-entropy in nats, number of arg-max predictions equal to the target) over N positions."""
    loss_sum = F.cross_entropy(logits_NV.float(), target_N, reduction="sum").item()
    return loss_sum, int((logits_NV.argmax(-1) == target_N).sum().item())


def masked_lm_metrics(loss_sum: float, n_correct: int, n: int) -> dict[str, float]:
    """val_loss (mean nats per masked token), val_mlm_ppl = exp(val_loss), val_masked_acc in [0, 1]."""
    loss = loss_sum / max(n, 1)
    return {"val_loss": loss, "val_mlm_ppl": perplexity(loss), "val_masked_acc": n_correct / max(n, 1)}


@torch.no_grad()
def evaluate_mlm(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
) -> dict[str, float]:
    """Masked-LM validation over (ids_BT, labels_BT) batches (e.g. :func:`mlm_eval_batches`); see
    :func:`masked_lm_metrics` for what it returns."""
    loss_sum, n_correct, n = 0.0, 0, 0
    for ids_BT, labels_BT in batches:
        pos_N, target_N = mlm_targets(labels_BT)
        ids_BT, pos_N, target_N = (t.to(device, non_blocking=True) for t in (ids_BT, pos_N, target_N))
        s, c = masked_lm_scores(masked_lm_logits(model, ids_BT, pos_N), target_N)
        loss_sum, n_correct, n = loss_sum + s, n_correct + c, n + target_N.numel()
    return masked_lm_metrics(loss_sum, n_correct, n)


def mlm_token_ids(tok: Tokenizer, where: Path) -> dict[str, Any]:
    """The ids masked-LM batches need (mask, [CLS] = bos, [SEP] = eos, all special ids) from ``tok``;
    DataError naming what is missing when the tokenizer (found in ``where``) lacks one."""
    roles = {"mask": "the mask token", "bos": "[CLS], the first token of a row",
             "eos": "[SEP], the last token of a row"}
    missing = [f"{tok.role_tokens[r]} ({what})" for r, what in roles.items() if getattr(tok, f"{r}_id") is None]
    if missing:
        raise DataError(
            f"masked-LM pretraining needs special tokens that the tokenizer in {where} lacks: {'; '.join(missing)}. "
            "Train a tokenizer with zenlm's special tokens, e.g. `zenlm tokenizer train --kind wordpiece --corpus "
            "TEXT --out TOK`, then run `zenlm prepare --tokenizer TOK ...` again.")
    return {"mask_id": tok.mask_id, "cls_id": tok.bos_id, "sep_id": tok.eos_id,
            "special_ids": sorted(tok.special_ids)}


# ---------------------------------------------------------------------------------------------- the recipe
# (get_batch, loss function, count_targets, evaluate): what fit needs from an objective
Task = tuple[Callable[[int, int], Any], Callable[[nn.Module, Any], LossOutput], Callable[[Any], int],
             Callable[[nn.Module], dict[str, float]]]


def _model_config(objective: str, model: str | None, vocab_size: int, overrides: dict[str, Any],
                  pad_id: int | None) -> Any:
    """A new run's model config: the preset ``model`` (None = the objective's default recipe's model), which
    must belong to an architecture that can learn ``objective`` (GPT for causal-lm, BERT for mlm)."""
    name = model or recipe_settings(DEFAULT_RECIPE[objective])["model"]
    arch, _ = find_preset(name)
    needs = OBJECTIVE_CAPABILITY[objective]
    if not arch.can(needs):
        fits = [o for o, c in OBJECTIVE_CAPABILITY.items() if arch.can(c)]
        hint = f" (pretrain {name!r} with --objective {fits[0]})" if fits else ""
        raise ConfigError(f"model {name!r} is a {arch.title} preset, but {objective} pretraining needs a {needs} "
                          f"model; choose one of: {', '.join(list_presets(needs))}{hint}, or leave --model out "
                          f"for {recipe_settings(DEFAULT_RECIPE[objective])['model']}.")
    extra = {"pad_id": pad_id} if pad_id is not None else {}  # the masked LM's padding id (BertConfig.pad_id)
    return arch.config(name, **{"vocab_size": vocab_size, **extra, **overrides})


def _start_run_dir(out: Path, data: Path, index: dict[str, Any], objective: str, model_cfg: dict[str, Any],
                   batch: dict[str, Any], train: TrainConfig, optim: OptimConfig,
                   extra: dict[str, Any] | None = None) -> None:
    """Copy the tokenizer into a new run directory and write its config.yaml (``extra``: more sections)."""
    copy_tokenizer_files(data, out)
    run_config = {
        "zenlm_version": __version__,
        "model": model_cfg,
        "batch": batch,
        "train": config_to_dict(train),
        "optim": config_to_dict(optim),
        "data": _data_section(data, index),
        "objective": objective,
        **(extra or {}),
    }
    write_run_config(out, run_config)


def _check_same_tokenizer(data: Path, init: Path) -> None:
    """Continued pretraining reads ids as the init run's embeddings understand them: same vocabulary."""
    ours, theirs = Tokenizer.load(data).hf, Tokenizer.load(init).hf
    if ours.get_vocab(with_added_tokens=True) != theirs.get_vocab(with_added_tokens=True):
        raise DataError(f"the shards in {data} were made with another tokenizer than the one of --init {init}; "
                        f"prepare them with that tokenizer: zenlm prepare --tokenizer {init} ...")


def _data_section(data: Path, index: dict[str, Any]) -> dict[str, Any]:
    """config.yaml's ``data:``: where the shards are, and their fingerprint (compared on --resume)."""
    return {"dir": str(data.resolve()), "vocab_size": int(index["vocab_size"]), "corpus": index.get("corpus"),
            **data_fingerprint(data)}


@dataclass
class RunSettings:
    """The settings a run directory continues with on resume, read from its config.yaml."""

    objective: str
    train: TrainConfig
    optim: OptimConfig
    batch: dict[str, Any]  # batch_size, seq_len, eval_tokens, eval_seq_len, eval_batch_size


BATCH_KEYS = ("batch_size", "seq_len", "eval_tokens", "eval_seq_len", "eval_batch_size")


def saved_settings(out: str | Path) -> RunSettings:
    """What ``resume=True`` continues ``out`` with when it is not given other settings: the objective, loop,
    optimiser and batch settings in its config.yaml (CheckpointError naming the file and section when one is
    damaged)."""
    saved = read_run_config(out)
    objective = saved.get("objective", "causal-lm")
    if objective not in OBJECTIVES:
        raise config_error(out, ConfigError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}; "
                                            "this is not a pretraining run"))
    settings: dict[str, Any] = {}
    for section, cls in (("train", TrainConfig), ("optim", OptimConfig)):
        try:
            settings[section] = dataclass_from_dict(cls, saved.get(section) or {})
        except ConfigError as e:
            raise config_error(out, e, section) from None
    batch = {k: v for k, v in (saved.get("batch") or {}).items() if k in BATCH_KEYS}
    for k, v in batch.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < (0 if k == "eval_tokens" else 1)):
            raise config_error(out, ConfigError(f"{k} must be a whole number >= 1 or null, got {v!r}"), "batch")
    return RunSettings(objective, settings["train"], settings["optim"], batch)


def _check_same_data(out: Path, saved: dict[str, Any], data: Path) -> None:
    """Refuse to resume ``out`` on a data directory whose token ids differ from the ones it was trained on:
    another tokenizer (compared with the run's own tokenizer.json) or, when config.yaml records one, another
    index fingerprint. A copy of the same data elsewhere is fine."""
    where = (saved.get("data") or {}).get("dir")
    hint = (f"resume with --data {where}" if where and Path(where).resolve() != data.resolve() else
            "resume with the data the run was trained on") + ", or start a new run with another --out"
    fp = data_fingerprint(data)
    own = out / "tokenizer.json"
    if own.is_file() and file_sha256(own) != fp["tokenizer_sha256"]:
        raise ConfigError(f"--resume: the tokenizer of {data} is not the one {out} was trained with "
                          f"({own} differs); {hint}.")
    recorded = (saved.get("data") or {}).get("index_sha256")
    if recorded is not None and recorded != fp["index_sha256"]:
        raise ConfigError(f"--resume: {data} holds other token shards than {out} was trained on (its index.json "
                          f"differs from the fingerprint in {out / 'config.yaml'}); {hint}.")


def _causal_lm_task(data: Path, index: dict[str, Any], batch_size: int, seq_len: int, eval_batch_size: int,
                    eval_seq_len: int, eval_tokens: int | None, seed: int, device: torch.device) -> Task:
    train_shards = TokenShards.open(data, "train")
    val_shards = TokenShards.open(data, "val")
    val_info = index["splits"]["val"]
    bytes_per_token = max(val_info["bytes"], 1) / max(val_info["tokens"], 1)
    batches = CausalBatches(train_shards, batch_size, seq_len, seed=seed)
    # raises now, before anything is written, not at the first evaluation, when the validation split is too small
    eval_batches(val_shards, eval_batch_size, eval_seq_len, eval_tokens)

    def get_batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        x_BT, y_BT = batches.get(step, micro)
        return x_BT.to(device, non_blocking=True), y_BT.to(device, non_blocking=True)

    def evaluate(m: nn.Module) -> dict[str, float]:
        return evaluate_causal_lm(m, val_shards, eval_batch_size, eval_seq_len, eval_tokens, bytes_per_token,
                                  device)

    return get_batch, causal_lm_loss, causal_lm_targets, evaluate


def _mlm_task(data: Path, index: dict[str, Any], batch_size: int, seq_len: int, eval_batch_size: int,
              eval_seq_len: int, eval_tokens: int | None, seed: int, device: torch.device,
              token_ids: dict[str, Any]) -> Task:
    masking = dict(token_ids, vocab_size=int(index["vocab_size"]), mask_prob=MASK_PROB)
    batches = MLMBatches(TokenShards.open(data, "train"), batch_size, seq_len, seed=seed, **masking)
    val_shards = TokenShards.open(data, "val")
    # raises now, not at the first evaluation, when the validation split is too small
    mlm_eval_batches(val_shards, eval_batch_size, eval_seq_len, eval_tokens, **masking)

    def get_batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids_BT, labels_BT = batches.get(step, micro)
        pos_N, target_N = mlm_targets(labels_BT)  # on the CPU, so the device never waits on a nonzero()
        return tuple(t.to(device, non_blocking=True) for t in (ids_BT, pos_N, target_N))  # type: ignore[return-value]

    def evaluate(m: nn.Module) -> dict[str, float]:
        return evaluate_mlm(m, mlm_eval_batches(val_shards, eval_batch_size, eval_seq_len, eval_tokens, **masking),
                            device)

    return get_batch, masked_lm_loss, masked_lm_targets, evaluate


def pretrain(
    data: str | Path,
    out: str | Path,
    *,
    objective: Literal["causal-lm", "mlm"] | None = None,
    model: str | None = None,
    model_overrides: dict[str, Any] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    batch_size: int | None = None,
    seq_len: int | None = None,
    eval_tokens: int | None = 65536,
    eval_seq_len: int | None = None,
    eval_batch_size: int | None = None,
    init_embeddings: str | Path | None = None,
    train: TrainConfig | None = None,
    optim: OptimConfig | None = None,
    init: str | Path | None = None,
    lora: LoRAConfig | None = None,
    progress: ProgressFn | None = None,
) -> TrainResult:
    """Pretrain a GPT (causal LM) or a BERT (masked LM) on the token shards in ``data``; write run directory ``out``.

    data:            a directory made by ``zenlm prepare`` (shards, index.json, tokenizer files)
    out:             the run directory to create (or to continue with ``resume=True``). A folder holding files
                     that are not a run is refused; a run that stopped before its first checkpoint is started
                     again; a run with a checkpoint needs ``resume`` or ``overwrite``.
    objective:       "causal-lm" (GPT, next-token prediction) or "mlm" (BERT, masked tokens; needs a tokenizer
                     with mask, bos and eos tokens). None = "causal-lm" for a new run, and the saved objective
                     on resume (read from config.yaml; giving another one is an error).
    model:           a preset name (``zenlm presets``) of an architecture that can learn the objective: a GPT
                     preset for causal-lm (or a lower rung of the ladder: ngram-N, mlp-*, lstm-*, gru-*), a BERT
                     preset for mlm; None = the objective's default recipe's ("demo" / "bert-mini"). Ignored on
                     resume: the saved config is used.
    model_overrides: config fields to change on top of the preset (GPTConfig or BertConfig, e.g. {"n_layer": 6})
    resume:          continue the run in ``out`` from its newest checkpoint: the data must be the run's (same
                     tokenizer and shards, checked by their fingerprint in config.yaml); settings left at None
                     (train, optim, batch_size, seq_len, eval_seq_len, eval_batch_size) are the run's own
    overwrite:       start again from scratch in an ``out`` that holds a run (its checkpoints are deleted)
    batch_size:      sequences per micro-batch (None = 16, or the run's own on resume); tokens per step =
                     batch_size * seq_len * grad_accum
    seq_len:         training context (None = the model's block_size / max_len, or the run's own on resume; for a
                     stateful model, which has none, the truncated-BPTT window, 64); an MLM row of seq_len tokens
                     holds [CLS], seq_len - 2 tokens of text and [SEP]
    eval_tokens:     validation tokens per evaluation (None = the whole split)
    eval_seq_len:    window length for validation (None = seq_len); fix it to compare runs fairly
    eval_batch_size: windows per validation batch (None = batch_size)
    init_embeddings: a word-vector file (word2vec text or binary, fastText .vec, GloVe; or a `zenlm wordvec
                     train` directory) whose vectors initialise a new model's token embeddings, one row per
                     vocabulary entry found; the coverage is reported and saved in config.yaml
    train:           the loop's settings (None = TrainConfig(), or the run's own on resume)
    optim:           None = the objective's default recipe's optimiser (Muon + AdamW for causal-lm; AdamW
                     5e-4, linear decay, weight decay 0.01 for mlm; see :mod:`zenlm.recipes.registry`), or the
                     run's own on resume
    init:            continued pretraining: start from this GPT or BERT run's weights and model config (``model``
                     and ``model_overrides`` are then ignored; the shards must use its tokenizer)
    lora:            train LoRA adapters on the frozen ``init`` model instead of every weight (``init`` may then
                     be an int8 run); the run saves adapter.safetensors and records the base run. On resume the
                     saved ``init`` and ``lora`` settings are used.
    """
    data, out = Path(data), Path(out)
    if objective is not None and objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective {objective!r}; choose one of: {', '.join(OBJECTIVES)}.")
    if resume and overwrite:
        raise ConfigError("give either --resume (continue the run) or --overwrite (start it again), not both.")
    index = load_index(data)
    vocab_size = int(index["vocab_size"])
    state = run_dir_state(out)
    refuse_foreign_out(out)
    restart = False  # a run without a checkpoint yet, started again from step 0
    lora_run = None
    if resume:
        if state == "new":
            raise CheckpointError(f"--resume: {out} is not a zenlm run directory (no config.yaml); start the run "
                                  "without --resume.")
        if state == "run" and not list_checkpoints(out / "checkpoints"):
            raise CheckpointError(f"--resume: {out} holds final weights but no checkpoint to continue from; pass "
                                  "--overwrite to train it again from scratch, or choose another --out.")
        saved = read_run_config(out)
        own = saved_settings(out)
        if objective is not None and objective != own.objective:
            raise ConfigError(f"{out} is a {own.objective} run; resume it with --objective {own.objective} "
                              "(or without --objective), or start a new run in another --out.")
        objective = own.objective
        try:
            cfg = config_from_dict(saved["model"])
        except ConfigError as e:
            raise config_error(out, e, "model") from None
        sb = own.batch
        batch_size = batch_size if batch_size is not None else sb.get("batch_size")
        seq_len = seq_len if seq_len is not None else sb.get("seq_len")
        eval_seq_len = eval_seq_len if eval_seq_len is not None else sb.get("eval_seq_len")
        eval_batch_size = eval_batch_size if eval_batch_size is not None else sb.get("eval_batch_size")
        train, optim = train or own.train, optim or own.optim
        _check_same_data(out, saved, data)
        lora_run = saved.get("lora")
        if state == "unstarted":
            restart = True
            report(progress, "train", message=f"note: {out} has no checkpoint yet (the run stopped before its first "
                   "save): starting it from step 0 with its saved settings")
    else:
        if state == "run" and not overwrite:
            raise ConfigError(f"{out} already holds a run; pass --resume to continue it, --overwrite to start it "
                              "again from scratch, or choose another --out.")
        if state == "run":
            report(progress, "train", message=f"note: --overwrite: the run in {out} is replaced (its checkpoints "
                   "are deleted when training starts)")
        elif state == "unstarted":
            report(progress, "train", message=f"note: {out} holds a run that stopped before its first checkpoint; "
                   "starting it again")
        init_objective = None
        if init is not None:  # continued pretraining: the objective the init run's architecture learns
            init_arch = run_architecture(read_run_config(init))
            fits = [o for o, c in OBJECTIVE_CAPABILITY.items() if init_arch.can(c)]
            if not fits:
                raise ConfigError(f"--init {init} holds a {init_arch.title} model, which none of the pretraining "
                                  f"objectives ({', '.join(OBJECTIVES)}) trains.")
            init_objective = objective if objective in fits else fits[0]
        elif lora is not None:
            raise ConfigError("LoRA adapts a trained model: give the run to adapt with --init RUN.")
        objective = objective or init_objective or "causal-lm"
        if init_objective is not None and objective != init_objective:
            raise ConfigError(f"--init {init} holds a {init_arch.title} model, which continues with --objective "
                              f"{init_objective}, not {objective}.")
    train = train or TrainConfig()
    world = apply_process_settings(train)  # with torchrun: joins the other processes of the run
    mlm = objective == "mlm"
    # the tokenizer the run copies must load; a masked LM's must have the tokens the masking uses (both checked
    # before anything is written)
    tok = Tokenizer.load(data)
    token_ids = mlm_token_ids(tok, data) if mlm else {}
    net: nn.Module | None = None
    if lora_run is not None:  # resuming a LoRA run: its base (fingerprint checked) with LoRA layers; fit loads A, B
        net, _, _ = build_model_from_run(out)
    elif not resume and init is not None:
        net, init_saved = load_base(init, lora=lora is not None)
        _check_same_tokenizer(data, Path(init))
        cfg = net.config  # type: ignore[assignment]
        if lora is not None:
            fingerprint = weights_fingerprint(net)
            lora = lora.with_tokens(tok)
            torch.manual_seed(train.seed)  # the adapters' random A matrices: the same run gives the same start
            lora_run = lora_section(lora, apply_lora(net, lora), init, fingerprint, init_saved)
    elif not resume:
        cfg = _model_config(objective, model, vocab_size, model_overrides or {}, tok.pad_id if mlm else None)
    arch = architecture_of(cfg)
    if arch.can("stateful"):  # the n-gram, MLP and LSTM rungs (recipes.ladder)
        ladder.check_one_process(world.size)
    stateful = arch.can("stateful") and arch.count is None  # trained with truncated BPTT
    optim = optim or OptimConfig(**recipe_settings(default_recipe(objective, model))["optim"])
    if lora_run is not None and optim.name == "muon":  # nothing for Muon to train: A and B are AdamW's (optim.py)
        optim = dataclasses.replace(optim, name="adamw")
    batch_size = batch_size or 16
    if cfg.vocab_size < vocab_size:
        raise ConfigError(f"model vocab_size {cfg.vocab_size} is smaller than the data's {vocab_size}.")
    context = "max_len" if mlm else "block_size"
    limit = getattr(cfg, "block_size", None)  # a stateful model has no context limit
    seq_len = seq_len or limit or ladder.STATEFUL_SEQ_LEN
    if limit is not None and seq_len > limit:
        raise ConfigError(f"seq_len {seq_len} exceeds the model's {context} {limit}.")
    if limit is not None and eval_seq_len is not None and eval_seq_len > limit:
        raise ConfigError(f"eval_seq_len {eval_seq_len} exceeds the model's {context} {limit}.")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")

    device = resolve_device(train.device)
    resolve_precision(train.precision, device)  # fp16 on a CPU is refused now, before anything is written
    task_args = (data, index, batch_size, seq_len, eval_batch_size or batch_size, eval_seq_len or seq_len,
                 eval_tokens, train.seed, device)
    get_batch, loss_fn, count_targets, evaluate = _mlm_task(*task_args, token_ids) if mlm else \
        ladder.stateful_task(*task_args, train.grad_accum) if stateful else _causal_lm_task(*task_args)
    torch.manual_seed(train.seed)
    net = (net or build_model(cfg)).to(device)
    vectors = ladder.init_from_vectors(net, tok, init_embeddings) if init_embeddings is not None and not resume \
        else None
    if stateful:
        net = ladder.StateCarrier(net, batch_size)  # the state carried from window to window, saved in checkpoints

    batch = {"batch_size": batch_size, "seq_len": seq_len, "eval_tokens": eval_tokens,
             "eval_seq_len": eval_seq_len, "eval_batch_size": eval_batch_size}
    world.barrier()  # every process has checked --out before process 0 writes into it
    if world.is_main:
        if not resume or restart:
            if state in ("run", "unstarted"):
                clear_run_dir(out)
            out.mkdir(parents=True, exist_ok=True)
            extra = {"init": str(Path(init).resolve())} if init is not None else {}
            _start_run_dir(out, data, index, objective, cfg.to_dict(), batch, train, optim,
                           extra={**extra, **({"lora": lora_run} if lora_run else {}),
                                  **({"init_embeddings": vectors} if vectors else {})})
        else:  # what the run continues with now is what a later --resume continues with
            write_run_config(out, {**saved, "batch": batch, "train": config_to_dict(train),
                                   "optim": config_to_dict(optim), "data": {**(saved.get("data") or {}),
                                                                            **data_fingerprint(data)}})
    world.barrier()
    if vectors is not None:
        report(progress, "train", message=f"embeddings from {init_embeddings}: {vectors['line']}")
    if arch.count is not None:  # the n-gram model: counted from the training split, not trained
        result = ladder.count_run(arch, cfg, data, index, out, eval_seq_len=eval_seq_len or seq_len,
                                  eval_tokens=eval_tokens, resume=resume and not restart, progress=progress)
        _plot_loss(out, "token")
        return result

    n_train = index["splits"]["train"]["tokens"]
    shape = f"{cfg.n_layer} layers, {cfg.n_embd} wide" if hasattr(cfg, "n_layer") and hasattr(cfg, "n_embd") \
        else arch.title
    report(progress, "train", message=(
        f"{'BERT encoder (masked LM)' if mlm else 'model'}: {shape}, "
        f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters; {n_train:,} training tokens; "
        f"{batch_size}x{seq_len}x{train.grad_accum} tokens/step; device {device}"))
    if lora_run is not None:
        report(progress, "train", message=describe_lora(net))
    result = fit(net, get_batch, loss_fn, out, train, optim, evaluate=evaluate, resume=resume and not restart,
                 progress=progress, count_targets=count_targets)
    if not world.is_main:
        return result
    if stateful:  # model.safetensors holds the model's own weights, not the state carried in training
        ladder.save_lm_weights(net, out / "model.safetensors")
    _plot_loss(out, "masked token" if mlm else "token")
    if lora_run is not None:
        finish_lora_run(out, lora_run)
    return result


def _plot_loss(out: Path, per: str) -> None:
    try:
        from zenlm.viz import plot_loss_curve

        plot_loss_curve(out / "metrics.jsonl", out / "plots" / "loss.png", per=per)
    except ImportError:  # pragma: no cover - matplotlib is a declared dependency
        pass


__all__ = ["pretrain", "saved_settings", "RunSettings", "causal_lm_loss", "causal_lm_targets", "evaluate_causal_lm", "masked_lm_loss",
           "masked_lm_targets", "evaluate_mlm", "mlm_targets", "masked_lm_logits", "masked_lm_scores",
           "masked_lm_metrics", "OBJECTIVES"]

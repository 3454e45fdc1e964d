"""Chat fine-tuning: a trained GPT run + conversations -> a chat model that answers in turn and stops.

    conversations  --chat template-->  <|bos|>user:\\nHi<|eos|>\\nassistant:\\nHello!<|eos|>\\n ...
    loss = sum over the assistant's tokens t of -log p(x_t | x_<t)  /  assistant tokens of the step

Only what the assistant writes is scored -- each reply *with* its end-of-turn token, so the model learns to end
its turn -- and the history in front of every reply is kept (:mod:`zenlm.data.chat`). The loss is summed per
micro-batch and divided by the assistant tokens of the whole optimiser step (:mod:`zenlm.train.step`), so a
token in a short reply weighs what a token in a long one does, whatever the accumulation. The output head and
the loss run on the scored positions only, in chunks of rows at a large vocabulary
(:mod:`zenlm.train.head_loss`).

One chat template serves training, ``zenlm chat``, the server and the export: the run's tokenizer_config.json
holds it. The base's template is kept when it marks the replies with ``{% generation %}``; zenlm's earlier
template (which has no marks) is replaced by the current one; ``chat_template=FILE`` sets another. Its
end-of-turn token (the special token right after a reply) must be a real special token, not the padding one,
and inside the marked span: a model never scored on its end-of-turn token never learns to stop.

With ``lora`` the base stays frozen (it may be an int8 run from ``zenlm quantize``) and only LoRA adapters are
trained (:mod:`zenlm.models.lora`); the run then holds adapter.safetensors. config.yaml records the task
(``task: {kind: chat, ...}``), so ``zenlm chat`` and the chat page show a chat-tuned model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from zenlm import __version__
from zenlm.adapter import finish_lora_run, load_base, lora_section
from zenlm.chat_template import TemplateError, compile_template
from zenlm.data.batches import IGNORE_INDEX
from zenlm.data.chat import (
    BUILTIN_CHATS,
    ChatBatches,
    Conversation,
    EncodedChats,
    check_messages,
    encode_conversations,
    fixed_batches,
    read_conversations,
    split_conversations,
)
from zenlm.data.jsonl import read_text_utf8
from zenlm.device import resolve_device
from zenlm.errors import ConfigError, DataError
from zenlm.evaluate import perplexity
from zenlm.fileio import atomic_write_text, read_json_object
from zenlm.models.lora import LoRAConfig, apply_lora, describe_lora, weights_fingerprint
from zenlm.progress import ProgressFn, report
from zenlm.rundir import (
    LM_TASKS,
    copy_tokenizer_files,
    read_run_config,
    refuse_foreign_out,
    run_architecture,
    run_task,
    write_run_config,
)
from zenlm.tokenizer import (
    CHAT_TEMPLATE,
    END_PROBE_MESSAGES,
    LEGACY_CHAT_TEMPLATE,
    RENDER_MAX_CHARS,
    Tokenizer,
    end_of_turn_id,
)
from zenlm.train.checkpoint import list_checkpoints
from zenlm.train.head_loss import next_token_loss
from zenlm.train.loop import TrainConfig, TrainResult, apply_process_settings, config_to_dict, fit
from zenlm.train.optim import OptimConfig
from zenlm.train.step import LossOutput

# What ``train=None`` means (the CLI's --max-steps, --eval-every, ... default to these too)
DEFAULT_TRAIN: dict[str, Any] = dict(max_steps=300, eval_every=50, tensorboard=False)
FULL_LR, LORA_LR = 3e-4, 2e-3  # AdamW peak rates: every weight / adapters that start from zero


# ------------------------------------------------------------------------------------------ objective


def chat_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], pad_id: int | None = None) -> LossOutput:
    """Next-token cross-entropy summed over the assistant's tokens. batch = (x_BT, labels_BT), labels
    IGNORE_INDEX where not scored; input tokens: those that are not ``pad_id`` (padding)."""
    x_BT, labels_BT = batch
    n_tokens = int(x_BT.ne(pad_id).sum()) if pad_id is not None else x_BT.numel()
    return LossOutput(next_token_loss(model, x_BT, labels_BT), int(labels_BT.ne(IGNORE_INDEX).sum()), n_tokens)


@torch.no_grad()
def evaluate_chat(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device
                  ) -> dict[str, float]:
    """Validation loss (nats per assistant token) and perplexity over fixed batches."""
    total, n = 0.0, 0
    for x_BT, labels_BT in batches:
        out = chat_loss(model, (x_BT.to(device), labels_BT.to(device)))
        total += float(out.loss_sum)
        n += out.n_targets
    loss = total / max(n, 1)
    return {"val_loss": loss, "val_ppl": perplexity(loss)}


# ---------------------------------------------------------------------------------------------- checks


def _check_base(base: Path, lora: bool) -> dict[str, Any]:
    """The base run's config.yaml; a run that is no decoder-only language model is refused, in one line."""
    saved = read_run_config(base)
    arch = run_architecture(saved)
    if not (arch.can("causal-lm") and arch.can("generate")) or arch.can("stateful"):
        raise ConfigError(f"{base} holds a {arch.title} model; chat fine-tuning trains a decoder-only Transformer "
                          "(a GPT run from `zenlm pretrain`, `zenlm demo` or `zenlm convert from-hf`).")
    if run_task(saved) not in LM_TASKS or saved.get("seq2seq"):
        raise ConfigError(f"{base} was fine-tuned for another task ({run_task(saved) or 'source -> target pairs'}); "
                          "start from the language-model run it was made from.")
    if saved.get("quantization") and not lora:
        raise ConfigError(f"{base} holds int8 weights, which cannot be trained; fine-tune the full-precision run, or "
                          "train LoRA adapters on this one (--lora).")
    return saved


def chat_template_for(tok: Tokenizer, chat_template: str | Path | None) -> tuple[str, str]:
    """(template, where it came from): the file ``chat_template``, else the base's own template, except zenlm's
    earlier one (no ``{% generation %}`` marks), which becomes :data:`~zenlm.tokenizer.CHAT_TEMPLATE`."""
    if chat_template is not None:
        path = Path(chat_template)
        if not path.is_file():
            raise DataError(f"chat template file {path} does not exist; give a Jinja file whose replies are marked "
                            "with {% generation %} ... {% endgeneration %}.")
        return read_text_utf8(path), str(path.resolve())
    if tok.chat_template == LEGACY_CHAT_TEMPLATE:
        return CHAT_TEMPLATE, "zenlm"
    return tok.chat_template, "zenlm" if tok.chat_template == CHAT_TEMPLATE else "base"


def template_special_ids(enc: EncodedChats, tok: Tokenizer, eot: int) -> list[int]:
    """The special-token ids (padding aside) that the encoded conversations contain, the end-of-turn id first:
    what ``--lora-tokens auto`` trains the rows of."""
    special = set(tok.special_ids) - {tok.pad_id}
    seen: set[int] = set()
    for ids in enc.ids:
        seen.update(int(i) for i in np.unique(ids) if int(i) in special)
    return [eot, *sorted(seen - {eot})]


def check_end_of_turn(tok: Tokenizer, max_tokens: int) -> int:
    """The end-of-turn id of ``tok``'s chat template, checked: a special token other than padding, scored as
    the last token of a reply (inside the ``{% generation %}`` span). ConfigError saying what is wrong."""
    try:
        compile_template(tok.chat_template, RENDER_MAX_CHARS)
    except TemplateError as e:
        raise DataError(f"{e}") from None
    eot = end_of_turn_id(tok)
    if eot is None:
        raise ConfigError("the chat template writes no special token right after a reply (an end-of-turn token "
                          f"such as {tok.role_tokens['eos']!r}); the model could never say that its turn is over. "
                          "End each assistant message with one, inside {% generation %}.")
    if eot == tok.pad_id:
        raise ConfigError(f"the chat template ends a reply with the padding token {tok.id_to_token(eot)!r}; padding "
                          "is never scored, so the model would never learn to stop. End replies with another "
                          "special token (zenlm's template uses <|eos|>).")
    where = "a two-message conversation"
    probe = encode_conversations([Conversation(check_messages(END_PROBE_MESSAGES, where), where)], tok, max_tokens)
    ids, scored = probe.ids[0], probe.scored[0]
    if not scored.any() or ids[scored][-1] != eot:
        raise ConfigError(f"the chat template's {{% generation %}} span does not end with its end-of-turn token "
                          f"{tok.id_to_token(eot)!r}; put the token inside the span so that it is scored.")
    return eot


def _write_template(out: Path, template: str) -> None:
    """Set ``chat_template`` in the run's tokenizer_config.json (copied from the base), keeping its other keys."""
    path = out / "tokenizer_config.json"
    cfg = read_json_object(path, DataError, "it was copied from the base run")
    cfg["chat_template"] = template
    atomic_write_text(path, json.dumps(cfg, indent=2, ensure_ascii=False))
    (out / "chat_template.jinja").unlink(missing_ok=True)  # the template is in tokenizer_config.json


# --------------------------------------------------------------------------------------------- recipe


def finetune_chat(
    base: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    val: str | Path | None = None,
    val_fraction: float = 0.05,
    max_len: int | None = None,
    chat_template: str | Path | None = None,
    batch_size: int = 8,
    lr: float | None = None,
    warmup_steps: int = 20,
    weight_decay: float = 0.0,
    train: TrainConfig | None = None,
    lora: LoRAConfig | None = None,
    progress: ProgressFn | None = None,
) -> TrainResult:
    """Fine-tune the GPT of run directory ``base`` on the conversations of ``data``; writes run directory ``out``.

    data:          ``.jsonl`` with one conversation per line (``{"messages": [{"role", "content"}, ...]}``, or
                   ShareGPT ``{"conversations": [{"from", "value"}, ...]}``), or a built-in data set: chitchat,
                   chatterbot-en, chatterbot-zh
    val:           validation conversations; None holds out ``val_fraction`` of ``data`` (a seeded shuffle)
    max_len:       tokens per conversation (default and most: the model's context); a longer one is cut after
                   the last reply that fits
    chat_template: a Jinja file to train, chat and serve with (replies marked with ``{% generation %}``); default:
                   the base's template (zenlm's earlier one is replaced by the current one)
    batch_size:    conversations per micro-batch (a step reads ``train.grad_accum`` of them)
    lr:            peak AdamW learning rate (warm-up, then cosine decay to lr / 10); None: 3e-4, or 2e-3 with
                   ``lora``
    lora:          train LoRA adapters on the frozen base instead of every weight (the base may be int8)
    """
    train = train or TrainConfig(**DEFAULT_TRAIN)
    world = apply_process_settings(train)  # with torchrun: joins the other processes of the run
    base, out = Path(base), Path(out)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    if max_len is not None and max_len < 2:
        raise ConfigError(f"max_len must be >= 2 tokens, got {max_len}.")
    refuse_foreign_out(out)  # a folder of other files is never written into
    if (out / "config.yaml").exists() or list_checkpoints(out / "checkpoints"):
        raise ConfigError(f"{out} already holds a run; choose another --out.")
    saved = _check_base(base, lora is not None)

    # ---- everything is read and checked before the run directory is made -----------------------------------
    tok = Tokenizer.load(base)
    template, template_source = chat_template_for(tok, chat_template)
    tok.chat_template = template
    block = int(saved["model"].get("block_size") or 0) or 1 << 30
    max_tokens = min(max_len or block, block) + 1  # a row reads all ids but the last
    eot = check_end_of_turn(tok, max_tokens)
    convs = read_conversations(data)
    if val is not None:
        train_convs, val_convs = convs, read_conversations(val)
    else:
        train_convs, val_convs = split_conversations(convs, val_fraction, train.seed)
    enc = encode_conversations(train_convs, tok, max_tokens, progress=progress)
    val_enc = encode_conversations(val_convs, tok, max_tokens, progress=progress, what="validation conversations") \
        if val_convs else EncodedChats()

    device = resolve_device(train.device)
    torch.manual_seed(train.seed)
    net, saved = load_base(base, lora=lora is not None)
    if net.config.vocab_size < tok.vocab_size:
        raise ConfigError(f"{base}: the model's vocab_size {net.config.vocab_size} is smaller than its tokenizer's "
                          f"{tok.vocab_size}.")
    lora_run = None
    if lora is not None:
        # ``auto``: the rows of the special tokens the conversations use (the end-of-turn token above all: the
        # base has learned to keep it unlikely, and adapters alone move it slowly; see zenlm.models.lora)
        lora = lora.with_tokens(tok, auto=template_special_ids(enc, tok, eot))
        fingerprint = weights_fingerprint(net)
        lora_run = lora_section(lora, apply_lora(net, lora), base, fingerprint, saved)
    net = net.to(device)
    pad_id = tok.pad_id if tok.pad_id is not None else 0  # padding follows a row's end: never attended, never scored
    batches = ChatBatches(enc, batch_size, pad_id=pad_id, grad_accum=train.grad_accum, seed=train.seed)
    val_batches = fixed_batches(val_enc, batch_size, pad_id) if len(val_enc) else []
    lr = lr if lr is not None else (LORA_LR if lora is not None else FULL_LR)
    optim = OptimConfig(name="adamw", lr=lr, min_lr=lr / 10, warmup_steps=warmup_steps, schedule="cosine",
                        weight_decay=weight_decay, betas=(0.9, 0.95), grad_clip=1.0)

    # ---- run directory -----------------------------------------------------------------------------------
    task = {"kind": "chat", "base": str(base.resolve()),
            "data": str(data) if str(data) in BUILTIN_CHATS else str(Path(data).resolve()),
            "val": str(Path(val).resolve()) if val is not None else None, "template": template_source,
            "end_of_turn": tok.id_to_token(eot), "max_tokens": max_tokens - 1, "conversations": len(enc),
            "val_conversations": len(val_enc), "assistant_tokens": enc.n_scored, "truncated": enc.truncated,
            "dropped": enc.dropped}
    run_config: dict[str, Any] = {"zenlm_version": __version__, "model": net.config.to_dict(), "objective": "chat",
                                  "task": task, "batch": {"batch_size": batch_size},
                                  "train": config_to_dict(train), "optim": config_to_dict(optim)}
    if lora_run is not None:
        run_config["lora"] = lora_run
    out.mkdir(parents=True, exist_ok=True)
    world.barrier()  # every process has checked --out before process 0 writes into it
    if world.is_main:
        copy_tokenizer_files(base, out)  # the base's exact files, with the template that was trained
        if not (out / "tokenizer_config.json").is_file():
            tok.save(out)
        elif template != Tokenizer.load(out).chat_template:
            _write_template(out, template)
        write_run_config(out, run_config)

    def get_batch(step: int, micro: int) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(device, non_blocking=True) for t in batches.get(step, micro))

    def loss_fn(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> LossOutput:
        return chat_loss(m, batch, pad_id)

    def evaluate(m: nn.Module) -> dict[str, float]:
        return evaluate_chat(m, val_batches, device)

    report(progress, "train", message=f"{len(enc):,} training / {len(val_enc):,} validation conversations, "
           f"{enc.n_scored:,} assistant tokens; {batches.real_share():.0%} of the row tokens are real (the rest "
           f"padding); batch {batch_size}x{train.grad_accum}; end of turn {tok.id_to_token(eot)}; device {device}")
    if lora is not None:
        report(progress, "train", message=describe_lora(net))
    result = fit(net, get_batch, loss_fn, out, train, optim, evaluate=evaluate if val_batches else None,
                 progress=progress)
    if not world.is_main:
        return result
    from zenlm.viz import plot_loss_curve

    plot_loss_curve(out / "metrics.jsonl", out / "plots" / "loss.png", per="assistant token")
    if lora_run is not None:
        finish_lora_run(out, lora_run)
    return result


__all__ = ["DEFAULT_TRAIN", "FULL_LR", "LORA_LR", "chat_loss", "chat_template_for", "check_end_of_turn",
           "template_special_ids",
           "evaluate_chat", "finetune_chat"]

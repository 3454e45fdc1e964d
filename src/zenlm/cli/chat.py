"""CLI verb ``zenlm finetune chat`` (registered in :func:`zenlm.cli.build_parser`):

    zenlm finetune chat --base RUN --data FILE.jsonl|chitchat|chatterbot-en|chatterbot-zh --out RUN [--lora]
"""

from __future__ import annotations

from typing import Any

from zenlm.clikit import Param, params_of

# the TrainConfig fields `zenlm finetune chat` has flags for
_TRAIN_FLAGS = ("max_steps", "max_seconds", "eval_every", "seed", "device", "precision", "grad_accum", "strategy")


def finetune_chat_params() -> list[Param]:
    """The flags: zenlm.recipes.finetune_chat.finetune_chat's own parameters, the TrainConfig fields above with
    the recipe's defaults (DEFAULT_TRAIN), and the LoRA settings."""
    from zenlm.cli.common import lora_params
    from zenlm.device import Precision
    from zenlm.recipes import finetune_chat as recipe
    from zenlm.train.loop import TrainConfig

    return [*params_of(recipe.finetune_chat, skip=("train", "lora", "progress")),
            *params_of(TrainConfig, only=_TRAIN_FLAGS, defaults=recipe.DEFAULT_TRAIN, types={"precision": Precision}),
            *lora_params()]


def finetune_chat(**flags: Any) -> None:
    """Fine-tune a GPT run for multi-turn chat: only the assistant's replies (each with its end-of-turn token)
    are scored, with the conversation so far in front of each.

    The run keeps the chat template it was trained with, so `zenlm chat`, `zenlm serve` and the exported
    tokenizer prompt it the same way, and replies stop at the end-of-turn token. With --lora only adapters on
    the frozen base are trained (the base may be an int8 run from `zenlm quantize`).

    Args:
        base: run directory to start from (`zenlm pretrain`, `zenlm demo`'s run, `zenlm convert from-hf`)
        data: .jsonl with one conversation per line, {"messages": [{"role": "user", "content": ...}, ...]}
            (roles system, user, assistant) or ShareGPT {"conversations": [{"from": "human", "value": ...}, ...]};
            or a built-in data set: chitchat (English conversations between two people), chatterbot-en,
            chatterbot-zh (short English / Chinese conversations)
        out: run directory to create
        val: validation conversations (default: --val-fraction of --data, held out)
        val_fraction: share of --data held out for validation when --val is not given
        max_len: tokens per conversation (default: the model's context); longer ones are cut after the last
            reply that fits
        chat_template: Jinja file to train, chat and serve with (replies marked {% generation %}); default: the
            base's template
        batch_size: conversations per micro-batch (a step reads --grad-accum of them)
        lr: peak AdamW learning rate (warm-up, cosine decay to lr/10); default 3e-4, or 2e-3 with --lora
        warmup_steps: linear warm-up steps
        weight_decay: AdamW weight decay on matrices
        max_steps: optimiser steps
        max_seconds: wall-time budget (the learning rate decays over whichever budget ends first)
        eval_every: validate every N steps
        seed: random seed (split, batch order, adapters)
        device: auto, cpu, cuda or mps
        precision: auto, fp32, bf16 or fp16
        grad_accum: micro-batches per optimiser step
    """
    from zenlm.cli.common import TerminalProgress, lora_config
    from zenlm.recipes import finetune_chat as recipe
    from zenlm.train.loop import TrainConfig

    train = {k: flags.pop(k) for k in _TRAIN_FLAGS}
    lora = lora_config(flags)
    out = flags["out"]
    progress = TerminalProgress()
    result = recipe.finetune_chat(**flags, train=TrainConfig(**{**recipe.DEFAULT_TRAIN, **train}), lora=lora,
                                  progress=progress)
    progress.close()
    print(f"\nstopped by {result.stopped_by} at step {result.step} after {result.elapsed_s:.1f} s; "
          f"train loss {result.train_loss:.4f} nats per assistant token")
    if result.val:
        print(f"validation loss {result.val['val_loss']:.4f} nats per assistant token  |  perplexity "
              f"{result.val['val_ppl']:.2f}")
    print(f"run directory: {out}\nnext: zenlm chat {out}   (or zenlm serve {out})")


__all__ = ["finetune_chat", "finetune_chat_params"]

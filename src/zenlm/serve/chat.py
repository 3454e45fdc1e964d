"""Terminal chat (``zenlm chat RUN``): multi-turn history rendered with the tokenizer's chat template,
replies streamed piece by piece, ``/reset`` forgets the history, ``/quit`` (or end of input) leaves.

The loop takes ``read`` and ``write`` callables so the CLI decides what the terminal shows (and tests can
drive it without one).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from zenlm.generate import GenerationConfig, generate_ids
from zenlm.models.gpt import GPT
from zenlm.tokenizer import Tokenizer, chat_stop_ids, render_chat

HELP = "Type a message. /reset starts a new conversation, /quit leaves."

# What kind of model is talking, as the chat page and `zenlm chat` show it (see model_kind)
KIND_LABELS = {"chat": "chat-tuned model", "base": "base model (pretrained only)",
               "imported": "imported model"}
KIND_HINTS = {
    "base": "A pretrained-only model continues text; it was not trained to answer, so expect it to ramble on "
            "from your message rather than reply. Fine-tune it for chat, or use it for completions.",
    "imported": "Imported from Hugging Face: whether it was tuned for chat is not recorded; its chat template "
                "decides how the conversation is prompted.",
}


def model_kind(saved: dict[str, Any]) -> str:
    """"chat" for a run fine-tuned for chat (config.yaml ``task: {kind: chat}``), "imported" for a model
    converted from Hugging Face (``source: {format: huggingface}``), else "base" (pretrained only)."""
    if (saved.get("task") or {}).get("kind") == "chat":
        return "chat"
    if (saved.get("source") or {}).get("format") == "huggingface":
        return "imported"
    return "base"


def _prompt_ids(model: GPT, tokenizer: Tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The ids of ``messages`` rendered by the chat template, ready for the assistant's reply."""
    ids = tokenizer.encode(render_chat(tokenizer, messages), allow_special=True)
    block = getattr(model.config, "block_size", None)  # None: a stateful model, no context limit
    if block is not None:
        ids = ids[-(block - 1):]  # keep the most recent turns when the history outgrows the context
    return ids


def reply_stream(model: GPT, tokenizer: Tokenizer, messages: list[dict[str, str]], cfg: GenerationConfig,
                 stop_ids: frozenset[int] | None = None):
    """Yield the assistant's reply to ``messages`` as text pieces. It ends at the template's end-of-turn token
    or the end-of-text token (``stop_ids``, default :func:`zenlm.tokenizer.chat_stop_ids`), not shown."""
    stop_ids = chat_stop_ids(tokenizer) if stop_ids is None else stop_ids
    ids = _prompt_ids(model, tokenizer, messages)
    decoder = tokenizer.stream_decoder(skip_special=True)
    for token in generate_ids(model, ids, cfg, eos_id=None):  # stops below, at any of stop_ids
        if token in stop_ids:
            break
        piece = decoder.push(token)
        if piece:
            yield piece
    tail = decoder.flush()
    if tail:
        yield tail


def warm_up(model: GPT, tokenizer: Tokenizer, cfg: GenerationConfig, system: str | None = None,
            tokens: int = 3) -> None:
    """Decode the first ``tokens`` tokens of a reply to a short first message and drop them, so that the
    compiled decode step the first real reply runs is built (or loaded) now (``zenlm chat --compile``). A
    program is specialised to the cache length, which follows from the prompt's length plus
    ``cfg.max_new_tokens`` (rounded up to a power of two): so the warm-up prompt is a first turn rendered by
    the chat template, and ``cfg.max_new_tokens`` is kept."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "Hi"}]
    greedy = dataclasses.replace(cfg, temperature=0.0)
    for n, _ in enumerate(generate_ids(model, _prompt_ids(model, tokenizer, messages), greedy, eos_id=None), 1):
        if n >= tokens:
            break


def chat_loop(
    model: GPT, tokenizer: Tokenizer, read: Callable[[], str | None], write: Callable[[str], None],
    cfg: GenerationConfig, system: str | None = None, *, name: str | None = None, kind: str | None = None,
) -> list[dict[str, str]]:
    """Run the conversation until ``/quit`` or ``read()`` returns None; returns the final history. ``name``
    and ``kind`` (see :func:`model_kind`) open it with a line saying what model is talking, and for a base
    model a hint that it will not converse."""
    base = [{"role": "system", "content": system}] if system else []
    history = list(base)
    stop_ids = chat_stop_ids(tokenizer)
    if kind is not None:
        write(f"{name or 'model'}: {KIND_LABELS[kind]}\n")
        if kind in KIND_HINTS:
            write(KIND_HINTS[kind] + "\n")
    write(HELP + "\n")
    while True:
        line = read()
        if line is None or line.strip() == "/quit":
            return history
        line = line.strip()
        if not line:
            continue
        if line == "/reset":
            history = list(base)
            write("(history cleared)\n")
            continue
        history.append({"role": "user", "content": line})
        pieces = reply_stream(model, tokenizer, history, cfg, stop_ids)
        reply = [next(pieces, "")]  # the prompt is read first: a note about the compiled step comes before
        write("assistant: " + reply[0])
        for piece in pieces:
            reply.append(piece)
            write(piece)
        write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})

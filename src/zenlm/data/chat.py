"""Conversations for chat fine-tuning: read and checked, rendered with the chat template, batched.

    FILE.jsonl | chitchat | chatterbot-en | chatterbot-zh
      -> read_conversations     [{"role", "content"}, ...] per conversation, checked; a mistake names file, line, field
      -> encode_conversations   render with the tokenizer's chat template, tokenize, mark the assistant's tokens,
                                truncate on turn boundaries
      -> ChatBatches            whole conversations, one per row, length-bucketed, right-padded

**Which tokens carry the loss.** The chat template marks what the assistant writes with ``{% generation %}``
(Hugging Face's convention; zenlm's template marks each reply together with its end-of-turn token). A token is
the assistant's when its characters overlap a marked span -- the rule of transformers'
``apply_chat_template(..., return_assistant_tokens_mask=True)``, so both give the same mask. For ids ``x_0 ..
x_n`` of a conversation::

    inputs  = x_0 .. x_{n-1}
    labels  = x_{t+1} where token t+1 is the assistant's, else IGNORE_INDEX        (t = 0 .. n-1)

so every reply, its end-of-turn token included, is scored, and nothing else: not the system prompt, not the
user's turns, not the role headers. (A model that never sees its end-of-turn token scored never learns to stop.)
The training step divides the summed loss by the assistant tokens of the whole step, however they fall into
micro-batches (:mod:`zenlm.train.step`).

**History.** A conversation is one row: the reply to turn k is scored with turns 1..k-1 in front of it, as in
a chat. Rows end with the last reply's end-of-turn token (a trailing user turn teaches nothing). A conversation
longer than the context is cut after the last reply that fits (and counted); one whose first reply does not
fit is left out (and counted).

**No packing.** Each row holds one conversation, so no attention mask beyond the causal one is needed and a
row's positions start at 0 as in a chat. Rows are grouped by length (``pool`` batches' worth of conversations
are sorted by length and cut into batches, whose order is then shuffled), which keeps padding small: see
:meth:`ChatBatches.real_share`.

Every batch is a pure function of ``(step, micro)``, so a resumed run sees the same data.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from torch import Tensor

from zenlm.chat_template import TemplateError, compile_template, render_spans
from zenlm.data.batches import IGNORE_INDEX
from zenlm.data.corpus import package_dir
from zenlm.data.jsonl import read_jsonl
from zenlm.data.seq2seq import pad_right
from zenlm.errors import DataError
from zenlm.progress import ProgressFn, report
from zenlm.tokenizer import RENDER_MAX_CHARS, Tokenizer, template_tokens

ROLES = ("system", "user", "assistant")
# ShareGPT's "from" values -> roles
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
# Built-in data sets: name -> (PyPI package that ships it, what it is)
BUILTIN_CHATS = {
    "chitchat": ("chitchat-dataset==0.9.0", "7,168 English conversations between two people (MIT)"),
    "chatterbot-en": ("chatterbot-corpus==1.3.3", "short English conversations on everyday topics (BSD)"),
    "chatterbot-zh": ("chatterbot-corpus==1.3.3", "short Chinese conversations on everyday topics (BSD)"),
}


@dataclass(frozen=True)
class Conversation:
    """One conversation: its messages (``{"role": ..., "content": ...}``, checked) and where it came from
    ("FILE:LINE", or a built-in data set's name and index) for messages about it."""

    messages: tuple[dict[str, str], ...]
    where: str


# ------------------------------------------------------------------------------------------- checking


def check_messages(messages: Any, where: str, field_name: str = "messages") -> tuple[dict[str, str], ...]:
    """The messages of one conversation, checked: a non-empty list of ``{"role", "content"}`` objects, roles
    among system / user / assistant, an optional system message first and then user and assistant in turn
    (user first), no empty text, at least one assistant reply. DataError naming ``where`` and the field."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: '{field_name}' must be a non-empty list of {{\"role\", \"content\"}} objects.")
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        at = f"{where}: {field_name}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{at} is a {type(m).__name__}, not an object with 'role' and 'content'.")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"{at}.role is {role!r}; use one of {', '.join(ROLES)}.")
        if not isinstance(content, str):
            raise DataError(f"{at}.content must be a string, got {type(content).__name__}.")
        if not content.strip():
            raise DataError(f"{at}.content is empty; remove the message or fill it in.")
        expected = ("system", "user") if i == 0 else ("user",) if out[-1]["role"] != "user" else ("assistant",)
        if role not in expected:
            before = f"after a {out[-1]['role']!r} message" if out else "first"
            raise DataError(f"{at}.role is {role!r} {before}; a conversation is an optional system message, then "
                            "user and assistant messages in turn, starting with the user.")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: the conversation has no assistant message; there is no reply to learn from.")
    return tuple(out)


def _sharegpt(turns: Any, where: str) -> list[dict[str, Any]]:
    """ShareGPT's ``[{"from": "human" | "gpt" | "system", "value": ...}]`` as messages."""
    if not isinstance(turns, list):
        raise DataError(f"{where}: 'conversations' must be a list of {{\"from\", \"value\"}} objects.")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise DataError(f"{where}: conversations[{i}] is a {type(t).__name__}, not an object with 'from' and "
                            "'value'.")
        who = t.get("from")
        if who not in SHAREGPT_ROLES:
            raise DataError(f"{where}: conversations[{i}].from is {who!r}; use one of {', '.join(SHAREGPT_ROLES)}.")
        out.append({"role": SHAREGPT_ROLES[who], "content": t.get("value")})
    return out


# -------------------------------------------------------------------------------------------- reading


def read_conversations(data: str | Path) -> list[Conversation]:
    """The conversations of a ``.jsonl`` file or a built-in data set (:data:`BUILTIN_CHATS`).

    A file holds one conversation per line, ``{"messages": [{"role": ..., "content": ...}, ...]}`` (OpenAI's
    chat format) or ``{"conversations": [{"from": "human", "value": ...}, ...]}`` (ShareGPT's); blank lines are
    skipped. Every conversation is checked (:func:`check_messages`); a mistake is a DataError naming the line
    and field. Built-in conversations that do not fit the rules (a speaker alone) are left out."""
    if str(data) in BUILTIN_CHATS:
        return read_builtin(str(data))
    path = Path(data)
    if not path.is_file():
        raise DataError(f"conversation file {path} does not exist; give a .jsonl file with one {{\"messages\": "
                        f"[...]}} object per line, or a built-in data set: {', '.join(BUILTIN_CHATS)}.")
    out = []
    for n, obj in read_jsonl(path, "'messages' (or ShareGPT 'conversations')"):
        where = f"{path}:{n}"
        if "messages" in obj:
            out.append(Conversation(check_messages(obj["messages"], where), where))
        elif "conversations" in obj:
            out.append(Conversation(check_messages(_sharegpt(obj["conversations"], where), where,
                                                   "conversations"), where))
        else:
            raise DataError(f"{where} has neither 'messages' (OpenAI chat format) nor 'conversations' (ShareGPT); "
                            f"it has {sorted(obj)}.")
    if not out:
        raise DataError(f"{path} holds no conversations; it needs at least one line with 'messages'.")
    return out


def _alternating(texts: Iterable[str], where: str) -> Conversation | None:
    """Texts spoken in turn by two people as a user / assistant conversation (None when it has no reply)."""
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]
    if len(messages) < 2 or any(not m["content"].strip() for m in messages):
        return None
    return Conversation(check_messages(messages, where), where)


def read_builtin(name: str) -> list[Conversation]:
    """A built-in data set, read from the files its PyPI package installed (no network):

    ``chitchat``       chitchat_dataset/dataset.json: per conversation, turns of one or more messages by one of two
                       people; a turn's messages are joined with a space, the first person is the user
    ``chatterbot-en``  chatterbot_corpus/data/english/*.yml, ``chatterbot-zh`` .../chinese/*.yml: lists of lines
                       spoken in turn, the first by the user (read as plain strings: "yes" stays "yes")
    """
    if name not in BUILTIN_CHATS:
        raise DataError(f"unknown built-in conversation data {name!r}; choose one of {', '.join(BUILTIN_CHATS)}.")
    package = BUILTIN_CHATS[name][0]
    out: list[Conversation] = []
    if name == "chitchat":
        file = package_dir("chitchat_dataset", package) / "dataset.json"
        data = json.loads(file.read_text(encoding="utf-8"))
        for key, conv in data.items():
            turns: list[tuple[str, str]] = []  # (sender, text), consecutive turns of one sender merged
            for group in conv.get("messages", []):
                text = " ".join(u["text"].strip() for u in group if u.get("text", "").strip())
                if not text:
                    continue
                sender = group[0].get("sender", "")
                if turns and turns[-1][0] == sender:
                    turns[-1] = (sender, f"{turns[-1][1]} {text}")
                else:
                    turns.append((sender, text))
            c = _alternating((t for _, t in turns), f"chitchat conversation {key}")
            if c is not None:
                out.append(c)
        return out
    folder = package_dir("chatterbot_corpus", package) / "data" / ("english" if name.endswith("en") else "chinese")
    for file in sorted(folder.glob("*.yml")):
        doc = yaml.load(file.read_text(encoding="utf-8"), Loader=yaml.BaseLoader)  # noqa: S506  # strings only
        for i, lines in enumerate((doc or {}).get("conversations") or []):
            if isinstance(lines, list) and all(isinstance(t, str) for t in lines):
                c = _alternating(lines, f"{file}: conversation {i}")
                if c is not None:
                    out.append(c)
    return out


def split_conversations(convs: Sequence[Conversation], val_fraction: float, seed: int
                        ) -> tuple[list[Conversation], list[Conversation]]:
    """(train, validation): a seeded shuffle, the last ``val_fraction`` (at least one when the fraction is
    above 0 and there are two or more) held out."""
    order = np.random.default_rng([seed, 7]).permutation(len(convs))
    n_val = min(len(convs) - 1, max(1, round(len(convs) * val_fraction))) if val_fraction > 0 else 0
    shuffled = [convs[i] for i in order]
    return shuffled[: len(convs) - n_val], shuffled[len(convs) - n_val :]


# ------------------------------------------------------------------------------------------- encoding


@dataclass
class EncodedChats:
    """Conversations as token ids. ``ids[i]`` [n_i] int64 and ``scored[i]`` [n_i] bool (the assistant's
    tokens); ``truncated`` were cut after their last reply that fits, ``dropped`` left out (not even their
    first reply fits); ``where`` names each kept conversation's source."""

    ids: list[np.ndarray] = field(default_factory=list)
    scored: list[np.ndarray] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    truncated: int = 0
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_scored(self) -> int:
        return int(sum(int(s[1:].sum()) for s in self.scored))


def assistant_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """[n] bool: token i (characters ``offsets[i]``) overlaps one of the character ``spans`` (start, end)."""
    starts = np.fromiter((a for a, _ in offsets), dtype=np.int64, count=len(offsets))
    ends = np.fromiter((b for _, b in offsets), dtype=np.int64, count=len(offsets))
    mask = np.zeros(len(offsets), dtype=bool)
    for a, b in spans:
        mask |= (starts < b) & (ends > a)
    return mask


def _cut_points(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """For each span, the number of tokens up to and including its last token (where a row may end)."""
    starts = np.fromiter((a for a, _ in offsets), dtype=np.int64, count=len(offsets))
    return [int(np.searchsorted(starts, b, side="left")) for _, b in spans]


def encode_conversations(
    convs: Sequence[Conversation], tokenizer: Tokenizer, max_tokens: int, *, template: str | None = None,
    progress: ProgressFn | None = None, what: str = "conversations",
) -> EncodedChats:
    """Render each conversation with the chat template (``template``, default the tokenizer's), tokenize it
    and mark the assistant's tokens; at most ``max_tokens`` ids per conversation (cut on turn boundaries).

    DataError naming the conversation when a message holds a special token's text (it would become that
    token), when the template fails on it, or when the template marks no reply with ``{% generation %}``."""
    template = tokenizer.chat_template if template is None else template
    try:
        tpl = compile_template(template, RENDER_MAX_CHARS)
    except TemplateError as e:
        raise DataError(f"{e}") from None
    tokens = template_tokens(tokenizer)
    specials = sorted(tokenizer.special_tokens, key=len, reverse=True)
    out = EncodedChats()
    block = 1024
    for s in range(0, len(convs), block):
        texts, spans_of = [], []
        for c in convs[s : s + block]:
            for i, m in enumerate(c.messages):
                bad = next((t for t in specials if t in m["content"]), None)
                if bad is not None:
                    raise DataError(f"{c.where}: message {i} contains the special token {bad!r} as text; remove it "
                                    "(only the chat template places special tokens).")
            try:
                text, spans = render_spans(tpl, list(c.messages), False, tokens, RENDER_MAX_CHARS)
            except TemplateError as e:
                raise DataError(f"{c.where}: {e}".rstrip(".") + ".") from None
            if not spans:
                raise DataError(f"{c.where}: the chat template marks no reply with {{% generation %}} ... "
                                "{% endgeneration %}, so there is nothing to score; mark what the assistant writes "
                                "(and its end-of-turn token) in the template.")
            texts.append(text)
            spans_of.append(spans)
        for c, spans, (ids, offsets) in zip(convs[s : s + block], spans_of, tokenizer.encode_offsets(texts),
                                             strict=True):
            ends = _cut_points(offsets, spans)
            cuts = [k for k in ends if k <= max_tokens]
            if not cuts:  # not even the first reply fits
                out.dropped += 1
                continue
            n = cuts[-1]  # the row ends with the last reply that fits (a trailing user turn scores nothing)
            out.truncated += n < ends[-1]
            out.ids.append(np.asarray(ids[:n], dtype=np.int64))
            out.scored.append(assistant_mask(offsets[:n], spans))
            out.where.append(c.where)
        report(progress, "chat", done=min(s + block, len(convs)), total=len(convs), unit="conv")
    if out.truncated or out.dropped:
        report(progress, "chat", message=f"{out.truncated} of {len(convs)} {what} are longer than {max_tokens} "
               f"tokens and were cut after the last reply that fits; {out.dropped} were left out (their first reply "
               "does not fit)")
    if not out.ids:
        raise DataError(f"no conversation fits in {max_tokens} tokens: not even the first reply of any of the "
                        f"{len(convs)} {what} does; use a model with a longer context or shorter conversations.")
    return out


# ------------------------------------------------------------------------------------------- batches


def chat_example(ids: np.ndarray, scored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) of one conversation: inputs ``ids[:-1]``, labels ``ids[1:]`` where the next token is the
    assistant's, else IGNORE_INDEX (see the module docstring)."""
    return ids[:-1], np.where(scored[1:], ids[1:], IGNORE_INDEX)


def collate_chats(data: EncodedChats, idx: Sequence[int], pad_id: int) -> tuple[Tensor, Tensor]:
    """(x_BT, labels_BT) of conversations ``idx``, right-padded (pad_id; labels IGNORE_INDEX)."""
    ex = [chat_example(data.ids[i], data.scored[i]) for i in idx]
    return pad_right([e[0] for e in ex], pad_id), pad_right([e[1] for e in ex], IGNORE_INDEX)


class ChatBatches:
    """Length-bucketed batches of whole conversations: ``get(step, micro)`` -> (x_BT, labels_BT).

    Each epoch is a seeded shuffle of the conversations, cut into pools of ``pool`` batches; each pool is
    sorted by length and cut into batches, and the epoch's batches are shuffled (so lengths do not rise within
    an epoch). pool=1: plain random batches."""

    def __init__(self, data: EncodedChats, batch_size: int, *, pad_id: int, grad_accum: int = 1, seed: int = 0,
                 pool: int = 64) -> None:
        if batch_size < 1 or pool < 1:
            raise DataError(f"batch_size and pool must be >= 1, got {batch_size} and {pool}.")
        self.data, self.batch_size, self.pad_id = data, batch_size, pad_id
        self.grad_accum, self.seed, self.pool = grad_accum, seed, pool
        n, per_pool = len(data), batch_size * pool
        self.batches_per_epoch = (n // per_pool) * pool + math.ceil((n % per_pool) / batch_size)
        self._epoch: tuple[int, list[list[int]]] | None = None

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The conversation indices of every batch of ``epoch``, in order."""
        if self._epoch is None or self._epoch[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self.data))
            lengths = np.array([len(x) for x in self.data.ids])
            per_pool = self.batch_size * self.pool
            batches = []
            for p in range(0, len(order), per_pool):
                pool = order[p : p + per_pool]
                pool = pool[np.argsort(lengths[pool], kind="stable")]
                batches += [pool[b : b + self.batch_size].tolist() for b in range(0, len(pool), self.batch_size)]
            self._epoch = (epoch, [batches[i] for i in rng.permutation(len(batches))])
        return self._epoch[1]

    def get(self, step: int, micro: int = 0) -> tuple[Tensor, Tensor]:
        epoch, i = divmod(step * self.grad_accum + micro, self.batches_per_epoch)
        return collate_chats(self.data, self.epoch_batches(epoch)[i], self.pad_id)

    def real_share(self, epoch: int = 0) -> float:
        """Real (not padding) input tokens / all input tokens of the rows of one epoch."""
        real = padded = 0
        for idx in self.epoch_batches(epoch):
            lens = [len(self.data.ids[i]) - 1 for i in idx]
            real, padded = real + sum(lens), padded + max(lens) * len(lens)
        return real / max(padded, 1)


def fixed_batches(data: EncodedChats, batch_size: int, pad_id: int) -> list[tuple[Tensor, Tensor]]:
    """Validation batches: every conversation once, sorted by length (little padding), in a fixed order."""
    order = sorted(range(len(data)), key=lambda i: len(data.ids[i]))
    return [collate_chats(data, order[s : s + batch_size], pad_id) for s in range(0, len(order), batch_size)]


__all__ = ["BUILTIN_CHATS", "ChatBatches", "Conversation", "EncodedChats", "ROLES", "assistant_mask", "chat_example",
           "check_messages", "collate_chats", "encode_conversations", "fixed_batches",
           "read_builtin", "read_conversations", "split_conversations"]

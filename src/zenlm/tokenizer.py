"""Tokenizers: train, save, load, encode, decode and stream-decode.

Four kinds, all built on the Hugging Face ``tokenizers`` library and saved as a standard ``tokenizer.json``
(plus ``tokenizer_config.json``) that ``transformers.PreTrainedTokenizerFast`` loads unchanged:

``bpe``        byte-level BPE (GPT-2 style). The text is turned into UTF-8 bytes, each byte is shown as one of 256
               printable characters, and merges are learned on top. The 256 byte characters are always in the
               vocabulary, so *every* string encodes and ``decode(encode(s)) == s`` exactly. (Python strings may
               hold lone surrogates, which have no UTF-8 form; they are replaced by U+FFFD before encoding.)
``wordpiece``  BERT-style WordPiece: whitespace/punctuation pre-splitting, ``##`` continuation pieces, an
               ``<|unk|>`` token for words it cannot spell. Case and accents are kept. Decoding puts single spaces
               between words, so it does not round-trip arbitrary whitespace.
``char``       one token per character: ids ``0..n-1`` are the characters seen in training, in sorted order,
               followed by the special tokens. Unseen characters become ``<|unk|>``.
``word``       one token per word: the text is split into runs of word characters and runs of punctuation
               (whitespace is dropped), and the ``vocab_size`` most frequent words seen at least
               ``min_frequency`` times get ids after the special tokens; other words become ``<|unk|>``. For word
               vectors and word-level LMs (``peoples-daily-words`` ships Chinese already segmented by spaces).
               Decoding puts single spaces between words.

Special tokens (``SPECIAL_TOKENS``) are never produced from user text by default: ``encode("<|eos|>")``
gives the ids of the seven ordinary characters/pieces, and only ``encode(..., allow_special=True)`` maps the
string to the single ``<|eos|>`` id. This keeps text from a user or a web page from injecting control tokens.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers

from zenlm.chat_template import TemplateError, compile_template, render
from zenlm.errors import ConfigError, DataError
from zenlm.fileio import atomic_write_text, read_json_object
from zenlm.progress import ProgressFn, report

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>", "<|mask|>"]
KINDS = ("bpe", "wordpiece", "char", "word")
# role -> the token string that plays it (looked up among the tokenizer's special tokens)
ROLES = {"bos": "<|bos|>", "eos": "<|eos|>", "pad": "<|pad|>", "unk": "<|unk|>", "mask": "<|mask|>"}
# transformers' "no limit" value for model_max_length
UNLIMITED_LENGTH = int(1e30)
# zenlm's chat template: <|bos|>, then per message "role:\n" + its text + the end-of-turn token (<|eos|>) + "\n";
# the prompt for a reply ends with "assistant:\n". What the assistant writes, its end-of-turn token included, is
# marked {% generation %} (the span that fine-tuning scores). The text is trimmed and every header ends in a
# newline, so the ids of a prompt are exactly the first ids of the conversation that continues it (a reply starts
# a new pre-token; no trailing space or newline of the prompt merges with its first characters).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] + ':\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim }}{{ eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim }}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:\\n' }}{% endif %}"
)
# The template of earlier versions ("role: content<|eos|>\n", prompt "assistant: "): runs made with it chat with
# it; chat fine-tuning replaces it by CHAT_TEMPLATE (it has no {% generation %} marks, and its prompt's trailing
# space is a token of its own that a reply never starts with).
LEGACY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)
_SURROGATES = re.compile("[\ud800-\udfff]")
_HF_KIND = {"BPE": "bpe", "WordPiece": "wordpiece", "WordLevel": "char"}


# Cut points for long texts: just before a space or newline that is followed by a word character. Every
# pre-tokenizer used here (GPT-2 byte-level regex, BERT whitespace/punctuation split, one-per-character)
# starts a new pre-token there, so encoding the pieces separately gives exactly the ids of the whole.
_CUT = re.compile(r"[ \n](?=\w)")
CUT_POINTS = _CUT  # public name: zenlm.data.shards cuts long documents at the same places
CHUNK_CHARS = 1 << 13
RENDER_MAX_CHARS = 1 << 24  # longest chat prompt render_chat produces (characters)


def split_text(text: str, size: int) -> list[str]:
    """Cut ``text`` into pieces of at least ``size`` characters (the last may be shorter) at safe cut points;
    a text without cut points stays whole. ``"".join(pieces) == text``."""
    pieces: list[str] = []
    start, n = 0, len(text)
    while n - start > size:
        m = _CUT.search(text, start + size)
        if m is None:
            break
        pieces.append(text[start:m.start()])
        start = m.start()
    if start < n:
        pieces.append(text[start:])
    return pieces


_CHAR_SPLIT = {"type": "Split", "pattern": {"Regex": r"[\s\S]"}, "behavior": "Isolated", "invert": False}


def _is_char_split(hf: tokenizers.Tokenizer) -> bool:
    """Whether ``hf`` pre-tokenizes into single characters exactly as :func:`train_tokenizer` sets it up (then
    encoding is a plain per-character lookup)."""
    return json.loads(hf.to_str()).get("pre_tokenizer") == _CHAR_SPLIT


def _clean(text: str) -> str:
    """Replace lone surrogates (which have no UTF-8 encoding) by U+FFFD."""
    return _SURROGATES.sub("\ufffd", text)


class Tokenizer:
    """A trained tokenizer: a ``tokenizers.Tokenizer`` (``.hf``) plus zenlm's encode/decode rules.

    Attributes: ``kind`` ("bpe" | "wordpiece" | "char" | "word"), ``vocab_size`` (special tokens included),
    ``bos_id`` / ``eos_id`` / ``pad_id`` / ``unk_id`` / ``mask_id`` (None when absent), ``special_tokens``,
    ``chat_template`` and ``model_max_length`` (written to tokenizer_config.json).
    ``role_tokens`` maps a role to the token string that plays it (default :data:`ROLES`; a tokenizer
    imported from elsewhere names its own, e.g. ``{"eos": "</s>"}``).
    """

    def __init__(
        self, hf: tokenizers.Tokenizer, kind: str, *, chat_template: str = CHAT_TEMPLATE,
        model_max_length: int | None = None, role_tokens: dict[str, str] | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ConfigError(f"unknown tokenizer kind {kind!r}; choose one of {', '.join(KINDS)}.")
        self.hf = hf
        self.kind = kind
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        added = hf.get_added_tokens_decoder()
        self.special_tokens: list[str] = [t.content for _, t in sorted(added.items()) if t.special]
        self.special_ids: frozenset[int] = frozenset(i for i, t in added.items() if t.special)
        self.role_tokens = {**ROLES, **(role_tokens or {})}
        for role, token in self.role_tokens.items():
            known = token in self.special_tokens or role in (role_tokens or {})
            setattr(self, f"{role}_id", hf.token_to_id(token) if known else None)
        # longest first, so that a special token that is a prefix of another never wins
        ordered = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, ordered))) if ordered else None
        self._plain_cache: dict[str, list[int]] = {}
        self._char_vocab: dict[str, int] | None = None
        if kind == "char" and hf.normalizer is None and _is_char_split(hf):
            self._char_vocab = dict(hf.get_vocab(with_added_tokens=False))
        # Long texts are encoded in pieces only when that cannot change the ids: there is a pre-tokenizer
        # (which splits at the cut points) and no normalizer that prepends to every input (SentencePiece-
        # style tokenizers imported from elsewhere prepend "▁", which would appear at every cut).
        norm = hf.normalizer.__getstate__() if hf.normalizer is not None else b""
        self._chunkable = hf.pre_tokenizer is not None and b'"Prepend"' not in norm
        self._bytes_per_token: int | None = None  # see min_tokens; found on first use

    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    mask_id: int | None

    # ------------------------------------------------------------------------------------------ basics
    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"

    def token_to_id(self, token: str) -> int | None:
        """The id of one vocabulary entry (e.g. a special token), or None."""
        return self.hf.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry of one id (byte-level BPE shows bytes as printable characters)."""
        return self.hf.id_to_token(token_id)

    # ------------------------------------------------------------------------------------------ encode
    def _encode_plain(self, text: str) -> list[int]:
        """Encode ``text`` through normalizer, pre-tokenizer and model only, bypassing the added (special)
        vocabulary; used for the literal text of special-token strings found in user input."""
        ids = self._plain_cache.get(text)
        if ids is None:
            s = self.hf.normalizer.normalize_str(text) if self.hf.normalizer is not None else text
            pieces = self.hf.pre_tokenizer.pre_tokenize_str(s) if self.hf.pre_tokenizer is not None else [(s, None)]
            ids = [tok.id for piece, _ in pieces for tok in self.hf.model.tokenize(piece)]
            self._plain_cache[text] = ids
        return list(ids)

    def _segments(self, text: str) -> list[tuple[str, bool]]:
        """Split ``text`` into (segment, is_special_string) parts."""
        assert self._special_re is not None
        parts: list[tuple[str, bool]] = []
        pos = 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                parts.append((text[pos:m.start()], False))
            parts.append((m.group(), True))
            pos = m.end()
        if pos < len(text):
            parts.append((text[pos:], False))
        return parts

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Token ids of ``text`` (a str of any length); no BOS/EOS is added.

        allow_special: when False (default) special-token strings such as "<|eos|>" in ``text`` are encoded as
        ordinary text; when True they become their single special id.
        """
        return self.encode_batch([text], allow_special=allow_special)[0]

    def encode_batch(self, texts: Sequence[str], *, allow_special: bool = False) -> list[list[int]]:
        """Encode several texts; returns one id list per text (same ids as :meth:`encode` on each).

        Long texts are cut into pieces of about ``CHUNK_CHARS`` characters at places where the
        pre-tokenizer always splits anyway (before a space or newline that precedes a word character), so
        the ids are exactly those of encoding the whole text, and the pieces are encoded in parallel.
        """
        texts = [_clean(t) for t in texts]
        if self._char_vocab is not None and not allow_special:
            # one id per character: the whole pipeline reduces to a dictionary lookup
            get, unk = self._char_vocab.get, self.unk_id
            return [[get(c, unk) for c in t] for t in texts]  # type: ignore[misc]
        jobs: list[str] = []  # ordinary text pieces for the library's parallel encoder
        plans: list[list[int | list[int]]] = []  # per text: job index, or literal ids of a special string
        for t in texts:
            plan: list[int | list[int]] = []
            find_special = not allow_special and self._special_re is not None and self._special_re.search(t)
            for seg, special in self._segments(t) if find_special else [(t, False)]:
                if special:
                    plan.append(self._encode_plain(seg))
                    continue
                for piece in split_text(seg, CHUNK_CHARS) if self._chunkable else [seg]:
                    plan.append(len(jobs))
                    jobs.append(piece)
            plans.append(plan)
        encoded = self.hf.encode_batch(jobs, add_special_tokens=False) if jobs else []
        out: list[list[int]] = []
        for plan in plans:
            ids: list[int] = []
            for p in plan:
                ids.extend(encoded[p].ids if isinstance(p, int) else p)
            out.append(ids)
        return out

    def encode_offsets(self, texts: Sequence[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """For each text: its ids with special-token strings as their ids (``encode(text, allow_special=True)``)
        and, per id, the (start, end) characters of the text it stands for (what a chat template's
        ``{% generation %}`` spans are matched against)."""
        encoded = self.hf.encode_batch([_clean(t) for t in texts], add_special_tokens=False)
        return [(list(e.ids), list(e.offsets)) for e in encoded]

    def min_tokens(self, text: str) -> int:
        """A lower bound on ``len(self.encode(text, allow_special=...))``, found without tokenising, so a text
        certainly too long for a context can be refused before the work of encoding it (0: no bound known).

        One id per character (zenlm's char tokenizer): ``len(text)``, less what special-token strings save
        when they become one id each (``allow_special``). Byte-level BPE with all 256
        byte symbols in its vocabulary: every byte of the normalised text lands in some token and no token
        holds more than L bytes (L: the longest vocabulary entry, special tokens included), so at least
        ``bytes / L`` tokens; a normalizer that only recomposes, folds or lowercases characters (NFC, NFKC,
        ...) can shrink the bytes at most 4 times (a 4-byte character folded to one ASCII letter), so then
        ``bytes / (4 L)``. Other tokenizers may drop text (whitespace, accents, whole unknown words): 0.
        """
        if self._char_vocab is not None:
            specials = self._special_re.finditer(text) if self._special_re is not None else ()
            return len(text) - sum(len(m.group()) - 1 for m in specials)
        if self._bytes_per_token is None:
            self._bytes_per_token = _bytes_per_token(self.hf)
        if not self._bytes_per_token:
            return 0
        return len(text.encode("utf-8", errors="replace")) // self._bytes_per_token

    # ------------------------------------------------------------------------------------------ decode
    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Text of a sequence of ids. skip_special drops special tokens (BOS, EOS, PAD, ...)."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def stream_decoder(self, *, skip_special: bool = False) -> StreamDecoder:
        """A :class:`StreamDecoder` that turns ids pushed one at a time into text pieces."""
        return StreamDecoder(self, skip_special=skip_special)

    # ------------------------------------------------------------------------------------------ files
    def config_dict(self) -> dict[str, Any]:
        """The contents of tokenizer_config.json."""
        cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
        for role, token in self.role_tokens.items():
            if getattr(self, f"{role}_id") is not None:
                cfg[f"{role}_token"] = token
        cfg["model_max_length"] = self.model_max_length or UNLIMITED_LENGTH
        cfg["clean_up_tokenization_spaces"] = False
        cfg["chat_template"] = self.chat_template
        cfg["zenlm_kind"] = self.kind
        return cfg

    def save(self, out_dir: str | os.PathLike[str]) -> None:
        """Write ``out_dir/tokenizer.json`` and ``out_dir/tokenizer_config.json`` (each via temp file + rename)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "tokenizer.json", self.hf.to_str(pretty=True))
        atomic_write_text(out / "tokenizer_config.json", json.dumps(self.config_dict(), indent=2, ensure_ascii=False))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a directory holding tokenizer.json (+ tokenizer_config.json), or a tokenizer.json file."""
        p = Path(path)
        file = p / "tokenizer.json" if p.is_dir() else p
        if not file.is_file():
            where = f"{p} has no tokenizer.json" if p.is_dir() else f"no such tokenizer file: {p}"
            raise DataError(f"{where}; train one with `zenlm tokenizer train` or point to a directory that has one.")
        try:
            hf = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the library raises a bare Exception on malformed JSON
            raise DataError(f"{file} is not a valid tokenizer.json ({e}).") from None
        cfg: dict[str, Any] = {}
        cfg_file = file.with_name("tokenizer_config.json")
        if cfg_file.is_file():
            cfg = read_json_object(cfg_file, DataError, "it holds the special tokens and the chat template: fix "
                                   "it, or delete it to use the defaults")
            tpl = cfg.get("chat_template")
            if tpl is not None and not isinstance(tpl, (str, list)):
                raise DataError(f"{cfg_file}: 'chat_template' must be a string or a list of named templates.")
        model_type = type(hf.model).__name__
        kind = cfg.get("zenlm_kind") or _HF_KIND.get(model_type)
        if kind not in KINDS:
            raise DataError(f"{file}: cannot tell the tokenizer kind (model type {model_type!r}); "
                            f"set zenlm_kind in tokenizer_config.json to one of {', '.join(KINDS)}.")
        mml = cfg.get("model_max_length")
        return cls(hf, kind, chat_template=_chat_template(cfg, file.with_name("chat_template.jinja")),
                   model_max_length=mml if isinstance(mml, int) and mml < UNLIMITED_LENGTH else None,
                   role_tokens=_role_tokens(cfg, hf))


# Normalizers that never delete text: they recompose, fold or lowercase characters, or prepend one
_KEEPING_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Prepend", "Sequence"}


def _types(state: bytes) -> set[str]:
    """Every ``"type"`` named in a serialised normalizer or pre-tokenizer (nested ones too)."""
    return set(re.findall(r'"type":\s*"(\w+)"', state.decode("utf-8", errors="replace")))


def _bytes_per_token(hf: tokenizers.Tokenizer) -> int:
    """The most UTF-8 bytes of input one token of a byte-level BPE can stand for (times 4 when a normalizer
    may shrink the text), or 0 when ``hf`` is not a byte-level BPE that keeps every byte (see min_tokens)."""
    pre = hf.pre_tokenizer.__getstate__() if hf.pre_tokenizer is not None else b""
    if type(hf.model).__name__ != "BPE" or "ByteLevel" not in _types(pre) or b'"Removed"' in pre:
        return 0
    shrink = 1
    if hf.normalizer is not None:
        if not _types(hf.normalizer.__getstate__()) <= _KEEPING_NORMALIZERS:
            return 0
        shrink = 4
    vocab = hf.get_vocab(with_added_tokens=True)
    if not set(pre_tokenizers.ByteLevel.alphabet()) <= vocab.keys():  # a missing byte could be dropped
        return 0
    return shrink * max(len(t) for t in vocab)


def _chat_template(cfg: dict[str, Any], jinja_file: Path) -> str:
    """The chat template of a tokenizer_config.json (a string, or a list of named templates), else the
    ``chat_template.jinja`` file beside it (newer Hugging Face layout), else zenlm's default."""
    tpl = cfg.get("chat_template")
    if isinstance(tpl, list):  # [{"name": ..., "template": ...}, ...]: take "default", else the first
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default") or next(iter(named.values()), None)
    if not tpl and jinja_file.is_file():
        tpl = jinja_file.read_text(encoding="utf-8")
    return tpl if isinstance(tpl, str) and tpl else CHAT_TEMPLATE


def _role_tokens(cfg: dict[str, Any], hf: tokenizers.Tokenizer) -> dict[str, str]:
    """Role -> token string from tokenizer_config.json (``eos_token`` etc., a string or an AddedToken-like
    dict), for the tokens that exist in the vocabulary."""
    roles: dict[str, str] = {}
    for role in ROLES:
        token = cfg.get(f"{role}_token")
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str) and hf.token_to_id(token) is not None:
            roles[role] = token
    return roles


def render_chat(tokenizer: Tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                max_chars: int = RENDER_MAX_CHARS) -> str:
    """The prompt text for ``messages`` (``[{"role": ..., "content": ...}]``) from the tokenizer's Jinja chat
    template, rendered in a sandbox (a template cannot reach Python objects) with bounded sizes (its output
    stops past ``max_chars`` characters; see :mod:`zenlm.chat_template`, which also renders with a deadline in
    a worker process, as the server does); the template sees the special tokens as ``bos_token``,
    ``eos_token``, ... DataError when the template refuses or fails on the messages or passes a bound."""
    try:
        tpl = compile_template(tokenizer.chat_template, max_chars)
        return render(tpl, messages, add_generation_prompt, template_tokens(tokenizer), max_chars)
    except TemplateError as e:
        raise DataError(f"{e}.".replace("..", ".")) from None


# A reply that cannot occur in a template's own text, to find what the template writes right after a reply
END_PROBE = "zq7xv1"
END_PROBE_MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": END_PROBE}]


def end_of_turn_in(tokenizer: Tokenizer, probe_text: str) -> int | None:
    """The id of the special token a chat template writes right after an assistant's text, read from
    ``probe_text`` (the template's rendering of :data:`END_PROBE_MESSAGES` without a generation prompt), or None
    when no special token follows it there."""
    at = probe_text.find(END_PROBE)
    if at < 0 or tokenizer._special_re is None:
        return None
    m = tokenizer._special_re.match(probe_text, at + len(END_PROBE))
    return tokenizer.token_to_id(m.group()) if m else None


def end_of_turn_id(tokenizer: Tokenizer) -> int | None:
    """The end-of-turn token of the tokenizer's chat template: the special token it writes right after what the
    assistant says (``<|eos|>`` for zenlm's template, ``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3). A
    chat-tuned model ends its reply with it, so chat replies stop there. None when the template puts no special
    token there or refuses the probe conversation. (The server renders the probe in its template worker and
    calls :func:`end_of_turn_in`.)"""
    try:
        return end_of_turn_in(tokenizer, render_chat(tokenizer, END_PROBE_MESSAGES, add_generation_prompt=False,
                                                     max_chars=1 << 16))
    except DataError:
        return None


def chat_stop_ids(tokenizer: Tokenizer, end_of_turn: int | None = None) -> frozenset[int]:
    """The ids a chat reply stops at: the end-of-turn token (``end_of_turn``, else :func:`end_of_turn_id`) and
    the end-of-text token."""
    eot = end_of_turn if end_of_turn is not None else end_of_turn_id(tokenizer)
    return frozenset(i for i in (eot, tokenizer.eos_id) if i is not None)


def template_tokens(tokenizer: Tokenizer) -> dict[str, str]:
    """The special tokens a chat template sees: ``{"bos_token": "<|bos|>", "eos_token": ...}``."""
    return {f"{role}_token": tok for role, tok in tokenizer.role_tokens.items()
            if getattr(tokenizer, f"{role}_id", None) is not None}


class StreamDecoder:
    """Incremental detokenizer for generation.

    ``push(id)`` returns the text that became complete with this token ("" while a multi-byte UTF-8 character
    is still incomplete, so a half character never shows as U+FFFD); ``flush()`` returns whatever is left.
    ``"".join(pushes) + flush() == tokenizer.decode(all ids)``.

    How: only a few already-emitted tokens are kept as left context (decoders such as WordPiece need it to know
    whether a space goes in front); each push decodes context + pending tokens and emits the new suffix
    once it does not end in U+FFFD. The cost per token is constant.
    """

    CONTEXT = 4

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._context: list[int] = []
        self._pending: list[int] = []

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special=self.skip_special) if ids else ""

    def _emit(self, force: bool) -> str:
        prev = self._decode(self._context)
        full = self._decode(self._context + self._pending)
        if not force and (not full or full.endswith("\ufffd")):
            return ""
        new = full[len(prev):] if full.startswith(prev) else full
        kept = self._context + self._pending
        if self.skip_special:  # skipped tokens give no context; keep the last ones that are decoded
            kept = [i for i in kept if i not in self.tokenizer.special_ids]
        self._context = kept[-self.CONTEXT:]
        self._pending = []
        return new

    def push(self, token_id: int) -> str:
        """Add one id; returns newly complete text (possibly "")."""
        self._pending.append(int(token_id))
        return self._emit(force=False)

    def flush(self) -> str:
        """Return any text still held back (e.g. an incomplete byte sequence, as U+FFFD) and reset."""
        out = self._emit(force=True) if self._pending else ""
        self._context, self._pending = [], []
        return out


# ---------------------------------------------------------------------------------------------- training


def _special_added(special_tokens: Sequence[str]) -> list[AddedToken]:
    return [AddedToken(t, special=True, normalized=False) for t in special_tokens]


def _counted(texts: Iterable[str], progress: ProgressFn | None, every: int = 8 << 20) -> Iterator[str]:
    """Yield texts (lone surrogates replaced), reporting characters seen every ``every`` characters."""
    seen, last, t0 = 0, 0, time.perf_counter()
    for t in texts:
        seen += len(t)
        if seen - last >= every:
            last = seen
            report(progress, "tokenizer", done=seen, unit="chars",
                   info={"Mchars/s": seen / 1e6 / max(time.perf_counter() - t0, 1e-9)})
        yield _clean(t)
    if seen == 0:
        raise DataError("the tokenizer training text is empty; give a corpus that has some text.")


def train_tokenizer(
    texts: Iterable[str], *, kind: str = "bpe", vocab_size: int = 8192,
    special_tokens: Sequence[str] = SPECIAL_TOKENS, min_frequency: int = 2, progress: ProgressFn | None = None,
) -> Tokenizer:
    """Train a tokenizer on an iterable of text pieces (e.g. ``corpus.texts("train")``).

    kind:           "bpe" (byte-level BPE), "wordpiece", "char" or "word"
    vocab_size:     total ids including special tokens. For "char" it is an upper bound: when the text has more
                    distinct characters than fit, the most frequent ones are kept.
    special_tokens: added after training-time merges; "<|unk|>" is required for wordpiece and char.
    min_frequency:  a pair must occur this often to be merged (bpe/wordpiece); a word this often to be kept (word).
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown tokenizer kind {kind!r}; choose one of {', '.join(KINDS)}.")
    special_tokens = list(dict.fromkeys(special_tokens))
    n_special = len(special_tokens)
    if kind == "bpe" and vocab_size < 256 + n_special:
        raise ConfigError(f"vocab_size {vocab_size} is too small for byte-level BPE: it needs the 256 byte tokens "
                          f"plus {n_special} special tokens; use at least {256 + n_special}.")
    if kind != "bpe" and vocab_size <= n_special:
        raise ConfigError(f"vocab_size {vocab_size} leaves no room next to the {n_special} special tokens.")
    if kind != "bpe" and ROLES["unk"] not in special_tokens:
        raise ConfigError(f"a {kind} tokenizer needs {ROLES['unk']} among its special tokens for unseen text.")
    if min_frequency < 1:
        raise ConfigError(f"min_frequency must be >= 1, got {min_frequency}.")
    report(progress, "tokenizer", message=f"training a {kind} tokenizer (vocab_size {vocab_size})")
    t0 = time.perf_counter()
    stream = _counted(texts, progress)

    if kind == "bpe":
        hf = tokenizers.Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
            special_tokens=_special_added(special_tokens), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        hf.train_from_iterator(stream, trainer)
    elif kind == "wordpiece":
        hf = tokenizers.Tokenizer(models.WordPiece(unk_token=ROLES["unk"], continuing_subword_prefix="##"))
        hf.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=False)
        hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        hf.decoder = decoders.WordPiece(prefix="##", cleanup=False)
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
            special_tokens=_special_added(special_tokens), continuing_subword_prefix="##",
        )
        hf.train_from_iterator(stream, trainer)
    elif kind == "word":
        hf = tokenizers.Tokenizer(models.WordLevel(unk_token=ROLES["unk"]))
        hf.pre_tokenizer = pre_tokenizers.Whitespace()  # \w+ | [^\w\s]+
        trainer = trainers.WordLevelTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
            special_tokens=_special_added(special_tokens),
        )
        hf.train_from_iterator(stream, trainer)
    else:
        counts: Counter[str] = Counter()
        for t in stream:
            counts.update(t)
        for s in special_tokens:
            counts.pop(s, None)  # a one-character special token keeps its special id only
        keep = vocab_size - n_special
        chars = sorted(c for c, _ in counts.most_common(keep)) if len(counts) > keep else sorted(counts)
        if len(counts) > keep:
            msg = f"{len(counts) - keep} rare characters of {len(counts)} do not fit vocab_size {vocab_size}; " \
                  f"they will encode as {ROLES['unk']}"
            log.warning(msg)
            report(progress, "tokenizer", message=msg)
        vocab = {c: i for i, c in enumerate(chars)}
        for s in special_tokens:
            vocab[s] = len(vocab)
        hf = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=ROLES["unk"]))
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        hf.decoder = decoders.Fuse()
    hf.add_special_tokens(_special_added(special_tokens))
    tok = Tokenizer(hf, kind)
    report(progress, "tokenizer",
           message=f"{kind} tokenizer trained: {tok.vocab_size} tokens in {time.perf_counter() - t0:.1f} s")
    return tok

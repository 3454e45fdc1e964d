"""Text generation: logits -> next token -> text, streamed.

The loop for one sequence:

    logits_V = model(prompt, cache=cache)[0, -1]        # prefill: scores of every possible next token
    repeat:
        token    = sampler.choose(logits_V).token       # zenlm.sampling: penalties, temperature, top-k/p, draw
        logits_V = model.decode_step([token], pos, cache.k, cache.v)[0]   # one new position, via the cache

With ``use_cache`` the prompt is run through the model once (prefill) and every later step feeds only the
newest token to :meth:`GPT.decode_step <zenlm.models.gpt.GPT.decode_step>`, reading the earlier keys/values
from the cache (or to its compiled twin, :mod:`zenlm.compiled`); without it each step recomputes the context.

Many prompts of different lengths at once (:func:`generate_batch`): each prompt is prefilled into its own
row of one preallocated cache; then every step feeds each row's newest token at that row's own position in
one batched ``decode_step`` (the step of the serving engine too), and each row picks its token with its own
:class:`~zenlm.sampling.Sampler` (its own seeded generator).

A stateful model (n-gram, MLP, LSTM: no KV cache, a state carried instead) is decoded by :mod:`zenlm.stateful`:
:func:`generate_ids` and :func:`generate_batch` hand it over after checking their arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from zenlm.compiled import CompiledDecoder, bucket_for, decoder_for
from zenlm.errors import ConfigError
from zenlm.models.cache import KVCache
from zenlm.models.gpt import GPT
from zenlm.sampling import Sampler, SamplingConfig, apply_repetition_penalty, pick_token
from zenlm.stateful import generate_batch as generate_batch_stateful
from zenlm.stateful import generate_ids as generate_ids_stateful
from zenlm.stateful import is_stateful


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
    seed:               random seed for sampling, 0 .. 2**64-1 (None: different every call)
    use_cache:          reuse past keys/values (fast); False recomputes the whole context each step
    stop_at_eos:        end when the model emits the end-of-text token (which is not returned)
    compile:            decode with the compiled step (:mod:`zenlm.compiled`; ahead of time with AOTInductor
                        on CPU), near the memory-bandwidth limit. None (the default): wherever it can be built
                        (a CPU with a C++ compiler, ``$ZENLM_COMPILE`` not 0); a program not built yet for
                        this model shape is built in the background (25-45 s for GPT-2-small on 2 CPU cores)
                        while the first tokens are decoded eagerly, and kept on disk for later processes, which
                        load it in about a second. True: always, waiting for a missing program (and refusing
                        use_cache=False). False: decode eagerly
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
    compile: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise ConfigError(f"max_new_tokens must be an integer, got {self.max_new_tokens!r}.")
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}.")
        self.sampling()  # validates temperature, top_k, top_p, repetition_penalty and seed
        if self.compile is True and not self.use_cache:
            raise ConfigError("compile decodes with the KV cache; drop use_cache=False (or compile).")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ConfigError(f"stop strings must be non-empty strings, got {s!r}.")

    def sampling(self) -> SamplingConfig:
        """The settings of the sampling pipeline (:mod:`zenlm.sampling`)."""
        return SamplingConfig(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              repetition_penalty=self.repetition_penalty, seed=self.seed)


# ------------------------------------------------------------------------------ logits -> next token


def sample_next(
    logits_V: Tensor,
    cfg: GenerationConfig,
    generator: torch.Generator | None = None,
    prev_ids: Sequence[int] | Tensor | None = None,
) -> int:
    """Pick the next token id from logits_V [V]: repetition penalty (over ``prev_ids``), then greedy if
    ``cfg.temperature == 0``, else temperature, top-k, top-p and a draw from ``generator`` (None: torch's
    global generator). One step of :mod:`zenlm.sampling`, without a sequence's state."""
    logits_V = logits_V.float()
    if prev_ids is not None:
        logits_V = apply_repetition_penalty(logits_V, prev_ids, cfg.repetition_penalty)
    return pick_token(logits_V, cfg.sampling(), generator)


# ----------------------------------------------------------------------------------- ids -> ids


@torch.inference_mode()
def _last_logits(model: GPT, ids: list[int], cache: KVCache | None, device: torch.device) -> Tensor:
    """Feed ``ids`` (one sequence) and return the logits after its last token, [V]."""
    idx_1T = torch.tensor([ids], dtype=torch.long, device=device)
    return model(idx_1T, cache=cache, last_only=True)[0, -1]


@torch.inference_mode()
def _next_logits(step: Callable[..., Tensor], token: int, cache: KVCache) -> Tensor:
    """Feed ``token`` at position ``cache.pos`` of a batch-1 cache through ``step`` (``GPT.decode_step`` or its
    compiled twin) -> logits [V]; ``cache.pos`` advances by one."""
    logits_1V = step(torch.tensor([token], device=cache.device), cache.pos, cache.k, cache.v)
    cache.pos += 1
    return logits_1V[0]


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
    if is_stateful(model):
        return generate_ids_stateful(model, prompt_ids, cfg, eos_id)
    return _generate_ids(model, prompt_ids, cfg, eos_id)


# The shortest KV cache generate_ids allocates (see cache_length).
MIN_CACHE_LENGTH = 256
# generate_batch prefills prompts of the same length together, up to this many tokens a forward pass (a bound
# on the activations' memory; one prompt longer than this still goes through in one pass).
PREFILL_TOKENS = 4096


def cache_length(block_size: int, needed: int) -> int:
    """The positions of the KV cache for one sequence that needs ``needed`` of them (prompt + new tokens): the
    next power of two from MIN_CACHE_LENGTH up, or the whole context (``block_size``) when that is shorter or
    more is needed (generation then refills the cache from the recent half of the context when it is full).
    A cache of the whole context would cost its full size whatever the request (75 MB in fp32 for GPT-2-small,
    half of it in bf16); the few sizes keep the compiled programs, which are built per cache length, few."""
    if needed > block_size:
        return block_size
    return min(block_size, max(MIN_CACHE_LENGTH, 1 << max(0, needed - 1).bit_length()))


def _generate_ids(
    model: GPT, prompt_ids: list[int], cfg: GenerationConfig, eos_id: int | None
) -> Generator[int, None, None]:
    if cfg.max_new_tokens == 0:
        return
    vocab_size, block_size = model.config.vocab_size, model.config.block_size
    device = next(model.parameters()).device
    sampler = Sampler(cfg.sampling(), vocab_size, device=device, prompt_ids=prompt_ids)

    was_training = model.training
    model.eval()
    try:
        ids = list(prompt_ids)
        cache = None
        if cfg.use_cache:
            cache = model.make_cache(1, cache_length(block_size, len(ids) + cfg.max_new_tokens))
            if isinstance(cache, KVCache):  # memory now, not page by page during the steps
                cache.reserve(0, 0, min(cache.max_len, len(ids) + cfg.max_new_tokens))
        step = (decoder_for(model, cfg.compile) if cfg.use_cache else None) or model.decode_step
        if isinstance(step, CompiledDecoder) and cache is not None and cfg.max_new_tokens > 1:
            step.prepare(cache.k)  # a note about its build comes now, before the first token
        logits_V = _last_logits(model, ids[-block_size:], cache, device)  # prefill
        for n in range(cfg.max_new_tokens):
            token = sampler.choose(logits_V).token
            if cfg.stop_at_eos and eos_id is not None and token == eos_id:
                return
            yield token
            ids.append(token)
            if n + 1 == cfg.max_new_tokens:
                return
            if cache is None:
                logits_V = _last_logits(model, ids[-block_size:], None, device)
            elif cache.pos >= cache.max_len:
                # full: refill from the recent half of the context, all but the newest token as a prompt and the
                # newest by a step, as generate_batch does (a step and a prompt pass may round differently)
                cache.reset()
                ctx = ids[-max(1, block_size // 2) :]
                if len(ctx) > 1:
                    _last_logits(model, ctx[:-1], cache, device)
                logits_V = _next_logits(step, token, cache)
            else:
                logits_V = _next_logits(step, token, cache)
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------ many prompts -> ids, batched


def generate_batch(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    cfg: GenerationConfig,
    *,
    eos_id: int | None = None,
    on_token: Callable[[int, int], bool] | None = None,
) -> list[list[int]]:
    """Continue several prompts of different lengths together -> the new ids of each, in prompt order.

    prompts: N non-empty lists of ids (any lengths). Each row stops on its own, exactly as
    :func:`generate_ids` would stop on that prompt alone: after ``cfg.max_new_tokens`` tokens, or when
    ``eos_id`` is drawn and ``cfg.stop_at_eos`` (not returned). ``on_token(i, token)``, if given, is called
    for every token kept for prompt i; returning True ends that row after this token (stop strings).

    How: a cache pool (a :class:`KVCache` of N rows) with ``max_len = min(block_size,
    longest prompt + max_new_tokens)``, in the dtype :meth:`GPT.make_cache` picks (the autocast dtype when
    autocast is on, else the weights'). The rows are ordered by prompt length and the prompts of one length
    are prefilled together (``GPT.forward`` on a view of their rows, up to ``PREFILL_TOKENS`` tokens a pass;
    a row attends over its own keys only), then each step runs :meth:`GPT.decode_step` over the unfinished
    rows, each at its own position.
    A finished row leaves the batch at once: the rows still running are moved up (their cache rows copied),
    so the batch shrinks and finished rows cost nothing more.

    Sampling: the same pipeline as :func:`generate_ids` (repetition penalty over that row's prompt and
    output, temperature, top-k, top-p), row by row. Row i draws from its own generator seeded with
    ``cfg.seed + i`` (modulo 2**64; ``cfg.seed is None``: a fresh random seed per row), so row 0 draws what
    ``generate_ids`` draws with ``cfg.seed``, and a row's draws do not depend on the other rows.

    Same tokens as alone: each row attends over exactly its own keys (``decode_step(...,
    row_attention=True)``), so a row's logits do not depend on the other prompts, and greedy rows
    (temperature 0) give the ids of :func:`generate_ids` on that prompt alone — in fp32, bf16 and int8
    alike (tested on CPU). On a GPU the batched matrix products may sum in another order than at batch 1,
    so a near-tie between the two best logits could go the other way there.

    Compiled (``cfg.compile``, see :class:`GenerationConfig`): the steps run the batched programs of
    :mod:`zenlm.compiled` (built for batch sizes 1, 2, 4, 8, ...; the pool gets a power-of-two number of rows
    and of positions, so that few programs serve every call). There too a row's logits do not depend on the
    other rows (bit for bit in bf16 and int8 on CPU; fp32 matrix products may round a row differently at
    another batch size), and greedy rows give the tokens of the eager path except at near-ties.

    Longer than the context: as :func:`generate_ids` with the cache — a prompt is cropped to its last
    ``block_size`` tokens, and a row whose cache is full is refilled from its last ``block_size // 2``
    tokens. The model is in eval mode while generating; its mode is restored afterwards.
    ``cfg.use_cache=False`` is refused (batched decoding always uses the cache).
    """
    if isinstance(prompts, (str, bytes)) or (len(prompts) > 0 and isinstance(prompts[0], int)):
        raise ConfigError("generate_batch takes a list of prompts, each a list of token ids; for one prompt "
                          "pass [prompt_ids] or use generate_ids.")
    rows = [[int(i) for i in p] for p in prompts]
    vocab_size = model.config.vocab_size
    for i, ids in enumerate(rows):
        if not ids:
            raise ConfigError(f"prompt {i} is empty; generation needs at least one prompt token (for example "
                              "the tokenizer's bos or eos id).")
        if min(ids) < 0 or max(ids) >= vocab_size:
            raise ConfigError(f"prompt {i}: token ids must be in 0..{vocab_size - 1} "
                              "(the model's vocabulary).")
    if not cfg.use_cache:
        raise ConfigError("generate_batch always decodes with the KV cache; leave use_cache=True (the tokens "
                          "are the same) or call generate_ids for a full recompute per step.")
    if not rows or cfg.max_new_tokens == 0:
        return [[] for _ in rows]
    decode = generate_batch_stateful if is_stateful(model) else _generate_batch
    was_training = model.training
    model.eval()
    try:
        return decode(model, rows, cfg, eos_id, on_token)
    finally:
        model.train(was_training)


def _prefill_limit(model: GPT) -> Callable[[int], int]:
    """How many tokens one prefill pass of generate_batch may take for prompts of a given length: up to
    PREFILL_TOKENS (at least one prompt). An int8 model's products of at most ``PACK_MAX_ROWS`` rows take the
    int8 kernel and larger ones the widened weights, which round differently: prompts that short are grouped
    only as far as the kernel still takes them, so that every row is computed as it is alone."""
    from zenlm.models.int8 import PACK_MAX_ROWS, Int8Linear

    int8 = any(isinstance(m, Int8Linear) for m in model.modules())

    def limit(length: int) -> int:
        if int8 and length <= PACK_MAX_ROWS:
            return PACK_MAX_ROWS
        return max(PREFILL_TOKENS, length)

    return limit


@torch.inference_mode()
def _generate_batch(
    model: GPT, prompts: list[list[int]], cfg: GenerationConfig, eos_id: int | None,
    on_token: Callable[[int, int], bool] | None,
) -> list[list[int]]:
    N = len(prompts)
    vocab_size, block_size = model.config.vocab_size, model.config.block_size
    device = next(model.parameters()).device
    sampling = cfg.sampling()
    samplers = [Sampler(sampling, vocab_size, device=device, prompt_ids=ids, seed_offset=i)
                for i, ids in enumerate(prompts)]

    max_len = min(block_size, max(len(p) for p in prompts) + cfg.max_new_tokens)
    decoder = decoder_for(model, cfg.compile)
    if decoder is not None:  # shapes the compiled programs are built for: few, so that they are reused
        max_len = min(block_size, 1 << (max_len - 1).bit_length())  # a power of two
    pool = model.make_cache(N if decoder is None else bucket_for(N, 1 << 30), max_len)
    if isinstance(pool, KVCache):  # every row may fill it: memory now, not page by page during the steps
        pool.reserve(slice(None), 0, max_len)
    history = [list(p) for p in prompts]  # prompt + new ids of each prompt (for cache refills)
    out: list[list[int]] = [[] for _ in prompts]

    # Prefill. Row r of the batch holds prompt live[r], pos[r] positions. The rows are ordered by prompt length,
    # so that prompts of the same length sit side by side and go through the model together (up to
    # PREFILL_TOKENS tokens a pass): each row still attends over its own keys only.
    ctxs = [ids[-block_size:] for ids in prompts]
    live = sorted(range(N), key=lambda i: len(ctxs[i]))
    pos = [len(ctxs[i]) for i in live]
    logits: list[Tensor] = []
    limit = _prefill_limit(model)
    r = 0
    while r < N:
        end = r + 1
        while end < N and pos[end] == pos[r] and (end - r + 1) * pos[r] <= limit(pos[r]):
            end += 1
        ids_BT = torch.tensor([ctxs[i] for i in live[r:end]], device=device)
        logits.append(model(ids_BT, cache=pool.rows(r, end), last_only=True)[:, -1])
        r = end
    logits_RV = torch.cat(logits)

    for n in range(cfg.max_new_tokens):
        if sampling.argmax_only:  # one argmax over the whole batch
            tokens = logits_RV.argmax(dim=-1).tolist()
        else:
            tokens = [samplers[i].choose(logits_RV[r]).token for r, i in enumerate(live)]
        keep: list[int] = []  # batch rows that go on
        for r, (i, token) in enumerate(zip(live, tokens, strict=True)):
            if cfg.stop_at_eos and eos_id is not None and token == eos_id:
                continue
            out[i].append(token)
            history[i].append(token)
            ended = on_token is not None and on_token(i, token)  # called for every kept token
            if ended or n + 1 == cfg.max_new_tokens:
                continue
            keep.append(r)
        if not keep:
            break
        if len(keep) < len(live):  # drop finished rows: move the running ones up to rows 0..R-1
            pool.move_rows(keep, max(pos[r] for r in keep))
            live, pos = [live[r] for r in keep], [pos[r] for r in keep]
        for r, i in enumerate(live):
            if pos[r] >= max_len:  # full (only when max_len == block_size): refill from the recent half
                ctx = history[i][-max(1, block_size // 2) :]
                row = pool.row(r)
                if len(ctx) > 1:  # all but the newest token; the batched step below feeds that one
                    model(torch.tensor([ctx[:-1]], device=device), cache=row)
                pos[r] = len(ctx) - 1
        tokens_R = torch.tensor([history[i][-1] for i in live], device=device)
        pos_R = torch.tensor(pos, device=device)
        if decoder is not None:  # the batched family: a row's logits do not depend on the other rows
            logits_RV = decoder(tokens_R, pos_R, pool.k, pool.v, batched=True)
        else:
            logits_RV = model.decode_step(tokens_R, pos_R, pool.k, pool.v, row_attention=True)
        pos = [p + 1 for p in pos]
    return out


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


def split_at_stop(text: str, stops: Sequence[str], final: bool) -> tuple[str, str, bool]:
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
            ready, pending, stopped = split_at_stop(pending, stops, final=False)
            if ready:
                yield ready
            if stopped:
                return
        pending += decoder.flush()
        ready, _, _ = split_at_stop(pending, stops, final=True)
        if ready:
            yield ready
    finally:
        tokens.close()  # end the token generator now (restores the model's mode)


def generate_text_batch(
    model: GPT, tokenizer: TextTokenizer, prompts: Sequence[str] | Sequence[Sequence[int]],
    cfg: GenerationConfig,
) -> list[str]:
    """The continuation of each of ``prompts`` (a list of strings, or of token-id lists taken as they are),
    generated together by :func:`generate_batch` -> one string per prompt, in order.

    Each string is what ``"".join(generate_text(model, tokenizer, prompt, cfg))`` gives for greedy decoding
    (for sampling, prompt i draws with seed ``cfg.seed + i``): stop strings end a row as soon as they are
    complete (the text before the stop string is kept), an empty prompt starts from the eos (or bos) token.
    """
    if isinstance(prompts, str):
        raise ConfigError("generate_text_batch takes a list of prompts; for one prompt pass [prompt] or use "
                          "generate_text.")
    start = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.bos_id
    ids_list = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        if not ids:
            if start is None:
                raise ConfigError("a prompt is empty and the tokenizer has no bos/eos token to start from; "
                                  "give non-empty prompts.")
            ids = [start]
        ids_list.append(ids)
    decoders = [tokenizer.stream_decoder() for _ in prompts]
    texts = ["" for _ in prompts]
    pending = ["" for _ in prompts]
    stopped = [False for _ in prompts]

    def on_token(i: int, token: int) -> bool:  # the text side of _stream_text, one row at a time
        pending[i] += decoders[i].push(token)
        if not pending[i]:
            return False
        ready, pending[i], stopped[i] = split_at_stop(pending[i], cfg.stop, final=False)
        texts[i] += ready
        return stopped[i]

    generate_batch(model, ids_list, cfg, eos_id=tokenizer.eos_id, on_token=on_token)
    for i in range(len(prompts)):
        if not stopped[i]:
            texts[i] += split_at_stop(pending[i] + decoders[i].flush(), cfg.stop, final=True)[0]
    return texts


__all__ = [
    "GenerationConfig",
    "sample_next",
    "split_at_stop",
    "generate_ids",
    "generate_text",
    "generate_batch",
    "generate_text_batch",
    "TextTokenizer",
]

"""Text generation: logits -> next token -> text, streamed.

The pipeline for one new token, in order (each step is a pure function below, tested on its own):

    logits_V = model(context)[-1]                       # scores of every possible next token
    logits_V = apply_repetition_penalty(logits_V, ...)  # CTRL: make tokens already seen less likely
    if temperature == 0: next = argmax(logits_V)        # greedy
    else:
        logits_V = logits_V / temperature               # < 1 sharpens, > 1 flattens
        logits_V = top_k_filter(logits_V, k)            # keep the k best tokens
        logits_V = top_p_filter(logits_V, p)            # keep the smallest set holding probability >= p
        next = sample(softmax(logits_V))

With ``use_cache`` the prompt is run through the model once (prefill) and every later step feeds only the
newest token, reading the earlier keys/values from the model's KV cache.

Many prompts of different lengths at once (:func:`generate_batch`): each prompt is prefilled into its own
row of one preallocated cache; then every step feeds each row's newest token at that row's own position in
one batched forward pass (:func:`decode_step`, also the decode step of the serving engine), and each row
picks its token with the pipeline above and its own random generator.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from zenlm.errors import ConfigError
from zenlm.models.gpt import GPT, KVCache
from zenlm.models.layers import attention


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
    seed:               random seed for sampling (None: different every call)
    use_cache:          reuse past keys/values (fast); False recomputes the whole context each step
    stop_at_eos:        end when the model emits the end-of-text token (which is not returned)
    compile:            decode with the compiled step (:mod:`zenlm.compiled`; ahead of time with AOTInductor
                        on CPU): near the memory-bandwidth limit. The first use for a model shape builds the
                        program (25-45 s for GPT-2-small on 2 CPU cores), which is kept on disk and loads in
                        about a second afterwards. One sequence at a time with the cache (not generate_batch,
                        not use_cache=False)
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
    compile: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise ConfigError(f"max_new_tokens must be an integer, got {self.max_new_tokens!r}.")
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}.")
        if not self.temperature >= 0:
            raise ConfigError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}.")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise ConfigError(f"top_k must be an integer >= 1 (or None for no limit), got {self.top_k!r}.")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1] (or None for no limit), got {self.top_p}.")
        if not self.repetition_penalty > 0:
            raise ConfigError(
                f"repetition_penalty must be > 0 (1.0 means none), got {self.repetition_penalty}."
            )
        if 0 < self.temperature < 1e-32:  # logits / T would overflow float32: T -> 0 is greedy decoding
            self.temperature = 0.0
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**64):  # what torch.Generator.manual_seed takes
            raise ConfigError(f"seed must be an integer in 0..2**64-1 (or None for a random seed), got {self.seed!r}.")
        if self.compile and not self.use_cache:
            raise ConfigError("compile decodes with the KV cache; drop use_cache=False (or compile).")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ConfigError(f"stop strings must be non-empty strings, got {s!r}.")


# ------------------------------------------------------------------------------ logits -> next token


def _penalise(logits_V: Tensor, seen_V: Tensor, penalty: float) -> Tensor:
    """CTRL repetition penalty given a boolean mask of seen tokens [V]."""
    penalised_V = torch.where(logits_V > 0, logits_V / penalty, logits_V * penalty)
    return torch.where(seen_V, penalised_V, logits_V)


def apply_repetition_penalty(logits_V: Tensor, prev_ids: Sequence[int] | Tensor, penalty: float) -> Tensor:
    """CTRL-style repetition penalty: for every token id in ``prev_ids``, divide its logit by ``penalty``
    if positive, multiply it if negative (so penalty > 1 always makes it less likely).

    logits_V: [V] float; prev_ids: ids seen so far (any order, repeats allowed). Returns a new [V] tensor.
    """
    if penalty == 1.0 or len(prev_ids) == 0:
        return logits_V
    ids = torch.as_tensor(prev_ids, dtype=torch.long, device=logits_V.device)
    seen_V = torch.zeros(logits_V.shape[-1], dtype=torch.bool, device=logits_V.device)
    seen_V[ids] = True
    return _penalise(logits_V, seen_V, penalty)


def top_k_filter(logits_V: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest logits, set the rest to -inf. logits_V: [V] -> [V].

    Tokens tied with the k-th largest logit are kept too.
    """
    if k >= logits_V.shape[-1]:
        return logits_V
    kth_value = torch.topk(logits_V, k).values[-1]
    return logits_V.masked_fill(logits_V < kth_value, float("-inf"))


def top_p_filter(logits_V: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probabilities sum to >= ``p``;
    set the rest to -inf. The most likely token is always kept. logits_V: [V] -> [V].
    """
    if p >= 1.0:
        return logits_V
    sorted_V, order_V = torch.sort(logits_V, descending=True)
    probs_V = torch.softmax(sorted_V, dim=-1)
    mass_before_V = torch.cumsum(probs_V, dim=-1) - probs_V  # probability of all better tokens
    drop_sorted_V = mass_before_V >= p  # the better tokens already hold p: this one is not needed
    drop_sorted_V[0] = False
    drop_V = torch.empty_like(drop_sorted_V).scatter_(0, order_V, drop_sorted_V)
    return logits_V.masked_fill(drop_V, float("-inf"))


def _sample(
    logits_V: Tensor, cfg: GenerationConfig, generator: torch.Generator | None, seen_V: Tensor | None
) -> int:
    logits_V = logits_V.float()
    if seen_V is not None and cfg.repetition_penalty != 1.0:
        logits_V = _penalise(logits_V, seen_V, cfg.repetition_penalty)
    if cfg.temperature == 0:
        return int(torch.argmax(logits_V).item())
    logits_V = logits_V / cfg.temperature
    if cfg.top_k is not None:
        logits_V = top_k_filter(logits_V, cfg.top_k)
    if cfg.top_p is not None:
        logits_V = top_p_filter(logits_V, cfg.top_p)
    probs_V = torch.softmax(logits_V, dim=-1)
    return int(torch.multinomial(probs_V, 1, generator=generator).item())


def sample_next(
    logits_V: Tensor,
    cfg: GenerationConfig,
    generator: torch.Generator | None = None,
    prev_ids: Sequence[int] | Tensor | None = None,
) -> int:
    """Pick the next token id from logits_V [V]: repetition penalty (over ``prev_ids``), then greedy if
    ``cfg.temperature == 0``, else temperature, top-k, top-p and a draw from ``generator``."""
    seen_V = None
    if prev_ids is not None and len(prev_ids) > 0 and cfg.repetition_penalty != 1.0:
        seen_V = torch.zeros(logits_V.shape[-1], dtype=torch.bool, device=logits_V.device)
        seen_V[torch.as_tensor(prev_ids, dtype=torch.long, device=logits_V.device)] = True
    return _sample(logits_V, cfg, generator, seen_V)


# ----------------------------------------------------------------------------------- ids -> ids


@torch.inference_mode()
def _last_logits(model: GPT, ids: list[int], cache: KVCache | None, device: torch.device) -> Tensor:
    """Feed ``ids`` (one sequence) and return the logits after its last token, [V]."""
    idx_1T = torch.tensor([ids], dtype=torch.long, device=device)
    return model(idx_1T, cache=cache, last_only=True)[0, -1]


@torch.inference_mode()
def _step(logits_V: Tensor, cfg: GenerationConfig, generator: torch.Generator, seen_V: Tensor | None) -> int:
    token = _sample(logits_V, cfg, generator, seen_V)
    if seen_V is not None:
        seen_V[token] = True
    return token


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
    return _generate_ids(model, prompt_ids, cfg, eos_id)


def _generate_ids(
    model: GPT, prompt_ids: list[int], cfg: GenerationConfig, eos_id: int | None
) -> Generator[int, None, None]:
    if cfg.max_new_tokens == 0:
        return
    vocab_size, block_size = model.config.vocab_size, model.config.block_size
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if cfg.seed is None:
        generator.seed()
    else:
        generator.manual_seed(cfg.seed)

    was_training = model.training
    model.eval()
    try:
        ids = list(prompt_ids)
        seen_V = None
        if cfg.repetition_penalty != 1.0:
            seen_V = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            seen_V[torch.tensor(ids, device=device)] = True
        cache = model.make_cache(1) if cfg.use_cache else None
        decoder = None
        if cfg.compile:
            from zenlm.compiled import compiled_decoder

            decoder = compiled_decoder(model)
        logits_V = _last_logits(model, ids[-block_size:], cache, device)  # prefill
        for n in range(cfg.max_new_tokens):
            token = _step(logits_V, cfg, generator, seen_V)
            if cfg.stop_at_eos and eos_id is not None and token == eos_id:
                return
            yield token
            ids.append(token)
            if n + 1 == cfg.max_new_tokens:
                return
            if cache is None:
                logits_V = _last_logits(model, ids[-block_size:], None, device)
            elif cache.pos >= cache.max_len:  # full: refill from the recent half of the context
                cache.reset()
                logits_V = _last_logits(model, ids[-max(1, block_size // 2) :], cache, device)
            elif decoder is not None:
                logits_V = decoder.next_logits(token, cache)
            else:
                logits_V = _last_logits(model, [token], cache, device)
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------ many prompts -> ids, batched


@torch.inference_mode()
def decode_step(
    model: GPT, tokens_B: Tensor, pos_B: Tensor, k_layers: Sequence[Tensor], v_layers: Sequence[Tensor], *,
    row_attention: bool = False,
) -> Tensor:
    """One new token for each of the first B slots, each at its own position -> logits [B, V] (float32).

    tokens_B: [B] the newest token of each row; pos_B: [B] its absolute position (= tokens already cached);
    k_layers, v_layers: per layer [>=B, n_kv_head, max_len, head_dim] (a :class:`KVCache`'s ``k`` and ``v``;
    rows past B are left alone). Row b writes its key/value at
    ``pos_B[b]`` and attends over its own keys ``0 .. pos_B[b]`` only. This is ``GPT.forward`` with a cache,
    written out for per-row positions (same modules, same formulas).

    row_attention: False: one attention call for all rows over the longest row's keys, the others' extra
    keys masked out. True: one attention call per row over exactly its own keys. Same formula, but the
    attention kernels sum in an order that depends on the number of keys, so with False a row's last bits
    (visible in bf16) depend on the other rows' lengths; with True they do not, and a row gets the logits
    ``GPT.forward`` gives that sequence alone (bit for bit wherever the batched matrix products compute each
    row as they would alone, as on CPU). The projections and MLPs run batched either way; the per-row calls
    cost little at the batch sizes of generation (about what the one masked call costs at batch 8 on CPU).
    """
    S = int(pos_B.max()) + 1  # keys any row can see
    return _decode(model, tokens_B, pos_B, torch.arange(S, device=tokens_B.device), k_layers, v_layers,
                   row_attention=row_attention)


def _decode(
    model: GPT, tokens_B: Tensor, pos_B: Tensor, keys_S: Tensor, k_layers: Sequence[Tensor],
    v_layers: Sequence[Tensor], *, row_attention: bool = False,
) -> Tensor:
    """The body of :func:`decode_step` (also what :mod:`zenlm.compiled` compiles). keys_S = arange(S), S =
    the keys the longest row sees: a tensor rather than an int, so a compiled step can treat S as a dynamic
    size (one program for every position) instead of recompiling at each new length."""
    B, S = tokens_B.shape[0], keys_S.shape[0]
    rows_B = torch.arange(B, device=tokens_B.device)
    x_B1C = model.tok_emb(tokens_B[:, None])
    if model.pos_emb is not None:
        x_B1C = x_B1C + model.pos_emb(pos_B)[:, None]
    rope = None
    if model.rotary is not None:  # per-row angles, broadcast over heads: [B, 1, 1, D]
        rope = (model.rotary.cos[pos_B][:, None, None], model.rotary.sin[pos_B][:, None, None])
    mask_B11S = None  # one row sees all S keys: no mask (as GPT.forward for one new token)
    if row_attention and B > 1:
        keys_B = (pos_B + 1).tolist()  # row b attends over its first keys_B[b] keys
    elif B > 1:
        mask_B11S = (keys_S[None, :] <= pos_B[:, None])[:, None, None]
    for i, block in enumerate(model.blocks):
        attn = block.attn
        H, K, D = attn.n_head, attn.n_kv_head, attn.head_dim
        q_BH1D, k_BK1D, v_BK1D = attn.heads(block.norm_attn(x_B1C), rope)
        k_cache, v_cache = k_layers[i], v_layers[i]
        k_cache[rows_B, :, pos_B] = k_BK1D[:, :, 0].to(k_cache.dtype)  # row b -> its own position
        v_cache[rows_B, :, pos_B] = v_BK1D[:, :, 0].to(v_cache.dtype)
        k_BKSD, v_BKSD = k_cache[:B, :, :S], v_cache[:B, :, :S]
        q_BH1D = q_BH1D.to(v_BKSD.dtype)
        extra = {"enable_gqa": True} if K != H else {}
        if row_attention and B > 1:  # row b: its own keys 0 .. pos_B[b], no mask
            y_BH1D = torch.cat([
                attention(q_BH1D[b : b + 1], k_BKSD[b : b + 1, :, :n], v_BKSD[b : b + 1, :, :n], **extra)
                for b, n in enumerate(keys_B)
            ])
        else:
            y_BH1D = attention(q_BH1D, k_BKSD, v_BKSD, attn_mask=mask_B11S, **extra)
        x_B1C = x_B1C + attn.proj(y_BH1D.transpose(1, 2).reshape(B, 1, H * D))
        x_B1C = x_B1C + block.mlp(block.norm_mlp(x_B1C))
    x_B1C = model.norm_f(x_B1C)
    x_BC = x_B1C[:, 0]
    logits_BV = (F.linear(x_BC, model.tok_emb.weight) if model.lm_head is None else model.lm_head(x_BC)).float()
    if model.config.logit_softcap is not None:
        cap = model.config.logit_softcap
        logits_BV = cap * torch.tanh(logits_BV / cap)
    return logits_BV


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
    autocast is on, else the weights'). Prompt i is prefilled alone into row i (``GPT.forward`` on a view of
    that row), then each step runs :func:`decode_step` over the unfinished rows, each at its own position.
    A finished row leaves the batch at once: the rows still running are moved up (their cache rows copied),
    so the batch shrinks and finished rows cost nothing more.

    Sampling: the same pipeline as :func:`generate_ids` (repetition penalty over that row's prompt and
    output, temperature, top-k, top-p), row by row. Row i draws from its own generator seeded with
    ``cfg.seed + i`` (``cfg.seed is None``: a fresh random seed per row), so row 0 draws what
    ``generate_ids`` draws with ``cfg.seed``, and a row's draws do not depend on the other rows.

    Same tokens as alone: each row attends over exactly its own keys (``decode_step(...,
    row_attention=True)``), so a row's logits do not depend on the other prompts, and greedy rows
    (temperature 0) give the ids of :func:`generate_ids` on that prompt alone — in fp32, bf16 and int8
    alike (tested on CPU). On a GPU the batched matrix products may sum in another order than at batch 1,
    so a near-tie between the two best logits could go the other way there.

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
    if cfg.compile:
        raise ConfigError("compile applies to one sequence at a time (generate_ids / generate_text); "
                          "generate_batch runs eagerly: drop compile=True.")
    if not rows or cfg.max_new_tokens == 0:
        return [[] for _ in rows]
    was_training = model.training
    model.eval()
    try:
        return _generate_batch(model, rows, cfg, eos_id, on_token)
    finally:
        model.train(was_training)


@torch.inference_mode()
def _generate_batch(
    model: GPT, prompts: list[list[int]], cfg: GenerationConfig, eos_id: int | None,
    on_token: Callable[[int, int], bool] | None,
) -> list[list[int]]:
    N = len(prompts)
    vocab_size, block_size = model.config.vocab_size, model.config.block_size
    device = next(model.parameters()).device
    generators = []
    for i in range(N):
        g = torch.Generator(device=device)
        if cfg.seed is None:
            g.seed()
        else:
            g.manual_seed(cfg.seed + i)
        generators.append(g)
    seen_NV = None
    if cfg.repetition_penalty != 1.0:
        seen_NV = torch.zeros(N, vocab_size, dtype=torch.bool, device=device)
        for i, ids in enumerate(prompts):
            seen_NV[i, torch.tensor(ids, device=device)] = True
    greedy_fast = cfg.temperature == 0 and seen_NV is None  # one argmax over the whole batch

    max_len = min(block_size, max(len(p) for p in prompts) + cfg.max_new_tokens)
    pool = model.make_cache(N, max_len)
    history = [list(p) for p in prompts]  # prompt + new ids of each prompt (for cache refills)
    out: list[list[int]] = [[] for _ in prompts]

    # Prefill: prompt i alone into cache row i. Row r of the batch holds prompt live[r], pos[r] positions.
    live = list(range(N))
    pos: list[int] = []
    logits: list[Tensor] = []
    for i, ids in enumerate(prompts):
        ctx = ids[-block_size:]
        logits.append(model(torch.tensor([ctx], device=device), cache=pool.row(i),
                            last_only=True)[0, -1])
        pos.append(len(ctx))
    logits_RV = torch.stack(logits)

    for n in range(cfg.max_new_tokens):
        if greedy_fast:
            tokens = logits_RV.argmax(dim=-1).tolist()
        else:
            tokens = [_step(logits_RV[r], cfg, generators[i], None if seen_NV is None else seen_NV[i])
                      for r, i in enumerate(live)]
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
        logits_RV = decode_step(model, tokens_R, torch.tensor(pos, device=device), pool.k, pool.v,
                                row_attention=True)
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


def _split_at_stop(text: str, stops: Sequence[str], final: bool) -> tuple[str, str, bool]:
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
            ready, pending, stopped = _split_at_stop(pending, stops, final=False)
            if ready:
                yield ready
            if stopped:
                return
        pending += decoder.flush()
        ready, _, _ = _split_at_stop(pending, stops, final=True)
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
        ready, pending[i], stopped[i] = _split_at_stop(pending[i], cfg.stop, final=False)
        texts[i] += ready
        return stopped[i]

    generate_batch(model, ids_list, cfg, eos_id=tokenizer.eos_id, on_token=on_token)
    for i in range(len(prompts)):
        if not stopped[i]:
            texts[i] += _split_at_stop(pending[i] + decoders[i].flush(), cfg.stop, final=True)[0]
    return texts


__all__ = [
    "GenerationConfig",
    "apply_repetition_penalty",
    "top_k_filter",
    "top_p_filter",
    "sample_next",
    "generate_ids",
    "generate_text",
    "decode_step",
    "generate_batch",
    "generate_text_batch",
    "TextTokenizer",
]

"""Generation: sampling helpers on hand-made logits, KV cache vs. full recompute, seeding, context overflow,
and text streaming with stop strings (a scripted fake model and a byte-level fake tokenizer)."""

from __future__ import annotations

import codecs
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from zenlm.config import GPTConfig
from zenlm.errors import ConfigError
from zenlm.generate import GenerationConfig, generate_ids, generate_text, sample_next
from zenlm.models.gpt import GPT
from zenlm.sampling import apply_repetition_penalty, top_k_filter, top_p_filter

NEG_INF = float("-inf")

# ------------------------------------------------------------------------------------- fakes


class ByteTokenizer:
    """Byte-level tokenizer: ids 0..255 are bytes, then bos, eos, then multi-byte pieces."""

    bos_id = 256
    eos_id = 257

    def __init__(self, pieces: tuple[str, ...] = ()) -> None:
        self.pieces = [p.encode() for p in pieces]
        self.vocab_size = 258 + len(self.pieces)

    def piece_id(self, piece: str) -> int:
        if len(piece.encode()) == 1:
            return piece.encode()[0]
        return 258 + self.pieces.index(piece.encode())

    def token_bytes(self, i: int) -> bytes:
        if i < 256:
            return bytes([i])
        return b"" if i in (self.bos_id, self.eos_id) else self.pieces[i - 258]

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> ByteStreamDecoder:
        return ByteStreamDecoder(self)


class ByteStreamDecoder:
    def __init__(self, tok: ByteTokenizer) -> None:
        self.tok = tok
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self.utf8.decode(self.tok.token_bytes(token_id))

    def flush(self) -> str:
        return self.utf8.decode(b"", final=True)


class FakeCache:
    def __init__(self, max_len: int) -> None:
        self.pos, self.max_len = 0, max_len
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.device = torch.device("cpu")

    def reset(self) -> None:
        self.pos = 0


class ScriptedLM(nn.Module):
    """A 'model' that predicts ``script[i + 1]`` after absolute position i (then eos forever)."""

    def __init__(self, script: list[int], vocab_size: int, eos_id: int = 257, block_size: int = 1024) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size, block_size=block_size)
        self.dummy = nn.Parameter(torch.zeros(()))
        self.script, self.eos_id = script, eos_id
        self.calls: list[tuple[int, int]] = []  # (start position, length) of each forward

    def make_cache(self, batch_size: int, max_len: int | None = None, **_) -> FakeCache:
        return FakeCache(max_len or self.config.block_size)

    def forward(self, idx, *, cache=None, last_only=False):
        B, T = idx.shape
        start = 0 if cache is None else cache.pos
        if cache is not None:
            assert cache.pos + T <= cache.max_len
            cache.pos += T
        logits = self._scores(B, start, T)
        return logits[:, -1:] if last_only else logits

    def decode_step(self, tokens_B, pos, k_layers, v_layers, **_):
        """One token per row, all at position ``pos`` (an int) -> logits [B, V] (the caller advances the cache)."""
        return self._scores(tokens_B.shape[0], pos, 1)[:, 0]

    def _scores(self, B: int, start: int, T: int) -> torch.Tensor:
        self.calls.append((start, T))
        logits = torch.zeros(B, T, self.config.vocab_size)
        for t in range(T):
            nxt = start + t + 1
            logits[:, t, self.script[nxt] if nxt < len(self.script) else self.eos_id] = 10.0
        return logits


def scripted(text: str | list[int], tok: ByteTokenizer, prompt: str = "P") -> tuple[ScriptedLM, str]:
    """A model that continues ``prompt`` with exactly ``text`` (a string, or token ids), then eos."""
    body = tok.encode(text) if isinstance(text, str) else list(text)
    return ScriptedLM(tok.encode(prompt) + body, tok.vocab_size, tok.eos_id), prompt


def run_text(text, stop=(), pieces=(), **kw) -> list[str]:
    tok = ByteTokenizer(pieces)
    if isinstance(text, list):
        text = [tok.piece_id(t) if isinstance(t, str) else t for t in text]
    model, prompt = scripted(text, tok)
    cfg = GenerationConfig(temperature=0, stop=list(stop), **kw)
    return list(generate_text(model, tok, prompt, cfg))


def tiny_model(**kw) -> GPT:
    torch.manual_seed(0)
    base = dict(vocab_size=97, block_size=24, n_layer=2, n_head=4, n_embd=32, init_std=0.3)
    return GPT(GPTConfig(**{**base, **kw}))


MODEL_VARIANTS = [
    dict(),
    dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, qk_norm=True, tie_embeddings=False,
         bias=False),
    dict(pos="rope", mlp="relu2", n_kv_head=1, logit_softcap=10.0),
]

# ------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("bad", [
    dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=0), dict(top_k=2.5),
    dict(repetition_penalty=0.0), dict(max_new_tokens=-1), dict(max_new_tokens=1.5), dict(stop=[""]),
    dict(temperature=float("nan")),
])
def test_generation_config_rejects_bad_values(bad):
    with pytest.raises(ConfigError):
        GenerationConfig(**bad)


def test_generation_config_defaults_and_single_stop_string():
    cfg = GenerationConfig()
    assert (cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p) == (128, 1.0, None, None)
    assert cfg.stop == [] and cfg.use_cache and cfg.stop_at_eos and cfg.seed is None
    assert GenerationConfig(stop="\n").stop == ["\n"]
    assert GenerationConfig(top_p=1.0, temperature=0).top_p == 1.0


# --------------------------------------------------------------------------- sampling helpers


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([2.0, -2.0, 1.0, -1.0, 0.5])
    out = apply_repetition_penalty(logits, [0, 1, 1, 4], 2.0)
    torch.testing.assert_close(out, torch.tensor([1.0, -4.0, 1.0, -1.0, 0.25]))
    assert torch.equal(logits, torch.tensor([2.0, -2.0, 1.0, -1.0, 0.5]))  # input untouched
    torch.testing.assert_close(apply_repetition_penalty(logits, torch.tensor([2]), 0.5),
                               torch.tensor([2.0, -2.0, 2.0, -1.0, 0.5]))
    assert apply_repetition_penalty(logits, [], 3.0) is logits
    assert apply_repetition_penalty(logits, [1, 2], 1.0) is logits


def test_top_k_filter():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    out = top_k_filter(logits, 2)
    assert out.tolist() == [NEG_INF, 5.0, NEG_INF, 4.0, NEG_INF]
    assert top_k_filter(logits, 1).argmax() == 1 and torch.isinf(top_k_filter(logits, 1)).sum() == 4
    assert torch.equal(top_k_filter(logits, 5), logits) and torch.equal(top_k_filter(logits, 50), logits)


def test_top_p_filter_keeps_smallest_nucleus():
    probs = torch.tensor([0.1, 0.5, 0.05, 0.25, 0.1])
    logits = probs.log()
    kept = lambda p: (~torch.isinf(top_p_filter(logits, p))).nonzero().flatten().tolist()  # noqa: E731
    assert kept(0.4) == [1]  # 0.5 alone already holds >= 0.4
    assert kept(0.6) == [1, 3]  # 0.5 + 0.25
    assert len(kept(0.8)) == 3 and {1, 3} < set(kept(0.8))  # 0.5 + 0.25 + one of the two 0.1s
    assert kept(0.82) == kept(0.8)
    assert kept(0.9) == [0, 1, 3, 4]
    assert kept(0.99) == [0, 1, 2, 3, 4]
    assert kept(1e-6) == [1]  # the top token is always kept
    assert torch.equal(top_p_filter(logits, 1.0), logits)
    out = top_p_filter(logits, 0.6)
    assert out[1] == logits[1] and out[3] == logits[3]  # kept logits are unchanged


def test_sample_next_greedy_and_filters():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    assert sample_next(logits, GenerationConfig(temperature=0)) == 1
    # repetition penalty applies before greedy: token 1 seen -> 3.0 / 2 = 1.5 < 2.9
    assert sample_next(logits, GenerationConfig(temperature=0, repetition_penalty=2.0), prev_ids=[1]) == 3
    g = torch.Generator().manual_seed(0)
    cfg = GenerationConfig(temperature=5.0, top_k=2)
    draws = {sample_next(logits, cfg, g) for _ in range(200)}
    assert draws == {1, 3}  # high temperature, but only the top 2 are allowed
    cfg = GenerationConfig(temperature=1.0, top_p=0.3)
    assert {sample_next(logits, cfg, g) for _ in range(50)} == {1}


def test_sample_next_matches_softmax_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros(3)
    for _ in range(3000):
        counts[sample_next(probs.log(), GenerationConfig(), g)] += 1
    torch.testing.assert_close(counts / 3000, probs, atol=0.03, rtol=0)
    # temperature 0.5 squares the probabilities (then renormalises)
    sharp = probs.pow(2) / probs.pow(2).sum()
    counts.zero_()
    for _ in range(3000):
        counts[sample_next(probs.log(), GenerationConfig(temperature=0.5), g)] += 1
    torch.testing.assert_close(counts / 3000, sharp, atol=0.03, rtol=0)


# ------------------------------------------------------------------------ generate_ids (real model)


@pytest.mark.parametrize("kw", MODEL_VARIANTS)
def test_greedy_generation_same_with_and_without_cache(kw):
    model = tiny_model(**kw)
    prompt = [5, 17, 3, 60, 2]
    cfg = dict(max_new_tokens=18, temperature=0)  # 5 + 18 = 23 < block_size 24: no overflow yet
    with_cache = list(generate_ids(model, prompt, GenerationConfig(**cfg, use_cache=True)))
    without = list(generate_ids(model, prompt, GenerationConfig(**cfg, use_cache=False)))
    assert with_cache == without and len(with_cache) == 18
    assert len(set(with_cache)) > 2  # the random model is not stuck on one token


@pytest.mark.parametrize("kw", MODEL_VARIANTS[:2])
def test_seeded_sampling_is_reproducible(kw):
    model = tiny_model(**kw)
    def cfg(seed: int, cache: bool) -> GenerationConfig:
        return GenerationConfig(max_new_tokens=15, temperature=1.0, top_k=40, top_p=0.95,
                                repetition_penalty=1.3, seed=seed, use_cache=cache)

    a = list(generate_ids(model, [1, 2, 3], cfg(7, True)))
    assert a == list(generate_ids(model, [1, 2, 3], cfg(7, True)))
    assert a == list(generate_ids(model, [1, 2, 3], cfg(7, False)))  # same draws, same (close) logits
    assert a != list(generate_ids(model, [1, 2, 3], cfg(8, True)))


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("kw", [MODEL_VARIANTS[0], MODEL_VARIANTS[1]])
def test_generation_past_the_context_length(kw, use_cache):
    model = tiny_model(**kw)  # block_size 24
    long_prompt = list(range(30))
    for prompt in ([4, 5], long_prompt):
        cfg = GenerationConfig(max_new_tokens=70, temperature=0.8, seed=0, use_cache=use_cache)
        out = list(generate_ids(model, prompt, cfg))
        assert len(out) == 70 and all(0 <= t < 97 for t in out)


def test_cache_refill_uses_recent_half_of_context():
    tok = ByteTokenizer()
    model = ScriptedLM(list(range(200)), tok.vocab_size, block_size=8)
    out = list(generate_ids(model, [0, 1, 2], GenerationConfig(max_new_tokens=12, temperature=0)))
    assert len(out) == 12
    # prefill 3, then single steps until the cache holds 8, then a refill of the last 4 tokens (3 as a prompt,
    # the newest by a step), ...
    assert model.calls[:8] == [(0, 3), (3, 1), (4, 1), (5, 1), (6, 1), (7, 1), (0, 3), (3, 1)]
    no_cache = ScriptedLM(list(range(200)), tok.vocab_size, block_size=8)
    cfg = GenerationConfig(max_new_tokens=12, temperature=0, use_cache=False)
    list(generate_ids(no_cache, [0, 1, 2], cfg))
    assert max(length for _, length in no_cache.calls) == 8


def test_generate_ids_edge_cases():
    model = tiny_model()
    model.train()
    assert list(generate_ids(model, [1], GenerationConfig(max_new_tokens=0))) == []
    out = list(generate_ids(model, [1], GenerationConfig(max_new_tokens=3, temperature=0)))
    assert len(out) == 3 and model.training  # the training flag is restored afterwards
    with pytest.raises(ConfigError, match="prompt"):  # raised at the call, before any token
        generate_ids(model, [], GenerationConfig())
    with pytest.raises(ConfigError, match="vocabulary"):
        generate_ids(model, [1, 97], GenerationConfig())
    tokens = generate_ids(model, [1, 2], GenerationConfig(max_new_tokens=5, temperature=0))
    next(tokens)
    assert not torch.is_inference_mode_enabled()  # the caller's code between tokens runs normally
    assert not model.training
    tokens.close()
    assert model.training


def test_empty_prompt_without_bos_or_eos_is_refused():
    tok = ByteTokenizer()
    tok.bos_id = tok.eos_id = None
    with pytest.raises(ConfigError, match="empty"):
        generate_text(tiny_model(vocab_size=258), tok, "", GenerationConfig())


def test_eos_stops_generation_unless_disabled():
    tok = ByteTokenizer()
    script = tok.encode("Pab") + [tok.eos_id] + tok.encode("cd")
    model = ScriptedLM(script, tok.vocab_size)
    cfg = GenerationConfig(temperature=0, max_new_tokens=10)
    assert list(generate_ids(model, tok.encode("P"), cfg, eos_id=tok.eos_id)) == tok.encode("ab")
    assert list(generate_ids(model, tok.encode("P"), cfg)) == tok.encode("ab") + [257] + tok.encode("cd") + [
        257] * 5  # without an eos_id nothing stops early
    cfg = GenerationConfig(temperature=0, max_new_tokens=4, stop_at_eos=False)
    assert list(generate_ids(model, tok.encode("P"), cfg, eos_id=tok.eos_id)) == [97, 98, 257, 99]


# ------------------------------------------------------------------------------ generate_text


def test_text_streams_token_by_token_without_stops():
    assert run_text("hello") == ["h", "e", "l", "l", "o"]
    assert "".join(run_text("hello", max_new_tokens=3)) == "hel"
    assert run_text("hi", use_cache=False) == ["h", "i"]


def test_stop_string_spanning_tokens_is_not_yielded():
    pieces = run_text("Hello, world!\nBye", stop=["\nBye"])
    assert "".join(pieces) == "Hello, world!"
    assert pieces[:3] == ["H", "e", "l"]  # text that cannot start a stop string is released at once


def test_partial_stop_match_is_held_then_released():
    pieces = run_text("ab STAR STOP after", stop=["STOP"])
    assert "".join(pieces) == "ab STAR "
    assert pieces == ["a", "b", " ", "STA", "R", " "]  # "S", "ST" held back while they could start STOP


def test_stop_inside_a_single_multi_character_token():
    out = run_text(["a", "xxSTOPyy", "b"], stop=["STOP"], pieces=("xxSTOPyy",))
    assert "".join(out) == "axx"
    out = run_text(["a", "ST", "OP", "b"], stop=["STOP"], pieces=("ST", "OP"))
    assert "".join(out) == "a"


def test_earliest_of_several_stop_strings_wins():
    assert "".join(run_text("one two three", stop=["three", "two"])) == "one "
    assert "".join(run_text("abcabd", stop=["abd", "ca"])) == "ab"
    assert "".join(run_text("xBéB", stop=["BéB", "é"])) == "xB"  # "é" is complete first
    assert "".join(run_text("xab", stop=["b", "ab"])) == "x"  # complete together: the longer one wins
    # the same when the text arrives in one token
    assert "".join(run_text(["x", "BéB"], stop=["BéB", "é"], pieces=("BéB",))) == "xB"


def test_stop_strings_and_eos_and_max_tokens_end_text():
    assert "".join(run_text("no stop here", stop=["zzz"])) == "no stop here"  # eos after the script
    assert "".join(run_text("abcSTO", stop=["STOP"])) == "abcSTO"  # held text flushed at the end
    assert "".join(run_text("abcdef", stop=["def"], max_new_tokens=4)) == "abcd"


def test_utf8_characters_are_never_split():
    text = "héllo wörld 中文 🙂"
    pieces = run_text(text)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(run_text(text, stop=["文 "])) == "héllo wörld 中"


def test_empty_prompt_starts_from_eos():
    tok = ByteTokenizer()
    model = ScriptedLM([tok.eos_id] + tok.encode("xy"), tok.vocab_size, eos_id=tok.eos_id)
    assert "".join(generate_text(model, tok, "", GenerationConfig(temperature=0))) == "xy"
    assert model.calls[0] == (0, 1)


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet="abAB\né", min_size=0, max_size=25),
       stops=st.lists(st.text(alphabet="abB\né", min_size=1, max_size=4), min_size=0, max_size=3))
def test_stop_strings_property(text, stops):
    expected = text  # reference: read one character at a time, cut before the first complete stop string
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            expected = text[: end - max(map(len, done))]
            break
    assert "".join(run_text(text, stop=stops)) == expected
    # the same text arriving in multi-character tokens stops at the same place
    chunks = [text[i : i + 3] for i in range(0, len(text), 3)]
    tok_pieces = tuple(c for c in chunks if len(c.encode()) > 1)
    assert "".join(run_text(chunks, stop=stops, pieces=tok_pieces)) == expected


def test_generate_text_with_real_model_runs():
    tok = ByteTokenizer()
    model = tiny_model(vocab_size=tok.vocab_size, pos="rope")
    cfg = GenerationConfig(max_new_tokens=40, seed=3, stop=["\n\n"])
    out = "".join(generate_text(model, tok, "Hi", cfg))
    assert isinstance(out, str) and "\n\n" not in out
    assert out == "".join(generate_text(model, tok, "Hi", cfg))

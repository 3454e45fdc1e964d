"""Batched generation of prompts of different lengths (zenlm.generate.generate_batch): every row gives what
generate_ids gives its prompt alone — in fp32, bf16 and int8 —, other rows never change a row, seeded sampling
is reproducible, EOS ends a row early; LM.generate_batch and `zenlm generate --dtype` on a run directory."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import zenlm
from zenlm.config import GPTConfig
from zenlm.errors import ConfigError
from zenlm.generate import GenerationConfig, generate_batch, generate_ids
from zenlm.models.gpt import GPT
from zenlm.models.int8 import quantize_int8
from zenlm.presets import get_preset
from zenlm.tokenizer import train_tokenizer
from zenlm.train.checkpoint import save_model

V = 97
LENGTHS = (1, 5, 9, 17)
# A gpt2-like variant next to the "tiny" preset (rotary, RMSNorm, qk-norm, untied head): learned positions,
# LayerNorm, GELU, biases, tied head.
FAMILIES = {
    "tiny": {},
    "gpt2": dict(pos="learned", norm="layernorm", mlp="gelu", bias=True, qk_norm=False, tie_embeddings=True),
}


def make_model(family: str, precision: str = "fp32", **overrides) -> GPT:
    """A random tiny GPT whose greedy output varies (large init, no zero-initialised projections)."""
    cfg = get_preset("tiny", vocab_size=V, init_std=0.5, zero_init_proj=False, **{**FAMILIES[family], **overrides})
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    if precision == "bf16":
        return model.to(torch.bfloat16)
    if precision == "int8":  # int8 weights, bf16 activations (the fast CPU path of Int8Linear)
        return quantize_int8(copy.deepcopy(model)).to(torch.bfloat16)
    assert precision == "fp32"
    return model


def prompts_of(lengths: tuple[int, ...] = LENGTHS, seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in lengths]


def alone(model: GPT, prompts: list[list[int]], cfg: GenerationConfig, **kw) -> list[list[int]]:
    return [list(generate_ids(model, p, cfg, **kw)) for p in prompts]


# -------------------------------------------------------------------------------- same tokens as alone


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_batch_equals_each_prompt_alone(family, precision):
    model = make_model(family, precision)
    prompts = prompts_of()
    cfg = GenerationConfig(max_new_tokens=24, temperature=0)
    got = generate_batch(model, prompts, cfg)
    want = alone(model, prompts, cfg)  # generate_ids of the same model, same precision
    assert got == want
    assert all(len(ids) == 24 for ids in got) and len({t for ids in got for t in ids}) > 5  # not stuck


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_other_rows_never_change_a_row(precision):
    model = make_model("tiny", precision)
    short, long_ = prompts_of((3, 40))
    cfg = GenerationConfig(max_new_tokens=20, temperature=0)
    solo = generate_batch(model, [short], cfg)[0]
    assert solo == list(generate_ids(model, short, cfg))
    for batch in ([short, long_], [long_, short, long_], [long_, long_[:7], short, [5]]):
        out = generate_batch(model, batch, cfg)
        assert all(ids == solo for p, ids in zip(batch, out, strict=True) if p == short)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_prompts_of_one_length_are_prefilled_together_and_decode_as_alone(precision, monkeypatch):
    """Prompts of the same length go through the model in one pass (PREFILL_TOKENS at most; an int8 model's
    short prompts only as many as the int8 kernel takes) and still give, row for row, what each gives alone."""
    import zenlm.generate

    model = make_model("gpt2", precision)
    prompts = prompts_of((6, 11, 6, 6, 11, 2), seed=5)
    cfg = GenerationConfig(max_new_tokens=16, temperature=0)
    want = alone(model, prompts, cfg)
    passes: list[tuple[int, int]] = []
    forward = GPT.forward

    def spy(self, idx, *args, **kwargs):
        passes.append(tuple(idx.shape))
        return forward(self, idx, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", spy)
    assert generate_batch(model, prompts, cfg) == want
    if precision == "int8":  # at most PACK_MAX_ROWS = 16 rows a pass, where the int8 kernel takes a prompt alone
        assert passes == [(1, 2), (2, 6), (1, 6), (1, 11), (1, 11)]
    else:
        assert passes == [(1, 2), (3, 6), (2, 11)]  # shortest first, one pass per length
    passes.clear()
    monkeypatch.setattr(zenlm.generate, "PREFILL_TOKENS", 12)  # two 6-token prompts a pass; 11 tokens: one
    assert generate_batch(model, prompts, cfg) == want
    assert passes == [(1, 2), (2, 6), (1, 6), (1, 11), (1, 11)]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_past_the_context_length_rows_refill_like_generate_ids(family, precision):
    model = make_model(family, precision, block_size=16)
    prompts = prompts_of((1, 9, 16, 40))  # the last one is cropped to its last 16 tokens
    cfg = GenerationConfig(max_new_tokens=40, temperature=0)  # every row refills its cache at least once
    assert generate_batch(model, prompts, cfg) == alone(model, prompts, cfg)


def test_pool_is_sized_to_the_longest_prompt_plus_new_tokens(monkeypatch):
    model = make_model("tiny")  # block_size 64
    sizes = []
    make_cache = model.make_cache
    monkeypatch.setattr(model, "make_cache", lambda B, max_len=None, **kw: sizes.append((B, max_len)) or
                        make_cache(B, max_len, **kw))
    generate_batch(model, prompts_of((2, 7)), GenerationConfig(max_new_tokens=5, temperature=0))
    generate_batch(model, prompts_of((2, 70)), GenerationConfig(max_new_tokens=5, temperature=0))
    assert sizes == [(2, 12), (2, 64)]  # capped at block_size


# ------------------------------------------------------------------------------------------- sampling


def test_seeded_sampling_is_reproducible_and_row_i_uses_seed_plus_i():
    model = make_model("gpt2")
    prompts = prompts_of()

    def cfg(seed: int | None) -> GenerationConfig:
        return GenerationConfig(max_new_tokens=15, temperature=1.0, top_k=40, top_p=0.9, repetition_penalty=1.3,
                                seed=seed)

    a = generate_batch(model, prompts, cfg(7))
    assert a == generate_batch(model, prompts, cfg(7))
    assert a != generate_batch(model, prompts, cfg(8))
    assert a == [list(generate_ids(model, p, cfg(7 + i))) for i, p in enumerate(prompts)]
    assert generate_batch(model, prompts[1:], cfg(8)) == a[1:]  # shifting rows shifts their seeds
    assert len(generate_batch(model, prompts, cfg(None))) == 4


# ------------------------------------------------------------------------------------------- stopping


def test_eos_ends_a_row_early_and_the_others_go_on():
    model = make_model("tiny")
    prompts = prompts_of()
    cfg = GenerationConfig(max_new_tokens=24, temperature=0)
    free = alone(model, prompts, cfg)
    eos = free[1][4]  # row 1 draws this token at step 4: make it the end-of-text token
    got = generate_batch(model, prompts, cfg, eos_id=eos)
    assert got == alone(model, prompts, cfg, eos_id=eos)
    assert got[1] == free[1][: free[1].index(eos)] and len(got[1]) < 24
    assert any(len(ids) == 24 for ids in got)  # a row without that token runs to max_new_tokens
    no_stop = GenerationConfig(max_new_tokens=24, temperature=0, stop_at_eos=False)
    assert generate_batch(model, prompts, no_stop, eos_id=eos) == free


def test_on_token_ends_a_row():
    model = make_model("tiny")
    prompts = prompts_of()
    cfg = GenerationConfig(max_new_tokens=12, temperature=0)
    free = generate_batch(model, prompts, cfg)
    seen: list[list[int]] = [[] for _ in prompts]

    def on_token(i: int, token: int) -> bool:
        seen[i].append(token)
        return i == 2 and len(seen[i]) == 3  # end prompt 2 after its third token

    got = generate_batch(model, prompts, cfg, on_token=on_token)
    assert got == seen
    assert got[2] == free[2][:3]
    assert [got[i] for i in (0, 1, 3)] == [free[i] for i in (0, 1, 3)]


# --------------------------------------------------------------------------------------------- errors


def test_bad_arguments_are_refused_and_the_mode_is_restored():
    model = make_model("tiny").train()
    cfg = GenerationConfig(max_new_tokens=3, temperature=0)
    with pytest.raises(ConfigError, match="prompt 1 is empty"):
        generate_batch(model, [[1], []], cfg)
    with pytest.raises(ConfigError, match="vocabulary"):
        generate_batch(model, [[1], [V]], cfg)
    with pytest.raises(ConfigError, match="list of prompts"):
        generate_batch(model, [1, 2, 3], cfg)  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="use_cache"):
        generate_batch(model, [[1]], GenerationConfig(use_cache=False))
    assert generate_batch(model, [], cfg) == []
    assert generate_batch(model, [[1], [2, 3]], GenerationConfig(max_new_tokens=0)) == [[], []]
    assert len(generate_batch(model, [[1], [2, 3]], cfg)[1]) == 3
    assert model.training  # eval while generating, restored afterwards


# ------------------------------------------------------------------------------ LM and the command line

TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
        "the slings and arrows of outrageous fortune. ") * 20 + "中文文本 é ü 😀\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory (config.yaml, tokenizer.json, model.safetensors) with a random tiny GPT."""
    root = tmp_path_factory.mktemp("batch_run")
    tok = train_tokenizer([TEXT], kind="char")
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_head=2, n_embd=32, init_std=0.5)
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        model.tok_emb.weight[tok.eos_id] = 0  # tied head: the eos logit is 0, so replies rarely end early
    (root / "config.yaml").write_text(yaml.safe_dump({"model": cfg.to_dict()}, sort_keys=False))
    tok.save(root)
    save_model(model, root / "model.safetensors")
    return root


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_lm_generate_batch_equals_generate_per_prompt(run_dir, dtype):
    lm = zenlm.load(run_dir, device="cpu", dtype=dtype)
    prompts = ["To be", "", "whether 'tis nobler in the mind", "é"]
    kw = dict(max_new_tokens=30, temperature=0)
    got = lm.generate_batch(prompts, **kw)
    assert got == [lm.generate(p, **kw) for p in prompts]
    assert all(got) and len(set(got)) > 1
    stop = got[2][5:7]  # a stop string that ends prompt 2's reply early (maybe others' too)
    got_stop = lm.generate_batch(prompts, stop=[stop], **kw)
    assert got_stop == [lm.generate(p, stop=[stop], **kw) for p in prompts]
    assert got_stop[2] == got[2][: got[2].index(stop)]
    sampled = lm.generate_batch(prompts, max_new_tokens=10, temperature=0.8, top_k=20, seed=1)
    assert sampled == lm.generate_batch(prompts, max_new_tokens=10, temperature=0.8, top_k=20, seed=1)
    assert sampled[0] == lm.generate(prompts[0], max_new_tokens=10, temperature=0.8, top_k=20, seed=1)
    with pytest.raises(ConfigError, match="list of prompts"):
        lm.generate_batch("one prompt", **kw)  # type: ignore[arg-type]


def test_cli_generate_with_bf16_weights(run_dir):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    res = subprocess.run([sys.executable, "-m", "zenlm", "generate", str(run_dir), "x", "--dtype", "bf16",
                          "--temperature", "0", "--max-new-tokens", "12", "--device", "cpu"],
                         capture_output=True, text=True, encoding="utf-8", env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    lm = zenlm.load(run_dir, device="cpu", dtype="bf16")
    assert res.stdout == "x" + lm.generate("x", max_new_tokens=12, temperature=0) + "\n"
    bad = subprocess.run([sys.executable, "-m", "zenlm", "generate", str(run_dir), "x", "--dtype", "int4"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode != 0 and "dtype" in bad.stderr

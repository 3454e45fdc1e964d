"""The compiled decode step (zenlm.compiled): same logits and tokens as eager decoding, one program for all
positions, int8 weights, and clear refusals. Each test compiles a tiny model (a few seconds to ~30 s here)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from zenlm.compiled import compiled_decoder
from zenlm.config import GPTConfig
from zenlm.errors import ConfigError
from zenlm.generate import GenerationConfig, generate_batch, generate_ids
from zenlm.models.gpt import GPT
from zenlm.models.int8 import quantize_int8

V = 96


def llama_like(**kw) -> GPTConfig:
    base = dict(vocab_size=V, block_size=24, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, pos="rope",
                norm="rmsnorm", mlp="swiglu", bias=False, qk_norm=True, init_std=0.1)
    return GPTConfig(**{**base, **kw})


def gpt2_like(**kw) -> GPTConfig:
    base = dict(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_embd=64, init_std=0.1)
    return GPTConfig(**{**base, **kw})


def test_compiled_step_matches_eager_at_every_position_with_one_program():
    torch.manual_seed(0)
    model = GPT(llama_like()).eval()
    prompt = torch.randint(0, V, (1, 5), generator=torch.Generator().manual_seed(1))
    eager, fast = model.make_cache(1), model.make_cache(1)
    decoder = compiled_decoder(model)
    assert compiled_decoder(model) is decoder  # one per model
    graphs_before = counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        model(prompt, cache=eager)
        model(prompt, cache=fast)
        token = 7
        for _ in range(12):
            want = model(torch.tensor([[token]]), cache=eager)[0, -1]
            got = decoder.next_logits(token, fast)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            token = int(want.argmax())
    assert fast.pos == eager.pos == 5 + 12
    for a, b in zip(fast.k + fast.v, eager.k + eager.v, strict=True):  # the compiled step wrote the cache
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # 12 different key counts, at most two programs (a first static one, then one with a dynamic length)
    assert counters["stats"]["unique_graphs"] - graphs_before <= 2


def test_generate_ids_compiled_gives_the_eager_greedy_tokens_through_cache_refills():
    torch.manual_seed(2)
    model = GPT(gpt2_like(block_size=16)).eval()  # 30 new tokens > block_size: the cache is refilled
    prompt = [3, 1, 4, 1, 5, 9]
    cfg = dict(max_new_tokens=30, temperature=0)
    want = list(generate_ids(model, prompt, GenerationConfig(**cfg)))
    got = list(generate_ids(model, prompt, GenerationConfig(**cfg, compile=True)))
    assert len(want) == 30
    assert got == want


def test_compiled_int8_model_reads_its_int8_weights_and_matches_eager():
    torch.manual_seed(3)
    model = quantize_int8(GPT(gpt2_like()).eval()).to(torch.bfloat16)
    prompt = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(4))
    eager, fast = model.make_cache(1), model.make_cache(1)
    decoder = compiled_decoder(model)
    with torch.inference_mode():
        model(prompt, cache=eager)
        model(prompt, cache=fast)
        for token in (5, 17, 2, 60):
            want = model(torch.tensor([[token]]), cache=eager)[0, -1]
            got = decoder.next_logits(token, fast)
            # bf16 activations: the two paths round at different points (int8 kernel vs fused fp32 sums)
            torch.testing.assert_close(got, want, atol=0.05, rtol=0.05)
    # still int8 on the model: compiling did not widen the stored weights
    assert model.blocks[0].mlp.fc.weight_int8.dtype == torch.int8


def test_compile_is_refused_where_it_does_not_apply():
    with pytest.raises(ConfigError, match="use_cache"):
        GenerationConfig(compile=True, use_cache=False)
    model = GPT(gpt2_like()).eval()
    with pytest.raises(ConfigError, match="one sequence at a time"):
        generate_batch(model, [[1, 2], [3]], GenerationConfig(max_new_tokens=2, compile=True))
    cache = model.make_cache(2)
    with pytest.raises(ConfigError, match="batch-1"):
        compiled_decoder(model).next_logits(1, cache)
    full = model.make_cache(1, max_len=2)
    full.pos = 2
    with pytest.raises(ConfigError, match="overflow"):
        compiled_decoder(model).next_logits(1, full)


def test_models_of_one_shape_share_a_program_but_each_uses_its_own_weights():
    prompt = torch.tensor([[1, 2, 3]])
    graphs = []
    for seed in (5, 6):
        torch.manual_seed(seed)
        model = GPT(gpt2_like()).eval()
        eager, fast = model.make_cache(1), model.make_cache(1)
        with torch.inference_mode():
            model(prompt, cache=eager)
            model(prompt, cache=fast)
            for token in (4, 5, 6):
                want = model(torch.tensor([[token]]), cache=eager)[0, -1]
                torch.testing.assert_close(compiled_decoder(model).next_logits(token, fast), want,
                                           atol=1e-4, rtol=1e-4)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[0]  # the second model reused the first one's program (weights are inputs)

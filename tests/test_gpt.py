"""The GPT model: shapes, initialisation, parameter count, KV-cache equivalence, and parity with the
`transformers` implementations of GPT-2, Llama and Qwen3 (tiny random models, weights copied over)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from zenlm.config import GPTConfig
from zenlm.errors import ConfigError
from zenlm.models.cache import KVCache
from zenlm.models.gpt import GPT
from zenlm.models.layers import RMSNorm, Rotary, apply_rotary, rotate_half

V = 61


def small_config(**kw) -> GPTConfig:
    base = dict(vocab_size=V, block_size=16, n_layer=2, n_head=4, n_embd=32)
    return GPTConfig(**{**base, **kw})


def ids(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------- KV cache


CACHE_COMBOS = list(itertools.product(
    ["learned", "rope"], ["layernorm", "rmsnorm"], ["gelu", "relu2", "swiglu"], [False, True], [False, True]
))


@pytest.mark.parametrize(("pos", "norm", "mlp", "gqa", "qk_norm"), CACHE_COMBOS)
def test_cached_forward_matches_full_forward(pos, norm, mlp, gqa, qk_norm):
    torch.manual_seed(0)
    cfg = small_config(pos=pos, norm=norm, mlp=mlp, n_kv_head=2 if gqa else None, qk_norm=qk_norm,
                       init_std=0.1)
    model = GPT(cfg).eval()
    x = ids(2, 12)
    with torch.no_grad():
        full = model(x)
        cache = model.make_cache(2)
        # prefill 5, a chunk of 3 (T > 1 with tokens already cached: exercises the mask), then 1 by 1
        parts = [model(x[:, :5], cache=cache), model(x[:, 5:8], cache=cache)]
        parts += [model(x[:, t : t + 1], cache=cache) for t in range(8, 12)]
    assert cache.pos == 12
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_decode_step_with_one_or_per_row_positions_equals_forward(pos):
    """The decoder step through the shared block loop: an int position (every row at it, slices of the cache)
    and per-row positions (a tensor) give the cached forward's logits and write the same cache."""
    torch.manual_seed(0)
    model = GPT(small_config(pos=pos, n_kv_head=2, qk_norm=True, init_std=0.1)).eval()
    x = ids(2, 9)
    caches = [model.make_cache(2) for _ in range(3)]
    with torch.inference_mode():
        for c in caches:
            model(x[:, :6], cache=c)
        want = [model(x[:, t : t + 1], cache=caches[0])[:, 0] for t in range(6, 9)]
        for step, t in enumerate(range(6, 9)):
            one = model.decode_step(x[:, t], t, caches[1].k, caches[1].v)
            rows = model.decode_step(x[:, t], torch.tensor([t, t]), caches[2].k, caches[2].v)
            torch.testing.assert_close(one, want[step], atol=1e-5, rtol=0)
            torch.testing.assert_close(rows, want[step], atol=1e-5, rtol=0)
    for a, b, c in zip(caches[0].k, caches[1].k, caches[2].k, strict=True):
        torch.testing.assert_close(a[:, :, :9], b[:, :, :9])
        torch.testing.assert_close(a[:, :, :9], c[:, :, :9])


def test_cache_with_no_positions_and_softcap_and_bias_variants():
    torch.manual_seed(1)
    for kw in (dict(pos="none"), dict(bias=False, tie_embeddings=False, logit_softcap=5.0)):
        model = GPT(small_config(**kw, init_std=0.1)).eval()
        x = ids(1, 9)
        with torch.no_grad():
            full = model(x)
            cache = model.make_cache(1, max_len=9)
            out = torch.cat([model(x[:, :4], cache=cache)] + [model(x[:, t : t + 1], cache=cache)
                                                              for t in range(4, 9)], dim=1)
        torch.testing.assert_close(out, full, atol=1e-5, rtol=0)


def test_cache_reset_reuses_buffers_and_gives_same_result():
    model = GPT(small_config(pos="rope")).eval()
    x = ids(1, 6)
    cache = model.make_cache(1)
    k_ptrs = [t.data_ptr() for t in cache.k]
    with torch.no_grad():
        first = model(x, cache=cache)
        cache.reset()
        assert cache.pos == 0
        second = model(x, cache=cache)
    assert [t.data_ptr() for t in cache.k] == k_ptrs
    torch.testing.assert_close(first, second)


def test_make_cache_shapes_and_dtype():
    cfg = small_config(n_kv_head=2)
    model = GPT(cfg)
    cache = model.make_cache(3, 10)
    assert isinstance(cache, KVCache)
    assert len(cache.k) == len(cache.v) == cfg.n_layer
    assert all(t.shape == (3, 2, 10, cfg.head_dim) for t in cache.k + cache.v)
    assert len({t.data_ptr() for t in cache.k + cache.v}) == 2 * cfg.n_layer  # separate buffers
    assert (cache.batch_size, cache.max_len, cache.pos) == (3, 10, 0)
    assert cache.dtype == torch.float32
    assert model.make_cache(1, dtype=torch.bfloat16).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.make_cache(1).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="max_len"):
        model.make_cache(1, max_len=cfg.block_size + 1)
    with pytest.raises(ConfigError, match="batch_size"):
        model.make_cache(0)


def test_too_long_input_and_cache_overflow_raise_clear_errors():
    model = GPT(small_config())
    with pytest.raises(ConfigError, match="block_size"):
        model(ids(1, 17))
    cache = model.make_cache(1, max_len=8)
    model(ids(1, 6), cache=cache)
    with pytest.raises(ConfigError, match="overflow"):
        model(ids(1, 3), cache=cache)
    assert cache.pos == 6  # a refused call changes nothing
    with pytest.raises(ConfigError, match="batch size"):
        model(ids(2, 1), cache=cache)
    with pytest.raises(ConfigError, match="shape"):
        model(torch.zeros(5, dtype=torch.long))


# ------------------------------------------------------------------------------- forward pass


def test_forward_shapes_dtype_and_last_only():
    model = GPT(small_config(pos="rope", mlp="swiglu")).eval()
    x = ids(3, 16)
    logits = model(x)
    assert logits.shape == (3, 16, V) and logits.dtype == torch.float32
    torch.testing.assert_close(model(x, last_only=True), logits[:, -1:])


def test_causality_future_tokens_do_not_change_past_logits():
    for pos in ("learned", "rope"):
        model = GPT(small_config(pos=pos)).eval()
        x = ids(1, 10)
        y = x.clone()
        y[0, 6:] = (y[0, 6:] + 1) % V
        a, b = model(x), model(y)
        torch.testing.assert_close(a[:, :6], b[:, :6])
        assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_logits_are_float32_under_bf16_autocast():
    model = GPT(small_config(pos="rope", norm="rmsnorm", qk_norm=True, n_kv_head=2, tie_embeddings=False))
    x = ids(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        cache = model.make_cache(2)
        model(x[:, :7], cache=cache)
        step = model(x[:, 7:], cache=cache)
    assert logits.dtype == step.dtype == torch.float32
    torch.testing.assert_close(step[:, 0], logits[:, -1], atol=0.1, rtol=0.05)
    logits.float().sum().backward()  # training under autocast works


def test_bf16_weights_run():
    model = GPT(small_config(pos="rope", n_kv_head=2)).to(torch.bfloat16).eval()
    x = ids(1, 6)
    cache = model.make_cache(1)
    assert cache.dtype == torch.bfloat16
    assert model(x, cache=cache).dtype == torch.float32


def test_logit_softcap_bounds_logits():
    model = GPT(small_config(logit_softcap=2.0, init_std=1.0))
    logits = model(ids(1, 8))
    assert logits.abs().max() <= 2.0
    assert logits.abs().max() > 1.5  # large init: the cap is active


def test_dropout_only_in_training():
    model = GPT(small_config(dropout=0.5, pos="rope"))
    x = ids(1, 8)
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x))


def test_backward_reaches_every_parameter():
    model = GPT(small_config(pos="learned", tie_embeddings=False, qk_norm=True, n_kv_head=2, dropout=0.1))
    x, y = ids(2, 16), ids(2, 16, seed=1)
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    assert abs(loss.item() - math.log(V)) < 0.5
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------- structure / init


def test_module_names_and_tied_head():
    tied = GPT(small_config(pos="learned", tie_embeddings=True))
    names = set(tied.state_dict())
    assert {"tok_emb.weight", "pos_emb.weight", "norm_f.weight", "blocks.0.attn.qkv.weight",
            "blocks.1.mlp.proj.weight", "blocks.0.norm_attn.weight", "blocks.0.norm_mlp.weight"} <= names
    assert not any(n.startswith("lm_head") for n in names)
    assert not any("rotary" in n or n.endswith(("cos", "sin")) for n in names)
    with torch.no_grad():  # the head really is the embedding matrix
        before = tied(ids(1, 4))
        tied.tok_emb.weight[:, 0] += 1.0
        assert not torch.allclose(before, tied(ids(1, 4)))

    untied = GPT(small_config(pos="rope", tie_embeddings=False))
    names = set(untied.state_dict())
    assert "lm_head.weight" in names and "pos_emb.weight" not in names
    assert untied.lm_head.weight.shape == (V, 32)
    assert untied.rotary is not None and untied.rotary.cos.shape == (16, 8)


NUM_PARAM_CONFIGS = [
    dict(),
    dict(bias=False),
    dict(norm="rmsnorm", bias=True),
    dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False, n_kv_head=2),
    dict(pos="none", mlp="relu2", qk_norm=True, mlp_hidden=40),
    dict(pos="learned", mlp="swiglu", bias=True, qk_norm=True, n_kv_head=1, tie_embeddings=False),
]


@pytest.mark.parametrize("kw", NUM_PARAM_CONFIGS)
def test_num_params_matches_config(kw):
    cfg = small_config(**kw)
    model = GPT(cfg)
    assert model.num_params() == cfg.num_params() == sum(p.numel() for p in model.parameters())
    assert model.num_params(include_embedding=False) == cfg.num_params(include_embedding=False)


def test_init_statistics():
    cfg = GPTConfig(vocab_size=512, block_size=64, n_layer=8, n_head=4, n_embd=128, init_std=0.02)
    model = GPT(cfg)
    block = model.blocks[3]
    assert abs(model.tok_emb.weight.std().item() - 0.02) < 0.002
    assert abs(block.attn.qkv.weight.std().item() - 0.02) < 0.002
    assert abs(block.mlp.fc.weight.std().item() - 0.02) < 0.002
    scaled = 0.02 / math.sqrt(2 * 8)
    assert abs(block.attn.proj.weight.std().item() - scaled) < 0.1 * scaled
    assert abs(block.mlp.proj.weight.std().item() - scaled) < 0.1 * scaled
    assert torch.all(block.attn.qkv.bias == 0) and torch.all(block.norm_attn.weight == 1)

    zero = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=2, n_head=2, n_embd=16, zero_init_proj=True,
                         mlp="swiglu"))
    for b in zero.blocks:
        assert torch.all(b.attn.proj.weight == 0) and torch.all(b.mlp.proj.weight == 0)
        assert b.mlp.gate.weight.abs().sum() > 0


# -------------------------------------------------------------------------------------- layers


def test_rmsnorm_formula():
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 8)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)


def test_rotary_is_a_rotation_depending_on_relative_position():
    rot = Rotary(head_dim=8, max_len=32)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    assert torch.equal(rotate_half(torch.arange(4.0)), torch.tensor([-2.0, -3.0, 0.0, 1.0]))

    def dot(m: int, n: int) -> float:
        qm = apply_rotary(q, *rot(m, 1))
        kn = apply_rotary(k, *rot(n, 1))
        return (qm * kn).sum().item()

    assert dot(5, 2) == pytest.approx(dot(13, 10), abs=1e-5)
    assert dot(5, 2) != pytest.approx(dot(5, 3), abs=1e-3)
    torch.testing.assert_close(apply_rotary(q, *rot(7, 1)).norm(), q.norm())
    torch.testing.assert_close(apply_rotary(q, *rot(0, 1)), q)


# ------------------------------------------------------------------------ parity with transformers


def _hf_logits(hf_model, x):
    with torch.no_grad():
        return hf_model(x).logits.float()


def test_parity_with_transformers_gpt2():
    tf = pytest.importorskip("transformers")
    cfg = GPTConfig(vocab_size=V, block_size=16, n_layer=2, n_head=4, n_embd=32, norm_eps=1e-5)
    hf = tf.GPT2LMHeadModel(tf.GPT2Config(
        vocab_size=V, n_positions=16, n_embd=32, n_layer=2, n_head=4, layer_norm_epsilon=1e-5,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )).eval()
    model = GPT(cfg).eval()
    sd = hf.state_dict()
    ours = {"tok_emb.weight": sd["transformer.wte.weight"], "pos_emb.weight": sd["transformer.wpe.weight"],
            "norm_f.weight": sd["transformer.ln_f.weight"], "norm_f.bias": sd["transformer.ln_f.bias"]}
    for i in range(2):
        h = f"transformer.h.{i}."
        b = f"blocks.{i}."
        for src, dst in [("ln_1", "norm_attn"), ("ln_2", "norm_mlp")]:
            ours[b + dst + ".weight"] = sd[h + src + ".weight"]
            ours[b + dst + ".bias"] = sd[h + src + ".bias"]
        for src, dst in [("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.proj"), ("mlp.c_fc", "mlp.fc"),
                         ("mlp.c_proj", "mlp.proj")]:  # GPT-2's Conv1D stores [in, out]
            ours[b + dst + ".weight"] = sd[h + src + ".weight"].t()
            ours[b + dst + ".bias"] = sd[h + src + ".bias"]
    model.load_state_dict(ours, strict=True)
    x = ids(2, 16)
    torch.testing.assert_close(model(x), _hf_logits(hf, x), atol=1e-4, rtol=1e-4)


def _llama_style_state_dict(sd: dict, n_layer: int, qk_norm: bool) -> dict:
    ours = {"tok_emb.weight": sd["model.embed_tokens.weight"], "norm_f.weight": sd["model.norm.weight"],
            "lm_head.weight": sd["lm_head.weight"]}
    for i in range(n_layer):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        ours[b + "norm_attn.weight"] = sd[h + "input_layernorm.weight"]
        ours[b + "norm_mlp.weight"] = sd[h + "post_attention_layernorm.weight"]
        ours[b + "attn.qkv.weight"] = torch.cat([sd[h + f"self_attn.{p}_proj.weight"] for p in "qkv"])
        ours[b + "attn.proj.weight"] = sd[h + "self_attn.o_proj.weight"]
        ours[b + "mlp.gate.weight"] = sd[h + "mlp.gate_proj.weight"]
        ours[b + "mlp.up.weight"] = sd[h + "mlp.up_proj.weight"]
        ours[b + "mlp.proj.weight"] = sd[h + "mlp.down_proj.weight"]
        if qk_norm:
            ours[b + "attn.q_norm.weight"] = sd[h + "self_attn.q_norm.weight"]
            ours[b + "attn.k_norm.weight"] = sd[h + "self_attn.k_norm.weight"]
    return ours


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_parity_with_transformers_llama_and_qwen3(family):
    tf = pytest.importorskip("transformers")
    qk_norm = family == "qwen3"
    cfg = GPTConfig(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, mlp_hidden=48,
                    pos="rope", rope_theta=10000.0, norm="rmsnorm", norm_eps=1e-6, mlp="swiglu", bias=False,
                    tie_embeddings=False, qk_norm=qk_norm)
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, attention_bias=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if family == "llama":
        hf = tf.LlamaForCausalLM(tf.LlamaConfig(**common, mlp_bias=False))
    else:
        hf = tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, head_dim=8))
    hf.eval()
    with torch.no_grad():  # make the norm gains non-trivial so a wrong mapping shows
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model = GPT(cfg).eval()
    model.load_state_dict(_llama_style_state_dict(hf.state_dict(), 2, qk_norm), strict=True)
    x = ids(2, 32)
    expected = _hf_logits(hf, x)
    torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # and through the cache
        cache = model.make_cache(2)
        out = torch.cat([model(x[:, :20], cache=cache)] + [model(x[:, t : t + 1], cache=cache)
                                                            for t in range(20, 32)], dim=1)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_cpu_bf16_attends_in_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU, bf16 attention runs SDPA in fp32 (PyTorch's bf16 kernels are slower there): training under
    autocast, inference under autocast, and bf16 weights without autocast (the result is bf16 again)."""
    import zenlm.models.layers as layers_mod

    seen: list[tuple[torch.dtype, bool]] = []
    real = layers_mod.F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.dtype, torch.is_autocast_enabled("cpu")))
        return real(q, k, v, **kw)

    monkeypatch.setattr(layers_mod.F, "scaled_dot_product_attention", spy)
    model = GPT(small_config(pos="rope", qk_norm=True))
    x = ids(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    logits.float().sum().backward()
    assert seen and all(s == (torch.float32, False) for s in seen)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    seen.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    assert seen and all(s == (torch.float32, False) for s in seen)
    seen.clear()
    bf16 = model.to(torch.bfloat16).eval()
    with torch.no_grad():
        cache = bf16.make_cache(2)
        bf16(x, cache=cache)
        y = bf16(x[:, :1], cache=cache)
    assert seen and all(s == (torch.float32, False) for s in seen)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()  # logits are fp32; the blocks stayed bf16
    assert bf16.blocks[0].attn.qkv.weight.dtype == torch.bfloat16

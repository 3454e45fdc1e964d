"""The one attention (zenlm.models.attention): SDPA held to the formula written out (reference_attention), for
every way of masking the models use; the module with explicit sizes; every model's attention going through
the one function (GPT with and without its cache and decode step, BERT with padding, the encoder-decoder's
self- and cross-attention), checked by swapping the formula in for SDPA; and the written-out attention of a
compiled decode step (decode_attention): the formula, and a row's result independent of the rest of the call."""

from __future__ import annotations

import math

import pytest
import torch

import zenlm.models.attention as attention_module
from zenlm.config import GPTConfig
from zenlm.models.attention import (
    Attention,
    attention,
    cached_causal_mask,
    decode_attention,
    reference_attention,
)
from zenlm.models.bert import Bert, get_bert_preset
from zenlm.models.encdec import EncoderDecoder, get_encdec_preset
from zenlm.models.gpt import GPT


def qkv(B=2, H=4, K=2, T=5, S=7, D=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, T, D, generator=g).to(dtype), torch.randn(B, K, S, D, generator=g).to(dtype),
            torch.randn(B, K, S, D, generator=g).to(dtype))


def test_reference_is_the_formula():
    q, k, v = qkv(B=1, H=1, K=1, T=2, S=3, D=4)
    y, w = reference_attention(q, k, v)
    scores = torch.stack([torch.stack([q[0, 0, t] @ k[0, 0, s] / math.sqrt(4) for s in range(3)]) for t in range(2)])
    want_w = torch.exp(scores) / torch.exp(scores).sum(-1, keepdim=True)
    torch.testing.assert_close(w[0, 0], want_w)
    torch.testing.assert_close(y[0, 0], want_w @ v[0, 0])
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 1, 2))


def _gqa(K: int, H: int) -> dict:
    return {"enable_gqa": True} if K != H else {}


@pytest.mark.parametrize("H,K", [(4, 4), (4, 2), (4, 1)])
def test_sdpa_equals_the_reference_for_every_masking(H, K):
    T = S = 5
    q, k, v = qkv(H=H, K=K, T=T, S=S)
    # no mask (every query sees every key), as the encoder without padding
    torch.testing.assert_close(attention(q, k, v, **_gqa(K, H)), reference_attention(q, k, v)[0])
    # causal over a square score matrix: training, prefill
    y = attention(q, k, v, is_causal=True, **_gqa(K, H))
    torch.testing.assert_close(y, reference_attention(q, k, v, is_causal=True)[0])
    # T new queries after 4 cached keys: the explicit [T, pos+T] mask of a KV cache
    q2, k2, v2 = qkv(H=H, K=K, T=3, S=7, seed=1)
    mask_TS, causal = cached_causal_mask(4, 3, q2.device)
    assert not causal and mask_TS is not None and mask_TS.shape == (3, 7)
    torch.testing.assert_close(attention(q2, k2, v2, attn_mask=mask_TS, **_gqa(K, H)),
                               reference_attention(q2, k2, v2, mask_TS)[0])
    # padding as an additive -inf bias [B, 1, 1, S] (BERT) and as a boolean key mask (encoder-decoder)
    keep_BS = torch.tensor([[True] * 5, [True, True, True, False, False]])
    bias = torch.zeros(2, 1, 1, S).masked_fill(~keep_BS[:, None, None], -math.inf)
    want = reference_attention(q, k, v, keep_BS[:, None, None])[0]
    torch.testing.assert_close(attention(q, k, v, attn_mask=bias, **_gqa(K, H)), want)
    torch.testing.assert_close(reference_attention(q, k, v, bias)[0], want)
    torch.testing.assert_close(attention(q, k, v, attn_mask=keep_BS[:, None, None], **_gqa(K, H)), want)


def test_cached_causal_mask_rules():
    assert cached_causal_mask(0, 6, torch.device("cpu")) == (None, True)  # nothing cached: plain causal
    assert cached_causal_mask(9, 1, torch.device("cpu")) == (None, False)  # one new token sees every key
    mask, causal = cached_causal_mask(2, 3, torch.device("cpu"))
    assert not causal and mask.tolist() == [[True, True, True, False, False], [True] * 4 + [False], [True] * 5]


def test_low_precision_on_cpu_is_attended_in_fp32():
    q, k, v = qkv(dtype=torch.bfloat16)
    y = attention(q, k, v, is_causal=True, enable_gqa=True)
    assert y.dtype == torch.bfloat16
    want = reference_attention(q.float(), k.float(), v.float(), is_causal=True)[0]
    torch.testing.assert_close(y, want.to(torch.bfloat16))  # the fp32 result, rounded once to bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast the fp32 result is handed on as is
        assert attention(q, k, v, enable_gqa=True).dtype == torch.float32


def test_per_row_key_counts_equal_one_masked_call():
    attn = Attention(32, 4, n_kv_head=2)
    q, k, v = qkv(B=3, H=4, K=2, T=1, S=6)
    keys = [6, 2, 4]
    mask_B11S = (torch.arange(6)[None, :] < torch.tensor(keys)[:, None])[:, None, None]
    rows = attn.attend(q, k, v, row_keys=keys)
    torch.testing.assert_close(rows, attn.attend(q, k, v, mask=mask_B11S))
    torch.testing.assert_close(rows, reference_attention(q, k, v, mask_B11S)[0])


def test_module_sizes_are_explicit_and_name_their_parameters():
    self_attn = Attention(48, 4, n_kv_head=2, head_dim=16, qkv_bias=False, proj_bias=True, qk_norm=True)
    shapes = {n: tuple(p.shape) for n, p in self_attn.named_parameters()}
    assert shapes == {"qkv.weight": ((4 + 2 * 2) * 16, 48), "proj.weight": (48, 64), "proj.bias": (48,),
                      "q_norm.weight": (16,), "k_norm.weight": (16,)}
    cross = Attention(48, 4, n_kv_head=2, head_dim=16, cross=True)
    assert {n for n, _ in cross.named_parameters()} == {"q.weight", "q.bias", "kv.weight", "kv.bias",
                                                         "proj.weight", "proj.bias"}
    x, memory = torch.randn(2, 3, 48), torch.randn(2, 5, 48)
    assert self_attn(x, is_causal=True).shape == (2, 3, 48)
    k, v = cross.memory_kv(memory)
    assert k.shape == v.shape == (2, 2, 5, 16)
    # cross-attention is the formula over the memory's keys/values
    q = cross.q(x).view(2, 3, 4, 16).transpose(1, 2)
    y = reference_attention(q, k, v)[0].transpose(1, 2).reshape(2, 3, 64)
    torch.testing.assert_close(cross(x, memory_kv=(k, v)), cross.proj(y))


def test_every_model_attends_through_the_one_function(monkeypatch):
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, pos="rope",
                        qk_norm=True)).eval()
    bert = Bert(get_bert_preset("bert-tiny", vocab_size=50, dropout=0.0)).eval()
    encdec = EncoderDecoder(get_encdec_preset("encdec-tiny", vocab_size=50)).eval()
    ids = torch.randint(0, 50, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0

    def run() -> list[torch.Tensor]:
        with torch.inference_mode():
            cache = gpt.make_cache(2)
            prefill = gpt(ids[:, :3], cache=cache)
            chunk = gpt(ids[:, 3:5], cache=cache)  # two new tokens after three cached: the explicit mask
            step = gpt.decode_step(ids[:, 5], torch.tensor([5, 5]), cache.k, cache.v)
            rows = gpt.make_cache(2)
            gpt(ids[:1, :4], cache=rows.row(0))
            gpt(ids[1:, :2], cache=rows.row(1))
            per_row = gpt.decode_step(ids[:, 4], torch.tensor([4, 2]), rows.k, rows.v, row_attention=True)
            masked = gpt.decode_step(ids[:, 4], torch.tensor([4, 2]), rows.k, rows.v)
            return [gpt(ids), gpt.features(ids), prefill, chunk, step, per_row, masked, bert(ids, mask),
                    encdec(ids, ids[:, :4], mask.bool())]

    with_sdpa = run()
    calls = []

    def formula(q, k, v, attn_mask=None, is_causal=False, dropout_p=0.0, enable_gqa=False):
        calls.append(tuple(q.shape))
        return reference_attention(q, k, v, attn_mask, is_causal=is_causal)[0]

    monkeypatch.setattr(attention_module, "attention", formula)
    with_formula = run()
    # 2 layers each: GPT forward, features, prefill, chunk, step, two row prefills, 2 rows x per-row step,
    # masked step; BERT; encoder-decoder: encoder self-attention, decoder self- and cross-attention
    assert len(calls) == 2 * (1 + 1 + 1 + 1 + 1 + 2 + 2 + 1) + 2 + 2 * 3
    for a, b in zip(with_sdpa, with_formula, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("H,K", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_is_the_formula_in_fp32(H, K, dtype):
    q, k, v = qkv(B=3, H=H, K=K, T=1, S=9, D=8, dtype=dtype)
    keys = torch.tensor([9, 1, 5])
    mask_B11S = (torch.arange(9)[None, :] < keys[:, None])[:, None, None]
    want = reference_attention(q.float(), k.float(), v.float(), mask_B11S)[0].to(dtype)
    y = decode_attention(q, k, v, mask_B11S)
    assert y.dtype == dtype and y.shape == q.shape
    torch.testing.assert_close(y, want, **({"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {}))
    torch.testing.assert_close(decode_attention(q, k, v), reference_attention(q.float(), k.float(), v.float())[0]
                               .to(dtype), **({"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_decode_attention_rows_do_not_depend_on_the_call(dtype):
    """What the batched decode programs promise (zenlm.compiled, "Batches"): compiled, a row's result is bit for
    bit the same whatever the other rows are, however many rows share the call, and however many key slots past
    its own the call reads (those are masked: exact zeros in every sum), in whole blocks of KEY_BLOCK slots as
    the programs read them."""
    import torch._dynamo

    from zenlm.compiled import KEY_BLOCK, _options

    torch._dynamo.reset()
    step = torch.compile(decode_attention, options=_options(), dynamic=True)
    B, H, K, L, D = 8, 4, 2, 96, 16
    q, k, v = qkv(B=B, H=H, K=K, T=1, S=L, D=D, dtype=dtype, seed=3)
    pos = torch.tensor([40, 3, 77, 16, 59, 30, 8, 64])

    def call(rows: slice, S: int) -> torch.Tensor:
        p = pos[rows]
        mask = (torch.arange(S)[None, :] <= p[:, None])[:, None, None]
        with torch.inference_mode():
            return step(q[rows], k[rows, :, :S], v[rows, :, :S], mask)

    def blocks(n: int) -> int:
        return -(-n // KEY_BLOCK) * KEY_BLOCK

    full = call(slice(0, B), blocks(int(pos.max()) + 1))
    torch.testing.assert_close(full, reference_attention(q.float(), k.float(), v.float(), (
        torch.arange(L)[None, :] <= pos[:, None])[:, None, None])[0].to(dtype), **(
        {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {}))
    for b in (0, 1, 5):
        own = blocks(int(pos[b]) + 1)
        for rows in (slice(b, b + 2), slice(b, b + 3)):  # two or more rows: one compiled kernel for every call
            for S in (own, own + KEY_BLOCK, L):
                assert torch.equal(call(rows, S)[0], full[b]), (b, rows, S)


@pytest.mark.parametrize("batched", [False, True])
def test_an_exported_decode_step_attends_through_decode_attention(batched):
    """The compiled CPU decode step (both families) takes decode_attention, not the fused kernel; eager decoding
    and every other call keep SDPA (test_every_model_attends_through_the_one_function)."""
    from zenlm.compiled import _StepModule

    gpt = GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, pos="rope",
                        qk_norm=True)).eval()
    cache = gpt.make_cache(2, 32)
    example = (torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.long), torch.arange(16), cache.k, cache.v)
    with torch.no_grad():
        graph = torch.export.export(_StepModule(gpt, batched), example, strict=False).graph_module.graph
    ops = [str(n.target) for n in graph.nodes if n.op == "call_function"]
    assert not [op for op in ops if "scaled_dot_product" in op]
    assert ops.count("aten.amax.default") == 2  # decode_attention's softmax, once per layer

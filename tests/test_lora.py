"""LoRA layers (zenlm.models.lora): the formula, the exact no-op start, what trains, merging, target selection,
and LoRA on a frozen int8 base."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from zenlm.errors import ConfigError
from zenlm.models import layers
from zenlm.models.bert import Bert, get_bert_preset
from zenlm.models.encdec import EncoderDecoder, get_encdec_preset
from zenlm.models.gpt import GPT
from zenlm.models.int8 import Int8Linear, dequantize_int8, quantize_int8
from zenlm.models.lora import (
    LoRAConfig,
    LoRALinear,
    SplitLoRALinear,
    adapter_state_dict,
    apply_lora,
    has_lora,
    lora_layers,
    merge_and_unload,
    merge_lora,
    resolve_targets,
    unmerge_lora,
)
from zenlm.presets import get_preset
from zenlm.train.checkpoint import load_model_weights, save_model
from zenlm.train.optim import OptimConfig, build_optimizers

V = 96
LAYOUTS = {
    "gpt2": dict(name="classic-char", n_layer=2, n_embd=32, n_head=4, block_size=32),
    "llama": dict(name="llama-tiny", n_layer=2, n_embd=32, n_head=4, n_kv_head=2, block_size=32),
}


@pytest.fixture
def unfused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain model's prompt passes compute ``gelu(fc(x))`` as one oneDNN call (zenlm.models.layers), which an
    adapted ``fc`` cannot (its adapter's term comes before the GELU), so the two round differently in the last
    bits. The tests that hold an adapter with B = 0 to be the base bit for bit turn that fusion off."""
    monkeypatch.setenv("ZENLM_FUSED_GELU", "0")
    layers._fused_gelu_dtypes.cache_clear()
    yield
    monkeypatch.delenv("ZENLM_FUSED_GELU")
    layers._fused_gelu_dtypes.cache_clear()


def _gpt(layout: str, seed: int = 0) -> GPT:
    fields = dict(LAYOUTS[layout])
    torch.manual_seed(seed)
    return GPT(get_preset(fields.pop("name"), vocab_size=V, **fields)).eval()


def _randomise_adapters(model: nn.Module, seed: int = 1) -> None:
    """Give every B a nonzero value, as training would (B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_b" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _ids(seed: int = 0, shape: tuple[int, int] = (2, 12)) -> torch.Tensor:
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def test_lora_linear_is_the_formula() -> None:
    torch.manual_seed(0)
    base = nn.Linear(20, 12)
    lora = LoRALinear(base, rank=4, alpha=8.0)
    assert lora.lora_a.weight.shape == (4, 20) and lora.lora_b.weight.shape == (12, 4)
    assert torch.count_nonzero(lora.lora_b.weight) == 0 and lora.lora_a.weight.abs().sum() > 0
    # A is initialised like an nn.Linear weight: Kaiming-uniform with bound 1/sqrt(in)
    assert lora.lora_a.weight.abs().max() <= 1 / 20 ** 0.5
    nn.init.normal_(lora.lora_b.weight)
    x = torch.randn(3, 5, 20)
    W, b, A, B = base.weight, base.bias, lora.lora_a.weight, lora.lora_b.weight
    expected = x @ W.T + b + (8.0 / 4) * (x @ A.T) @ B.T  # y = W x + b + (alpha / r) B A x
    torch.testing.assert_close(lora(x), expected)
    torch.testing.assert_close(lora.delta_weight(), 2.0 * B @ A)


def test_split_pairs_equal_one_shared_pair_when_their_a_agree() -> None:
    """Separate q/k/v pairs with one shared A are the fused pair with B split by rows (the export direction)."""
    torch.manual_seed(0)
    base = nn.Linear(16, 8 + 4 + 4, bias=False)
    fused = LoRALinear(base, rank=3, alpha=6.0)
    split = SplitLoRALinear(base, {"q": 8, "k": 4, "v": 4}, ["q", "k", "v"], rank=3, alpha=6.0)
    nn.init.normal_(fused.lora_b.weight)
    with torch.no_grad():
        for p, rows in zip("qkv", fused.lora_b.weight.split([8, 4, 4]), strict=True):
            split.lora_a[p].weight.copy_(fused.lora_a.weight)
            split.lora_b[p].weight.copy_(rows)
    x = torch.randn(2, 16)
    torch.testing.assert_close(split(x), fused(x))
    # ... but independent A's are a rank-3r update, which no single rank-r pair can express
    with torch.no_grad():
        split.lora_a["k"].weight.normal_()
    assert torch.linalg.matrix_rank(split.delta_weight()) > 3


@pytest.mark.parametrize("layout", ["gpt2", "llama"])
def test_lora_starts_as_an_exact_no_op_and_merges(layout: str, unfused: None) -> None:
    model = _gpt(layout)
    x = _ids()
    with torch.no_grad():
        before = model(x)
    modules = apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=("all",)))
    assert set(modules) == {f"blocks.{i}.{n}" for i in range(2) for n in
                            (["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"] if layout == "gpt2" else
                             ["attn.qkv", "attn.proj", "mlp.gate", "mlp.up", "mlp.proj"])}
    # GPT-2 layout: one pair on the fused projection; Llama layout: one pair per part
    assert modules["blocks.0.attn.qkv"] == (None if layout == "gpt2" else ["q", "k", "v"])
    with torch.no_grad():
        assert torch.equal(model(x), before)  # B = 0: exactly the base, bit for bit
        _randomise_adapters(model)
        adapted = model(x)
        assert (adapted - before).abs().max() > 1e-3
        merge_lora(model)  # W += (alpha / r) B A, adapters skipped
        torch.testing.assert_close(model(x), adapted)
        unmerge_lora(model)
        torch.testing.assert_close(model(x), adapted)
        merge_and_unload(model)  # an ordinary GPT again
        assert not has_lora(model) and all(type(m) is nn.Linear for n, m in model.named_modules()
                                           if n.endswith(("qkv", "proj", "fc", "gate", "up")))
        torch.testing.assert_close(model(x), adapted)


def test_only_the_adapters_train_and_a_run_saves_only_them(tmp_path: Path) -> None:
    model = _gpt("llama").train()
    apply_lora(model, LoRAConfig(rank=2, targets=("attn",)))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_a." in n or ".lora_b." in n for n in trainable)
    _randomise_adapters(model)  # with B = 0 the gradient of A is zero too
    x = _ids(shape=(2, 9))
    F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    # Muon never sees the low-rank factors: they go to AdamW (the only optimiser left)
    opts = build_optimizers(model, OptimConfig(name="muon"), "cpu")
    assert [type(o).__name__ for o in opts] == ["AdamW"]
    assert sum(p.numel() for g in opts[0].param_groups for p in g["params"]) == \
        sum(p.numel() for p in model.parameters() if p.requires_grad)
    # checkpoints and final weights of a LoRA model hold what it trains, and load back
    save_model(model, tmp_path / "a.safetensors")
    saved = load_file(str(tmp_path / "a.safetensors"))
    assert set(saved) == set(adapter_state_dict(model)) == trainable
    other = _gpt("llama")
    apply_lora(other, LoRAConfig(rank=2, targets=("attn",)))
    load_model_weights(other, tmp_path / "a.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(x), model.eval()(x))


def test_targets_groups_parts_patterns_and_refusals() -> None:
    model = _gpt("llama")
    cfg = LoRAConfig(targets=("q", "v", "blocks.1.mlp.*"))
    assert resolve_targets(model, cfg) == {
        "blocks.0.attn.qkv": ["q", "v"], "blocks.1.attn.qkv": ["q", "v"],
        "blocks.1.mlp.gate": None, "blocks.1.mlp.up": None, "blocks.1.mlp.proj": None}
    assert list(resolve_targets(model, LoRAConfig(targets="attn.proj"))) == ["blocks.0.attn.proj",
                                                                              "blocks.1.attn.proj"]
    assert resolve_targets(model, LoRAConfig(targets="qkv", qkv="fused"))["blocks.0.attn.qkv"] is None
    with pytest.raises(ConfigError, match=r"'attn\.c_attn', 'dense' match no linear layer.*blocks\.\*\.attn\.qkv, "
                                          r"blocks\.\*\.attn\.proj, blocks\.\*\.mlp\.gate.*lm_head"):
        resolve_targets(model, LoRAConfig(targets=("attn.c_attn", "mlp", "dense")))
    with pytest.raises(ConfigError, match="fused q/k/v projection.*cannot adapt only k, v"):
        resolve_targets(_gpt("gpt2"), LoRAConfig(targets=("k", "v")))
    for bad in (dict(rank=0), dict(alpha=0), dict(dropout=1.0), dict(targets=()), dict(qkv="shared")):
        with pytest.raises(ConfigError):
            LoRAConfig(**bad)  # type: ignore[arg-type]
    apply_lora(model, LoRAConfig(targets="mlp"))
    with pytest.raises(ConfigError, match="already has LoRA"):
        apply_lora(model, LoRAConfig(targets="attn"))


def test_bert_and_encoder_decoder_groups(unfused: None) -> None:
    bert = Bert(get_bert_preset("bert-tiny", vocab_size=V, n_layer=1))
    assert resolve_targets(bert, LoRAConfig(targets="attn")) == {"blocks.0.qkv": ["q", "k", "v"],
                                                                 "blocks.0.proj": None}
    assert list(resolve_targets(bert, LoRAConfig(targets="mlp"))) == ["blocks.0.fc", "blocks.0.out"]
    ed = EncoderDecoder(get_encdec_preset("encdec-tiny", vocab_size=V, n_enc_layer=1, n_dec_layer=1))
    attn = resolve_targets(ed, LoRAConfig(targets="attn"))
    assert {n.split(".", 2)[-1] for n in attn} == {"attn.qkv", "attn.proj", "self_attn.qkv", "self_attn.proj",
                                                   "cross_attn.q", "cross_attn.kv", "cross_attn.proj"}
    src, tgt = _ids(1, (2, 7)), _ids(2, (2, 5))
    with torch.no_grad():
        before = ed.eval()(src, tgt)
        apply_lora(ed, LoRAConfig(targets="all"))
        assert torch.equal(ed(src, tgt), before)


def test_int8_linear_backward_equals_dequantized_linear() -> None:
    torch.manual_seed(0)
    q = Int8Linear.from_linear(nn.Linear(24, 16))
    x = torch.randn(4, 6, 24, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    (q(x) ** 2).sum().backward()
    (F.linear(x2, q.dequantized(), q.bias) ** 2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_lora_on_a_frozen_int8_base_trains_and_merges() -> None:
    """QLoRA-style: int8 base (zenlm quantize), float adapters; the loss falls and merging keeps the outputs."""
    model = quantize_int8(_gpt("llama"))
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets="all"))
    assert all(isinstance(layer.base, Int8Linear) for _, layer in lora_layers(model))
    assert "lm_head" not in resolve_targets(quantize_int8(_gpt("gpt2")), LoRAConfig(targets="all"))  # tied head
    opt = build_optimizers(model, OptimConfig(name="adamw", lr=1e-2, weight_decay=0.0), "cpu")[0]
    x = _ids(3, (4, 17))
    losses = []
    model.train()
    for _ in range(30):
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n)
    model.eval()
    with torch.no_grad():
        adapted = model(x)
        with pytest.raises(ConfigError, match="int8 base"):
            merge_lora(model)
        dequantize_int8(merge_and_unload(model))  # W = q * s + (alpha / r) B A in float32
        assert not any(isinstance(m, Int8Linear) for m in model.modules())
        torch.testing.assert_close(model(x), adapted, rtol=1e-4, atol=1e-4)

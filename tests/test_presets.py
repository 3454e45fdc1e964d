"""The preset registry: every preset builds, has the shape it promises, and takes overrides."""

from __future__ import annotations

import pytest
import torch

from zenlm.config import GPTConfig
from zenlm.errors import ConfigError
from zenlm.models.gpt import GPT
from zenlm.models.registry import config_from_dict
from zenlm.presets import PRESETS, get_preset, list_presets

EXPECTED = {"tiny", "demo", "classic-char", "gpt2-small", "gpt2-medium", "llama-tiny"}


def test_registry_lists_every_preset_with_a_one_line_description():
    listed = list_presets()
    assert EXPECTED <= set(listed) and list(listed) == list(PRESETS)
    for name, description in listed.items():
        assert description and "\n" not in description, name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_preset_is_a_valid_config_that_round_trips(name):
    cfg = get_preset(name, vocab_size=300)
    assert isinstance(cfg, GPTConfig) and cfg.vocab_size == 300
    assert config_from_dict(cfg.to_dict()) == cfg
    assert cfg.num_params() > 0


@pytest.mark.parametrize("name", ["tiny", "demo", "classic-char", "llama-tiny"])
def test_small_presets_build_and_run(name):
    cfg = get_preset(name, vocab_size=300)
    model = GPT(cfg)
    assert model.num_params() == cfg.num_params()
    logits = model(torch.randint(0, 300, (1, 8)))
    assert logits.shape == (1, 8, 300)


def test_preset_shapes():
    tiny = get_preset("tiny")
    assert (tiny.n_layer, tiny.n_head, tiny.n_embd, tiny.block_size) == (2, 2, 64, 64)
    classic = get_preset("classic-char", vocab_size=65)
    assert (classic.n_layer, classic.n_head, classic.n_embd, classic.block_size) == (4, 4, 128, 64)
    shape = (classic.pos, classic.norm, classic.mlp, classic.bias, classic.tie_embeddings, classic.dropout)
    assert shape == ("learned", "layernorm", "gelu", True, True, 0.0)
    small = get_preset("gpt2-small")
    assert (small.n_layer, small.n_head, small.n_embd, small.block_size, small.vocab_size) == (
        12, 12, 768, 1024, 50257)
    assert 123e6 < small.num_params() < 125e6  # GPT-2 small is "124M"
    medium = get_preset("gpt2-medium")
    assert (medium.n_layer, medium.n_head, medium.n_embd) == (24, 16, 1024)
    assert 354e6 < medium.num_params() < 356e6
    llama = get_preset("llama-tiny")
    assert (llama.pos, llama.norm, llama.mlp, llama.bias, llama.tie_embeddings) == (
        "rope", "rmsnorm", "swiglu", False, False)
    assert llama.n_kv_head == llama.n_head // 2
    demo = get_preset("demo")
    assert demo.pos == "rope" and demo.norm == "rmsnorm" and demo.block_size == 256


def test_overrides_and_errors():
    cfg = get_preset("demo", vocab_size=1000, n_layer=6, dropout=0.1)
    assert (cfg.vocab_size, cfg.n_layer, cfg.dropout, cfg.n_embd) == (1000, 6, 0.1, 256)
    assert get_preset("demo").n_layer == 4  # the registry is not modified by overrides
    with pytest.raises(ConfigError, match="tiny.*demo"):
        get_preset("no-such-model")
    with pytest.raises(ConfigError, match="n_layers"):
        get_preset("tiny", n_layers=3)
    with pytest.raises(ConfigError, match="divisible"):
        get_preset("tiny", n_embd=65)


@pytest.mark.parametrize("name", ["tiny", "demo"])
def test_the_default_presets_have_a_transformers_twin(name: str) -> None:
    """What `zenlm pretrain` trains by default leaves zenlm: the Qwen3 layout (rotary, RMSNorm, SwiGLU, qk-norm)."""
    from zenlm.convert.hf import architecture_for_config

    assert architecture_for_config(get_preset(name, vocab_size=100)).name == "Qwen3ForCausalLM"


def test_the_squared_relu_preset_says_it_does_not_export() -> None:
    from zenlm.convert.hf import architecture_for_config

    assert "NOT exportable" in list_presets()["demo-relu2"]
    with pytest.raises(ConfigError, match="mlp='relu2'"):
        architecture_for_config(get_preset("demo-relu2", vocab_size=100))

"""Named GPT shapes: ``get_preset("demo", vocab_size=tok.vocab_size)`` -> GPTConfig.

A preset is a set of GPTConfig fields; anything it does not name keeps the GPTConfig default, and any
field can be overridden by keyword. The vocabulary size normally comes from the tokenizer, so pass it.
The table is registered with the "gpt" architecture (:mod:`zenlm.models.registry`), which lists every
family's presets together (``zenlm presets``); the other families keep theirs next to their model.
"""

from __future__ import annotations

from typing import Any

from zenlm.config import GPTConfig, Preset, config_from_preset

# Fields shared by the two GPT-2 presets: learned positions, LayerNorm with biases, tanh-GELU MLP,
# tied embeddings, GPT-2's 50257-token vocabulary and 1024-token context. Dropout stays 0 (pretraining).
_GPT2 = dict(vocab_size=50257, block_size=1024, pos="learned", norm="layernorm", mlp="gelu",
             bias=True, tie_embeddings=True, dropout=0.0)

PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        "2 layers x 64 wide, context 64: the modern recipe at toy size, for tests and smoke runs (Qwen3 layout).",
        dict(n_layer=2, n_head=2, n_embd=64, block_size=64, pos="rope", norm="rmsnorm", mlp="swiglu",
             bias=False, tie_embeddings=False, qk_norm=True, zero_init_proj=True),
    ),
    "demo": Preset(
        "4 layers x 256 wide, context 256: rotary, RMSNorm, SwiGLU, qk-norm (the Qwen3 layout: exports to "
        "transformers and GGUF); minutes on a CPU.",
        dict(n_layer=4, n_head=4, n_embd=256, block_size=256, pos="rope", norm="rmsnorm", mlp="swiglu",
             bias=False, tie_embeddings=False, qk_norm=True, zero_init_proj=True),
    ),
    "demo-relu2": Preset(
        "the demo model with a squared-ReLU MLP (the earlier default: same steps to a loss, about 20% less time "
        "on the fast recipe's race); NOT exportable: no transformers or llama.cpp counterpart.",
        dict(n_layer=4, n_head=4, n_embd=256, block_size=256, pos="rope", norm="rmsnorm", mlp="relu2",
             bias=False, tie_embeddings=False, qk_norm=True, zero_init_proj=True),
    ),
    "classic-char": Preset(
        "4 layers x 128 wide, context 64: the classic GPT-2 recipe (learned positions, LayerNorm, GELU).",
        dict(n_layer=4, n_head=4, n_embd=128, block_size=64, pos="learned", norm="layernorm", mlp="gelu",
             bias=True, tie_embeddings=True, dropout=0.0),
    ),
    "gpt2-small": Preset(
        "GPT-2 small (124M with its 50257 vocabulary): 12 layers x 768 wide, 12 heads, context 1024.",
        dict(_GPT2, n_layer=12, n_head=12, n_embd=768),
    ),
    "gpt2-medium": Preset(
        "GPT-2 medium (355M with its 50257 vocabulary): 24 layers x 1024 wide, 16 heads, context 1024.",
        dict(_GPT2, n_layer=24, n_head=16, n_embd=1024),
    ),
    "llama-tiny": Preset(
        "4 layers x 256 wide, context 256, Llama recipe: rotary, RMSNorm, SwiGLU, 8 query / 4 kv heads.",
        dict(n_layer=4, n_head=8, n_kv_head=4, n_embd=256, block_size=256, pos="rope", norm="rmsnorm",
             mlp="swiglu", bias=False, tie_embeddings=False, norm_eps=1e-5, rope_theta=10000.0),
    ),
}


def list_presets() -> dict[str, str]:
    """GPT preset names (in table order) mapped to their one-line descriptions."""
    return {name: preset.description for name, preset in PRESETS.items()}


def get_preset(name: str, **overrides: Any) -> GPTConfig:
    """The GPTConfig of preset ``name``, with any GPTConfig fields in ``overrides`` changed.

    Typical use: ``get_preset("demo", vocab_size=tokenizer.vocab_size, n_layer=6)``.
    """
    return config_from_preset(GPTConfig, PRESETS, name, overrides, "GPT")


__all__ = ["PRESETS", "Preset", "get_preset", "list_presets"]

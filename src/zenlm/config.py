"""Typed, validated model configurations.

A config is a plain dataclass: everything needed to rebuild a model, nothing else. It is saved into
``RUN_DIR/config.yaml`` (as a dict under ``model:``) and rebuilt with
:func:`zenlm.models.registry.config_from_dict`. This module holds the decoder's :class:`GPTConfig` and what every
family's config shares: validation helpers, :func:`dataclass_from_dict`, and the one :class:`Preset` format
(named shapes; the GPT ones are in :mod:`zenlm.presets`, each other family's next to its model).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

from zenlm.errors import ConfigError

PosKind = Literal["learned", "rope", "none"]
NormKind = Literal["layernorm", "rmsnorm"]
_T = TypeVar("_T")
MLPKind = Literal["gelu", "swiglu", "relu2"]


def _check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, choices))}.")


def _check_positive(name: str, value: int | float) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value!r}.")


def check_block_settings(cfg: Any) -> None:
    """The checks every Transformer config (GPT, encoder-decoder) makes of its per-block settings ``n_embd``,
    ``n_head``, ``pos``, ``norm``, ``mlp``, ``mlp_hidden`` and ``dropout``: the width splits into heads, the
    kinds are known, rotary positions get an even head dim, dropout is in [0, 1). Fills in ``mlp_hidden`` when
    None: 4*C for gelu/relu2, 8/3*C rounded up to 64 for swiglu (its three matrices then hold about what two
    of 4*C do)."""
    if cfg.n_embd % cfg.n_head:
        raise ConfigError(f"n_embd={cfg.n_embd} must be divisible by n_head={cfg.n_head}.")
    _check_choice("norm", cfg.norm, ("layernorm", "rmsnorm"))
    _check_choice("mlp", cfg.mlp, ("gelu", "swiglu", "relu2"))
    if cfg.pos == "rope" and (cfg.n_embd // cfg.n_head) % 2:
        raise ConfigError(f"rotary positions need an even head dim, got {cfg.n_embd // cfg.n_head}.")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {cfg.dropout}.")
    if cfg.mlp_hidden is None:
        cfg.mlp_hidden = -(-int(8 * cfg.n_embd / 3) // 64) * 64 if cfg.mlp == "swiglu" else 4 * cfg.n_embd
    _check_positive("mlp_hidden", cfg.mlp_hidden)


ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def _check_rope_scaling(scaling: Any) -> None:
    kind = scaling.get("rope_type") if isinstance(scaling, dict) else None
    if kind not in ROPE_SCALING_KEYS:
        raise ConfigError(f"rope_scaling={scaling!r} is not supported; give None or a dict with rope_type "
                          f"{' or '.join(map(repr, ROPE_SCALING_KEYS))}.")
    missing = [k for k in ROPE_SCALING_KEYS[kind] if not isinstance(scaling.get(k), (int, float))]
    if missing:
        raise ConfigError(f"rope_scaling of type {kind!r} needs numbers for {', '.join(missing)}.")
    _check_positive("rope_scaling factor", scaling["factor"])


class ModelConfig:
    """What every architecture's config dataclass shares: :meth:`to_dict` gives the ``model:`` section of
    config.yaml, ``{"arch": ARCH, **fields}``, and :meth:`from_dict` rebuilds the config from it. A subclass
    sets ``ARCH`` to the name it is registered under (zenlm.models.registry)."""

    ARCH: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.ARCH, **dataclasses.asdict(self)}  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        """Rebuild from :meth:`to_dict` output (``arch`` may be present; unknown fields are refused)."""
        return dataclass_from_dict(cls, d)


@dataclass
class GPTConfig(ModelConfig):
    """A decoder-only Transformer (GPT-2 and Llama families are both points in this space).

    vocab_size:     number of token ids the embedding accepts
    block_size:     maximum context length T (positions 0..T-1)
    n_layer:        number of Transformer blocks
    n_head:         query heads H; head dim D = n_embd // n_head
    n_kv_head:      key/value heads (grouped-query attention); None means n_head (plain multi-head)
    n_embd:         model width C
    mlp_hidden:     MLP inner width; None means 4*C for gelu/relu2, and 8/3*C rounded up to 64 for swiglu
    pos:            "learned" absolute position embeddings (GPT-2) or "rope" rotary positions (Llama)
    rope_theta:     rotary base frequency
    rope_scaling:   None, or frequency scaling of the rotary positions: {"rope_type": "linear", "factor": f}
                    or Llama 3.1's {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
                    "original_max_position_embeddings"} (see zenlm.models.layers.rope_frequencies)
    norm:           "layernorm" (GPT-2) or "rmsnorm" (Llama)
    norm_eps:       epsilon inside the norm
    mlp:            "gelu" (GPT-2), "swiglu" (Llama) or "relu2" (squared ReLU)
    bias:           biases in linear layers and LayerNorm
    qkv_bias:       bias on the q/k/v projections; None means ``bias`` (Qwen2: True with bias=False)
    attn_proj_bias: bias on the attention output projection; None means ``bias``
    mlp_bias:       biases in the MLP; None means ``bias``
    tie_embeddings: the output head shares the token embedding matrix
    qk_norm:        normalise queries and keys per head (RMSNorm) before attention
    logit_softcap:  if set, logits = cap * tanh(logits / cap)
    zero_init_proj: initialise each block's output projections (attention out, MLP down) to zero
    dropout:        dropout probability on embeddings, attention weights and residual branches
    init_std:       standard deviation of the normal initialisation of weights
    """

    vocab_size: int = 50304
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None
    n_embd: int = 768
    mlp_hidden: int | None = None
    pos: PosKind = "learned"
    rope_theta: float = 10000.0
    norm: NormKind = "layernorm"
    norm_eps: float = 1e-5
    mlp: MLPKind = "gelu"
    bias: bool = True
    tie_embeddings: bool = True
    qk_norm: bool = False
    logit_softcap: float | None = None
    zero_init_proj: bool = False
    dropout: float = 0.0
    init_std: float = 0.02
    qkv_bias: bool | None = None
    attn_proj_bias: bool | None = None
    mlp_bias: bool | None = None
    rope_scaling: dict[str, Any] | None = None
    ARCH: ClassVar[str] = "gpt"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            _check_positive(name, getattr(self, name))
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        _check_positive("n_kv_head", self.n_kv_head)
        _check_choice("pos", self.pos, ("learned", "rope", "none"))
        check_block_settings(self)
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}.")
        if self.logit_softcap is not None:
            _check_positive("logit_softcap", self.logit_softcap)
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)
        for name in ("qkv_bias", "attn_proj_bias", "mlp_bias"):
            if getattr(self, name) is None:
                setattr(self, name, self.bias)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count computed from the shapes (matches ``sum(p.numel())`` of the built model)."""
        C, L, V, F = self.n_embd, self.n_layer, self.vocab_size, self.mlp_hidden
        kv = self.n_kv_head * self.head_dim
        b_qkv, b_proj, b = int(bool(self.qkv_bias)), int(bool(self.attn_proj_bias)), int(bool(self.mlp_bias))
        norm_p = C * (2 if (self.norm == "layernorm" and self.bias) else 1)
        attn = C * (C + 2 * kv) + b_qkv * (C + 2 * kv) + C * C + b_proj * C
        if self.qk_norm:
            attn += 2 * self.head_dim
        n_in = 2 if self.mlp == "swiglu" else 1
        mlp = n_in * (C * F + b * F) + F * C + b * C
        blocks = L * (attn + mlp + 2 * norm_p)
        emb = V * C + (self.block_size * C if self.pos == "learned" else 0)
        head = 0 if self.tie_embeddings else V * C
        total = blocks + norm_p + emb + head
        if not include_embedding:
            total -= V * C + (self.block_size * C if self.pos == "learned" else 0)
        return total


def dataclass_from_dict(cls: type[_T], d: dict[str, Any]) -> _T:
    """Build the config dataclass ``cls`` from a dict (the ``model:`` section of config.yaml; an ``arch`` key is
    ignored), refusing fields it does not know (a config written by another version or edited by hand)."""
    d = {k: v for k, v in d.items() if k != "arch"}
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields {unknown}; known fields: {sorted(known)}.")
    return cls(**d)


@dataclass(frozen=True)
class Preset:
    """A named model shape: a one-line description and the config fields it sets (anything it does not name
    keeps the config class's default). Every architecture's presets use this one format."""

    description: str
    fields: dict[str, Any] = field(default_factory=dict)


def make_config(cls: type[_T], fields: dict[str, Any], overrides: dict[str, Any]) -> _T:
    """Config dataclass ``cls`` from a preset's ``fields`` with ``overrides`` on top; unknown override names are
    refused with the list of the fields there are."""
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown model settings {unknown}; {cls.__name__} fields are: {', '.join(sorted(known))}.")
    return cls(**{**fields, **overrides})


def config_from_preset(cls: type[_T], presets: Mapping[str, Preset], name: str, overrides: dict[str, Any],
                       title: str = "model") -> _T:
    """Config dataclass ``cls`` of preset ``name`` (one of ``presets``) with ``overrides`` on top; an unknown
    name is refused with the list of presets (``title`` names the family in the message)."""
    if name not in presets:
        raise ConfigError(f"unknown {title} preset {name!r}; choose one of: {', '.join(presets)}.")
    return make_config(cls, presets[name].fields, overrides)

"""Typed, validated model configurations.

A config is a plain dataclass: everything needed to rebuild a model, nothing else. It is saved into
``RUN_DIR/config.yaml`` (as a dict under ``model:``) and rebuilt with
:func:`zenlm.models.registry.config_from_dict`. This module holds the decoder's :class:`GPTConfig` and what every
family's config shares: validation helpers, :func:`dataclass_from_dict`, and the one :class:`Preset` format
(named shapes; the GPT ones are in :mod:`zenlm.presets`, each other family's next to its model).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
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


# ---------------------------------------------------------------------------------- field types
# A config read from a file (config.yaml, a --config file) may hold anything YAML can say: "2" where a number
# belongs, 2.7 where a whole number does, a list where a mapping does, nan. Every settings dataclass is checked
# against its own type hints before it is built (:func:`check_fields`), so such a value is refused with its
# name and what it should be, instead of failing later somewhere deep inside with a TypeError.

INT_LIMIT = 2**63  # the largest magnitude a tensor size or an int64 can hold


def _describe(tp: Any) -> str:
    """How a message names what a value of type hint ``tp`` should be."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("None" if a is type(None) else _describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (tuple, list):
        fixed = origin is tuple and args and args[-1] is not Ellipsis
        return f"a list of {len(args)} values" if fixed else "a list"
    return {bool: "true or false", int: "a whole number", float: "a finite number", str: "text",
            dict: "a mapping"}.get(origin or tp, getattr(tp, "__name__", str(tp)))


def _check_value(name: str, value: Any, tp: Any) -> Any:
    """``value`` checked against the type hint ``tp`` (ConfigError naming ``name`` when it does not fit),
    with the harmless conversions: a whole float to int (2.0 -> 2), an int to float, a list to a tuple."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_value(name, value, a)
            except ConfigError:
                continue
        return _refuse(name, value, tp)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        return _refuse(name, value, tp)
    if tp is bool:
        return value if isinstance(value, bool) else _refuse(name, value, tp)
    if tp is int:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) >= INT_LIMIT:
                raise ConfigError(f"{name} must be a whole number below 2**63, got {value}.")
            return value
        return _refuse(name, value, tp)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        return _refuse(name, value, tp)
    if tp is str:
        return value if isinstance(value, str) else _refuse(name, value, tp)
    if origin is dict or tp is dict:
        return value if isinstance(value, dict) else _refuse(name, value, tp)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return _refuse(name, value, tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                return _refuse(name, value, tp)
            items = [_check_value(f"{name}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=True))]
        else:
            inner = args[0] if args else Any
            items = [_check_value(f"{name}[{i}]", v, inner) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if isinstance(tp, type) and not isinstance(value, tp):
        return _refuse(name, value, tp)
    return value


def _refuse(name: str, value: Any, tp: Any) -> Any:
    hint = ""
    if isinstance(value, str) and _is_number(value):
        hint = " (text, not a number: write it without quotes"
        if "e" in value.lower() and "." not in value:  # YAML 1.1 reads 1e-3 as text, 1.0e-3 as a number
            hint += f"; YAML reads {value} as text, write it with a decimal point, e.g. 1.0e-3"
        hint += ")"
    raise ConfigError(f"{name} must be {_describe(tp)}, got {value!r}{hint}.")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_fields(cls: type, values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``values`` (field name -> value) checked against the type hints of the dataclass ``cls`` (only the names
    it declares are checked; the caller refuses unknown ones), with the conversions of :func:`_check_value`.
    Non-finite floats and whole numbers given as 2.7 are refused. ``prefix`` goes in front of each name in
    messages (e.g. ``"train."``)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return {k: _check_value(prefix + k, v, hints[k]) if k in fields and k in hints else v for k, v in values.items()}


def check_dataclass(obj: Any) -> None:
    """Check (and convert in place) every field of the dataclass instance ``obj`` against its type hints:
    what a settings class's ``__post_init__`` calls first, before comparing values."""
    values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    for k, v in check_fields(type(obj), values).items():
        if v is not values[k]:
            object.__setattr__(obj, k, v)


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
    return cls(**check_fields(cls, d))


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
    return cls(**check_fields(cls, {**fields, **overrides}))


def config_from_preset(cls: type[_T], presets: Mapping[str, Preset], name: str, overrides: dict[str, Any],
                       title: str = "model") -> _T:
    """Config dataclass ``cls`` of preset ``name`` (one of ``presets``) with ``overrides`` on top; an unknown
    name is refused with the list of presets (``title`` names the family in the message)."""
    if name not in presets:
        raise ConfigError(f"unknown {title} preset {name!r}; choose one of: {', '.join(presets)}.")
    return make_config(cls, presets[name].fields, overrides)

"""The architecture registry: the one place that knows which model families exist and what each can do.

A run directory names its family in ``config.yaml`` (``model: {arch: gpt, ...}``). Everything that has to act
on "whatever model this is" asks the registry instead of testing names::

    arch = get_architecture(saved["model"]["arch"])    # -> Architecture("gpt", ...)
    cfg = arch.config_from_dict(saved["model"])        # the validated config dataclass
    model = arch.build(cfg)                            # an nn.Module with freshly initialised weights
    arch.can("generate")                               # what it can do decides what zenlm.load returns

An :class:`Architecture` is one record: its ``arch`` name, its config class, a builder, its named presets (one
:class:`~zenlm.config.Preset` format for every family) and its capabilities, drawn from

    causal-lm   predicts the next token from the ones before it                        (zenlm pretrain)
                    model(ids_BT) -> logits_BTV                   a window of context (GPT), or with "stateful":
    stateful        logits_BTV, state = model(ids_BT, state)      state: what the model carries from the text
                    state = model.init_state(B)                   read so far (None = the start of a text)
    masked-lm   predicts hidden tokens from both sides: model.mlm_logits(hidden)         (--objective mlm)
    seq2seq     writes a target from a source: model(src_BS, tgt_BT, src_mask_BS) -> logits_BTV
    classify    has per-token hidden states a classification head can pool             (finetune classify)
    embed       gives a vector per text (the mean of its hidden states)                  (zenlm embed)
    generate    produces text token by token (generation, the server; beam search for GPT and seq2seq)

A **stateful** causal LM (the n-gram, MLP and LSTM/GRU rungs of the ladder, ``models/ngram.py`` and ``rnn.py``)
has no context window and no KV cache: a state tuple, every tensor of it batch first, holds all it keeps of the
text read so far, and feeding a text in pieces (passing the state on) equals feeding it whole. That one protocol
serves every use: scoring reads a text whole (or window by window, passing the state on), generation feeds one
token at a time with the state instead of a KV cache (:mod:`zenlm.stateful`), the server keeps one state row
per sequence (:mod:`zenlm.serve.stateful_engine`), and pretraining reads consecutive windows with the state
carried across them (truncated BPTT, :mod:`zenlm.recipes.ladder`). Everything that runs a causal LM asks
``can("stateful")`` once, at the entry point, and takes the stateful path; a GPT's path is unchanged.

A family whose model is **counted** rather than trained (the n-gram model) names ``count``: ``zenlm pretrain``
then counts the training split once instead of running the training loop. When the size of its tensors
depends on the data (count tables), ``from_tensors`` builds a loaded model from its weights file; ``build``
still gives the model before anything is counted (uniform next-token probabilities).

Adding a model family is one new file in ``zenlm/models/`` (its config dataclass with ``to_dict`` /
``from_dict``, its ``nn.Module``, its presets) plus one ``register(Architecture(...))`` in
``zenlm/models/__init__.py``. The contract a config class keeps:

* ``to_dict()`` returns ``{"arch": <registered name>, **fields}``: what config.yaml stores under ``model:``;
* ``from_dict(d)`` (a classmethod) rebuilds it, ignoring ``arch`` and refusing unknown fields;
* validation happens in ``__post_init__`` and raises :class:`~zenlm.errors.ConfigError`;
* ``vocab_size`` is a field; ``n_embd`` (the width of the hidden states) and ``block_size`` (the longest input)
  are readable when the family can ``classify`` or ``embed``, since the heads and the encoders read them. A
  causal LM that is not stateful has a ``block_size``; a stateful one has none (it reads any length).

What a run adds on top of its architecture (a classification head, int8 weights) is not an architecture:
:func:`zenlm.rundir.build_model_from_run` applies those options after ``arch.build``. Which Python object
``zenlm.load`` returns is decided by capability in :mod:`zenlm.api` (``Architecture.api`` overrides it for a
family whose users need an object of their own); every causal LM, stateful or not, loads as a
:class:`zenlm.api.LM`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from zenlm.config import Preset, config_from_preset
from zenlm.errors import ConfigError

Capability = Literal["causal-lm", "stateful", "masked-lm", "seq2seq", "classify", "embed", "generate"]
CAPABILITIES: tuple[str, ...] = ("causal-lm", "stateful", "masked-lm", "seq2seq", "classify", "embed", "generate")


@dataclass(frozen=True)
class Architecture:
    """One model family.

    name:           the ``arch`` key of config.yaml ("gpt", "bert", "encdec"); also what ``to_dict`` writes
    title:          how messages name it ("GPT", "BERT", "encoder-decoder")
    description:    one line for ``zenlm presets``
    config_class:   the config dataclass (``to_dict`` / ``from_dict``, validated in ``__post_init__``)
    build:          config -> model with freshly initialised weights (usually the nn.Module class itself)
    capabilities:   what the model can do (see the module docstring)
    presets:        named shapes, in the order ``zenlm presets`` lists them
    default_preset: the preset a recipe uses when none is named
    shape_names:    generic shape settings (n_layer, n_head, n_embd, block_size) -> this config's field names,
                    so one ``--n-layer`` / ``--n-embd`` / ``--block-size`` flag works for every family
    api:            "module:function" that turns a loaded run into what ``zenlm.load`` returns, for a family
                    that needs its own user-facing object; None: chosen by capability (zenlm.api)
    count:          for a family learned by counting (the n-gram model): ``count(ids_N, config) -> model``
                    from the training split's ids (a 1-D integer array); None: trained by the training loop
    from_tensors:   for a family whose tensor shapes depend on the data: ``from_tensors(config, tensors) ->
                    model`` from the tensors of its weights file; None: ``build`` and load the weights
    """

    name: str
    title: str
    description: str
    config_class: type
    build: Callable[[Any], nn.Module]
    capabilities: frozenset[str]
    presets: Mapping[str, Preset] = field(default_factory=dict)
    default_preset: str | None = None
    shape_names: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    api: str | None = None
    count: Callable[[Any, Any], nn.Module] | None = None
    from_tensors: Callable[[Any, dict[str, torch.Tensor]], nn.Module] | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.capabilities) - set(CAPABILITIES))
        assert not unknown, f"{self.name}: unknown capabilities {unknown}; known: {CAPABILITIES}"
        assert "stateful" not in self.capabilities or "causal-lm" in self.capabilities, \
            f"{self.name}: 'stateful' describes how a causal LM is called; add 'causal-lm'"
        assert self.default_preset is None or self.default_preset in self.presets, self.default_preset
        fields = {f.name for f in dataclasses.fields(self.config_class)}
        for generic, names in self.shape_names.items():
            assert set(names) <= fields, f"{self.name}: shape_names[{generic!r}] = {names} are not config fields"

    def can(self, capability: str) -> bool:
        """True when this family has ``capability`` (one of CAPABILITIES)."""
        assert capability in CAPABILITIES, capability
        return capability in self.capabilities

    def config(self, preset: str | None = None, **overrides: Any) -> Any:
        """The config of ``preset`` (None: ``default_preset``) with ``overrides`` (config fields) on top."""
        return config_from_preset(self.config_class, self.presets, preset or self.default_preset or "",
                                  overrides, self.title)

    def config_from_dict(self, d: Mapping[str, Any]) -> Any:
        """Rebuild a config from the ``model:`` section of a config.yaml (see the contract above)."""
        return self.config_class.from_dict(dict(d))  # type: ignore[attr-defined]

    def shape_overrides(self, **generic: Any) -> dict[str, Any]:
        """Generic shape settings -> this config's fields; None values are left out. For example, for an
        encoder-decoder ``shape_overrides(n_layer=3, n_embd=None)`` is ``{"n_enc_layer": 3, "n_dec_layer": 3}``.
        A generic name the family does not map passes through unchanged (so the config refuses it if unknown)."""
        out: dict[str, Any] = {}
        for key, value in generic.items():
            if value is not None:
                out.update(dict.fromkeys(self.shape_names.get(key, (key,)), value))
        return out


_REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    """Add ``arch`` to the registry (its name and its preset names must be new); returns it."""
    if arch.name in _REGISTRY:
        raise ConfigError(f"an architecture named {arch.name!r} is already registered.")
    taken = {p: a.name for a in _REGISTRY.values() for p in a.presets}
    clash = sorted(set(arch.presets) & set(taken))
    if clash:
        raise ConfigError(f"preset name(s) {clash} of {arch.name!r} are already used by {taken[clash[0]]!r}; "
                          "preset names are unique across architectures.")
    _REGISTRY[arch.name] = arch
    return arch


def unregister(name: str) -> None:
    """Remove a registered architecture (for tests that register a toy one)."""
    _REGISTRY.pop(name, None)


def architectures() -> tuple[Architecture, ...]:
    """Every registered architecture, in registration order."""
    return tuple(_REGISTRY.values())


def get_architecture(name: str) -> Architecture:
    """The architecture registered as ``name`` (the ``arch`` key of config.yaml)."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model architecture {name!r}; this version knows "
                          f"{', '.join(map(repr, _REGISTRY))}.")
    return _REGISTRY[name]


def architecture_of(config: Any) -> Architecture:
    """The architecture whose config class ``config`` is an instance of."""
    for arch in _REGISTRY.values():
        if type(config) is arch.config_class:
            return arch
    raise ConfigError(f"{type(config).__name__} is not the config of a registered architecture.")


def config_from_dict(d: Mapping[str, Any]) -> Any:
    """Rebuild any model config from its ``to_dict()`` (the ``model:`` section of config.yaml). A dict without
    ``arch`` is a GPT config (the first runs were written before there were other families)."""
    return get_architecture(d.get("arch", "gpt")).config_from_dict(d)


def build_model(config: Any, *, check_memory: bool = True) -> nn.Module:
    """A model with freshly initialised weights for ``config`` (any registered family). With ``check_memory``
    a config whose weights and buffers would not fit in the memory there is (a hand-edited ``block_size:
    1000000000000`` asks for terabytes) is refused first (:func:`check_model_fits`)."""
    if check_memory:
        check_model_fits(config)
    return architecture_of(config).build(config)


def _meta_sizes(config: Any) -> tuple[int, int]:
    """(parameters, bytes of parameters and buffers) of the model ``config`` describes, built on the meta
    device: shapes only, nothing allocated. Shared weights are counted once."""
    with torch.device("meta"):
        model = architecture_of(config).build(config)
    params = {id(p): p for p in model.parameters()}
    buffers = {id(b): b for b in model.buffers()}
    n_bytes = sum(t.numel() * t.element_size() for t in [*params.values(), *buffers.values()])
    return sum(p.numel() for p in params.values()), n_bytes


def _layer_fields(config: Any) -> tuple[str, ...]:
    """The fields of ``config`` that count repeated layers (the generic n_layer of its family)."""
    arch = architecture_of(config)
    names = {f.name for f in dataclasses.fields(config)}
    return tuple(n for n in arch.shape_names.get("n_layer", ("n_layer",)) if n in names)


def model_sizes(config: Any) -> tuple[int, int]:
    """(parameters, bytes of parameters and buffers as built) of the model ``config`` describes, without
    allocating it. A deep stack is counted from copies of the config with one and two layers (a layer adds the
    same every time), so even an absurd layer count is counted at once."""
    layers = {n: getattr(config, n) for n in _layer_fields(config)}
    if all(v <= 2 for v in layers.values()):
        return _meta_sizes(config)
    base_p, base_b = _meta_sizes(dataclasses.replace(config, **dict.fromkeys(layers, 1)))
    total_p, total_b = base_p, base_b
    for name, count in layers.items():
        p2, b2 = _meta_sizes(dataclasses.replace(config, **{**dict.fromkeys(layers, 1), name: 2}))
        total_p += (count - 1) * (p2 - base_p)
        total_b += (count - 1) * (b2 - base_b)
    return total_p, total_b


def check_model_fits(config: Any, device: str = "cpu") -> None:
    """Refuse (ConfigError) a config whose parameters and buffers need more bytes than ``device`` has free
    (zenlm.device.available_memory), before anything is allocated; the message names the config's largest
    sizes, which is where a damaged or hand-edited config goes wrong."""
    from zenlm.device import available_memory

    _, need = model_sizes(config)
    free = available_memory(device)
    if free is None or need <= free:
        return
    sizes = sorted(((getattr(config, f.name), f.name) for f in dataclasses.fields(config)
                    if isinstance(getattr(config, f.name), int) and not isinstance(getattr(config, f.name), bool)),
                   reverse=True)[:3]
    raise ConfigError(f"this {architecture_of(config).title} model needs {_human_bytes(need)} for its weights and "
                      f"buffers, more than the {_human_bytes(free)} of memory free on {device}; its largest sizes "
                      f"are {', '.join(f'{n}={v}' for v, n in sizes)}. Check the model's settings.")


def _human_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"  # pragma: no cover


def num_params(config: Any) -> int:
    """Parameters of the model ``config`` describes (shared weights counted once), counted on the meta device
    so nothing is allocated."""
    return model_sizes(config)[0]


def find_preset(name: str) -> tuple[Architecture, Preset]:
    """The architecture that owns preset ``name``, and the preset (preset names are unique)."""
    for arch in _REGISTRY.values():
        if name in arch.presets:
            return arch, arch.presets[name]
    known = "; ".join(f"{a.title}: {', '.join(a.presets)}" for a in _REGISTRY.values() if a.presets)
    raise ConfigError(f"unknown model preset {name!r}; choose one of ({known}).")


def preset_config(name: str, **overrides: Any) -> Any:
    """The config of preset ``name`` of whichever architecture owns it, with ``overrides`` on top."""
    return find_preset(name)[0].config(name, **overrides)


def list_presets(capability: str | None = None) -> dict[str, str]:
    """Preset names -> one-line descriptions, architecture by architecture in registration order; only the
    architectures with ``capability`` when one is given."""
    return {name: p.description for a in _REGISTRY.values() if capability is None or a.can(capability)
            for name, p in a.presets.items()}


__all__ = ["CAPABILITIES", "Architecture", "Capability", "Preset", "architecture_of", "architectures",
           "build_model", "check_model_fits", "config_from_dict", "find_preset", "get_architecture",
           "list_presets", "model_sizes", "num_params", "preset_config", "register", "unregister"]

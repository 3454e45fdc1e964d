"""The architecture registry: every family keeps the contract, presets are one table, and a new family plugs
in with one file and one registration (a toy bigram LM here) and is then loaded by zenlm.load by capability."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import zenlm
from zenlm.config import Preset, dataclass_from_dict
from zenlm.errors import ConfigError
from zenlm.models.registry import (
    CAPABILITIES,
    Architecture,
    architecture_of,
    architectures,
    build_model,
    config_from_dict,
    find_preset,
    get_architecture,
    list_presets,
    num_params,
    preset_config,
    register,
    unregister,
)
from zenlm.train.checkpoint import save_model


def test_the_built_in_families_and_what_they_can_do() -> None:
    assert [a.name for a in architectures()][:3] == ["gpt", "bert", "encdec"]
    can = {a.name: a.capabilities for a in architectures()}
    assert {"causal-lm", "generate"} <= can["gpt"] and "seq2seq" not in can["gpt"]
    assert {"masked-lm", "embed", "classify"} <= can["bert"] and "generate" not in can["bert"]
    assert {"seq2seq", "generate"} <= can["encdec"] and "classify" not in can["encdec"]
    for rung in ("ngram", "mlp", "rnn"):  # the ladder: causal LMs called with a state, no context window
        assert can[rung] == {"causal-lm", "stateful", "generate"}


@pytest.mark.parametrize("arch", architectures(), ids=lambda a: a.name)
def test_every_family_keeps_the_contract(arch: Architecture) -> None:
    assert arch.capabilities <= set(CAPABILITIES) and arch.presets and arch.default_preset in arch.presets
    for name in arch.presets:
        cfg = arch.config(name, vocab_size=300)
        d = cfg.to_dict()
        assert d["arch"] == arch.name and yaml.safe_load(yaml.safe_dump(d)) == d  # what config.yaml holds
        assert config_from_dict(d) == cfg and arch.config_from_dict(d) == cfg
        assert architecture_of(cfg) is arch and find_preset(name)[0] is arch
        assert cfg.vocab_size == 300
        if arch.can("classify") or arch.can("embed"):
            assert cfg.n_embd > 0 and cfg.block_size > 0  # what heads and encoders read
    with torch.device("meta"):
        model = build_model(arch.config())
    assert isinstance(model, nn.Module) and model.config == arch.config()
    assert num_params(arch.config()) == sum(p.numel() for p in model.parameters())


def test_presets_are_one_table_with_unique_names() -> None:
    everything = list_presets()
    assert len(everything) == sum(len(a.presets) for a in architectures())
    assert {"tiny", "demo", "bert-tiny", "minilm-l6", "encdec-tiny", "t5-small"} <= set(everything)
    assert set(list_presets("masked-lm")) == set(get_architecture("bert").presets)
    assert all(isinstance(p, Preset) for a in architectures() for p in a.presets.values())
    assert preset_config("bert-tiny", vocab_size=50, d_model=32).d_model == 32
    assert preset_config("encdec-tiny").n_enc_layer == 2
    with pytest.raises(ConfigError, match=r"unknown model preset 'nope'.*GPT: tiny.*encoder-decoder: encdec-tiny"):
        find_preset("nope")
    with pytest.raises(ConfigError, match="unknown BERT encoder preset 'tiny'"):
        get_architecture("bert").config("tiny")
    with pytest.raises(ConfigError, match="unknown model architecture 'transformer-xl'.*'gpt', 'bert', 'encdec', "
                                          "'vae', 'ngram', 'mlp', 'rnn'"):
        config_from_dict({"arch": "transformer-xl"})
    assert config_from_dict({"n_layer": 1, "n_head": 1, "n_embd": 8}).n_layer == 1  # no arch: a GPT


def test_generic_shape_settings_map_to_each_config() -> None:
    assert get_architecture("encdec").shape_overrides(n_layer=3, n_embd=None, dropout=0.1) == {
        "n_enc_layer": 3, "n_dec_layer": 3, "dropout": 0.1}
    assert get_architecture("bert").shape_overrides(n_embd=96, block_size=64) == {"d_model": 96, "max_len": 64}
    assert get_architecture("gpt").shape_overrides(n_embd=96, block_size=None) == {"n_embd": 96}


def test_registering_twice_or_reusing_a_preset_name_is_refused() -> None:
    gpt = get_architecture("gpt")
    with pytest.raises(ConfigError, match="already registered"):
        register(gpt)
    with pytest.raises(ConfigError, match=r"'tiny'\].*already used by 'gpt'"):
        register(dataclasses.replace(gpt, name="gpt-copy"))


# ------------------------------------------------------------------- a new family: one file, one registration
@dataclass
class BigramConfig:
    """A bigram language model: the next token's logits depend on the current token only."""

    vocab_size: int = 64
    block_size: int = 32

    def to_dict(self) -> dict[str, Any]:
        return {"arch": "toy-bigram", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BigramConfig:
        return dataclass_from_dict(cls, d)


class Bigram(nn.Module):
    """logits[b, t] = table[ids[b, t]]  ([B, T] -> [B, T, V])."""

    def __init__(self, config: BigramConfig) -> None:
        super().__init__()
        self.config = config
        self.table = nn.Embedding(config.vocab_size, config.vocab_size)

    def forward(self, ids_BT: torch.Tensor) -> torch.Tensor:
        return self.table(ids_BT)


def _bigram_api(run: Any) -> dict[str, Any]:
    return {"model": run.model, "arch": run.arch.name}


@pytest.fixture
def bigram_registered():
    arch = register(Architecture(
        name="toy-bigram", title="bigram", description="a table of next-token logits per token",
        config_class=BigramConfig, build=Bigram, capabilities=frozenset({"causal-lm"}),
        presets={"bigram-tiny": Preset("a 64-token table", dict(vocab_size=64))}, default_preset="bigram-tiny"))
    yield arch
    unregister("toy-bigram")


def _write_run(run: Path, model: nn.Module, tok_dir: Path) -> None:
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": model.config.to_dict()}), encoding="utf-8")
    save_model(model, run / "model.safetensors")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (run / name).write_bytes((tok_dir / name).read_bytes())


def test_a_new_family_plugs_in_with_one_registration(bigram_registered, char_tok, tmp_path: Path) -> None:
    arch = bigram_registered
    assert find_preset("bigram-tiny")[0] is arch and "bigram-tiny" in list_presets("causal-lm")
    cfg = arch.config(vocab_size=char_tok.vocab_size)
    torch.manual_seed(0)
    model = build_model(cfg)
    char_tok.save(tmp_path / "tok")
    _write_run(tmp_path / "run", model, tmp_path / "tok")

    lm = zenlm.load(tmp_path / "run", device="cpu")  # a causal LM loads as an LM
    assert isinstance(lm, zenlm.LM) and torch.equal(lm.model.table.weight, model.table.weight)
    text = "to be or not"
    ids = [char_tok.eos_id, *char_tok.encode(text)]
    nll = F.cross_entropy(model.table.weight[ids[:-1]], torch.tensor(ids[1:])).item()
    assert lm.perplexity(text) == pytest.approx(math.exp(nll), rel=1e-5)

    unregister("toy-bigram")  # a family can name its own user-facing object instead
    register(dataclasses.replace(arch, api=f"{__name__}:_bigram_api"))
    got = zenlm.load(tmp_path / "run", device="cpu")
    assert got["arch"] == "toy-bigram" and isinstance(got["model"], Bigram)

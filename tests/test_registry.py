"""Training recipes: the registry, overrides, and `zenlm pretrain --recipe` resolution."""

from __future__ import annotations

import pytest
import yaml

from zenlm.cli import main
from zenlm.errors import ConfigError
from zenlm.recipes.registry import RECIPES, recipe_settings
from zenlm.train.optim import OptimConfig


def test_every_recipe_builds_valid_configs() -> None:
    from zenlm.presets import get_preset

    for name in RECIPES:
        s = recipe_settings(name)
        OptimConfig(**s["optim"])
        get_preset(s["model"], vocab_size=65, **s["model_overrides"])


def test_classic_recipe_is_the_documented_one() -> None:
    s = recipe_settings("classic")
    assert (s["batch_size"], s["seq_len"], s["max_steps"], s["precision"], s["compile"]) == (12, 64, 2000, "fp32", False)
    o = s["optim"]
    assert (o["name"], o["lr"], o["min_lr"], o["warmup_steps"], o["weight_decay"], tuple(o["betas"])) == (
        "adamw", 1e-3, 1e-4, 100, 0.1, (0.9, 0.99))


def test_overrides_merge_and_do_not_leak() -> None:
    s = recipe_settings("fast", optim={"name": "adamw"}, batch_size=7)
    assert s["optim"]["name"] == "adamw" and s["optim"]["lr"] == RECIPES["fast"].optim["lr"]
    assert s["batch_size"] == 7
    assert recipe_settings("fast")["optim"]["name"] == "muon"  # the registry itself is untouched
    with pytest.raises(ConfigError, match="unknown recipe"):
        recipe_settings("turbo")
    with pytest.raises(ConfigError, match="unknown recipe setting"):
        recipe_settings("fast", batchsize=3)


def test_cli_flags_win_over_the_recipe(tmp_path, monkeypatch) -> None:
    import functools

    from zenlm.recipes.pretrain import pretrain

    seen = {}

    @functools.wraps(pretrain)  # the CLI reads its flags from the recipe's signature
    def fake_pretrain(data, out, **kw):
        seen.update(kw)
        raise ConfigError("stop here")

    monkeypatch.setattr("zenlm.recipes.pretrain.pretrain", fake_pretrain)
    assert main(["pretrain", "--data", "d", "--out", str(tmp_path / "r"), "--recipe", "classic",
                 "--lr", "5e-4", "--batch-size", "3"]) == 2
    assert seen["model"] == "classic-char" and seen["batch_size"] == 3 and seen["seq_len"] == 64
    assert seen["optim"].lr == 5e-4 and seen["optim"].name == "adamw" and seen["optim"].min_lr == 5e-5
    assert seen["train"].precision == "fp32" and seen["train"].max_steps == 2000
    assert main(["pretrain", "--data", "d", "--out", str(tmp_path / "r")]) == 2
    assert seen["model"] == "demo" and seen["optim"].name == "muon"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"recipe": "fast", "optimizer": "adamw"}))
    assert main(["pretrain", "--config", str(cfg), "--data", "d", "--out", str(tmp_path / "r")]) == 2
    assert seen["optim"].name == "adamw" and seen["batch_size"] == 32

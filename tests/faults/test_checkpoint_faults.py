"""Damaged checkpoints and failed writes: refused by name, never applied half-way, never left behind."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from zenlm.config import GPTConfig
from zenlm.errors import CheckpointError
from zenlm.models.gpt import GPT
from zenlm.recipes.pretrain import causal_lm_loss
from zenlm.train.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    load_model_weights,
    save_checkpoint,
    save_model,
)
from zenlm.train.optim import OptimConfig, build_optimizers

CFG = GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16)


def _trained(name: str = "adamw") -> tuple[GPT, list[torch.optim.Optimizer]]:
    torch.manual_seed(0)
    model = GPT(CFG)
    opts = build_optimizers(model, OptimConfig(name=name), "cpu")
    x = torch.randint(0, 20, (2, 9))
    loss = causal_lm_loss(model, (x[:, :-1], x[:, 1:]))[0]
    loss.backward()
    for o in opts:
        o.step()
    return model, opts


def _fresh(name: str = "adamw") -> tuple[GPT, list[torch.optim.Optimizer]]:
    torch.manual_seed(1)
    model = GPT(CFG)
    return model, build_optimizers(model, OptimConfig(name=name), "cpu")


def _snapshot(model: GPT) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _rewrite(path: Path, change) -> None:
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_a_misshaped_optimizer_tensor_is_refused_before_anything_changes(tmp_path: Path, name: str) -> None:
    """One row cut off exp_avg (header still valid) used to run the fused AdamW on mismatched buffers."""
    model, opts = _trained(name)
    path = save_checkpoint(tmp_path, 5, model, opts, {})
    key = "opt0.state.0.exp_avg" if name == "adamw" else "opt1.state.0.momentum_buffer"
    _rewrite(path / "optimizer.safetensors", lambda t: t.__setitem__(key, t[key][:-1].clone()))
    fresh, fresh_opts = _fresh(name)
    before = _snapshot(fresh)
    with pytest.raises(CheckpointError, match=rf"optimizer\.safetensors.*{key}"):
        load_checkpoint(path, fresh, fresh_opts)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())  # nothing applied
    assert all(not o.state for o in fresh_opts)


def test_a_missing_optimizer_key_and_foreign_dtypes_are_refused(tmp_path: Path) -> None:
    model, opts = _trained()
    path = save_checkpoint(tmp_path, 5, model, opts, {})
    _rewrite(path / "optimizer.safetensors", lambda t: t.pop("opt0.state.1.exp_avg"))
    with pytest.raises(CheckpointError, match=r"lacks \['exp_avg'\]"):
        load_checkpoint(path, *_fresh())
    path = save_checkpoint(tmp_path, 6, model, opts, {})
    _rewrite(path / "optimizer.safetensors",
             lambda t: t.__setitem__("opt0.state.0.exp_avg_sq", t["opt0.state.0.exp_avg_sq"].to(torch.int32)))
    with pytest.raises(CheckpointError, match="exp_avg_sq"):
        load_checkpoint(path, *_fresh())
    path = save_checkpoint(tmp_path, 7, model, opts, {})
    _rewrite(path / "optimizer.safetensors", lambda t: t.__setitem__("opt0.state.99.exp_avg", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="names no parameter"):
        load_checkpoint(path, *_fresh())


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda d: (d / "trainer.json").write_text("[1, 2]"), "must hold a JSON object"),
        (lambda d: (d / "trainer.json").write_text('{"step": "7", "optimizers": []}'), "'step' must be"),
        (lambda d: (d / "trainer.json").write_text('{"step": 7}'), "no 'optimizers'"),
        (lambda d: (d / "trainer.json").write_bytes(b"\xff\xfe{"), "not valid JSON"),
        (lambda d: (d / "trainer.json").write_text(json.dumps({**json.loads((d / "trainer.json").read_text()),
                                                              "elapsed_s": "soon"})), "'elapsed_s' must be"),
        (lambda d: save_file({"cpu": torch.zeros(3, dtype=torch.uint8)}, str(d / "rng.safetensors")),
         "rng.safetensors"),
        (lambda d: save_file({"gpu": torch.zeros(3)}, str(d / "rng.safetensors")), "rng.safetensors"),
        (lambda d: (d / "rng.safetensors").write_bytes(b"junk"), "rng.safetensors"),
        (lambda d: (d / "optimizer.safetensors").unlink(), "optimizer.safetensors is missing"),
    ],
)
def test_damaged_checkpoint_files_are_named(tmp_path: Path, damage, match: str) -> None:
    model, opts = _trained()
    path = save_checkpoint(tmp_path, 3, model, opts, {"elapsed_s": 1.0})
    damage(path)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path, *_fresh())


def test_weights_of_the_wrong_dtype_or_with_nan_are_refused(tmp_path: Path) -> None:
    model, _ = _trained()
    good = tmp_path / "m.safetensors"
    save_model(model, good)
    for change, match in [
        (lambda t: t.__setitem__("norm_f.weight", torch.ones_like(t["norm_f.weight"], dtype=torch.bool)), "bool"),
        (lambda t: t.__setitem__("tok_emb.weight", t["tok_emb.weight"].to(torch.int64)), "int64"),
        (lambda t: t["blocks.0.attn.qkv.weight"].__setitem__((0, 0), float("nan")), "NaN or Inf"),
        (lambda t: t["norm_f.weight"].__setitem__(0, float("inf")), "NaN or Inf"),
    ]:
        bad = tmp_path / "bad.safetensors"
        tensors = load_file(str(good))
        change(tensors)
        save_file(tensors, str(bad))
        fresh, _ = _fresh()
        before = _snapshot(fresh)
        with pytest.raises(CheckpointError, match=match):
            load_model_weights(fresh, bad)
        assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
    fresh, _ = _fresh()
    load_model_weights(fresh, good)  # the good file still loads, bf16 copies too
    half = tmp_path / "half.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(good)).items()}, str(half))
    load_model_weights(fresh, half)


def test_resume_falls_back_past_a_damaged_newest_checkpoint(tmp_path: Path) -> None:
    model, opts = _trained()
    save_checkpoint(tmp_path, 4, model, opts, {"elapsed_s": 1.0})
    newest = save_checkpoint(tmp_path, 8, model, opts, {"elapsed_s": 2.0})
    (newest / "model.safetensors").write_bytes(b"\x00" * 10)
    warnings: list[str] = []
    where, state = load_latest_checkpoint(tmp_path, *_fresh(), warn=warnings.append)
    assert where.name == "step-000004" and state["step"] == 4
    assert len(warnings) == 1 and "step-000008" in warnings[0] and "falling back to step-000004" in warnings[0]
    # when every checkpoint is damaged, the newest one's problem is the error
    (tmp_path / "step-000004" / "trainer.json").write_text("{")
    with pytest.raises(CheckpointError, match="step-000008"):
        load_latest_checkpoint(tmp_path, *_fresh())


def test_a_full_disk_cleans_up_and_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, opts = _trained()
    save_checkpoint(tmp_path, 1, model, opts, {})
    import safetensors.torch

    real_save = safetensors.torch.save_file

    def full_disk(tensors, filename, metadata=None):
        if filename.endswith("optimizer.safetensors"):
            Path(filename).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(CheckpointError, match=r"no space left on device while writing .*optimizer\.safetensors"):
        save_checkpoint(tmp_path, 2, model, opts, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001"]  # no partial copy left behind
    def always_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", always_full)
    with pytest.raises(CheckpointError, match=r"no space left on device while writing .*w\.safetensors"):
        save_model(model, tmp_path / "w.safetensors")
    assert not list(tmp_path.glob("*w.safetensors*"))
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    assert save_checkpoint(tmp_path, 2, model, opts, {}).name == "step-000002"  # space again: saving works


def test_partial_checkpoints_of_dead_processes_are_removed(tmp_path: Path) -> None:
    model, opts = _trained()
    dead = tmp_path / ".step-000003.tmp-999999999"  # no such process
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"x" * 100)
    alive = tmp_path / f".step-000003.tmp-{os.getppid()}"  # a live process (our parent) is writing this one
    alive.mkdir()
    save_checkpoint(tmp_path, 4, model, opts, {})
    assert not dead.exists() and alive.exists()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000004"]


def test_weights_get_the_permissions_of_the_runs_other_files(tmp_path: Path) -> None:
    model, _ = _trained()
    save_model(model, tmp_path / "model.safetensors")
    (tmp_path / "config.yaml").write_text("x")
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == (tmp_path / "config.yaml").stat().st_mode & 0o777
    opts = build_optimizers(model, OptimConfig(), "cpu")
    step = save_checkpoint(tmp_path / "checkpoints", 1, model, opts, {})
    assert {f.stat().st_mode & 0o777 for f in step.iterdir()} == {(tmp_path / "config.yaml").stat().st_mode & 0o777}


def test_sigterm_saves_at_once_without_a_validation_pass(tmp_path: Path) -> None:
    """A signal used to run a full validation pass before saving (247 s seen): managers kill long before."""
    import signal

    from zenlm.train.loop import TrainConfig, fit

    model, _ = _fresh()
    x = torch.randint(0, 20, (2, 9))
    evaluations: list[int] = []

    def get_batch(step: int, micro: int):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # as a service manager would
        return x[:, :-1], x[:, 1:]

    def evaluate(m) -> dict[str, float]:
        evaluations.append(1)
        return {"val_loss": 1.0}

    res = fit(model, get_batch, causal_lm_loss, tmp_path,
              TrainConfig(max_steps=100, eval_every=0, ckpt_every=0, device="cpu", tensorboard=False),
              OptimConfig(warmup_steps=0), evaluate=evaluate)
    assert res.stopped_by == "signal" and res.step == 4
    assert evaluations == []
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-000004"]
    assert (tmp_path / "model.safetensors").is_file()

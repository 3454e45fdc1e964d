"""Truncated BPTT on zenlm's training loop: consecutive windows, the carried state, exact resume, evaluation and
the losses of the MLP and LSTM rungs falling (the library pieces; tests/test_ladder_cli.py runs the rungs
through `zenlm pretrain`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from zenlm.data.batches import eval_batches
from zenlm.data.shards import TokenShards
from zenlm.data.streams import StreamBatches
from zenlm.errors import ConfigError, DataError
from zenlm.models.rnn import MLPLM, RNNLM, MLPLMConfig, RNNLMConfig
from zenlm.recipes.ladder import (
    StateCarrier,
    eval_targets,
    evaluate_stateful_lm,
    save_lm_weights,
    stream_task,
    tbptt_loss,
)
from zenlm.train.loop import TrainConfig, fit
from zenlm.train.optim import OptimConfig


class ArrayShards:
    """The part of TokenShards a batch source uses, over an in-memory array."""

    split = "train"

    def __init__(self, ids: np.ndarray) -> None:
        self.ids = ids.astype(np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def window(self, start: int, length: int) -> np.ndarray:
        assert 0 <= start and start + length <= len(self.ids)
        return self.ids[start:start + length].copy()


def test_windows_are_consecutive_within_each_stream() -> None:
    ids = np.arange(1000)  # the id is its own position: windows show where they come from
    b = StreamBatches(ArrayShards(ids), batch_size=4, seq_len=10, grad_accum=3, seed=7)
    assert b.stream_len == 249 and b.windows_per_epoch == (249 - 10 + 1) // 10 == 24
    prev_y = None
    for w in range(b.windows_per_epoch):
        x, reset, y = b.get(*divmod(w, 3))
        assert reset == (w == 0)
        assert torch.equal(y, x + 1)  # targets are the next ids
        assert torch.equal(x[:, 0], torch.arange(4) * 249 + 10 * w)  # stream b starts at b * L
        if prev_y is not None:
            assert torch.equal(x[:, 0], prev_y[:, -1])  # window t continues window t - 1
        prev_y = y
    assert int(prev_y.max()) <= 999
    # the next epoch starts afresh, at a seeded offset within the first window, and the same again when asked
    x, reset, _ = b.get(*divmod(b.windows_per_epoch, 3))
    off = b.epoch_offset(1)
    assert reset and 0 <= off < 10 and torch.equal(x[:, 0], torch.arange(4) * 249 + off)
    assert all(torch.equal(p, q) for p, q in zip(b.get(9, 2)[::2], b.get(9, 2)[::2], strict=True))
    last = b.windows_per_epoch * 5 - 1  # the last window of any epoch stays inside its stream
    x, _, y = b.get(*divmod(last, 3))
    assert (y[:, -1] <= torch.arange(1, 5) * 249).all()


def test_stream_batches_refuse_bad_settings() -> None:
    with pytest.raises(DataError, match="too few"):
        StreamBatches(ArrayShards(np.arange(50)), batch_size=4, seq_len=10)
    with pytest.raises(ConfigError, match="seq_len"):
        StreamBatches(ArrayShards(np.arange(50)), batch_size=1, seq_len=0)
    with pytest.raises(IndexError):
        StreamBatches(ArrayShards(np.arange(50)), batch_size=1, seq_len=5, grad_accum=2).get(0, 2)


@pytest.mark.parametrize("make", [
    lambda: RNNLM(RNNLMConfig(vocab_size=50, n_embd=8, n_hidden=12, n_layer=2)),
    lambda: MLPLM(MLPLMConfig(vocab_size=50, context=3, n_embd=4, n_hidden=8)),
])
def test_the_carried_state_makes_windows_equal_one_long_pass(make) -> None:
    torch.manual_seed(0)
    lm = make().eval()
    carrier = StateCarrier(lm, batch_size=2)
    ids = torch.randint(0, 50, (2, 30))
    whole, _ = lm(ids)
    pieces = [carrier(ids[:, i:i + 10], reset=(i == 0)) for i in range(0, 30, 10)]
    torch.testing.assert_close(torch.cat(pieces, 1), whole)
    torch.testing.assert_close(carrier(ids[:, :10], reset=True), whole[:, :10])  # reset: from the start state
    assert {k for k in carrier.state_dict() if k.startswith("carry_")} == {f"carry_{i}" for i in
                                                                          range(carrier.n_state)}


def _fit(lm: torch.nn.Module, shards, run_dir: Path, steps: int, *, batch_size: int = 4, seq_len: int = 8,
         grad_accum: int = 1, lr: float = 3e-3, resume: bool = False, decay_steps: int | None = None,
         ckpt_every: int = 0) -> tuple[StateCarrier, list[float]]:
    carrier = StateCarrier(lm, batch_size)
    run_dir.mkdir(exist_ok=True)
    cfg = TrainConfig(max_steps=steps, decay_steps=decay_steps, grad_accum=grad_accum, eval_every=0, log_every=1,
                      ckpt_every=ckpt_every, device="cpu", precision="fp32", tensorboard=False, seed=0)
    optim = OptimConfig(name="adamw", lr=lr, min_lr=lr / 10, warmup_steps=2, weight_decay=0.0)
    get_batch = stream_task(shards, batch_size, seq_len, grad_accum=grad_accum, seed=1)
    fit(carrier, get_batch, tbptt_loss, run_dir, cfg, optim, resume=resume)
    lines = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return carrier, [r["train_loss"] for r in lines if "train_loss" in r]


def test_resume_is_exact_with_the_carried_state(tmp_path: Path) -> None:
    ids = np.random.default_rng(0).integers(0, 30, size=230)
    shards = ArrayShards(ids)  # 2 streams x 114 ids, 13 windows per epoch: 7 steps x 2 micro cross an epoch

    def lm() -> RNNLM:
        torch.manual_seed(0)
        return RNNLM(RNNLMConfig(vocab_size=30, n_embd=8, n_hidden=8, n_layer=2, dropout=0.3))

    whole, losses = _fit(lm(), shards, tmp_path / "a", 7, batch_size=2, grad_accum=2)
    _fit(lm(), shards, tmp_path / "b", 4, batch_size=2, grad_accum=2, decay_steps=7)
    resumed, resumed_losses = _fit(lm(), shards, tmp_path / "b", 7, batch_size=2, grad_accum=2, resume=True)
    assert len(losses) == 7 and resumed_losses == losses
    for name, t in whole.state_dict().items():  # weights and the carried state alike
        assert torch.equal(t, resumed.state_dict()[name]), name
    saved = load_file(str(tmp_path / "b" / "checkpoints" / "step-000004" / "model.safetensors"))
    assert "carry_0" in saved and "carry_1" in saved  # the checkpoint holds (h, c)
    save_lm_weights(resumed, tmp_path / "lm.safetensors")
    assert set(load_file(str(tmp_path / "lm.safetensors"))) == set(resumed.lm.state_dict())


@pytest.mark.parametrize("name, make, lr", [
    ("mlp", lambda v: MLPLM(MLPLMConfig(vocab_size=v, context=4, n_embd=8, n_hidden=64)), 1e-2),
    ("lstm", lambda v: RNNLM(RNNLMConfig(vocab_size=v, n_embd=32, n_hidden=32, n_layer=1)), 1e-2),
])
def test_loss_falls_with_truncated_bptt(char_data: Path, tmp_path: Path, name: str, make, lr: float) -> None:
    train = TokenShards.open(char_data, "train")
    vocab = int(train.index["vocab_size"])
    torch.manual_seed(0)
    carrier, losses = _fit(make(vocab), train, tmp_path / name, 40, batch_size=8, seq_len=32, lr=lr)
    assert losses[0] == pytest.approx(np.log(vocab), rel=0.15)  # starts near uniform
    assert np.mean(losses[-5:]) < losses[0] - 1.0, losses


def test_stateful_evaluation_scores_the_same_tokens_as_the_gpt_evaluation(char_data: Path) -> None:
    val = TokenShards.open(char_data, "val")
    for seq_len, max_tokens in ((64, 1000), (50, None)):
        scored = sum(y.numel() for _, y in eval_batches(val, 8, seq_len, max_tokens))
        assert eval_targets(val, seq_len, max_tokens) == scored
    torch.manual_seed(0)
    lm = RNNLM(RNNLMConfig(vocab_size=int(val.index["vocab_size"]), n_embd=8, n_hidden=8, n_layer=1)).eval()
    r = evaluate_stateful_lm(lm, val, 3, 64, 1000, bytes_per_token=2.0)
    # by hand: three streams of the 960 targets (the last padded), each read whole with its state
    ids = torch.from_numpy(val.window(0, 961))
    total = 0.0
    for b in range(3):
        x, y = ids[b * 320:(b + 1) * 320], ids[b * 320 + 1:(b + 1) * 320 + 1]
        total += torch.nn.functional.cross_entropy(lm(x[None])[0][0], y, reduction="sum").item()
    assert r["val_loss"] == pytest.approx(total / 960, rel=1e-5)
    assert r["val_bpb"] == pytest.approx(r["val_loss"] / np.log(2) / 2.0)
    carrier = StateCarrier(lm, 2)
    carrier.carry_0.fill_(1.0)
    assert evaluate_stateful_lm(carrier, val, 3, 64, 1000, 2.0) == pytest.approx(r)  # the carry is left alone
    assert carrier.carry_0.eq(1.0).all()

"""The pieces around the training step: the run clock, the best-weights tracker, the metrics log, and the
rule that fit() changes no process-wide setting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zenlm.config import GPTConfig
from zenlm.errors import ConfigError
from zenlm.models.gpt import GPT
from zenlm.recipes.pretrain import causal_lm_loss
from zenlm.train.best import BEST_FILE, BestWeights, best_step_of
from zenlm.train.checkpoint import save_model
from zenlm.train.clock import RunClock
from zenlm.train.loop import TrainConfig, apply_process_settings, fit
from zenlm.train.metrics import MetricsLog
from zenlm.train.optim import OptimConfig


class FakeTime:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_clock_budgets_progress_and_times() -> None:
    now = FakeTime()
    clock = RunClock(max_steps=100, decay_steps=50, max_seconds=None, elapsed_before=7.0, train_before=5.0, now=now)
    now.t += 10
    assert clock.schedule_progress(25) == 0.5 and clock.done_fraction(25) == 0.25 and not clock.out_of_time()
    assert clock.elapsed() == 17.0
    clock.add_eval_time(3.0)
    assert clock.train_s() == 5.0 + 10 - 3
    assert clock.tokens_per_s(2000, now.t) == 200.0
    clock.mark(2000)
    now.t += 4
    assert clock.tokens_per_s(2400, now.t) == 100.0

    timed = RunClock(max_steps=100, decay_steps=100, max_seconds=20.0, now=now)
    now.t += 15  # the time budget runs out before the step budget: the schedule follows the time
    assert timed.schedule_progress(10) == 0.75 and timed.done_fraction(10) == 0.75 and not timed.out_of_time()
    now.t += 10
    assert timed.out_of_time() and timed.done_fraction(10) == 1.0 and timed.schedule_progress(10) == 1.25


def test_best_weights_keep_the_best_and_count_patience(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    best = BestWeights(model, tmp_path, "val_f1", patience=2)
    assert best.state() is None
    assert best.update(1, {"val_f1": 0.5}) is False
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    assert best.update(2, {"val_f1": 0.4}) is False  # worse: one bad evaluation
    assert best.update(3, {"val_f1": 0.5}) is True   # not better either: patience 2 has run out
    assert best.state() == {"value": 0.5, "step": 1, "val": {"val_f1": 0.5}, "bad": 2, "metric": "val_f1"}
    assert best_step_of(tmp_path / BEST_FILE) == 1
    with pytest.raises(ConfigError, match="val_acc"):
        BestWeights(model, tmp_path, "val_acc").update(4, {"val_f1": 1.0})
    assert best.finish() and not (tmp_path / BEST_FILE).exists()
    assert all(torch.equal(load_file(tmp_path / "model.safetensors")[k], v) for k, v in kept.items())
    assert BestWeights(model, tmp_path, None).update(5, {}) is False  # no metric: nothing is tracked


def test_best_weights_resume_from_the_file_that_holds_them(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    record = {"value": 0.9, "step": 4, "val": {"val_f1": 0.9}, "bad": 1, "metric": "val_f1"}
    save_model(model, tmp_path / "model.safetensors", metadata={"format": "pt", "best_step": "4"})
    resumed = BestWeights(model, tmp_path, "val_f1", resumed=record)  # moved to model.safetensors at the end
    assert (resumed.value, resumed.step, resumed.bad) == (0.9, 4, 1) and best_step_of(tmp_path / BEST_FILE) == 4
    other = BestWeights(model, tmp_path, "val_acc", resumed=record)  # another metric: start afresh
    assert other.step is None
    (tmp_path / BEST_FILE).unlink()
    save_model(model, tmp_path / "model.safetensors")  # weights that are not the best ones
    assert BestWeights(model, tmp_path, "val_f1", resumed=record).step is None


def test_metrics_log_new_run_and_resume(tmp_path: Path) -> None:
    with MetricsLog(tmp_path, None, tensorboard=False) as log:
        for s in (1, 2, 3):
            log.write({"step": s, "train_loss": 1.0 / s})
    path = tmp_path / "metrics.jsonl"
    path.write_text(path.read_text() + '{"step": 4, "train_lo')  # a line cut short by a crash
    with MetricsLog(tmp_path, 2, tensorboard=False) as log:  # resume from step 2: lines after it go
        log.write({"step": 3, "train_loss": 0.25})
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3]
    MetricsLog(tmp_path, None, tensorboard=False).close()  # a new run starts an empty file
    assert path.read_text() == ""


def test_fit_changes_no_process_wide_setting(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16))
    x = torch.randint(0, 20, (2, 9))
    threads = torch.get_num_threads()
    other = 1 if threads != 1 else 2
    cfg = TrainConfig(max_steps=2, eval_every=0, ckpt_every=0, device="cpu", precision="fp32", tensorboard=False,
                      threads=other)
    fit(model, lambda s, m: (x[:, :-1], x[:, 1:]), causal_lm_loss, tmp_path, cfg, OptimConfig(warmup_steps=0))
    assert torch.get_num_threads() == threads
    try:
        apply_process_settings(cfg)  # what the entry points call
        assert torch.get_num_threads() == other
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ the schedule
def test_warm_up_and_decay_count_the_same_budget() -> None:
    """Issue 14.7: warm-up counted steps while decay counted seconds. Under a time budget warm-up now also ends
    when its share of the time is used; under a step budget nothing changes."""
    from zenlm.train.optim import lr_factor, warmup_share

    cfg = OptimConfig(lr=5e-4, min_lr=0.0, warmup_steps=100, schedule="linear")
    for step in range(0, 150, 7):  # a step budget: the same factors as steps alone, bit for bit
        assert lr_factor(cfg, step, step / 2000, 100 / 2000) == lr_factor(cfg, step, step / 2000)
    assert lr_factor(cfg, 99, 99 / 2000, 100 / 2000) == 1.0  # the last warm-up step is at the peak
    # slow steps under a time budget: a tenth of the time is gone at step 2, so warm-up is over
    share = warmup_share(100, 2000)
    assert share == 0.1 and lr_factor(cfg, 2, 0.10, share) == pytest.approx(0.9)
    assert lr_factor(cfg, 2, 0.10) == pytest.approx(0.03)  # counted in steps only: still deep in warm-up
    assert lr_factor(cfg, 0, 0.0, share) == pytest.approx(0.01)  # the first step still starts low
    # fast steps under a nominal step budget (the demo: 1,000,000 steps, 300 s): warm-up keeps its 50 steps
    demo = OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=50)
    share = warmup_share(50, 1_000_000)
    assert lr_factor(demo, 9, 9 * 0.1 / 300, share) == pytest.approx(10 / 50)
    assert lr_factor(demo, 49, 49 * 0.1 / 300, share) == 1.0


def test_a_short_time_budget_warms_up_then_decays_over_the_time(tmp_path: Path, monkeypatch) -> None:
    """A run that gets ten steps from a 90-second budget (9 s a step) with 100 warm-up steps used to stay in
    warm-up the whole run; now it reaches the peak after the first step and decays to min_lr by the end."""
    import zenlm.train.loop as loop

    clock = FakeTime()

    class SlowSteps(RunClock):  # every step takes 9 s of the budget
        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, **kw, now=clock)

    monkeypatch.setattr(loop, "RunClock", SlowSteps)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16))

    def get_batch(step: int, micro: int):
        clock.t += 9.0 if micro == 0 else 0.0
        x = torch.randint(0, 20, (2, 9), generator=torch.Generator().manual_seed(step))
        return x[:, :-1], x[:, 1:]

    cfg = TrainConfig(max_steps=2000, max_seconds=90.0, log_every=1, eval_every=0, ckpt_every=0, device="cpu",
                      precision="fp32", tensorboard=False)
    optim = OptimConfig(name="adamw", lr=5e-4, min_lr=0.0, warmup_steps=100, schedule="linear")
    res = fit(model, get_batch, causal_lm_loss, tmp_path, cfg, optim)
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    assert res.stopped_by == "max_seconds" and len(lrs) == 10
    assert lrs[0] == pytest.approx(5e-6)  # step 0: (0 + 1) / 100 of the peak
    assert lrs[1] == pytest.approx(5e-4 * 0.9)  # warm-up over (5% of the time), then linear in the time
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:], strict=False))  # down with the time
    assert lrs[-1] == pytest.approx(5e-4 * 0.1)


def test_a_run_that_ends_inside_its_warm_up_says_so(tmp_path: Path) -> None:
    messages = []
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16))

    def get_batch(step: int, micro: int):
        x = torch.randint(0, 20, (2, 9))
        return x[:, :-1], x[:, 1:]

    fit(model, get_batch, causal_lm_loss, tmp_path, TrainConfig(max_steps=3, eval_every=0, device="cpu",
                                                                 precision="fp32", tensorboard=False),
        OptimConfig(warmup_steps=10), progress=lambda p: messages.append(p.message or ""))
    assert any("ends inside its learning-rate warm-up (warmup_steps 10 >= max_steps 3)" in m for m in messages)

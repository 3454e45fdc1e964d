"""One optimiser step (zenlm.train.step): k micro-batches give the gradient of one batch of the same rows."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from torch import nn

from zenlm.config import GPTConfig
from zenlm.data.batches import IGNORE_INDEX
from zenlm.errors import ConfigError, TrainingError
from zenlm.models.bert import Bert, BertConfig
from zenlm.models.encdec import EncDecConfig, EncoderDecoder
from zenlm.models.gpt import GPT
from zenlm.recipes.finetune_seq2seq import prompt_completion_loss, seq2seq_loss
from zenlm.recipes.pretrain import (
    causal_lm_loss,
    causal_lm_targets,
    masked_lm_loss,
    masked_lm_targets,
    mlm_targets,
)
from zenlm.train.step import LossOutput, TrainStep, count_labels

V = 40


def grad_of(p: torch.Tensor) -> torch.Tensor:
    return p.grad.clone() if p.grad is not None else torch.zeros_like(p)  # e.g. BERT's pooler in MLM


class GradCapture(torch.optim.Optimizer):
    """An 'optimiser' that keeps a copy of the gradients it is asked to apply and leaves the weights alone."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, {})
        self.grads: list[torch.Tensor] = []

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        self.grads = [grad_of(p) for g in self.param_groups for p in g["params"]]


def step_grads(model: nn.Module, loss_fn: Callable, batches: Sequence, count: Callable = count_labels,
               **kw: Any) -> list[torch.Tensor]:
    """The gradients one TrainStep over ``batches`` applies."""
    cap = GradCapture(model.parameters())
    TrainStep(model, loss_fn, [cap], count_targets=count, **kw)(batches, 1)
    return cap.grads


def mean_of_means_grads(model: nn.Module, loss_fn: Callable, batches: Sequence) -> list[torch.Tensor]:
    """What averaging each micro-batch's mean loss gives (the rule this step replaced)."""
    model.zero_grad()
    for b in batches:
        out = loss_fn(model, b)
        (out.loss_sum / out.n_targets / len(batches)).backward()
    grads = [grad_of(p) for p in model.parameters()]
    model.zero_grad()
    return grads


def rows(batch: tuple[torch.Tensor, ...], parts: Sequence[slice]) -> list[tuple[torch.Tensor, ...]]:
    """Split a batch of row-aligned tensors into micro-batches of the given rows."""
    return [tuple(t[s] for t in batch) for s in parts]


UNEVEN = [slice(0, 1), slice(1, 4), slice(4, 6)]  # micro-batches of 1, 3 and 2 rows


def masked_labels(gen: torch.Generator, n_rows: int, length: int) -> torch.Tensor:
    """Labels [n_rows, length] with a different number of IGNORE_INDEX positions in every row."""
    labels = torch.randint(3, V, (n_rows, length), generator=gen)
    for r in range(n_rows):
        labels[r, : 1 + (r * 5) % (length - 1)] = IGNORE_INDEX  # the prompt part of the row, no target
    return labels


def _causal() -> tuple[nn.Module, Callable, tuple, list, Callable]:
    model = GPT(GPTConfig(vocab_size=V, block_size=16, n_layer=1, n_head=2, n_embd=16))
    x = torch.randint(0, V, (6, 13), generator=torch.Generator().manual_seed(1))
    batch = (x[:, :-1], x[:, 1:])
    return model, causal_lm_loss, batch, rows(batch, UNEVEN), causal_lm_targets


def _mlm() -> tuple[nn.Module, Callable, tuple, list, Callable]:
    model = Bert(BertConfig(vocab_size=V, d_model=16, n_layer=1, n_head=2, d_ff=32, max_len=16, dropout=0.0))
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(5, V, (6, 12), generator=gen)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for r in range(6):  # 1, 2, ... 6 masked positions: the micro-batches hold very different counts
        pos = torch.randperm(12, generator=gen)[: r + 1]
        labels[r, pos] = ids[r, pos]

    def mlm_batch(ids_BT: torch.Tensor, labels_BT: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (ids_BT, *mlm_targets(labels_BT))

    micro = [mlm_batch(ids[s], labels[s]) for s in UNEVEN]
    return model, masked_lm_loss, mlm_batch(ids, labels), micro, masked_lm_targets


def _prompt_completion() -> tuple[nn.Module, Callable, tuple, list, Callable]:
    model = GPT(GPTConfig(vocab_size=V, block_size=16, n_layer=1, n_head=2, n_embd=16))
    gen = torch.Generator().manual_seed(3)
    batch = (torch.randint(0, V, (6, 12), generator=gen), masked_labels(gen, 6, 12))
    loss = functools.partial(prompt_completion_loss, label_smoothing=0.1)
    return model, loss, batch, rows(batch, UNEVEN), count_labels


def _seq2seq() -> tuple[nn.Module, Callable, tuple, list, Callable]:
    model = EncoderDecoder(EncDecConfig(vocab_size=V, max_source_len=16, max_target_len=16, n_enc_layer=1,
                                        n_dec_layer=1, n_head=2, n_embd=16))
    gen = torch.Generator().manual_seed(4)
    src = torch.randint(3, V, (6, 9), generator=gen)
    src_mask = torch.ones_like(src, dtype=torch.bool)
    src_mask[::2, 6:] = False
    labels = masked_labels(gen, 6, 8).flip(1)  # padding at the end of the targets, as collate_seq2seq makes it
    tgt_in = torch.randint(3, V, (6, 8), generator=gen)
    batch = (src, src_mask, tgt_in, labels)
    loss = functools.partial(seq2seq_loss, label_smoothing=0.1)
    return model, loss, batch, rows(batch, UNEVEN), count_labels


OBJECTIVES = {"causal-lm": _causal, "mlm": _mlm, "prompt-completion": _prompt_completion, "seq2seq": _seq2seq}


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_micro_batches_give_the_gradient_of_one_batch(objective: str) -> None:
    torch.manual_seed(0)
    model, loss_fn, whole, micro, count = OBJECTIVES[objective]()
    assert len({count(b) for b in micro}) > 1 or objective == "causal-lm"  # the micro-batches differ in targets
    one = step_grads(model, loss_fn, [whole], count)
    accumulated = step_grads(model, loss_fn, micro, count)
    for g1, gk in zip(one, accumulated, strict=True):
        torch.testing.assert_close(gk, g1)
    if objective != "causal-lm":  # every causal-LM row has the same number of targets; masked ones do not
        old = mean_of_means_grads(model, loss_fn, micro)
        assert not all(torch.allclose(g_old, g1, rtol=1e-3, atol=1e-6) for g_old, g1 in zip(old, one, strict=True))


def test_the_step_loss_is_the_mean_per_target_and_the_counts_add_up() -> None:
    torch.manual_seed(0)
    model, loss_fn, whole, micro, count = _mlm()
    cap = GradCapture(model.parameters())
    step = TrainStep(model, loss_fn, [cap], count_targets=count)
    out = step(micro, 1)
    expected = loss_fn(model, whole)
    assert out.n_targets == expected.n_targets == sum(range(1, 7))
    assert out.n_tokens == expected.n_tokens == 6 * 12
    assert out.loss == pytest.approx(expected.loss_sum.item() / expected.n_targets, rel=1e-5)


def test_the_denominator_is_one_replaceable_function() -> None:
    """A distributed run divides by its global count: the gradient scales with 1 / denominator."""
    torch.manual_seed(0)
    model, loss_fn, whole, _, count = _causal()
    local = step_grads(model, loss_fn, [whole], count)
    n = count(whole)
    halved = step_grads(model, loss_fn, [whole], count, denominator=lambda n_local: 2 * n_local)
    assert n == 6 * 12
    for g, h in zip(local, halved, strict=True):
        torch.testing.assert_close(h, g / 2)


def test_a_step_without_targets_changes_nothing() -> None:
    model, loss_fn, _, _, _ = _prompt_completion()
    x = torch.randint(0, V, (2, 8))
    out = TrainStep(model, loss_fn, [GradCapture(model.parameters())])([(x, torch.full_like(x, IGNORE_INDEX))], 1)
    assert out.loss == 0.0 and out.n_targets == 0  # not NaN: the divisor is at least 1


def test_a_count_that_disagrees_with_the_loss_is_refused() -> None:
    model, loss_fn, whole, _, _ = _prompt_completion()
    step = TrainStep(model, loss_fn, [GradCapture(model.parameters())], count_targets=lambda b: b[1].numel())
    with pytest.raises(ConfigError, match="count_targets"):
        step([whole], 1)


def test_non_finite_loss_stops_before_the_update_and_clipping_bounds_it() -> None:
    torch.manual_seed(0)
    model, _, whole, _, count = _causal()

    def nan_loss(m: nn.Module, batch: Any) -> LossOutput:
        out = causal_lm_loss(m, batch)
        return out._replace(loss_sum=out.loss_sum * float("nan"))

    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TrainingError, match="at step 7"):
        TrainStep(model, nan_loss, [opt], count_targets=count, grad_clip=1.0)([whole], 7)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))

    # clipping bounds the update: SGD moves the weights by lr times the clipped gradient
    opt.zero_grad()  # the failed step left its gradients (the run stops there)
    out = TrainStep(model, causal_lm_loss, [opt], count_targets=count, grad_clip=1e-3)([whole], 1)
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)])
    assert out.loss > 0 and moved.norm().item() == pytest.approx(0.1 * 1e-3, rel=1e-3)

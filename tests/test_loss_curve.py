"""A pinned loss curve: 20 optimiser steps of a tiny GPT on fixed data must reproduce recorded losses.

Like llm.c's ``test_gpt2``: any change to the model, the loss, the optimiser, the schedule or the training
step that changes the numbers fails here, even when every other test (which only asks the loss to fall)
passes. Two paths are pinned: AdamW on a GPT-2-style model (learned positions, LayerNorm, GELU, tied head)
and Muon + AdamW on a Llama-style one (rotary, RMSNorm, SwiGLU, qk-norm, separate head).

The data is built here from a fixed text, so nothing is read from disk. If a change is *meant* to move
the numbers, print the new curve with ``python tests/test_loss_curve.py`` and replace the lists below,
saying in the commit why they moved.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from zenlm.config import GPTConfig
from zenlm.models.gpt import GPT
from zenlm.recipes.pretrain import causal_lm_loss
from zenlm.train.loop import TrainConfig, fit
from zenlm.train.optim import OptimConfig

TEXT = (
    "Now is the winter of our discontent made glorious summer by this sun of York; and all the clouds "
    "that lour'd upon our house in the deep bosom of the ocean buried. Now are our brows bound with "
    "victorious wreaths; our bruised arms hung up for monuments; our stern alarums changed to merry "
    "meetings, our dreadful marches to delightful measures.\n"
)
STEPS, ROWS, SEQ = 20, 8, 32
VOCAB = sorted(set(TEXT))
IDS = torch.tensor([VOCAB.index(c) for c in TEXT])

MODELS = {
    "gpt2-style": dict(pos="learned", norm="layernorm", mlp="gelu", tie_embeddings=True),
    "llama-style": dict(pos="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=False, qk_norm=True, bias=False),
}
OPTIMS = {
    "adamw": OptimConfig(name="adamw", lr=1e-2, min_lr=1e-3, warmup_steps=5),
    "muon": OptimConfig(name="muon", lr=1e-2, min_lr=1e-3, muon_lr=0.02, warmup_steps=5),
}

# Recorded from the code as of the commit that added this file (fp32, CPU).
PINNED = {
    ("gpt2-style", "adamw"): [
        3.4078118801116943, 3.313685417175293, 3.2245917320251465, 3.1572318077087402, 3.0472280979156494,
        2.9897565841674805, 2.940394163131714, 2.915898323059082, 2.90143084526062, 2.9265825748443604,
        2.85953950881958, 2.8826558589935303, 2.8933475017547607, 2.9043476581573486, 2.936774492263794,
        2.82932710647583, 2.908010244369507, 2.867366313934326, 2.8993425369262695, 2.83276629447937,
    ],
    ("llama-style", "muon"): [
        3.4246139526367188, 3.3698270320892334, 3.2673726081848145, 3.215266704559326, 3.041184425354004,
        2.91288423538208, 2.7764346599578857, 2.6990976333618164, 2.6083688735961914, 2.5415191650390625,
        2.43764066696167, 2.4016551971435547, 2.3636250495910645, 2.3447418212890625, 2.3756539821624756,
        2.2745795249938965, 2.261629581451416, 2.1597304344177246, 2.2246696949005127, 2.2379300594329834,
    ],
}


def step_rows(step: int) -> torch.Tensor:
    """The ROWS windows of SEQ + 1 tokens that step ``step`` trains on: [ROWS, SEQ + 1], a pure function of step."""
    gen = torch.Generator().manual_seed(1000 + step)
    starts = torch.randint(0, len(IDS) - SEQ - 1, (ROWS,), generator=gen)
    return torch.stack([IDS[s : s + SEQ + 1] for s in starts.tolist()])


def loss_curve(model_kind: str, optim: str, grad_accum: int = 1) -> list[float]:
    """Train a fresh tiny model for STEPS steps; the step's ROWS rows are split over ``grad_accum`` micro-batches."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=len(VOCAB), block_size=SEQ, n_layer=2, n_head=2, n_embd=32, **MODELS[model_kind])
    model = GPT(cfg)
    per = ROWS // grad_accum

    def get_batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = step_rows(step)[micro * per : (micro + 1) * per]
        return rows[:, :-1], rows[:, 1:]

    train = TrainConfig(max_steps=STEPS, grad_accum=grad_accum, eval_every=0, log_every=1, ckpt_every=0,
                        device="cpu", precision="fp32", tensorboard=False)
    with tempfile.TemporaryDirectory() as tmp:
        fit(model, get_batch, causal_lm_loss, Path(tmp), train, OPTIMS[optim])
        lines = (Path(tmp) / "metrics.jsonl").read_text().splitlines()
    return [r["train_loss"] for r in map(json.loads, lines) if "train_loss" in r]


@pytest.mark.parametrize(("model_kind", "optim"), list(PINNED))
def test_loss_curve_is_pinned(model_kind: str, optim: str) -> None:
    got = loss_curve(model_kind, optim)
    assert len(got) == STEPS
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64),
                               torch.tensor(PINNED[(model_kind, optim)], dtype=torch.float64), rtol=1e-4, atol=0.0)
    assert got[-1] < got[0] - 0.5  # and it is a curve that learns


def test_accumulated_micro_batches_follow_the_same_curve() -> None:
    """Each step's rows in 4 micro-batches of 2 give the gradient of the whole batch: the same curve."""
    got = loss_curve("gpt2-style", "adamw", grad_accum=4)
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64),
                               torch.tensor(PINNED[("gpt2-style", "adamw")], dtype=torch.float64), rtol=1e-4, atol=0.0)


if __name__ == "__main__":  # print the curves to paste into PINNED
    for key in PINNED:
        print(key, json.dumps(loss_curve(*key)), file=sys.stdout)

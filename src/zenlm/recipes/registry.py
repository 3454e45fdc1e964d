"""Named training recipes: a model preset plus the batch, optimiser and precision that go with it.

``zenlm pretrain --recipe NAME`` starts from a recipe; any flag given on the command line wins over it.

* ``default``  what ``zenlm pretrain`` and ``zenlm demo`` use: the ``demo`` model with the fast optimiser.
* ``classic``  the well-known small-GPT recipe (learned positions, LayerNorm, GELU, tied embeddings, AdamW
               1e-3 with betas 0.9/0.99, weight decay 0.1, 100 warm-up steps, cosine to 1e-4, fp32, no
               compilation, batch 12 x 64). Kept so learners can compare.
* ``fast``     zenlm's default: the recipe that reaches the classic recipe's validation loss on
               shakespeare-char in a fraction of its wall time on a CPU (see docs/BENCHMARKS.md and the
               ablation table in docs/training-speed.md).
* ``five-min`` the fast recipe at a larger size, for the best loss in five minutes of CPU time.

Masked-LM recipes (``zenlm pretrain --objective mlm``) train a BERT encoder and live in ``MLM_RECIPES``, apart
from ``RECIPES`` (whose entries are all causal-LM GPT recipes):

* ``mlm``      what ``zenlm pretrain --objective mlm`` uses: bert-mini, rows of 128 tokens, AdamW 5e-4 with
               100 warm-up steps, linear decay to 0 and weight decay 0.01 (the BERT / RoBERTa optimiser).

The lower rungs of the ladder (n-gram, MLP, LSTM / GRU presets) start from ``LADDER_RECIPES``:

* ``ladder``   what ``zenlm pretrain --model lstm-small`` (or any MLP, LSTM, GRU or n-gram preset) uses: 32
               streams read in 64-token windows (truncated BPTT), AdamW 3e-3 with 50 warm-up steps and cosine
               decay to 3e-4, weight decay 0.01, fp32. (An n-gram model is counted: only its batch settings,
               which set the validation windows, apply.)

``DEFAULT_RECIPE`` names the recipe each objective starts from when no --recipe is given;
:func:`default_recipe` also looks at the model, so a ladder preset starts from ``ladder``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from zenlm.errors import ConfigError


@dataclass(frozen=True)
class Recipe:
    description: str
    model: str
    model_overrides: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 16
    seq_len: int | None = None
    grad_accum: int = 1
    max_steps: int = 2000
    precision: str = "auto"
    compile: bool = False
    optim: dict[str, Any] = field(default_factory=dict)
    eval_every: int = 250
    ablations: dict[str, dict[str, Any]] = field(default_factory=dict)
    objective: str = "causal-lm"  # "causal-lm" (GPT presets) or "mlm" (BERT presets)


CLASSIC_OPTIM = dict(name="adamw", lr=1e-3, min_lr=1e-4, warmup_steps=100, schedule="cosine", weight_decay=0.1,
                     betas=(0.9, 0.99), grad_clip=1.0)

# Muon for hidden matrices + AdamW for the rest; what the demo and the five-minute recipe use.
MUON_OPTIM = dict(name="muon", lr=3e-3, min_lr=3e-4, muon_lr=0.02, warmup_steps=50, schedule="cosine",
                  weight_decay=0.0, betas=(0.9, 0.95), grad_clip=1.0)
# The same, tuned for the short shakespeare-char race: higher peak rates, a short warm-up.
FAST_OPTIM = dict(MUON_OPTIM, lr=5e-3, min_lr=5e-4, muon_lr=0.03, warmup_steps=15)

RECIPES: dict[str, Recipe] = {
    "default": Recipe(
        "what `zenlm pretrain` does without --recipe: the demo model with the fast recipe's optimiser, bf16 where native",
        model="demo", batch_size=16, seq_len=None, max_steps=2000, precision="auto", compile=False,
        optim=MUON_OPTIM,
    ),
    "classic": Recipe(
        "classic small-GPT recipe: 4x128, context 64, batch 12, AdamW 1e-3, cosine, fp32",
        model="classic-char", batch_size=12, seq_len=64, max_steps=2000, precision="fp32", compile=False,
        optim=CLASSIC_OPTIM,
    ),
    "fast": Recipe(
        "zenlm's fast recipe: 2x128, rotary, RMSNorm, SwiGLU, qk-norm, zero-init projections, Muon + AdamW, bf16 where native",
        model="tiny", model_overrides=dict(n_layer=2, n_head=4, n_embd=128, block_size=64),
        batch_size=32, seq_len=64, max_steps=200, precision="auto", compile=False,
        optim=FAST_OPTIM,
        eval_every=25,
        ablations={
            "AdamW instead of Muon": dict(optim=dict(name="adamw")),
            "fp32 instead of bf16": dict(precision="fp32"),
            "classic architecture (learned pos, LayerNorm, GELU, tied)": dict(model_overrides=dict(
                pos="learned", norm="layernorm", mlp="gelu", qk_norm=False, zero_init_proj=False, bias=True,
                tie_embeddings=True)),
            "no qk-norm": dict(model_overrides=dict(qk_norm=False)),
            "no zero-init projections": dict(model_overrides=dict(zero_init_proj=False)),
            "4 layers (classic depth) instead of 2": dict(model_overrides=dict(n_layer=4)),
            "batch 12 (classic) instead of 32": dict(batch_size=12),
            "+ torch.compile": dict(compile=True),
            "squared-ReLU MLP instead of SwiGLU (the earlier default; no transformers counterpart)":
                dict(model_overrides=dict(mlp="relu2")),
        },
    ),
    "five-min": Recipe(
        "the fast recipe at 6x256, context 128, for the best loss in five minutes of CPU time",
        model="tiny", model_overrides=dict(n_layer=6, n_head=4, n_embd=256, block_size=128),
        batch_size=32, seq_len=128, max_steps=100_000, precision="auto", compile=False,
        optim=MUON_OPTIM,
    ),
}


# AdamW as BERT and RoBERTa pretrain with it: a short linear warm-up (100 steps, ~5% of the recipe's 2000),
# linear decay to 0, weight decay 0.01, RoBERTa's beta2 0.98 and eps 1e-6 (steadier with small batches).
MLM_OPTIM = dict(name="adamw", lr=5e-4, min_lr=0.0, warmup_steps=100, schedule="linear", weight_decay=0.01,
                 betas=(0.9, 0.98), eps=1e-6, grad_clip=1.0)

MLM_RECIPES: dict[str, Recipe] = {
    "mlm": Recipe(
        "masked-LM pretraining of bert-mini (4x256): rows of 128 tokens, batch 32, AdamW 5e-4, linear decay",
        model="bert-mini", batch_size=32, seq_len=128, max_steps=2000, precision="auto", compile=False,
        optim=MLM_OPTIM, objective="mlm",
    ),
}

# AdamW for the recurrent and feed-forward rungs (benchmarks/ladder.py trains them with it); the Muon settings of
# the recipes above were tuned on the Transformer.
LADDER_OPTIM = dict(name="adamw", lr=3e-3, min_lr=3e-4, warmup_steps=50, schedule="cosine", weight_decay=0.01,
                    betas=(0.9, 0.99), grad_clip=1.0)

LADDER_RECIPES: dict[str, Recipe] = {
    "ladder": Recipe(
        "the n-gram, MLP and LSTM rungs: 32 streams x 64-token windows (truncated BPTT), AdamW 3e-3, cosine, fp32",
        model="lstm-small", batch_size=32, seq_len=64, max_steps=2000, precision="fp32", compile=False,
        optim=LADDER_OPTIM,
    ),
}

DEFAULT_RECIPE: dict[str, str] = {"causal-lm": "default", "mlm": "mlm"}
LADDER_ARCHS = ("ngram", "mlp", "rnn")  # architectures whose presets start from the ladder recipe


def default_recipe(objective: str, model: str | None = None) -> str:
    """The recipe a run starts from when none is named: ``ladder`` for a preset of the lower rungs (n-gram, MLP,
    LSTM / GRU), else the objective's (:data:`DEFAULT_RECIPE`)."""
    if model is not None and objective == "causal-lm":
        from zenlm.models.registry import find_preset

        try:
            if find_preset(model)[0].name in LADDER_ARCHS:
                return "ladder"
        except ConfigError:
            pass  # an unknown preset is reported where the model is built
    return DEFAULT_RECIPE[objective]


def recipe_settings(name: str, **overrides: Any) -> dict[str, Any]:
    """The settings of recipe ``name`` (from RECIPES or MLM_RECIPES) as a plain dict, with ``overrides`` applied.

    Override keys are Recipe fields; ``optim`` and ``model_overrides`` are merged key by key.
    """
    known = {**RECIPES, **MLM_RECIPES, **LADDER_RECIPES}
    if name not in known:
        raise ConfigError(f"unknown recipe {name!r}; choose one of: {', '.join(known)}.")
    r = known[name]
    s = {k: copy.deepcopy(getattr(r, k)) for k in ("model", "model_overrides", "batch_size", "seq_len",
                                                   "grad_accum", "max_steps", "precision", "compile", "optim",
                                                   "objective")}
    for k, v in overrides.items():
        if k in ("optim", "model_overrides"):
            s[k].update(v)
        elif k in s:
            s[k] = v
        else:
            raise ConfigError(f"unknown recipe setting {k!r}; known: {', '.join(s)}.")
    return s

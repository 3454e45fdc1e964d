"""CLI verbs for the generative classics (registered in :func:`zenlm.cli.build_parser` through :func:`register`):

    zenlm vae train --corpus shakespeare --out runs/vae [--kl-schedule sigmoid|linear|none] [--word-dropout 0.25]
    zenlm vae sample RUN [--num 5] [--temperature 1.0] [--seed 0]
    zenlm vae reconstruct RUN "a sentence" ...
    zenlm vae interpolate RUN "first sentence" "second sentence" [--steps 5]

The flags and their defaults come from the library functions the verbs call (zenlm.recipes.vae.train_vae and the
TrainConfig fields named below).
"""

from __future__ import annotations

import argparse
from typing import Any

from zenlm.clikit import Param, add_verb, params_of

# the TrainConfig fields the training verbs have flags for
_TRAIN_FLAGS = ("max_steps", "max_seconds", "eval_every", "log_every", "ckpt_every", "seed", "device", "precision",
                "threads")


def _train_params(recipe: Any, skip: tuple[str, ...] = ()) -> list[Param]:
    """A recipe's own parameters (less ``train`` and ``progress``) and the TrainConfig fields above."""
    from zenlm.device import Precision
    from zenlm.train.loop import TrainConfig

    return [*params_of(recipe, skip=("train", "progress", *skip)),
            *params_of(TrainConfig, only=_TRAIN_FLAGS, types={"precision": Precision})]


def _run_recipe(recipe: Any, flags: dict[str, Any]) -> Any:
    """Call ``recipe`` with its own flags and a TrainConfig made of the others, with a progress bar."""
    from zenlm.cli.common import TerminalProgress
    from zenlm.train.loop import TrainConfig

    train = TrainConfig(**{k: flags.pop(k) for k in _TRAIN_FLAGS if k in flags})
    progress = TerminalProgress()
    try:
        return recipe(**flags, train=train, progress=progress)
    finally:
        progress.close()


# ---------------------------------------------------------------------------------------------- vae
def vae_train_params() -> list[Param]:
    from zenlm.recipes.vae import train_vae

    return _train_params(train_vae)


def vae_train(**flags: Any) -> None:
    """Train a sentence VAE (Bowman et al.) on the short sentences of a corpus; reports ELBO, reconstruction,
    KL and active units on the validation sentences.

    Args:
        corpus: shakespeare, peoples-daily (built in) or a local .txt/.jsonl file or folder
        out: run directory to create (config.yaml, tokenizer, model.safetensors, metrics.jsonl)
        max_steps: optimiser steps
        eval_every: validate every N steps
    """
    from zenlm.recipes.vae import train_vae

    res = _run_recipe(train_vae, flags)
    v = res.val
    print(f"\nstopped by {res.train.stopped_by} at step {res.train.step} after {res.train.elapsed_s:.1f} s "
          f"({res.n_train:,} training sentences)")
    if v:
        print(f"validation, per sentence: ELBO {v['val_elbo']:.2f} nats = -(reconstruction {v['val_rec']:.2f} + KL "
              f"{v['val_kl']:.2f}); NLL bound {v['val_nll_token']:.3f} nats/token (perplexity <= {v['val_ppl']:.1f}); "
              f"active units {v['val_active_units']:.0f} of {_z_dim(res.run_dir)}")
    print(f"run directory: {res.run_dir}\nnext: zenlm vae sample {res.run_dir} --num 5")


def _z_dim(run: Any) -> int:
    from zenlm.rundir import read_run_config

    return int(read_run_config(run)["model"]["z_dim"])


def _load_vae(run: str, device: str) -> Any:
    import zenlm
    from zenlm.errors import ConfigError
    from zenlm.vae import SentenceVAE

    vae = zenlm.load(run, device=device)
    if not isinstance(vae, SentenceVAE):
        raise ConfigError(f"{run} is not a sentence-VAE run; make one with `zenlm vae train`.")
    return vae


def vae_sample(run: str, num: int = 5, temperature: float = 1.0, top_k: int | None = None, seed: int | None = None,
               device: str = "auto") -> None:
    """Sample new sentences: codes z from the prior N(0, I), decoded by the VAE's decoder.

    Args:
        run: run directory made by `zenlm vae train`
        num: how many sentences
        temperature: 0 decodes greedily (each code's most likely sentence); 1 samples from the decoder
        top_k: sample only among the K most likely words
        seed: seeds the codes and the draws
        device: auto, cpu, cuda or mps
    """
    for s in _load_vae(run, device).sample(num, temperature=temperature, top_k=top_k, seed=seed):
        print(s)


def vae_reconstruct(run: str, texts: list[str], temperature: float = 0.0, device: str = "auto") -> None:
    """Encode each sentence to its posterior mean and decode it again.

    Args:
        run: run directory made by `zenlm vae train`
        texts: sentences to reconstruct
        temperature: 0 decodes greedily
        device: auto, cpu, cuda or mps
    """
    vae = _load_vae(run, device)
    for text, rec in zip(texts, vae.reconstruct(texts, temperature=temperature, seed=0), strict=True):
        print(f"{text}\n  -> {rec}")


def vae_interpolate(run: str, a: str, b: str, steps: int = 5, temperature: float = 0.0, device: str = "auto") -> None:
    """Decode codes on the straight line between two sentences' posterior means (both ends included).

    Args:
        run: run directory made by `zenlm vae train`
        a: first sentence
        b: second sentence
        steps: points on the line
        temperature: 0 decodes greedily
        device: auto, cpu, cuda or mps
    """
    vae = _load_vae(run, device)
    for i, s in enumerate(vae.interpolate(a, b, steps=steps, temperature=temperature, seed=0)):
        print(f"{i / (steps - 1):.2f}  {s}")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``zenlm vae ...`` to the top-level sub-commands ``sub``."""
    vae = sub.add_parser("vae", help="sentence VAE: train, sample, reconstruct, interpolate")
    vae_sub = vae.add_subparsers(dest="vaeverb", metavar="ACTION")
    add_verb(vae_sub, "train", vae_train, params=vae_train_params)
    add_verb(vae_sub, "sample", vae_sample, positional=("run",))
    add_verb(vae_sub, "reconstruct", vae_reconstruct, positional=("run", "texts"))
    add_verb(vae_sub, "interpolate", vae_interpolate, positional=("run", "a", "b"))


__all__ = ["register"]

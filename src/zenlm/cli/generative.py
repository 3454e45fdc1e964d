"""CLI verbs for the generative classics (registered in :func:`zenlm.cli.build_parser` through :func:`register`):

    zenlm vae train --corpus shakespeare --out runs/vae [--kl-schedule sigmoid|linear|none] [--word-dropout 0.25]
    zenlm vae sample RUN [--num 5] [--temperature 1.0] [--seed 0]
    zenlm vae reconstruct RUN "a sentence" ...
    zenlm vae interpolate RUN "first sentence" "second sentence" [--steps 5]
    zenlm seqgan --out runs/seqgan [--data oracle|CORPUS] [--generator lstm|gpt] [--adv-rounds 60] [--resume]
    zenlm distill --teacher RUN --student PRESET --out RUN [--alpha 0.5] [--temperature 2] [--cosine 0]

The flags and their defaults come from the library the verbs call (zenlm.recipes.vae.train_vae, the fields of
zenlm.recipes.seqgan.SeqGANSettings, and the TrainConfig fields named below).
"""

from __future__ import annotations

import argparse
from typing import Any

from zenlm.clikit import Param, add_verb, params_of

# the TrainConfig fields the training verbs have flags for
_TRAIN_FLAGS = ("max_steps", "max_seconds", "eval_every", "log_every", "ckpt_every", "seed", "device", "precision",
                "threads")


def _train_params(recipe: Any, skip: tuple[str, ...] = ()) -> list[Param]:
    """A recipe's own parameters (less ``train`` and ``progress``; none for a recipe without parameters) and the
    TrainConfig fields above."""
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
        print(f"validation, per sentence: ELBO {v['val_elbo']:.2f} nats = -(reconstruction {v['val_rec']:.2f} + "
              f"KL {v['val_kl']:.2f}); NLL bound {v['val_nll_token']:.3f} nats/token (perplexity <= "
              f"{v['val_ppl']:.1f}); active units {v['val_active_units']:.0f} of {_z_dim(res.run_dir)}")
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


def vae_interpolate(run: str, a: str, b: str, steps: int = 5, temperature: float = 0.0,
                    device: str = "auto") -> None:
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


# ---------------------------------------------------------------------------------------------- seqgan
_SEQGAN_TRAIN_FLAGS = ("eval_every", "log_every", "ckpt_every", "seed", "device", "precision", "threads")


def seqgan_params() -> list[Param]:
    from zenlm.device import Precision
    from zenlm.recipes.seqgan import SeqGANSettings, train_seqgan
    from zenlm.train.loop import TrainConfig

    return [*params_of(train_seqgan, only=("out", "resume")), *params_of(SeqGANSettings),
            *params_of(TrainConfig, only=_SEQGAN_TRAIN_FLAGS, types={"precision": Precision})]


def seqgan(**flags: Any) -> None:
    """Run a SeqGAN experiment (Yu et al. 2017): MLE pretraining, adversarial training with Monte-Carlo
    roll-outs, and the comparison with the MLE model sampled at lower temperatures.

    Args:
        out: directory of the experiment (stages mle/ and gan/, results.json)
        resume: continue an interrupted experiment in --out
    """
    import dataclasses

    from zenlm.cli.common import TerminalProgress
    from zenlm.recipes.seqgan import SeqGANSettings, train_seqgan
    from zenlm.train.loop import TrainConfig

    fields = {f.name for f in dataclasses.fields(SeqGANSettings)}
    settings = SeqGANSettings(**{k: v for k, v in flags.items() if k in fields})
    train = TrainConfig(**{k: flags[k] for k in _SEQGAN_TRAIN_FLAGS})
    progress = TerminalProgress()
    try:
        res = train_seqgan(flags["out"], settings=settings, resume=flags["resume"], train=train, progress=progress)
    finally:
        progress.close()
    if res.stopped:
        print(f"\nstopped; continue with: zenlm seqgan --out {flags['out']} --resume")
        return
    print()
    print(seqgan_table(res.rows))
    print(f"\n{res.verdict}\nMLE {res.mle['steps']} steps in {res.mle['train_s']:.0f} s; adversarial "
          f"{res.gan['steps']} steps in {res.gan['train_s']:.0f} s. Results: {res.run_dir / 'results.json'}")


def seqgan_table(rows: list[dict[str, Any]]) -> str:
    """The temperature sweep as a markdown table (the columns the experiment has)."""
    cols = [c for c in ("oracle_nll", "bleu", "self_bleu", "nll_test") if c in rows[0]]
    names = {"oracle_nll": "oracle NLL (lower: better samples)", "bleu": "BLEU-4 (higher: better samples)",
             "self_bleu": "self-BLEU-4 (lower: more diverse)", "nll_test": "NLL-test (lower: better coverage)"}
    lines = ["| model | temperature | " + " | ".join(names[c] for c in cols) + " |",
             "|---|---:|" + "---:|" * len(cols)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['temperature']:g} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- distill
def distill_params() -> list[Param]:
    """The flags: both distillation recipes' parameters (each uses its own), DistillSettings, the loop's."""
    from zenlm.recipes.distill import DistillSettings, distill_classifier, distill_lm

    skip = ("settings", "train", "optim", "progress", "lr", "student_overrides")
    found = {p.name: p for p in params_of(distill_classifier, skip=skip)}
    for p in params_of(distill_lm, skip=skip):
        found.setdefault(p.name, p)
    lr = Param("lr", float | None, None, "peak learning rate (default: 5e-4 for classifiers with linear decay, "
               "1e-3 for language models with cosine decay to a tenth)")
    return [*found.values(), lr, *params_of(DistillSettings), *_train_params(lambda: None)]


def distill(**flags: Any) -> None:
    """Distil a trained teacher into a small student (Hinton et al.): loss = alpha * T^2 * KL(teacher || student)
    + (1 - alpha) * cross-entropy, optionally + a hidden-state cosine term.

    Args:
        teacher: a classifier run (zenlm finetune classify) or a GPT run (zenlm pretrain)
        student: a preset (zenlm presets): BERT for classifiers (or an encoder run with the teacher's vocabulary),
            GPT for language models
        out: run directory to create (load it like any classifier / GPT run)
        data: classifiers: the labelled file (default: the teacher's); language models: the data directory
            (default: the teacher's)
        epochs: classifiers: passes over the training texts (language models train for --max-steps)
        max_steps: language models: optimiser steps
    """
    import dataclasses
    import inspect

    from zenlm.cli.common import TerminalProgress, print_train_result
    from zenlm.recipes.distill import DistillSettings, distill_classifier, recipe_for
    from zenlm.train.loop import TrainConfig
    from zenlm.train.optim import OptimConfig

    fields = {f.name for f in dataclasses.fields(DistillSettings)}
    settings = DistillSettings(**{k: flags.pop(k) for k in fields})
    train = TrainConfig(**{k: flags.pop(k) for k in _TRAIN_FLAGS})
    lr = flags.pop("lr")
    recipe = recipe_for(flags["teacher"])
    is_classifier = recipe is distill_classifier
    kwargs = {k: v for k, v in flags.items() if k in inspect.signature(recipe).parameters}
    if lr is not None:
        if is_classifier:
            kwargs["lr"] = lr
        else:
            kwargs["optim"] = OptimConfig(name="adamw", lr=lr, min_lr=lr / 10, warmup_steps=100)
    progress = TerminalProgress()
    try:
        res = recipe(settings=settings, train=train, progress=progress, **kwargs)
    finally:
        progress.close()
    if res.report is not None:
        print(f"\nstopped by {res.train.stopped_by} at step {res.train.step}; kept the weights of step "
              f"{res.train.best_step} (teacher outputs: {res.teacher_s:.1f} s)\n")
        print(res.report.format())
        print(f"\nrun directory: {res.run_dir}\nnext: zenlm predict {res.run_dir} \"some text\"")
    else:
        print_train_result(res.train, res.run_dir)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``zenlm vae ...``, ``zenlm seqgan`` and ``zenlm distill`` to the top-level sub-commands ``sub``."""
    vae = sub.add_parser("vae", help="sentence VAE: train, sample, reconstruct, interpolate")
    vae_sub = vae.add_subparsers(dest="vaeverb", metavar="ACTION")
    add_verb(vae_sub, "train", vae_train, params=vae_train_params)
    add_verb(vae_sub, "sample", vae_sample, positional=("run",))
    add_verb(vae_sub, "reconstruct", vae_reconstruct, positional=("run", "texts"))
    add_verb(vae_sub, "interpolate", vae_interpolate, positional=("run", "a", "b"))
    add_verb(sub, "seqgan", seqgan, params=seqgan_params)
    add_verb(sub, "distill", distill, params=distill_params)


__all__ = ["register"]

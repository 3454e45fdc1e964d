"""Training the sentence VAE (:mod:`zenlm.models.vae`) on short sentences of a corpus.

One optimiser step, for a batch of B sentences (the loss is the negative ELBO with the KL term weighted)::

    beta    = kl_weight(step)                                   # KL annealing: 0 -> 1 (see below)
    mu, logvar = encoder(x)                                     # q(z | x)
    z       = mu + exp(logvar / 2) * eps                        # one draw per sentence
    rec_b   = -sum_t log p(x_t | x_<t, z)                       # over x_1 .. x_n and <eos>; inputs word-dropped
    kl_b    = 1/2 sum_j (mu_j^2 + exp(logvar_j) - 1 - logvar_j) # closed form
    loss    = sum_b (rec_b + beta * kl_b)  /  B                 # nats per sentence (fit divides by B)

KL annealing (Bowman et al.): the KL term's weight ``beta`` rises over ``kl_anneal_steps`` optimiser steps,
``"sigmoid"``: 1 / (1 + exp(-10 (step / kl_anneal_steps - 1/2))) (the paper's logistic curve, 0.007 at the start,
0.5 half way, 0.993 at the end), ``"linear"``: min(1, step / kl_anneal_steps), ``"none"``: 1 from the start.
Word dropout happens inside the model (``TextVAEConfig.word_dropout``).

Validation (one fixed draw of z per sentence, so evaluations compare) reports, per sentence:
``val_rec`` (reconstruction NLL, nats), ``val_kl`` (nats), ``val_elbo = -(val_rec + val_kl)``, ``val_loss =
val_rec + val_kl`` (the negative ELBO, an upper bound of the NLL), ``val_nll_token`` (that bound per token) with
``val_ppl = exp(val_nll_token)``, and ``val_active_units``: the dimensions j of z whose posterior mean moves
with the sentence, Var_x(mu_j(x)) > 0.01 (Burda et al. 2016). A collapsed posterior has KL ~ 0 and no active unit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from zenlm import __version__
from zenlm.data.batches import IGNORE_INDEX
from zenlm.data.classify import ClassBatches, pad_batch
from zenlm.data.sentences import sentence_data
from zenlm.device import resolve_device
from zenlm.errors import ConfigError
from zenlm.models.registry import get_architecture
from zenlm.models.vae import TextVAE, TextVAEConfig, gaussian_kl, reconstruction_nll
from zenlm.progress import ProgressFn, report
from zenlm.rundir import read_run_config, write_run_config
from zenlm.tokenizer import Tokenizer
from zenlm.train.checkpoint import list_checkpoints
from zenlm.train.loop import TrainConfig, TrainResult, apply_process_settings, config_to_dict, fit
from zenlm.train.optim import OptimConfig
from zenlm.train.step import LossOutput

KL_SCHEDULES = ("sigmoid", "linear", "none")
ACTIVE_THRESHOLD = 0.01  # Burda et al.'s threshold on Var_x(E_q[z_j])

# (src_BT, lengths_B, dec_in_BT, beta, target_BT): one training batch of the VAE objective
VAEBatch = tuple[Tensor, Tensor, Tensor, float, Tensor]


def kl_weight(step: int, schedule: str, anneal_steps: int) -> float:
    """The KL term's weight beta at optimiser step ``step`` (0-based); see the module docstring."""
    if schedule == "none" or anneal_steps <= 0:
        return 1.0
    if schedule == "linear":
        return min(1.0, step / anneal_steps)
    if schedule == "sigmoid":
        return 1.0 / (1.0 + math.exp(-10.0 * (step / anneal_steps - 0.5)))
    raise ConfigError(f"unknown KL schedule {schedule!r}; choose one of {', '.join(KL_SCHEDULES)}.")


def vae_batch(ids_BT: Tensor, mask_BT: Tensor, bos_id: int, eos_id: int, beta: float = 1.0) -> VAEBatch:
    """Right-padded sentences ids_BT [B, T] with mask_BT (1 = real token) -> the VAE's inputs and targets:
    lengths [B]; decoder input ``<bos> x_1 .. x_T`` [B, T+1]; targets ``x_1 .. x_n <eos>`` then -100 [B, T+1]."""
    B, T = ids_BT.shape
    lengths_B = mask_BT.sum(1)
    dec_in_BT = torch.cat([torch.full((B, 1), bos_id, dtype=ids_BT.dtype), ids_BT], dim=1)
    target_BT = torch.full((B, T + 1), IGNORE_INDEX, dtype=ids_BT.dtype)
    target_BT[:, :T] = ids_BT.masked_fill(mask_BT == 0, IGNORE_INDEX)
    target_BT[torch.arange(B), lengths_B] = eos_id
    return ids_BT, lengths_B, dec_in_BT, beta, target_BT


def vae_loss(model: nn.Module, batch: VAEBatch) -> LossOutput:
    """sum over the batch of rec + beta * KL (the negative ELBO with the KL term weighted); the targets are the
    sentences, so the loop reports nats per sentence."""
    src_BT, lengths_B, dec_in_BT, beta, target_BT = batch
    logits_BTV, mu_BZ, logvar_BZ = model(src_BT, lengths_B, dec_in_BT)
    rec_B = reconstruction_nll(logits_BTV, target_BT)
    kl_B = gaussian_kl(mu_BZ.float(), logvar_BZ.float())
    return LossOutput((rec_B + beta * kl_B).sum(), src_BT.shape[0], int(lengths_B.sum()))


def count_sentences(batch: VAEBatch) -> int:
    """The targets of a VAE batch: its sentences."""
    return batch[0].shape[0]


def active_units(mu_NZ: Tensor, threshold: float = ACTIVE_THRESHOLD) -> int:
    """How many dimensions of the posterior mean vary across the N sentences: Var_x(mu_j) > threshold."""
    if mu_NZ.shape[0] < 2:
        return 0
    return int((mu_NZ.float().var(dim=0) > threshold).sum())


@torch.no_grad()
def evaluate_vae(model: TextVAE, seqs: list[list[int]], pad_id: int, bos_id: int, eos_id: int,
                 batch_size: int = 64, seed: int = 0, device: torch.device | str = "cpu") -> dict[str, float]:
    """Validation scores of the module docstring over the sentences ``seqs`` (token ids), one draw of z per
    sentence from a generator seeded with ``seed``."""
    generator = torch.Generator(device=device).manual_seed(seed)
    rec = kl = 0.0
    tokens = 0
    mus: list[Tensor] = []
    for s in range(0, len(seqs), batch_size):
        ids_BT, mask_BT = pad_batch(seqs[s:s + batch_size], pad_id)
        src_BT, lengths_B, dec_in_BT, _, target_BT = (
            t.to(device) if isinstance(t, Tensor) else t for t in vae_batch(ids_BT, mask_BT, bos_id, eos_id))
        logits_BTV, mu_BZ, logvar_BZ = model(src_BT, lengths_B, dec_in_BT, generator=generator)
        rec += float(reconstruction_nll(logits_BTV, target_BT).sum())
        kl += float(gaussian_kl(mu_BZ.float(), logvar_BZ.float()).sum())
        tokens += int(lengths_B.sum()) + len(lengths_B)  # the words and each sentence's <eos>
        mus.append(mu_BZ.float().cpu())
    n = max(len(seqs), 1)
    nll_token = (rec + kl) / max(tokens, 1)
    return {"val_loss": (rec + kl) / n, "val_rec": rec / n, "val_kl": kl / n, "val_elbo": -(rec + kl) / n,
            "val_nll_token": nll_token, "val_ppl": math.exp(min(nll_token, 50.0)),
            "val_active_units": float(active_units(torch.cat(mus)))}


@dataclass
class VAEResult:
    """What :func:`train_vae` did: the run directory, the loop's result and the last validation scores."""

    run_dir: Path
    train: TrainResult
    val: dict[str, float]
    n_train: int
    n_val: int


def _special_ids(tok: Tokenizer) -> dict[str, int]:
    missing = [r for r in ("bos", "eos", "pad", "unk") if getattr(tok, f"{r}_id") is None]
    if missing:
        raise ConfigError(f"the sentence VAE needs a tokenizer with {', '.join(missing)} tokens; leave --tokenizer "
                          "out to train one, or give one made by `zenlm tokenizer train`.")
    return {r: int(getattr(tok, f"{r}_id")) for r in ("bos", "eos", "pad", "unk")}


def train_vae(
    corpus: str,
    out: str | Path,
    *,
    lang: Literal["auto", "en", "zh"] = "auto",
    model: str = "vae-small",
    z_dim: int | None = None,
    kl_schedule: Literal["sigmoid", "linear", "none"] = "sigmoid",
    kl_anneal_steps: int = 2000,
    word_dropout: float = 0.25,
    dropout: float = 0.0,
    min_len: int = 4,
    max_len: int = 15,
    max_sentences: int | None = None,
    tokenizer: str | None = None,
    vocab_size: int = 5000,
    batch_size: int = 32,
    lr: float = 1e-3,
    eval_sentences: int = 2000,
    resume: bool = False,
    train: TrainConfig | None = None,
    progress: ProgressFn | None = None,
) -> VAEResult:
    """Train a sentence VAE on the short sentences of ``corpus``; writes run directory ``out``.

    corpus:          a built-in corpus (shakespeare, peoples-daily, ...) or a local .txt/.jsonl file or folder
    lang:            en (words, lowercased) or zh (characters); auto decides from the text
    model:           a VAE preset (zenlm presets: vae-tiny, vae-small, vae-bowman)
    z_dim:           size of the latent code (None: the preset's)
    kl_schedule:     how the KL term's weight rises: sigmoid (Bowman et al.), linear, or none (weight 1 from the
                     start: no annealing)
    kl_anneal_steps: optimiser steps over which the KL weight goes from 0 to 1
    word_dropout:    share of the decoder's input words replaced by <unk> while training (0 = off)
    dropout:         dropout on embeddings and before the output layer
    min_len:         shortest sentence kept, in words (en) or characters (zh)
    max_len:         longest sentence kept
    max_sentences:   use only the first N training sentences (None: all)
    tokenizer:       a tokenizer directory to use; default: train one on the training sentences (words for
                     English, characters for Chinese)
    vocab_size:      vocabulary of that tokenizer (the rarest words become <unk>)
    batch_size:      sentences per step
    lr:              peak AdamW learning rate (warm-up 100 steps, cosine decay to lr / 10)
    eval_sentences:  validation sentences scored at each evaluation
    resume:          continue the run in ``out`` from its newest checkpoint (its saved settings are used)
    """
    train = train or TrainConfig()
    apply_process_settings(train)
    out = Path(out)
    settings: dict[str, Any] = dict(corpus=corpus, lang=lang, min_len=min_len, max_len=max_len,
                                    max_sentences=max_sentences, kl_schedule=kl_schedule,
                                    kl_anneal_steps=kl_anneal_steps, batch_size=batch_size,
                                    eval_sentences=eval_sentences)
    tok: Tokenizer | None = Tokenizer.load(tokenizer) if tokenizer else None
    if resume:
        saved = read_run_config(out)
        if saved.get("objective") != "vae":
            raise ConfigError(f"{out} is not a sentence-VAE run; resume it with the command that made it.")
        settings = {**saved["vae"]}
        tok = Tokenizer.load(out)
    elif (out / "config.yaml").exists() or list_checkpoints(out / "checkpoints"):
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it, or choose another --out.")
    if settings["kl_schedule"] not in KL_SCHEDULES:
        raise ConfigError(f"unknown KL schedule {settings['kl_schedule']!r}; choose one of "
                          f"{', '.join(KL_SCHEDULES)}.")
    if batch_size < 1 or eval_sentences < 1:
        raise ConfigError("batch_size and eval_sentences must be >= 1.")

    data = sentence_data(settings["corpus"], lang=settings["lang"], min_len=settings["min_len"],
                         max_len=settings["max_len"], max_sentences=settings["max_sentences"],
                         max_val=settings["eval_sentences"], tokenizer=tok, vocab_size=vocab_size,
                         progress=progress)
    tok = data.tokenizer
    ids = _special_ids(tok)
    longest = max(len(s) for s in data.train_ids + data.val_ids) + 1  # + <eos>
    if resume:
        cfg = TextVAEConfig.from_dict(saved["model"])
        optim = OptimConfig(**saved["optim"])
    else:
        overrides: dict[str, Any] = {"vocab_size": tok.vocab_size, "word_dropout": word_dropout,
                                     "dropout": dropout, "unk_id": ids["unk"], "max_len": longest}
        if z_dim is not None:
            overrides["z_dim"] = z_dim
        cfg = get_architecture("vae").config(model, **overrides)
        optim = OptimConfig(name="adamw", lr=lr, min_lr=lr / 10, warmup_steps=100, schedule="cosine",
                            weight_decay=0.0, betas=(0.9, 0.999), grad_clip=5.0)

    device = resolve_device(train.device)
    torch.manual_seed(train.seed)
    net = TextVAE(cfg).to(device)
    batches = ClassBatches(data.train_ids, [0] * len(data.train_ids), settings["batch_size"], ids["pad"],
                           seed=train.seed)

    def get_batch(step: int, micro: int) -> VAEBatch:
        ids_BT, mask_BT, _ = batches.get(step * train.grad_accum + micro)
        beta = kl_weight(step, settings["kl_schedule"], settings["kl_anneal_steps"])
        src, lengths, dec_in, beta, target = vae_batch(ids_BT, mask_BT, ids["bos"], ids["eos"], beta)
        return src.to(device), lengths.to(device), dec_in.to(device), beta, target.to(device)

    def evaluate(m: nn.Module) -> dict[str, float]:
        return evaluate_vae(net, data.val_ids, ids["pad"], ids["bos"], ids["eos"], device=device)

    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        tok.save(out)
        settings.update(lang=data.lang, n_train=len(data.train), n_val=len(data.val))
        write_run_config(out, {"zenlm_version": __version__, "model": cfg.to_dict(), "vae": settings,
                               "train": config_to_dict(train), "optim": config_to_dict(optim), "objective": "vae"})
    report(progress, "train", message=f"sentence VAE: {net.num_params() / 1e6:.2f}M parameters, z of {cfg.z_dim} "
           f"dimensions; KL weight {settings['kl_schedule']} over {settings['kl_anneal_steps']} steps, word "
           f"dropout {cfg.word_dropout:g}; {len(data.train):,} sentences, {settings['batch_size']} per step; "
           f"device {device}")
    result = fit(net, get_batch, vae_loss, out, train, optim, evaluate=evaluate, resume=resume, progress=progress,
                 count_targets=count_sentences)
    from zenlm.viz import plot_loss_curve

    plot_loss_curve(out / "metrics.jsonl", out / "plots" / "loss.png", per="sentence")
    return VAEResult(out, result, result.val, len(data.train), len(data.val))


__all__ = ["KL_SCHEDULES", "VAEResult", "active_units", "count_sentences", "evaluate_vae", "kl_weight",
           "train_vae", "vae_batch", "vae_loss"]

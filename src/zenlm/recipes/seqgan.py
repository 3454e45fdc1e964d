"""SeqGAN experiments, scaled to minutes on a CPU: maximum-likelihood pretraining, then adversarial training,
then the comparison against the same MLE model sampled at several temperatures.

Stages, each a run of the one training loop (:func:`zenlm.train.loop.fit`) in its own directory::

    OUT/mle/   G alone, next-token cross-entropy on the real sequences          (mle_steps)
    OUT/gan/   G and D in one module (zenlm.models.gan.SeqGAN), one phase per optimiser step:
                 d_pretrain_steps D steps, then rounds of g_steps G steps + d_steps D steps
    OUT/results.json   the temperature sweep and the verdict

A D step (real sequences from the data, generated ones drawn from G inside the objective, no gradient into G)::

    loss = sum_b [ -log D(real_b) - log(1 - D(fake_b)) ]            2B targets: nats per sentence judged

A G step (policy gradient; only G's parameters receive gradients, so only they move)::

    Y      ~ G                                                       B sequences of T tokens
    Q      = rollout_rewards(G, D, Y)                               [B, T], D in eval mode (no dropout)
    loss   = - sum_b sum_t Q[b, t] * log G(y_bt | y_b<t)            B targets: per sentence

Samples and roll-outs draw from a generator seeded by (seed, step, micro-batch), and real batches are chosen the
same way, so a stage is a pure function of its step and an interrupted stage resumes exactly (the loop restores
weights, optimiser moments and RNG). A finished stage leaves ``done.json`` and is skipped on ``--resume``.

Two experiments (``data``):

* ``"oracle"`` (the paper's synthetic test): a randomly initialised LSTM (weights ~ N(0, 1)) is the "real" data
  distribution; it generates the training and test sequences, and judges G's samples exactly: the **oracle NLL**
  -1/T sum_t log p_oracle(y_t | y_<t) of G's samples (quality, lower is better). Its mirror, **NLL-test**, G's own
  NLL of held-out oracle sequences, measures coverage (lower is better): a G that drops modes scores badly there.
* a corpus: short sentences, **BLEU-4** of G's samples against the held-out sentences (quality, higher is better)
  and **self-BLEU-4** among the samples (Zhu et al. 2018: lower = more diverse), with NLL-test.

The baseline (Caccia et al. 2020, "Language GANs Falling Short"): the MLE model alone, sampled at temperatures
below 1, trades diversity for quality too; a GAN only wins if no temperature of the MLE model is at least as good
on both axes. The verdict says which it is.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from zenlm import __version__
from zenlm.config import GPTConfig
from zenlm.data.batches import IGNORE_INDEX
from zenlm.data.sentences import sentence_data
from zenlm.device import resolve_device
from zenlm.errors import ConfigError
from zenlm.evaluate import reference_set_bleu, self_bleu
from zenlm.fileio import atomic_write_text
from zenlm.models.gan import (
    CNNDiscriminator,
    CNNDiscriminatorConfig,
    SeqGAN,
    lm_logits,
    rollout_rewards,
    sample_sequences,
)
from zenlm.models.gpt import GPT
from zenlm.models.rnn import RNNLM, RNNLMConfig
from zenlm.progress import ProgressFn, report
from zenlm.tokenizer import Tokenizer
from zenlm.train.checkpoint import list_checkpoints, load_model_weights, save_model
from zenlm.train.loop import TrainConfig, TrainResult, apply_process_settings, config_to_dict, fit
from zenlm.train.optim import OptimConfig
from zenlm.train.step import LossOutput, count_labels


@dataclass
class SeqGANSettings:
    """Everything an experiment depends on (saved in OUT/experiment.yaml; a resumed run uses the saved ones).

    data:             "oracle" (synthetic, the paper's test) or a corpus for real text (shakespeare,
                      peoples-daily, a .txt file ...)
    seq_len:          T, tokens per sequence (real sentences: up to T-1 tokens, then <eos> and padding)
    oracle_vocab:     the oracle's vocabulary
    oracle_hidden:    width of the oracle LSTM (its embeddings too)
    n_train:          oracle sequences to train on (real text: the first N sentences; None = all)
    n_test:           held-out sequences (oracle) or sentences (real text) for NLL-test and BLEU references
    min_len:          shortest real sentence kept, in words (en) or characters (zh)
    vocab_size:       word vocabulary of the real-text tokenizer (the rest is <unk>)
    generator:        lstm (the paper's) or gpt
    g_embd:           generator embedding width (gpt: its width)
    g_hidden:         LSTM units (ignored for gpt)
    g_layers:         LSTM layers or GPT blocks
    d_embd:           discriminator embedding width
    d_filters:        discriminator filters per width (widths 2, 3, 4, 5)
    batch_size:       sequences per step (D steps: that many real and that many generated)
    mle_steps:        maximum-likelihood pretraining steps of G
    mle_lr:           its AdamW learning rate (constant)
    d_pretrain_steps: D steps before the adversarial rounds
    adv_rounds:       adversarial rounds
    g_steps:          G (policy-gradient) steps per round
    d_steps:          D steps per round
    rollouts:         Monte-Carlo roll-outs per prefix (K)
    adv_lr:           AdamW learning rate of both players in the adversarial stage (constant)
    eval_samples:     sequences sampled to score G
    temperatures:     the MLE model's temperature sweep
    """

    data: str = "oracle"
    seq_len: int = 20
    oracle_vocab: int = 1000
    oracle_hidden: int = 32
    n_train: int | None = 10000
    n_test: int = 2000
    min_len: int = 4
    vocab_size: int = 2000
    generator: Literal["lstm", "gpt"] = "lstm"
    g_embd: int = 32
    g_hidden: int = 32
    g_layers: int = 1
    d_embd: int = 64
    d_filters: int = 64
    batch_size: int = 64
    mle_steps: int = 1500
    mle_lr: float = 1e-2
    d_pretrain_steps: int = 200
    adv_rounds: int = 60
    g_steps: int = 1
    d_steps: int = 3
    rollouts: int = 16
    adv_lr: float = 1e-3
    eval_samples: int = 1000
    temperatures: list[float] = field(default_factory=lambda: [0.6, 0.7, 0.8, 0.9, 1.0])

    def __post_init__(self) -> None:
        if self.generator not in ("lstm", "gpt"):
            raise ConfigError(f"generator {self.generator!r} is not supported; choose lstm or gpt.")
        if self.seq_len < 5:
            raise ConfigError(f"seq_len must be >= 5 (the discriminator's widest filter), got {self.seq_len}.")
        for name in ("oracle_vocab", "oracle_hidden", "n_test", "vocab_size", "g_embd", "g_hidden", "g_layers",
                     "d_embd", "d_filters", "batch_size", "rollouts", "eval_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("mle_steps", "d_pretrain_steps", "adv_rounds", "g_steps", "d_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.g_steps + self.d_steps == 0 and self.adv_rounds:
            raise ConfigError("an adversarial round needs g_steps + d_steps >= 1.")
        if not self.temperatures or min(self.temperatures) <= 0:
            raise ConfigError(f"temperatures must be > 0, got {self.temperatures}.")
        self.temperatures = [float(t) for t in self.temperatures]

    @property
    def adv_steps(self) -> int:
        return self.d_pretrain_steps + self.adv_rounds * (self.g_steps + self.d_steps)

    def phase(self, step: int) -> Literal["g", "d"]:
        """Which player the gan stage's optimiser step ``step`` (0-based) trains."""
        if step < self.d_pretrain_steps:
            return "d"
        return "g" if (step - self.d_pretrain_steps) % (self.g_steps + self.d_steps) < self.g_steps else "d"


# ---------------------------------------------------------------------------------------------- the task
@dataclass
class Task:
    """The data of an experiment: fixed-length sequences [N, T], the ids that frame them, and the judges."""

    train_NT: Tensor
    test_NT: Tensor
    vocab_size: int
    start_id: int
    end_id: int | None = None  # real text: <eos>; after it a sequence holds pad_id
    pad_id: int = 0
    oracle: nn.Module | None = None
    tokenizer: Tokenizer | None = None
    references: list[str] = field(default_factory=list)
    lang: str = "en"


def seeded(*parts: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded by a tuple of integers (seed, step, micro ...): the same tuple, the same draws."""
    value = 0
    for p in parts:
        value = (value * 1_000_003 + int(p)) % (2**63)
    return torch.Generator(device=device).manual_seed(value)


def make_oracle(vocab: int, hidden: int, seed: int) -> RNNLM:
    """The synthetic data source: a one-layer LSTM LM with every parameter drawn from N(0, 1) (the paper's
    initialisation, which makes its next-token distributions peaked and its sentences structured)."""
    oracle = RNNLM(RNNLMConfig(vocab_size=vocab, cell="lstm", n_embd=hidden, n_hidden=hidden, n_layer=1))
    g = seeded(seed, 7)
    with torch.no_grad():
        for p in oracle.parameters():
            p.normal_(0.0, 1.0, generator=g)
    return oracle.eval()


def pack_sentences(seqs: list[list[int]], length: int, end_id: int, pad_id: int) -> Tensor:
    """Token-id sentences -> [N, length]: each cut to length - 1 ids, then <eos>, then padding."""
    out = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        s = s[:length - 1] + [end_id]
        out[i, :len(s)] = torch.as_tensor(s)
    return out


def scored_positions(seqs_BT: Tensor, end_id: int | None) -> Tensor:
    """True where a token is the sequence's own (up to and including its first <eos>); False on the padding."""
    if end_id is None:
        return torch.ones_like(seqs_BT, dtype=torch.bool)
    is_end = (seqs_BT == end_id).long()
    return (is_end.cumsum(1) - is_end) == 0


def _oracle_task(s: SeqGANSettings, seed: int, chunk: int = 1000) -> Task:
    oracle = make_oracle(s.oracle_vocab, s.oracle_hidden, seed)
    n_train = s.n_train if s.n_train is not None else 10000

    def draw(n: int, tag: int) -> Tensor:
        g = seeded(seed, tag)
        return torch.cat([sample_sequences(oracle, min(chunk, n - i), s.seq_len, 0, generator=g, device="cpu")
                          for i in range(0, n, chunk)])

    return Task(draw(n_train, 1), draw(s.n_test, 2), s.oracle_vocab, start_id=0, oracle=oracle)


def _text_task(s: SeqGANSettings, tokenizer: Tokenizer | None, progress: ProgressFn | None) -> Task:
    data = sentence_data(s.data, min_len=s.min_len, max_len=s.seq_len - 1, max_sentences=s.n_train,
                         max_val=s.n_test, tokenizer=tokenizer, vocab_size=s.vocab_size, progress=progress)
    tok = data.tokenizer
    if tok.bos_id is None or tok.eos_id is None or tok.pad_id is None:
        raise ConfigError("SeqGAN on real text needs a tokenizer with bos, eos and pad tokens.")
    train = pack_sentences(data.train_ids, s.seq_len, tok.eos_id, tok.pad_id)
    test = pack_sentences(data.val_ids, s.seq_len, tok.eos_id, tok.pad_id)
    return Task(train, test, tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tokenizer=tok,
                references=data.val, lang=data.lang)


def decode_samples(task: Task, seqs_BT: Tensor) -> list[str]:
    """Real-text samples as sentences: cut at <eos>, special tokens left out."""
    assert task.tokenizer is not None
    out = []
    for row in seqs_BT.tolist():
        if task.end_id in row:
            row = row[:row.index(task.end_id)]
        out.append(task.tokenizer.decode(row, skip_special=True).strip())
    return out


# ---------------------------------------------------------------------------------------------- objectives
def mle_batch(seqs_BT: Tensor, start_id: int, end_id: int | None) -> tuple[Tensor, Tensor]:
    """(x, y) for maximum likelihood: x = <start> y_1 .. y_{T-1}, y = the sequence with its padding unscored."""
    start_B1 = torch.full((seqs_BT.shape[0], 1), start_id, dtype=seqs_BT.dtype, device=seqs_BT.device)
    x_BT = torch.cat([start_B1, seqs_BT[:, :-1]], 1)
    return x_BT, seqs_BT.masked_fill(~scored_positions(seqs_BT, end_id), IGNORE_INDEX)


def mle_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> LossOutput:
    """Summed next-token cross-entropy of a sequence batch (x, y) over its scored targets."""
    x_BT, y_BT = batch
    logits_BTV = lm_logits(model, x_BT)
    loss_sum = F.cross_entropy(logits_BTV.float().flatten(0, 1), y_BT.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")
    return LossOutput(loss_sum, int((y_BT != IGNORE_INDEX).sum()), x_BT.numel())


def discriminator_loss(discriminator: nn.Module, real_BT: Tensor, fake_BT: Tensor) -> LossOutput:
    """D's side of the game: -log D(real) - log(1 - D(fake)), summed over the 2B sentences."""
    logits_N = discriminator(torch.cat([real_BT, fake_BT]))
    labels_N = torch.cat([torch.ones(real_BT.shape[0]), torch.zeros(fake_BT.shape[0])]).to(logits_N.device)
    return LossOutput(F.binary_cross_entropy_with_logits(logits_N, labels_N, reduction="sum"), logits_N.shape[0],
                      real_BT.numel() + fake_BT.numel())


def policy_gradient_loss(generator: nn.Module, seqs_BT: Tensor, q_BT: Tensor, start_id: int,
                         end_id: int | None) -> LossOutput:
    """G's side: -sum_t Q_t log G(y_t | y_<t) over each sequence's own tokens (not the forced padding), summed over
    the B sequences. Its gradient is the REINFORCE estimate of -grad E[reward]."""
    x_BT, _ = mle_batch(seqs_BT, start_id, end_id)
    logp_BT = torch.log_softmax(lm_logits(generator, x_BT).float(), -1).gather(-1, seqs_BT[..., None]).squeeze(-1)
    weight_BT = q_BT * scored_positions(seqs_BT, end_id)
    return LossOutput(-(logp_BT * weight_BT).sum(), seqs_BT.shape[0], seqs_BT.numel())


@contextmanager
def _eval_mode(module: nn.Module):  # type: ignore[no-untyped-def]
    was = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was)


@torch.no_grad()
def sequence_nll(model: nn.Module, seqs_NT: Tensor, start_id: int, end_id: int | None = None,
                 temperature: float = 1.0, batch_size: int = 500) -> float:
    """Mean NLL per scored token (nats) that ``model`` sampled at ``temperature`` gives the sequences seqs_NT."""
    device = next(model.parameters()).device
    total, n = 0.0, 0
    for i in range(0, seqs_NT.shape[0], batch_size):
        x_BT, y_BT = (t.to(device) for t in mle_batch(seqs_NT[i:i + batch_size], start_id, end_id))
        logits_BTV = lm_logits(model, x_BT).float() / temperature
        total += F.cross_entropy(logits_BTV.flatten(0, 1), y_BT.flatten(), ignore_index=IGNORE_INDEX,
                                 reduction="sum").item()
        n += int((y_BT != IGNORE_INDEX).sum())
    return total / max(n, 1)


@torch.no_grad()
def score_generator(generator: nn.Module, task: Task, n: int, temperature: float, seed: int) -> dict[str, float]:
    """Sample ``n`` sequences at ``temperature`` (seeded) and score them: oracle -> oracle_nll; real text -> bleu
    and self_bleu; both -> nll_test (G's NLL of the held-out sequences at that temperature)."""
    device = next(generator.parameters()).device
    with _eval_mode(generator):
        samples = sample_sequences(generator, n, task.train_NT.shape[1], task.start_id, temperature=temperature,
                                   generator=seeded(seed, 99, device=device), end_id=task.end_id,
                                   pad_id=task.pad_id).cpu()
        out = {"nll_test": sequence_nll(generator, task.test_NT, task.start_id, task.end_id, temperature)}
    if task.oracle is not None:
        out["oracle_nll"] = sequence_nll(task.oracle, samples, task.start_id)
    else:
        texts = decode_samples(task, samples)
        out["bleu"] = reference_set_bleu(texts, task.references, task.lang)  # type: ignore[arg-type]
        out["self_bleu"] = self_bleu(texts, task.lang) if n > 1 else 0.0  # type: ignore[arg-type]
    return out


# ---------------------------------------------------------------------------------------------- the recipe
@dataclass
class SeqGANResult:
    run_dir: Path
    rows: list[dict[str, Any]]
    verdict: str
    mle: dict[str, Any]
    gan: dict[str, Any]
    stopped: bool = False  # a stage was interrupted; continue with resume=True


def build_generator(s: SeqGANSettings, vocab_size: int) -> nn.Module:
    """G: an LSTM LM (zenlm.models.rnn) or a GPT, at the settings' sizes."""
    if s.generator == "lstm":
        return RNNLM(RNNLMConfig(vocab_size=vocab_size, cell="lstm", n_embd=s.g_embd, n_hidden=s.g_hidden,
                                 n_layer=s.g_layers))
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=s.seq_len, n_layer=s.g_layers,
                         n_head=max(1, s.g_embd // 32), n_embd=s.g_embd))


def _constant_adamw(lr: float) -> OptimConfig:
    return OptimConfig(name="adamw", lr=lr, min_lr=lr, warmup_steps=0, schedule="constant", weight_decay=0.0,
                       betas=(0.9, 0.999), grad_clip=5.0)


def _stage(run: Path, model: nn.Module, get_batch: Callable[[int, int], Any], loss_fn: Any, count: Any,
           evaluate: Callable[[nn.Module], dict[str, float]], steps: int, lr: float, train: TrainConfig,
           resume: bool, progress: ProgressFn | None) -> tuple[dict[str, Any], bool]:
    """Run one stage with fit in ``run`` (or read back a finished one): -> (its summary, whether it finished)."""
    done = run / "done.json"
    if done.is_file():
        load_model_weights(model, run / "model.safetensors")
        return json.loads(done.read_text(encoding="utf-8")), True
    run.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(train, max_steps=max(steps, 1), decay_steps=None)
    res: TrainResult = fit(model, get_batch, loss_fn, run, cfg, _constant_adamw(lr), evaluate=evaluate,
                           resume=resume and bool(list_checkpoints(run / "checkpoints")), progress=progress,
                           count_targets=count)
    summary = {"steps": res.step, "train_s": round(res.train_s, 2), "stopped_by": res.stopped_by, "val": res.val}
    if res.stopped_by == "signal":
        return summary, False
    atomic_write_text(done, json.dumps(summary, indent=2) + "\n")
    return summary, True


def verdict(rows: list[dict[str, Any]], oracle: bool) -> str:
    """Which wins: is SeqGAN at temperature 1 matched or beaten on both axes by the MLE model at some
    temperature?"""
    q, d = ("oracle_nll", "nll_test") if oracle else ("bleu", "self_bleu")
    better = (lambda a, b: a <= b) if oracle else (lambda a, b: a >= b)  # quality: lower NLL / higher BLEU
    gan = next(r for r in rows if r["model"] == "seqgan" and r["temperature"] == 1.0)
    beat = [r for r in rows if r["model"] == "mle" and better(r[q], gan[q]) and r[d] <= gan[d]]
    if beat:
        best = min(beat, key=lambda r: abs(r["temperature"] - 1.0))
        return (f"MLE wins: at temperature {best['temperature']:g} the MLE model is at least as good as SeqGAN on "
                f"both axes ({q} {best[q]:.3f} vs {gan[q]:.3f}, {d} {best[d]:.3f} vs {gan[d]:.3f}).")
    return (f"SeqGAN wins: no temperature of the MLE model matches SeqGAN's {q} {gan[q]:.3f} and {d} "
            f"{gan[d]:.3f} together.")


EXPERIMENT = "experiment.yaml"  # the experiment's settings; its two stages are run directories (mle/, gan/)


def _read_experiment(out: Path) -> dict[str, Any]:
    """The settings of the SeqGAN experiment in ``out`` (ConfigError naming the file when it is not one)."""
    path = out / EXPERIMENT
    if not path.is_file():
        raise ConfigError(f"{out} holds no SeqGAN experiment (no {EXPERIMENT}); start it without --resume.")
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid YAML ({e}); it is damaged.") from None
    if not isinstance(saved, dict) or saved.get("experiment") != "seqgan" or not isinstance(saved.get("seqgan"), dict):
        raise ConfigError(f"{path} is not a SeqGAN experiment's settings; resume it with the command that made it.")
    return saved


def train_seqgan(
    out: str | Path,
    *,
    settings: SeqGANSettings | None = None,
    resume: bool = False,
    train: TrainConfig | None = None,
    progress: ProgressFn | None = None,
) -> SeqGANResult:
    """Run a SeqGAN experiment (see the module docstring) into directory ``out``.

    settings: the experiment (SeqGANSettings); ignored on resume (the saved ones are used)
    resume:   continue an interrupted experiment in ``out``: finished stages are read back, an interrupted one
              continues from its newest checkpoint
    train:    the loop's settings (seed, device, precision, eval_every, log_every, ckpt_every, threads); the
              step counts come from the settings
    """
    train = train or TrainConfig()
    apply_process_settings(train)
    out = Path(out)
    if resume:
        saved = _read_experiment(out)
        s = SeqGANSettings(**saved["seqgan"])
        tok: Tokenizer | None = Tokenizer.load(out) if (out / "tokenizer.json").is_file() else None
    else:
        if (out / EXPERIMENT).exists():
            raise ConfigError(f"{out} already holds an experiment; pass --resume to continue it, or choose another "
                              "--out.")
        s, tok = settings or SeqGANSettings(), None
    seed = train.seed
    task = _oracle_task(s, seed) if s.data == "oracle" else _text_task(s, tok, progress)
    device = resolve_device(train.device)
    if task.oracle is not None:
        task.oracle.to(device)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        if task.tokenizer is not None:
            task.tokenizer.save(out)
        if task.oracle is not None:
            save_model(task.oracle, out / "oracle.safetensors")
        atomic_write_text(out / EXPERIMENT, yaml.safe_dump(
            {"zenlm_version": __version__, "experiment": "seqgan", "seqgan": config_to_dict(s),
             "train": config_to_dict(train)}, sort_keys=False, allow_unicode=True))
    source = "oracle" if task.oracle is not None else s.data
    report(progress, "seqgan", message=f"{source}: {task.train_NT.shape[0]:,} training and {task.test_NT.shape[0]:,} held-out sequences of {s.seq_len} tokens, vocabulary "
           f"{task.vocab_size:,}")

    torch.manual_seed(seed)
    g_model = build_generator(s, task.vocab_size).to(device)
    train_NT = task.train_NT.to(device)

    def real_rows(step: int, micro: int) -> Tensor:
        idx = torch.randint(0, train_NT.shape[0], (s.batch_size,), generator=seeded(seed, step, micro, 1))
        return train_NT[idx.to(device)]

    def evaluate(m: nn.Module) -> dict[str, float]:
        scores = score_generator(g_model, task, s.eval_samples, 1.0, seed)
        return {"val_loss": scores["nll_test"], **{f"val_{k}": v for k, v in scores.items() if k != "nll_test"}}

    def mle_get_batch(step: int, micro: int) -> tuple[Tensor, Tensor]:
        return mle_batch(real_rows(step, micro), task.start_id, task.end_id)

    report(progress, "seqgan", message=f"stage 1/2: maximum likelihood, {s.mle_steps} steps")
    mle, finished = _stage(out / "mle", g_model, mle_get_batch, mle_loss, count_labels, evaluate, s.mle_steps,
                           s.mle_lr, train, resume, progress)
    if not finished:
        return SeqGANResult(out, [], "", mle, {}, stopped=True)
    mle_state = {k: v.detach().clone() for k, v in g_model.state_dict().items()}

    torch.manual_seed(seed + 1)
    d_cfg = CNNDiscriminatorConfig(vocab_size=task.vocab_size, n_embd=s.d_embd, filters=[s.d_filters] * 4)
    gan = SeqGAN(g_model, CNNDiscriminator(d_cfg).to(device))

    def gan_get_batch(step: int, micro: int) -> tuple[str, int, Tensor, int]:
        phase = s.phase(step)
        return phase, step * 1009 + micro, real_rows(step, micro), (2 if phase == "d" else 1) * s.batch_size

    def gan_loss(model: nn.Module, batch: tuple[str, int, Tensor, int]) -> LossOutput:
        phase, key, real_BT, _ = batch
        g = seeded(seed, key, 2, device=device)
        fake_BT = sample_sequences(model.generator, real_BT.shape[0], s.seq_len, task.start_id, generator=g,
                                   end_id=task.end_id, pad_id=task.pad_id)
        if phase == "d":
            return discriminator_loss(model.discriminator, real_BT, fake_BT)
        with _eval_mode(model.discriminator) as d:
            q_BT = rollout_rewards(model.generator, d, fake_BT, task.start_id, s.rollouts, generator=g,
                                   end_id=task.end_id, pad_id=task.pad_id)
        return policy_gradient_loss(model.generator, fake_BT, q_BT, task.start_id, task.end_id)

    def gan_evaluate(m: nn.Module) -> dict[str, float]:
        scores = evaluate(m)
        test = task.test_NT[:s.eval_samples].to(device)
        fake = sample_sequences(g_model, test.shape[0], s.seq_len, task.start_id,
                                generator=seeded(seed, 98, device=device), end_id=task.end_id, pad_id=task.pad_id)
        logits = gan.discriminator(torch.cat([test, fake]))
        right = (logits[:len(test)] > 0).sum() + (logits[len(test):] <= 0).sum()
        return {**scores, "val_d_acc": float(right) / (2 * len(test))}

    report(progress, "seqgan", message=f"stage 2/2: adversarial, {s.d_pretrain_steps} discriminator steps, then "
           f"{s.adv_rounds} rounds of {s.g_steps} generator + {s.d_steps} discriminator steps ({s.rollouts} "
           "roll-outs per prefix)")
    adv, finished = _stage(out / "gan", gan, gan_get_batch, gan_loss, lambda b: b[3], gan_evaluate, s.adv_steps,
                           s.adv_lr, train, resume, progress)
    if not finished:
        return SeqGANResult(out, [], "", mle, adv, stopped=True)

    rows = []
    for name, state in (("mle", mle_state), ("seqgan", {k: v.clone() for k, v in g_model.state_dict().items()})):
        g_model.load_state_dict(state)
        for t in sorted(set(s.temperatures) | {1.0}):
            rows.append({"model": name, "temperature": t, **score_generator(g_model, task, s.eval_samples, t, seed)})
    result = SeqGANResult(out, rows, verdict(rows, task.oracle is not None), mle, adv)
    atomic_write_text(out / "results.json", json.dumps({"rows": rows, "verdict": result.verdict, "mle": mle,
                                                        "gan": adv}, indent=2) + "\n")
    return result


__all__ = ["SeqGANResult", "SeqGANSettings", "Task", "decode_samples", "discriminator_loss", "make_oracle",
           "mle_batch", "mle_loss", "pack_sentences", "policy_gradient_loss", "score_generator", "scored_positions",
           "seeded", "sequence_nll", "train_seqgan", "verdict"]

"""Knowledge distillation (Hinton, Vinyals & Dean 2015; DistilBERT, Sanh et al. 2019): a small student learns from a
trained teacher's output distribution as well as from the labels.

For one scored row (an example of a classifier, a token of a language model) with student logits z_s, teacher
logits z_t, the true class y and a temperature T::

    p_t  = softmax(z_t / T)                     # the teacher's softened distribution
    KL   = sum_v p_t[v] * (log p_t[v] - log softmax(z_s / T)[v])       # KL(p_t || p_s)
    loss = alpha * T^2 * KL  +  (1 - alpha) * CE(z_s, y)  (+ cos_weight * (1 - cos(W h_s, h_t)))

T > 1 exposes how the teacher ranks the wrong answers ("dark knowledge"); the T^2 keeps the soft term's gradients
at the scale of the hard term's as T changes (the gradient of the KL scales as 1/T^2). alpha = 0 is plain
training on the labels; the optional cosine term (DistilBERT) pulls the student's last hidden state, mapped to the
teacher's width by a learned W, towards the teacher's. :func:`distillation_loss` is that formula, summed over rows.

Two recipes:

* :func:`distill_classifier`: teacher = a classifier run (``zenlm finetune classify``), student = a BERT preset
  (trained from scratch) or an encoder run (e.g. masked-LM pretrained), with the teacher's tokenizer. The
  teacher's logits (and pooled vectors) are computed once for the training texts and saved in
  ``OUT/teacher.safetensors``; training, validation, early stopping and report are those of fine-tuning.
* :func:`distill_lm`: teacher = a GPT run, student = a GPT preset, on the teacher's token shards; the teacher runs
  on every batch (its forward pass is part of the student's training time).

Both write a normal run directory (``zenlm.load`` opens it like any classifier / GPT run) with the settings under
``distill:`` in config.yaml. ``alpha = 0`` trains exactly as ``zenlm finetune classify`` / ``zenlm pretrain`` do.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from zenlm import __version__
from zenlm.data.batches import IGNORE_INDEX
from zenlm.data.classify import ClassBatches, encode_for_model, pad_batch, read_labelled, stratified_split
from zenlm.data.shards import load_index
from zenlm.device import resolve_device
from zenlm.errors import CheckpointError, ConfigError, DataError
from zenlm.evaluate import ClassificationReport
from zenlm.fileio import save_safetensors
from zenlm.models.classifier import SequenceClassifier
from zenlm.models.registry import build_model, find_preset
from zenlm.progress import ProgressFn, report
from zenlm.recipes.finetune_classify import evaluate_classifier, load_backbone, write_report
from zenlm.recipes.pretrain import _causal_lm_task
from zenlm.rundir import copy_tokenizer_files, load_run, read_run_config, run_task, write_run_config
from zenlm.tokenizer import Tokenizer
from zenlm.train.checkpoint import list_checkpoints, load_model_weights, save_model
from zenlm.train.loop import TrainConfig, TrainResult, apply_process_settings, config_to_dict, fit
from zenlm.train.optim import OptimConfig
from zenlm.train.step import LossOutput


# ---------------------------------------------------------------------------------------------- the objective
def soft_kl(student_NV: Tensor, teacher_NV: Tensor, temperature: float) -> Tensor:
    """KL(softmax(z_t / T) || softmax(z_s / T)) per row, in nats: [N, V] logits -> [N] (float32)."""
    log_p_t = torch.log_softmax(teacher_NV.float() / temperature, dim=-1)
    log_p_s = torch.log_softmax(student_NV.float() / temperature, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)


def distillation_loss(student_NV: Tensor, teacher_NV: Tensor, target_N: Tensor, alpha: float, temperature: float,
                      hidden: tuple[Tensor, Tensor] | None = None, cos_weight: float = 0.0) -> Tensor:
    """alpha * T^2 * sum KL + (1 - alpha) * sum CE (+ cos_weight * sum (1 - cos)) over the scored rows (targets
    that are not -100). hidden: (the student's mapped hidden states, the teacher's), [N, C] each, or None."""
    keep_N = target_N != IGNORE_INDEX
    ce = F.cross_entropy(student_NV.float(), target_N, ignore_index=IGNORE_INDEX, reduction="sum")
    kl = soft_kl(student_NV[keep_N], teacher_NV[keep_N], temperature).sum()
    loss = alpha * temperature**2 * kl + (1.0 - alpha) * ce
    if hidden is not None and cos_weight:
        h_s, h_t = hidden
        cos_N = F.cosine_similarity(h_s[keep_N].float(), h_t[keep_N].float(), dim=-1)
        loss = loss + cos_weight * (1.0 - cos_N).sum()
    return loss


@dataclass
class DistillSettings:
    """How the student learns from the teacher.

    alpha:       weight of the teacher's soft targets (0 = labels only, 1 = teacher only)
    temperature: T, the softening of both distributions in the KL term
    cosine:      weight of the hidden-state cosine term (0 = off); adds a learned map from the student's width to
                 the teacher's, used in training only
    """

    alpha: float = 0.5
    temperature: float = 2.0
    cosine: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}.")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}.")
        if self.cosine < 0:
            raise ConfigError(f"cosine must be >= 0, got {self.cosine}.")


class WithProjection(nn.Module):
    """The student plus the map W (student width -> teacher width) of the cosine term. Only ``student`` is kept
    at the end (the run's model.safetensors); checkpoints hold both, so a resumed run continues exactly."""

    def __init__(self, student: nn.Module, student_width: int, teacher_width: int) -> None:
        super().__init__()
        self.student = student
        self.proj = nn.Linear(student_width, teacher_width, bias=False)


def _student_of(model: nn.Module) -> nn.Module:
    return model.student if isinstance(model, WithProjection) else model


@dataclass
class DistillResult:
    """What a distillation run did: its directory, the loop's result, and (classifiers) the validation report."""

    run_dir: Path
    train: TrainResult
    report: ClassificationReport | None = None
    teacher_s: float = 0.0  # time spent computing the teacher's outputs before training (classifiers)


def _start(out: Path, resume: bool, student: str, settings: DistillSettings | None) -> tuple[str, DistillSettings,
                                                                                            dict[str, Any]]:
    """A new run's (student, settings), or on resume the saved ones and the saved config."""
    if not resume:
        if (out / "config.yaml").exists() or list_checkpoints(out / "checkpoints"):
            raise ConfigError(f"{out} already holds a run; pass --resume to continue it, or choose another --out.")
        return student, settings or DistillSettings(), {}
    saved = read_run_config(out)
    if "distill" not in saved:
        raise ConfigError(f"{out} is not a distillation run; resume it with the command that made it.")
    d = saved["distill"]
    kept = DistillSettings(**{f.name: d[f.name] for f in dataclasses.fields(DistillSettings)})
    return d["student"], kept, saved


def _student_config(student: str, capability: str, **fields: Any) -> Any:
    arch, _ = find_preset(student)
    if not arch.can(capability):
        raise ConfigError(f"student preset {student!r} is a {arch.title}, which cannot be a {capability} student.")
    return arch.config(student, **fields)


def _finish(model: nn.Module, out: Path) -> nn.Module:
    """Make ``out/model.safetensors`` the student's own weights (the kept ones) and return the student. Only for a
    run that ended normally: an interrupted one keeps the loop's files as they are, so resuming finds them."""
    load_model_weights(model, out / "model.safetensors")
    student = _student_of(model)
    if student is not model:
        save_model(student, out / "model.safetensors")
    return student


# ---------------------------------------------------------------------------------------------- classifiers
@torch.no_grad()
def teacher_outputs(teacher: SequenceClassifier, seqs: list[list[int]], pad_id: int, batch_size: int,
                    device: torch.device) -> tuple[Tensor, Tensor]:
    """The teacher's logits [N, n_classes] and pooled vectors [N, C_t] for encoded texts, in their order."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # batched by length: little padding
    logits = torch.empty(len(seqs), teacher.n_classes)
    pooled = torch.empty(len(seqs), teacher.config.n_embd)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids, mask = (t.to(device) for t in pad_batch([seqs[i] for i in idx], pad_id))
        v = teacher.pool(teacher.hidden(ids, mask), mask)
        pooled[idx], logits[idx] = v.float().cpu(), teacher.head(v).float().cpu()
    return logits, pooled


def _classifier_student(student: str, tok: Tokenizer, n_classes: int, pooling: str, dropout: float, max_len: int,
                        seed: int, overrides: dict[str, Any]) -> SequenceClassifier:
    """The student classifier: a preset's backbone (initialised from ``seed``) or a run's (its weights), then a
    head initialised from ``seed`` (as ``zenlm finetune classify`` initialises its head)."""
    if Path(student).is_dir():  # a pretrained encoder run with the teacher's vocabulary
        backbone, stok = load_backbone(student)
        if stok.hf.get_vocab() != tok.hf.get_vocab():
            raise ConfigError(f"the student run {student} has another vocabulary than the teacher; a student must "
                              "read the teacher's token ids (pretrain it on data prepared with the teacher's "
                              "tokenizer, or give a preset).")
    else:
        extra = {"pad_id": tok.pad_id or 0} if find_preset(student)[0].name == "bert" else {}
        cfg = _student_config(student, "classify", **{"vocab_size": tok.vocab_size, **extra, **overrides})
        torch.manual_seed(seed)
        backbone = build_model(cfg)
    if backbone.config.block_size < max_len:
        raise ConfigError(f"the student reads at most {backbone.config.block_size} tokens, the teacher {max_len}.")
    if pooling == "auto":
        pooling = "mean" if hasattr(backbone, "pool") else "last"
    torch.manual_seed(seed)
    return SequenceClassifier(backbone, n_classes, pooling, dropout)  # type: ignore[arg-type]


def distill_classifier(
    teacher: str | Path,
    student: str,
    out: str | Path,
    *,
    data: str | Path | None = None,
    val: str | Path | None = None,
    val_fraction: float = 0.1,
    settings: DistillSettings | None = None,
    student_overrides: dict[str, Any] | None = None,
    pooling: Literal["auto", "cls", "mean", "last"] = "auto",
    dropout: float = 0.1,
    batch_size: int = 16,
    epochs: float = 3.0,
    lr: float = 5e-4,
    weight_decay: float = 0.01,
    warmup_frac: float = 0.1,
    patience: int = 2,
    evals_per_epoch: int = 2,
    resume: bool = False,
    train: TrainConfig | None = None,
    progress: ProgressFn | None = None,
) -> DistillResult:
    """Train classifier ``student`` on the teacher classifier run's task with the distillation loss; writes ``out``.

    teacher:         a classifier run (zenlm finetune classify); its tokenizer, labels and max_len are used
    student:         a BERT preset (zenlm presets: bert-tiny, bert-mini ...) trained from scratch, or an encoder run
                     with the teacher's vocabulary
    data:            the labelled .jsonl/.csv texts (default: the teacher's training file)
    val:             a separate validation file (default: a stratified val_fraction of data, fixed by train.seed,
                     as fine-tuning splits it)
    val_fraction:    share of each class held out for validation when val is not given
    settings:        alpha, temperature and the cosine weight (DistillSettings)
    student_overrides: config fields to change on top of the student preset (e.g. {"n_layer": 1})
    pooling:         auto (BERT: mean of the hidden states), cls, mean or last
    dropout:         dropout before the student's classification head
    batch_size:      texts per step
    epochs:          passes over the training texts (train.max_steps is ignored; train.max_seconds caps the run)
    lr:              peak AdamW learning rate (warm-up over warmup_frac of the steps, then linear decay to 0)
    weight_decay:    AdamW weight decay
    warmup_frac:     share of the steps spent warming the learning rate up
    patience:        stop after this many evaluations without a better validation macro-F1 (0 = never)
    evals_per_epoch: validations per pass over the training texts
    resume:          continue the run in out from its newest checkpoint (its saved student and settings are used)
    """
    train = train or TrainConfig()
    apply_process_settings(train)
    teacher, out = Path(teacher), Path(out)
    student, settings, _ = _start(out, resume, student, settings)
    if epochs <= 0 or batch_size < 1 or evals_per_epoch < 1:
        raise ConfigError("epochs must be > 0, batch_size and evals_per_epoch >= 1.")
    device = resolve_device(train.device)
    trun = load_run(teacher, device=str(device))
    if trun.task != "classify":
        raise ConfigError(f"{teacher} is not a classifier run; distil a classifier from a `zenlm finetune "
                          "classify` run (or a language model from a `zenlm pretrain` run).")
    task, tok = trun.saved["task"], trun.tokenizer
    labels, max_len = list(task["labels"]), int(task["max_len"])
    if data is None:
        data = task.get("data")
        if not data or not Path(data).is_file():
            raise DataError(f"the teacher's training file {data} is gone; give --data.")
    fields = task.get("text_field", "text"), task.get("label_field", "label")
    examples = read_labelled(data, *fields)
    train_ex, val_ex = ((examples, read_labelled(val, *fields)) if val is not None
                        else stratified_split(examples, val_fraction, train.seed))
    unknown = sorted({lb for _, lb in train_ex + val_ex} - set(labels))
    if unknown:
        raise DataError(f"the data has label(s) {unknown} the teacher does not know; its labels: {labels}.")
    index = {label: i for i, label in enumerate(labels)}
    is_encoder = hasattr(trun.model.backbone, "pool")
    x_train = encode_for_model(tok, [t for t, _ in train_ex], max_len, encoder=is_encoder)
    x_val = encode_for_model(tok, [t for t, _ in val_ex], max_len, encoder=is_encoder)
    y_train = torch.as_tensor([index[lb] for _, lb in train_ex])
    y_val = [index[lb] for _, lb in val_ex]
    pad_id = tok.pad_id if tok.pad_id is not None else 0

    out.mkdir(parents=True, exist_ok=True)
    cache = out / "teacher.safetensors"
    start = time.perf_counter()
    if resume and cache.is_file():
        saved_t = load_file(str(cache))
        t_logits, t_pooled = saved_t["logits"], saved_t["pooled"]
    else:
        t_logits, t_pooled = teacher_outputs(trun.model, x_train, pad_id, 2 * batch_size, device)
        save_safetensors({"logits": t_logits, "pooled": t_pooled}, cache)
    teacher_s = time.perf_counter() - start
    report(progress, "distill", message=f"teacher {teacher}: outputs for {len(x_train):,} training texts in "
           f"{teacher_s:.1f} s; {len(val_ex):,} validation texts, {len(labels)} classes")

    student_model = _classifier_student(student, tok, len(labels), pooling, dropout, max_len, train.seed,
                                        student_overrides or {})
    model: nn.Module = student_model
    if settings.cosine:
        model = WithProjection(student_model, student_model.config.n_embd, t_pooled.shape[1])
    model = model.to(device)
    # the "labels" are the row numbers: a batch then knows its rows of y_train and of the teacher's outputs
    batches = ClassBatches(x_train, list(range(len(x_train))), batch_size, pad_id, seed=train.seed)
    max_steps = max(1, math.ceil(epochs * batches.steps_per_epoch))
    eval_every = max(1, batches.steps_per_epoch // evals_per_epoch)
    train = TrainConfig(**{**config_to_dict(train), "max_steps": max_steps, "eval_every": eval_every,
                           "log_every": min(train.log_every, eval_every)})
    optim = OptimConfig(name="adamw", lr=lr, min_lr=0.0, warmup_steps=round(warmup_frac * max_steps),
                        schedule="linear", weight_decay=weight_decay, betas=(0.9, 0.999))
    if not resume:
        copy_tokenizer_files(teacher, out)
        run_task_cfg = {"kind": "classify", "labels": labels, "pooling": student_model.pooling, "dropout": dropout,
                        "max_len": max_len, "text_field": fields[0], "label_field": fields[1], "base": None,
                        "data": str(Path(data).resolve()), "n_train": len(train_ex), "n_val": len(val_ex)}
        write_run_config(out, {
            "zenlm_version": __version__, "model": student_model.backbone.config.to_dict(), "task": run_task_cfg,
            "distill": {"teacher": str(teacher.resolve()), "student": student, **dataclasses.asdict(settings)},
            "train": config_to_dict(train), "optim": config_to_dict(optim), "objective": "classify"})

    def get_batch(step: int, micro: int) -> tuple[Tensor, ...]:
        ids, mask, rows = batches.get(step * train.grad_accum + micro)
        return tuple(t.to(device) for t in (ids, mask, t_logits[rows], t_pooled[rows], y_train[rows]))

    def loss_fn(m: nn.Module, batch: tuple[Tensor, ...]) -> LossOutput:
        ids, mask, zt, ht, y = batch
        n_tokens = int(mask.sum())
        if isinstance(m, WithProjection):
            s = m.student
            v = s.pool(s.hidden(ids, mask), mask)
            loss = distillation_loss(s.head(s.drop(v)).float(), zt, y, settings.alpha, settings.temperature,
                                     (m.proj(v), ht), settings.cosine)
        else:
            loss = distillation_loss(m(ids, mask), zt, y, settings.alpha, settings.temperature)
        return LossOutput(loss, y.numel(), n_tokens)

    def evaluate(m: nn.Module) -> dict[str, float]:
        return evaluate_classifier(student_model, x_val, y_val, labels, pad_id, 2 * batch_size, device)[0]

    n_params = sum(p.numel() for p in student_model.parameters())
    report(progress, "train", message=f"student {student}: {n_params / 1e6:.2f}M parameters, alpha "
           f"{settings.alpha:g}, T {settings.temperature:g}, cosine {settings.cosine:g}; {max_steps} steps")
    result = fit(model, get_batch, loss_fn, out, train, optim, evaluate=evaluate, best_metric="val_f1",
                 patience=patience or None, resume=resume, progress=progress,
                 count_targets=lambda b: b[0].shape[0])
    if result.stopped_by == "signal":  # the checkpoint is what counts; the run continues with resume=True
        return DistillResult(out, result, None, teacher_s)
    clf = _finish(model, out).eval()
    _, rep = evaluate_classifier(clf, x_val, y_val, labels, pad_id, 2 * batch_size,  # type: ignore[arg-type]
                                 device)
    write_report(rep, out / "report.json", out / "plots" / "confusion.png",
                 extra={"best_step": result.best_step, "stopped_by": result.stopped_by, "teacher_s": teacher_s})
    return DistillResult(out, result, rep, teacher_s)


# ---------------------------------------------------------------------------------------------- language models
def distill_lm(
    teacher: str | Path,
    student: str,
    out: str | Path,
    *,
    data: str | Path | None = None,
    settings: DistillSettings | None = None,
    student_overrides: dict[str, Any] | None = None,
    batch_size: int = 16,
    seq_len: int | None = None,
    eval_tokens: int | None = 65536,
    resume: bool = False,
    train: TrainConfig | None = None,
    optim: OptimConfig | None = None,
    progress: ProgressFn | None = None,
) -> DistillResult:
    """Train GPT preset ``student`` on the teacher GPT run's token shards with the distillation loss (per token);
    writes run directory ``out`` (open it with zenlm.load / zenlm generate).

    teacher:     a GPT run (zenlm pretrain)
    student:     a GPT preset (zenlm presets) trained from scratch with the teacher's vocabulary
    data:        a data directory (zenlm prepare) with the teacher's vocabulary (default: the teacher's own data)
    settings:    alpha, temperature and the cosine weight (DistillSettings)
    student_overrides: config fields to change on top of the student preset (e.g. {"n_layer": 2})
    batch_size:  windows per step
    seq_len:     training window (None: the student's block_size, at most the teacher's)
    eval_tokens: validation tokens per evaluation (None = the whole split)
    resume:      continue the run in out from its newest checkpoint
    optim:       the student's optimiser (None: AdamW 1e-3, warm-up 100 steps, cosine to 1e-4)
    """
    train = train or TrainConfig()
    apply_process_settings(train)
    teacher, out = Path(teacher), Path(out)
    student, settings, saved = _start(out, resume, student, settings)
    device = resolve_device(train.device)
    trun = load_run(teacher, device=str(device))
    if not trun.arch.can("causal-lm") or run_task(trun.saved):
        raise ConfigError(f"{teacher} is not a language-model run; distil a language model from a `zenlm pretrain` "
                          "run (or a classifier from a `zenlm finetune classify` run).")
    t_model = trun.model
    data = Path(data or (trun.saved.get("data") or {}).get("dir", ""))
    if not (data / "index.json").is_file():
        raise DataError(f"{data} is not a data directory (zenlm prepare); give --data.")
    index = load_index(data)
    if int(index["vocab_size"]) > t_model.config.vocab_size:
        raise ConfigError(f"{data} has {index['vocab_size']} token ids; the teacher knows "
                          f"{t_model.config.vocab_size}.")
    if resume:
        cfg = trun.arch.config_from_dict(saved["model"])
        batch_size, seq_len = saved["batch"]["batch_size"], saved["batch"]["seq_len"]
    else:
        cfg = _student_config(student, "causal-lm", **{"vocab_size": t_model.config.vocab_size,
                                                       **(student_overrides or {})})
    seq_len = seq_len or min(cfg.block_size, t_model.config.block_size)
    if seq_len > min(cfg.block_size, t_model.config.block_size):
        raise ConfigError(f"seq_len {seq_len} exceeds the student's or the teacher's context.")
    if resume:
        optim = OptimConfig(**saved["optim"])
    optim = optim or OptimConfig(name="adamw", lr=1e-3, min_lr=1e-4, warmup_steps=100)
    get_batch, _, count, evaluate = _causal_lm_task(data, index, batch_size, seq_len, batch_size, seq_len,
                                                    eval_tokens, train.seed, device)
    torch.manual_seed(train.seed)
    student_lm = build_model(cfg).to(device)
    model: nn.Module = student_lm
    if settings.cosine:
        model = WithProjection(student_lm, cfg.n_embd, t_model.config.n_embd).to(device)

    def loss_fn(m: nn.Module, batch: tuple[Tensor, Tensor]) -> LossOutput:
        x_BT, y_BT = batch
        with torch.no_grad():
            if settings.cosine:
                h_t = t_model.features(x_BT)
                z_t = t_model.head(h_t)
            else:
                z_t, h_t = t_model(x_BT), None
        if isinstance(m, WithProjection):
            h_s = m.student.features(x_BT)
            assert h_t is not None
            z_s, hidden = m.student.head(h_s), (m.proj(h_s).flatten(0, 1), h_t.flatten(0, 1))
        else:
            z_s, hidden = m(x_BT), None
        loss = distillation_loss(z_s.flatten(0, 1), z_t.flatten(0, 1), y_BT.flatten(), settings.alpha,
                                 settings.temperature, hidden, settings.cosine)
        return LossOutput(loss, y_BT.numel(), x_BT.numel())

    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        copy_tokenizer_files(data, out)
        write_run_config(out, {
            "zenlm_version": __version__, "model": cfg.to_dict(),
            "batch": {"batch_size": batch_size, "seq_len": seq_len, "eval_tokens": eval_tokens,
                      "eval_seq_len": seq_len, "eval_batch_size": batch_size},
            "train": config_to_dict(train), "optim": config_to_dict(optim),
            "data": {"dir": str(data.resolve()), "vocab_size": int(index["vocab_size"]),
                     "corpus": index.get("corpus")},
            "objective": "causal-lm",
            "distill": {"teacher": str(teacher.resolve()), "student": student, **dataclasses.asdict(settings)}})
    n_student, n_teacher = (sum(p.numel() for p in m.parameters()) / 1e6 for m in (student_lm, t_model))
    report(progress, "train", message=f"student {student}: {n_student:.2f}M parameters, teacher {n_teacher:.2f}M; "
           f"alpha {settings.alpha:g}, "
           f"T {settings.temperature:g}, cosine {settings.cosine:g}; {batch_size}x{seq_len} tokens per step")

    def evaluate_student(m: nn.Module) -> dict[str, float]:
        return evaluate(student_lm)

    result = fit(model, get_batch, loss_fn, out, train, optim, evaluate=evaluate_student, resume=resume,
                 progress=progress, count_targets=count)
    if result.stopped_by != "signal":  # interrupted: the checkpoint is what counts (resume=True continues)
        _finish(model, out)
    return DistillResult(out, result)


def recipe_for(teacher: str | Path) -> Callable[..., DistillResult]:
    """The recipe that distils the run ``teacher``: :func:`distill_classifier` for a classifier run,
    :func:`distill_lm` for a GPT language-model run."""
    saved = read_run_config(teacher)
    if run_task(saved) == "classify":
        return distill_classifier
    if saved.get("objective", "causal-lm") == "causal-lm" and saved["model"].get("arch", "gpt") == "gpt":
        return distill_lm
    raise CheckpointError(f"{teacher} is neither a classifier nor a GPT language-model run; nothing to distil.")


def distill(teacher: str | Path, student: str, out: str | Path, **kwargs: Any) -> DistillResult:
    """Distil the run ``teacher`` into ``student`` with the recipe :func:`recipe_for` picks (``kwargs`` go to it)."""
    return recipe_for(teacher)(teacher, student, out, **kwargs)


__all__ = ["DistillResult", "DistillSettings", "WithProjection", "distill", "distill_classifier",
           "distill_lm", "distillation_loss", "recipe_for", "soft_kl", "teacher_outputs"]

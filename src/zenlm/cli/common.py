"""What the verbs share: progress bars on the terminal, the summary of a training run, the shape flags, and
the check that a run can do what a verb asks of it."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from zenlm.clikit import Param
from zenlm.progress import Progress


def launch_rank() -> int:
    """This process's rank when torchrun started it (RANK), else 0: only rank 0 prints."""
    from zenlm.errors import ZenlmError
    from zenlm.train.distributed import launch_env

    try:
        return launch_env()[0]
    except ZenlmError:
        return 0  # a malformed RANK is reported where the run starts


class TerminalProgress:
    """Renders :class:`Progress` records as tqdm bars on stderr (one bar per task); silent in every process of a
    torchrun launch but rank 0."""

    def __init__(self) -> None:
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self.bars: dict[str, object] = {}
        self.silent = launch_rank() != 0

    def __call__(self, p: Progress) -> None:
        if self.silent:
            return
        tqdm = self._tqdm
        if p.message:
            tqdm.write(p.message, file=sys.stderr)
        if p.total is None and not p.done:
            return
        bar = self.bars.get(p.task)
        if bar is None:
            scale = p.unit == "B"
            fmt = "{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]" if p.unit == "%" else None
            bar = tqdm(total=p.total, desc=p.task, unit=p.unit or "it", unit_scale=scale,
                       unit_divisor=1024 if scale else 1000, dynamic_ncols=True, file=sys.stderr,
                       initial=p.done, leave=True, bar_format=fmt,
                       mininterval=0.2 if sys.stderr.isatty() else 10.0)
            self.bars[p.task] = bar
        if p.info:
            bar.set_postfix({k: _fmt(v) for k, v in p.info.items()}, refresh=False)  # type: ignore[attr-defined]
        bar.update(p.done - bar.n)  # type: ignore[attr-defined]  # redraws at most every mininterval
        if p.total is not None and p.done >= p.total:
            self.close(p.task)

    def close(self, task: str | None = None) -> None:
        for name in [task] if task else list(self.bars):
            bar = self.bars.pop(name, None)
            if bar is not None:
                bar.close()  # type: ignore[attr-defined]


class _Text:
    """Whether the text the CLI streams to stdout (:func:`write_text`) stops mid-line right now."""

    mid_line = False


def write_text(text: str) -> None:
    """Write streamed text (a prompt, a reply's pieces) to stdout at once, remembering whether it ends
    mid-line: a note printed meanwhile then starts on a line of its own."""
    sys.stdout.write(text)
    sys.stdout.flush()
    if text:
        _Text.mid_line = not text.endswith("\n")


class StderrHandler(logging.StreamHandler):
    """A ``logging.StreamHandler`` that writes to whatever ``sys.stderr`` is when a record comes, not to the one
    there when it was made: a server's threads log for as long as it runs, and a caller (a test harness, a
    notebook) may have swapped ``sys.stderr`` for a stream it has closed since."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler's constructor and setStream assign it: ignored
        pass


class _Notes(logging.Handler):
    """Prints a logger's records as one-line notes on stderr (on a new line when streamed text on stdout has
    stopped mid-line: both usually share one terminal)."""

    def emit(self, record: logging.LogRecord) -> None:
        lead = "\n" if _Text.mid_line else ""
        _Text.mid_line = False
        print(f"{lead}note: {record.getMessage()}", file=sys.stderr, flush=True)


def show_log_notes(name: str) -> None:
    """Show the INFO records of the library logger ``name`` on the terminal as one-line notes: what a long
    silent step is doing (building the compiled decode step), which the CLI otherwise keeps quiet."""
    logger = logging.getLogger(name)
    if not any(isinstance(h, _Notes) for h in logger.handlers):
        logger.addHandler(_Notes())
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _fmt(v: object) -> str:
    if isinstance(v, float):
        if v >= 1000:
            return f"{v:,.0f}"
        return f"{v:.3g}" if abs(v) < 0.01 else f"{v:.3f}"
    return str(v)


def show_inference_notes(lm: Any) -> None:
    """On stderr: how a loaded model keeps its weights and computes (``lm.precision``), and from now on the
    one-line notes of the compiled decode step (a build in the background, no C++ compiler found)."""
    precision = getattr(lm, "precision", None)
    if precision is not None:
        print(f"note: {precision.line()}", file=sys.stderr, flush=True)
    show_log_notes("zenlm.compiled")


def print_train_result(result: Any, out: Path) -> None:
    """How a pretraining run ended (a zenlm.train.loop.TrainResult), its validation scores and where it is."""
    val = result.val
    print(f"\nstopped by {result.stopped_by} at step {result.step} after {result.elapsed_s:.1f} s "
          f"({result.tokens_per_s:,.0f} tokens/s at the end)")
    if val:
        print(f"validation loss {val['val_loss']:.4f} nats/token  |  perplexity {val['val_ppl']:.2f}  |  "
              f"{val['val_bpb']:.4f} bits/byte")
    print(f"run directory: {out}  (loss curve: {out / 'plots' / 'loss.png'})")


def shape_params() -> list[Param]:
    """--n-layer, --n-head, --n-embd, --block-size, --dropout: changes to the preset's shape, mapped to each
    architecture's own config fields (zenlm.models.registry.Architecture.shape_overrides)."""
    return [Param("n_layer", int | None, None, "override the preset's number of layers"),
            Param("n_head", int | None, None, "override the preset's number of heads"),
            Param("n_embd", int | None, None, "override the preset's width"),
            Param("block_size", int | None, None, "override the preset's context length"),
            Param("dropout", float | None, None, "override the preset's dropout")]


LORA_FIELDS = ("rank", "alpha", "dropout", "targets", "qkv", "tokens")


def lora_params() -> list[Param]:
    """--lora and the settings of zenlm.models.lora.LoRAConfig as --lora-rank, --lora-alpha, --lora-dropout,
    --lora-targets, --lora-qkv and --lora-tokens: what a recipe's ``lora`` argument takes (see :func:`lora_config`)."""
    from typing import Literal

    from zenlm.clikit import params_of
    from zenlm.models.lora import QKV_MODES, LoRAConfig

    return [Param("lora", bool | None, None, "train LoRA adapters on the frozen base instead of every weight (the "
                  "run saves adapter.safetensors; an int8 base from `zenlm quantize` is allowed)"),
            *params_of(LoRAConfig, only=LORA_FIELDS, rename={k: f"lora_{k}" for k in LORA_FIELDS},
                       types={"targets": list[str], "qkv": Literal[QKV_MODES], "tokens": list[str]})]  # type: ignore[valid-type]


def lora_config(flags: dict[str, Any]) -> Any:
    """The LoRAConfig that --lora and the --lora-* flags describe (removed from ``flags``), or None without
    --lora; a --lora-* setting changed without --lora is a mistake, refused."""
    from zenlm.errors import ConfigError
    from zenlm.models.lora import LoRAConfig

    lora, settings = flags.pop("lora"), {k: flags.pop(f"lora_{k}") for k in LORA_FIELDS}
    if lora:
        return LoRAConfig(**settings)
    default = LoRAConfig()
    changed = [f"--lora-{k}" for k, v in settings.items() if LoRAConfig(**{k: v}).to_dict()[k] != default.to_dict()[k]]
    if changed:
        raise ConfigError(f"{', '.join(changed)} set(s) how LoRA adapters are trained; add --lora to train them.")
    return None


# What a run is used through, by what it is (see run_kind): the uses it fits (a verb, or evaluate with --data /
# --tasks) and the command that fits it best.
_KINDS: dict[str, tuple[frozenset[str], str]] = {
    "classifier": (frozenset({"predict", "embed", "evaluate --data"}), 'zenlm predict {run} "some text"'),
    "seq2seq": (frozenset({"generate", "evaluate --data"}), 'zenlm generate {run} "source text"'),
    "language-model": (frozenset({"generate", "embed", "evaluate --tasks"}), 'zenlm generate {run} "a prompt"'),
    "encoder": (frozenset({"embed"}), 'zenlm embed {run} "some text"'),
}
_EVALUATE = {"evaluate --data": "zenlm evaluate {run} --data FILE", "evaluate --tasks": "zenlm evaluate {run} --tasks NAMES"}
_DOES = {"generate": "writes text", "predict": "labels texts with a classifier", "embed": "turns texts into vectors",
         "evaluate --data": "scores a classifier or a source -> target model on a file of examples",
         "evaluate --tasks": "runs lm-eval tasks on a language model"}


def run_kind(saved: dict[str, Any]) -> tuple[str, str]:
    """What a run is, from its config.yaml (the architecture registry's capabilities, the run's task, a
    seq2seq section): (kind, how a message describes it); kind is a key of _KINDS, or "other"."""
    from zenlm.rundir import run_architecture, run_task

    arch = run_architecture(saved)
    if run_task(saved) == "classify":
        labels = (saved.get("task") or {}).get("labels") or []
        return "classifier", f"a {arch.title} classifier (labels: {', '.join(map(str, labels[:5]))})"
    if arch.can("seq2seq") or saved.get("seq2seq"):
        return "seq2seq", f"a {arch.title} trained on source -> target pairs"
    if arch.can("causal-lm") and arch.can("generate"):
        return "language-model", f"a {arch.title} language model"
    if arch.can("embed"):
        return "encoder", f"a {arch.title} (a classifier is made from it with `zenlm finetune classify --base`)"
    return "other", f"a {arch.title} model"


def check_run_fits(run: str, use: str) -> dict[str, Any]:
    """Refuse, in one line (ConfigError), a ``use`` (a verb, or "evaluate --data" / "evaluate --tasks") that the
    run in ``run`` cannot serve, naming the command that fits it; returns the run's config.yaml. Reads only
    config.yaml, so the refusal comes before any weights are loaded."""
    from zenlm.errors import ConfigError
    from zenlm.rundir import read_run_config

    saved = read_run_config(run)
    kind, what = run_kind(saved)
    uses, fits = _KINDS.get(kind, (frozenset(), ""))
    if use in uses:
        return saved
    if use.startswith("evaluate"):  # the other way to evaluate, when the run has one
        fits = next((_EVALUATE[u] for u in sorted(uses) if u.startswith("evaluate")), fits)
    hint = f"; try `{fits.format(run=run)}`" if fits else ""
    raise ConfigError(f"`zenlm {use}` {_DOES[use]}, and {run} is {what}{hint}.")

"""What the verbs share: progress bars on the terminal, the summary of a training run, the shape flags."""

from __future__ import annotations

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


def _fmt(v: object) -> str:
    if isinstance(v, float):
        if v >= 1000:
            return f"{v:,.0f}"
        return f"{v:.3g}" if abs(v) < 0.01 else f"{v:.3f}"
    return str(v)


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


LORA_FIELDS = ("rank", "alpha", "dropout", "targets", "qkv")


def lora_params() -> list[Param]:
    """--lora and the settings of zenlm.models.lora.LoRAConfig as --lora-rank, --lora-alpha, --lora-dropout,
    --lora-targets and --lora-qkv: what a recipe's ``lora`` argument takes (see :func:`lora_config`)."""
    from typing import Literal

    from zenlm.clikit import params_of
    from zenlm.models.lora import QKV_MODES, LoRAConfig

    return [Param("lora", bool | None, None, "train LoRA adapters on the frozen base instead of every weight (the "
                  "run saves adapter.safetensors; an int8 base from `zenlm quantize` is allowed)"),
            *params_of(LoRAConfig, only=LORA_FIELDS, rename={k: f"lora_{k}" for k in LORA_FIELDS},
                       types={"targets": list[str], "qkv": Literal[QKV_MODES]})]  # type: ignore[valid-type]


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

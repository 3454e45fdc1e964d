"""The run directory: what a training run leaves on disk, and how to read it back.

    RUN_DIR/config.yaml          model config + training settings (enough to rebuild and continue)
    RUN_DIR/tokenizer.json       the tokenizer (+ tokenizer_config.json)
    RUN_DIR/model.safetensors    final weights
    RUN_DIR/checkpoints/step-NNNNNN/   resumable checkpoints (see zenlm.train.checkpoint)
    RUN_DIR/metrics.jsonl        one JSON object per logged step
    RUN_DIR/plots/loss.png       loss curve
    RUN_DIR/tb/                  TensorBoard events

The model is rebuilt in two steps. The ``model:`` section names an architecture (``arch``), which the registry
(:mod:`zenlm.models.registry`) turns into a config and an ``nn.Module``. Then the run's own options wrap or
change that module, each in one function of :data:`RUN_OPTIONS`: a classifier run (``task: {kind: classify}``)
puts a classification head on it, a quantised run (``quantization:``) swaps its linear layers for int8 ones.

A LoRA run (``lora:``, written by ``--lora`` or a PEFT import; see :mod:`zenlm.adapter`) holds no base weights:
its model starts as the trained model of its base run (``lora.base.run``, whose weights must still have the
recorded fingerprint), and the option :func:`_lora_layers` wraps the adapted layers; ``adapter.safetensors``
then fills the A and B matrices (and a classifier's head), and :func:`load_run` merges them into the weights.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from torch import Tensor, nn

from zenlm.device import (
    DTYPE_NAMES,
    DTYPES,
    InferencePrecision,
    inference_precision,
    meta_build,
    resolve_device,
)
from zenlm.errors import CheckpointError, ConfigError
from zenlm.fileio import atomic_write_text
from zenlm.models.gpt import GPT
from zenlm.models.lora import LoRAConfig, apply_lora, merge_and_unload, weights_fingerprint
from zenlm.models.registry import Architecture, build_model, get_architecture
from zenlm.tokenizer import Tokenizer
from zenlm.train.checkpoint import (
    StoredTensor,
    check_finite,
    check_layout,
    list_checkpoints,
    load_model_weights,
    read_blocks,
    read_tensor,
    read_weights,
    save_model,
    weights_index,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
ADAPTER_WEIGHTS = "adapter.safetensors"  # what a LoRA run trained, in place of model.safetensors


# The sections of config.yaml that are mappings when present (a later version may add others).
SECTIONS = ("model", "batch", "train", "optim", "data", "task", "quantization", "seq2seq", "source", "resolved")


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The parsed ``config.yaml`` of a run directory (CheckpointError naming the file when it is absent, not
    YAML, or not shaped like a run's config: a mapping with a ``model`` mapping, every known section a mapping)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a zenlm run directory (no config.yaml). Check the path.")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); it is damaged.") from None
    except yaml.YAMLError as e:
        raise CheckpointError(f"{path} is not valid YAML ({e}).") from e
    if not isinstance(cfg, dict) or "model" not in cfg:
        raise CheckpointError(f"{path} has no 'model' section; it was not written by zenlm.")
    for name in SECTIONS:
        if cfg.get(name) is not None and not isinstance(cfg[name], dict):
            raise CheckpointError(f"{path}: '{name}' must be a mapping of settings, got {cfg[name]!r}; the file "
                                  "is damaged or was edited by hand.")
    if not isinstance(cfg["model"].get("arch", "gpt"), str):
        raise CheckpointError(f"{path}: model.arch must be the name of an architecture, got {cfg['model']['arch']!r}.")
    try:
        get_architecture(cfg["model"].get("arch", "gpt"))
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return cfg


def config_error(run_dir: str | Path, e: Exception, section: str = "") -> CheckpointError:
    """A ConfigError raised while reading part of a run's config.yaml, as a CheckpointError naming the file."""
    where = f" ({section})" if section else ""
    return CheckpointError(f"{Path(run_dir) / 'config.yaml'}{where}: {e}")


def write_run_config(run_dir: str | Path, run_config: dict[str, Any]) -> None:
    """Write ``run_config`` as ``run_dir/config.yaml`` (keys in the given order, atomically)."""
    atomic_write_text(Path(run_dir) / "config.yaml",
                      yaml.safe_dump(run_config, sort_keys=False, allow_unicode=True))


def save_run(run_dir: str | Path, model: nn.Module, tokenizer: Tokenizer,
             run_config: dict[str, Any] | None = None) -> Path:
    """Write a run directory that :func:`load_run` (and ``zenlm.load``) opens: config.yaml (``model:`` from
    ``model.config.to_dict()``, then ``run_config``), the tokenizer files and model.safetensors. For models
    made in code rather than trained by a recipe (tests, benchmarks, a model built by hand)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_run_config(run_dir, {"model": model.config.to_dict(), **(run_config or {})})
    tokenizer.save(run_dir)
    save_model(model, run_dir / "model.safetensors")
    return run_dir


def run_architecture(saved: dict[str, Any]) -> Architecture:
    """The registered architecture a run's config names (``model.arch``; runs written before there were
    other families have none and are GPTs)."""
    return get_architecture(saved["model"].get("arch", "gpt"))


def run_task(saved: dict[str, Any]) -> str | None:
    """What the run was fine-tuned for on top of its architecture ("classify", "chat"), or None."""
    return (saved.get("task") or {}).get("kind")


LM_TASKS = (None, "chat")  # tasks after which the model is still a plain language model (same weights, same head)


def _classifier_head(model: nn.Module, saved: dict[str, Any], run_dir: Path) -> nn.Module:
    """``task: {kind: classify}``: the backbone inside a SequenceClassifier with ``len(task.labels)`` classes."""
    task = saved.get("task") or {}
    if task.get("kind") != "classify":
        return model
    from zenlm.models.classifier import SequenceClassifier

    labels = task.get("labels")
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
        raise CheckpointError(f"{run_dir}/config.yaml: a classifier run needs task.labels (two or more names).")
    dropout = task.get("dropout", 0.1)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
        raise CheckpointError(f"{run_dir}/config.yaml: task.dropout must be a number, got {dropout!r}.")
    return SequenceClassifier(model, len(labels), task.get("pooling", "mean"), dropout)


def _int8_weights(model: nn.Module, saved: dict[str, Any], run_dir: Path) -> nn.Module:
    """``quantization: {method: int8-weight-only, ...}``: empty int8 layers that model.safetensors fills."""
    quant = saved.get("quantization") or {}
    if not quant:
        return model
    from zenlm.models.int8 import METHOD, quantize_int8

    if quant.get("method") != METHOD:
        raise CheckpointError(f"{run_dir}/config.yaml names quantization {quant.get('method')!r}; this "
                              f"version reads {METHOD!r}.")
    return quantize_int8(model, empty=True)


def _lora_base(saved: dict[str, Any], run_dir: Path) -> nn.Module:
    """The trained model of a LoRA run's base run, refused when its weights are not the ones the adapters were
    trained on (``lora.base.fingerprint``) or when the base run is gone."""
    base = saved["lora"]["base"]
    base_run = Path(base["run"])
    if not (base_run / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir}: its base run {base_run} (lora.base.run in config.yaml) is missing; put "
                              "the base run back there or correct that path.")
    model, _, _ = build_model_from_run(base_run)
    load_model_weights(model, weights_file(base_run))
    fingerprint = weights_fingerprint(model)
    if fingerprint != base["fingerprint"]:
        raise CheckpointError(
            f"{run_dir}: the weights of its base run {base_run} are not the ones its adapters were trained on "
            f"(fingerprint {fingerprint[:19]}..., recorded {str(base['fingerprint'])[:19]}...): the base was "
            "retrained or replaced. Restore the original base, or point lora.base.run in config.yaml at it.")
    return model


def _lora_layers(model: nn.Module, saved: dict[str, Any], run_dir: Path) -> nn.Module:
    """``lora: {rank, alpha, modules, ...}``: LoRA layers on the adapted layers of the base (a classifier's
    backbone; its head stays trainable), to be filled from adapter.safetensors."""
    section = saved.get("lora")
    if not section:
        return model
    from zenlm.models.classifier import SequenceClassifier

    adapted = model.backbone if isinstance(model, SequenceClassifier) else model
    apply_lora(adapted, LoRAConfig.from_dict(section), modules=section["modules"])
    return model


# What a run directory can add on top of its architecture, applied in this order to the built model.
RUN_OPTIONS: tuple[Callable[[nn.Module, dict[str, Any], Path], nn.Module], ...] = (
    _classifier_head, _int8_weights, _lora_layers)


def build_model_from_run(run_dir: str | Path) -> tuple[nn.Module, Any, dict[str, Any]]:
    """The (untrained) model described by ``run_dir/config.yaml``, its config and the whole run config.

    The architecture comes from the registry (``model.arch``); then :data:`RUN_OPTIONS` are applied (a
    classifier run wraps its GPT or BERT backbone in a :class:`~zenlm.models.classifier.SequenceClassifier`).
    A LoRA run starts from its base run's trained model instead (see the module docstring).
    """
    run_dir = Path(run_dir)
    saved = read_run_config(run_dir)
    try:
        arch = run_architecture(saved)
        cfg = arch.config_from_dict(saved["model"])
        # a LoRA run starts from its base; a new model refuses sizes that do not fit in memory before allocating
        model = _lora_base(saved, run_dir) if saved.get("lora") else build_model(cfg)
    except ConfigError as e:
        raise config_error(run_dir, e, "model") from None
    for option in RUN_OPTIONS:
        try:
            model = option(model, saved, run_dir)
        except ConfigError as e:
            raise config_error(run_dir, e) from None
    return model, cfg, saved


def weights_file(run_dir: str | Path) -> Path:
    """``run_dir/model.safetensors`` (a LoRA run: ``adapter.safetensors``), else the newest checkpoint's weights
    (a run that was stopped hard)."""
    run_dir = Path(run_dir)
    for weights in (run_dir / "model.safetensors", run_dir / ADAPTER_WEIGHTS):
        if weights.is_file():
            return weights
    ckpts = list_checkpoints(run_dir / "checkpoints")
    if not ckpts:
        raise CheckpointError(f"{run_dir} has neither model.safetensors nor a checkpoint; train it first.")
    return ckpts[-1] / "model.safetensors"


def load_run_weights(run_dir: str | Path, model: nn.Module) -> None:
    """The weights of ``run_dir`` (:func:`weights_file`) into ``model``; names, shapes, dtypes and values are
    checked (CheckpointError naming the file)."""
    load_model_weights(model, weights_file(run_dir))


def load_run_tokenizer(run_dir: str | Path) -> Tokenizer:
    """The tokenizer saved in ``run_dir`` (CheckpointError when it is missing)."""
    if not (Path(run_dir) / "tokenizer.json").is_file():
        raise CheckpointError(f"{run_dir} has no tokenizer.json; copy the tokenizer of its data directory there.")
    return Tokenizer.load(run_dir)


# What a run directory holds: the files and folders zenlm writes there (and its hidden temporary names).
_RUN_ENTRIES = re.compile(r"^(config\.yaml|tokenizer\.json|tokenizer_config\.json|generation_config\.json|"
                          r"chat_template\.jinja|(model|best)\.safetensors|metrics\.jsonl|report\.json|"
                          r"eval-.*\.(json|png)|checkpoints|plots|tb|eval|\..*\.tmp-\d+.*)$")
RunDirState = Literal["new", "foreign", "unstarted", "run"]


def run_dir_state(out: str | Path) -> RunDirState:
    """What ``out`` holds, for a recipe about to write a run there:

        "new"        nothing: it does not exist or is empty
        "foreign"    no run: a file, or a folder of files without a config.yaml (never overwritten)
        "unstarted"  a run that stopped before its first checkpoint (config.yaml, no checkpoint, no weights):
                     nothing in it is worth keeping, so it can simply be started again
        "run"        a run with a checkpoint or weights
    """
    out = Path(out)
    if not out.exists():
        return "new"
    if not out.is_dir():
        return "foreign"
    if not any(out.iterdir()):
        return "new"
    if not (out / "config.yaml").is_file():
        return "foreign"
    if (out / "model.safetensors").exists() or list_checkpoints(out / "checkpoints"):
        return "run"
    return "unstarted"


def clear_run_dir(out: str | Path, keep: tuple[str, ...] = ()) -> None:
    """Remove what a run wrote in ``out`` (the names a run directory holds, except ``keep``); anything else in
    it is left alone."""
    for p in Path(out).iterdir():
        if _RUN_ENTRIES.match(p.name) and p.name not in keep:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()


def refuse_foreign_out(out: str | Path, flag: str = "--out") -> None:
    """CheckpointError when ``out`` is a file, or a folder that holds files but no run (they would be
    overwritten or mixed with a run's)."""
    out = Path(out)
    if run_dir_state(out) != "foreign":
        return
    if not out.is_dir():
        raise CheckpointError(f"{out} is a file; give {flag} a folder to write the run into.")
    names = sorted(p.name for p in out.iterdir())
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    raise CheckpointError(f"{out} is not empty and holds no zenlm run ({shown}); choose an empty or new {flag} so "
                          "nothing there is overwritten.")


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> None:
    """Copy the tokenizer files of ``src`` (a data or run directory) into ``dst`` as they are."""
    for name in TOKENIZER_FILES:
        if (Path(src) / name).exists():
            shutil.copyfile(Path(src) / name, Path(dst) / name)


@dataclass
class LoadedRun:
    """A run directory read back: its config, architecture, model (weights loaded, in eval mode), tokenizer,
    and the precision it was loaded in."""

    run_dir: Path
    saved: dict[str, Any]
    arch: Architecture
    model: nn.Module
    tokenizer: Tokenizer
    precision: InferencePrecision | None = None

    @property
    def task(self) -> str | None:
        return run_task(self.saved)


def load_run(run_dir: str | Path, *, device: str = "auto", dtype: str = "auto", merge: bool = True) -> LoadedRun:
    """Build the model of ``run_dir``, load its weights (:func:`weights_file`) and tokenizer, on ``device``.

    dtype: "auto" (the weights' own precision: nothing is rounded that the file did not round), "fp32",
    "bf16", "fp16" or "int8" (linear layers quantised per output channel while loading, for language-model
    runs); the activations follow the hardware (:func:`zenlm.device.inference_precision`), which is recorded
    in ``LoadedRun.precision``.

    Lean: the model is built on the meta device (no memory, no random initialisation), the file's table of
    contents is checked against it, and then each tensor is read from the file straight into its final dtype,
    one at a time (converted or quantised a block of rows at a time): the process holds the weights once, in
    the chosen dtype, never a second full copy.

    merge: a LoRA run's adapters are folded into the base weights, ``W + (alpha / r) B A`` (an ordinary model,
           as fast as the base), unless its base is int8 (they then stay beside the int8 layers) or ``merge`` is
           False (the LoRA layers are kept). A LoRA run is loaded whole (base, then adapters) and then put in
           the chosen precision, computing in its weights' dtype.
    """
    run_dir = Path(run_dir)
    dev = resolve_device(device)
    saved = read_run_config(run_dir)
    if run_architecture(saved).from_tensors is not None:
        return _load_from_tensors(run_dir, saved, device)
    if saved.get("lora"):
        return _load_lora_run(run_dir, saved, dev, dtype, merge)
    path = weights_file(run_dir)
    index = weights_index(path)
    precision = inference_precision(dtype, dev, _stored_precision(index, saved))
    with meta_build():
        model, _, saved = build_model_from_run(run_dir)
    own = model.state_dict(keep_vars=True)
    check_layout(own, set(_first_names(own)), {n: (e.shape, e.dtype) for n, e in index.items()}, path)
    precision = _apply_precision(model, saved, run_dir, precision)
    _load_streaming(model, path, index, precision)
    tokenizer = load_run_tokenizer(run_dir)
    model = model.to(dev).eval()
    return LoadedRun(run_dir, saved, run_architecture(saved), model, tokenizer, precision)


def _load_lora_run(run_dir: Path, saved: dict[str, Any], dev: torch.device, dtype: str,
                   merge: bool) -> LoadedRun:
    """A LoRA run (see :func:`load_run`): the base run's model with its weights, the LoRA layers filled from
    adapter.safetensors, merged unless asked not to or on an int8 base; then in the precision asked for."""
    from zenlm.models.int8 import quantize_int8

    model, _, saved = build_model_from_run(run_dir)
    try:
        load_run_weights(run_dir, model)
    except CheckpointError as e:  # a tensor of the adapter does not fit the base
        raise CheckpointError(f"{e} The adapter does not fit the base run {saved['lora']['base']['run']}.") \
            from None
    int8_base = bool(saved["lora"]["base"].get("quantization"))
    if merge and not int8_base:
        merge_and_unload(model)
    precision = inference_precision(dtype, dev, "int8" if int8_base else "fp32")
    if precision.weights == "int8" and not int8_base:
        if not (merge and isinstance(model, GPT)):
            raise ConfigError(f"--dtype int8 quantises a merged LoRA language model; {run_dir} is not one. "
                              "Use --dtype auto, fp32 or bf16.")
        quantize_int8(model)
    compute = precision.weights if precision.weights != "int8" else precision.activations
    precision = dataclasses.replace(precision, activations=compute, why="a LoRA run computes in its weights' dtype"
                                    if precision.weights != "int8" else precision.why)
    model = model.to(dev, dtype=DTYPES[compute]).eval()
    return LoadedRun(run_dir, saved, run_architecture(saved), model, load_run_tokenizer(run_dir), precision)


def _stored_precision(index: dict[str, StoredTensor], saved: dict[str, Any]) -> str:
    """The precision of a run's weights file: "int8" for a quantised run, else the float dtype holding the
    most bytes ("fp32", "bf16" or "fp16")."""
    if saved.get("quantization"):
        return "int8"
    by_dtype: dict[torch.dtype, int] = {}
    for e in index.values():
        if e.dtype.is_floating_point:
            by_dtype[e.dtype] = by_dtype.get(e.dtype, 0) + e.end - e.start
    return DTYPE_NAMES.get(max(by_dtype, key=by_dtype.__getitem__), "fp32") if by_dtype else "fp32"


def _first_names(own: dict[str, Tensor]) -> dict[str, list[str]]:
    """Each tensor of a state dict (``keep_vars``) under its first name -> all its names (a tied matrix has
    several; a weights file holds it once, under the first)."""
    groups: dict[int, list[str]] = {}
    for name, t in own.items():
        groups.setdefault(id(t), []).append(name)
    return {names[0]: names for names in groups.values()}


def _apply_precision(model: nn.Module, saved: dict[str, Any], run_dir: Path,
                     precision: InferencePrecision) -> InferencePrecision:
    """Change the structure of the (meta) model for ``precision`` before its weights are read: int8 layers to
    quantise into, or linear layers that take weights narrower than their input. Models other than a GPT
    compute in their weights' dtype (the precision returned says so)."""
    from zenlm.models.int8 import quantize_int8
    from zenlm.models.layers import narrow_linears

    if precision.weights == "int8" and not saved.get("quantization"):
        if not isinstance(model, GPT):
            raise ConfigError(f"--dtype int8 quantises language models (GPT runs); {run_dir} holds a "
                              f"{type(model).__name__}. Use --dtype auto, fp32 or bf16.")
        with meta_build():
            quantize_int8(model, empty=True)
    if precision.weights != precision.activations and precision.weights != "int8":
        if isinstance(model, GPT):
            with meta_build():
                narrow_linears(model)
        else:
            precision = dataclasses.replace(precision, activations=precision.weights,
                                            why=f"a {type(model).__name__} computes in its weights' dtype")
    return precision


def _load_streaming(model: nn.Module, path: Path, index: dict[str, StoredTensor],
                    precision: InferencePrecision) -> None:
    """Read every tensor of a meta-device ``model`` from ``path`` into its final dtype, one at a time: the
    large matrices (linear layers, the token embedding) in the weights' dtype, the rest (norms, biases,
    scales) in the activations' dtype, int8 buffers as stored; an int8 layer of a float file is quantised
    while its rows are read. Non-finite values are a CheckpointError naming the tensor."""
    from zenlm.models.int8 import Int8Embedding, Int8Linear, quantize_rows
    from zenlm.models.layers import compute_buffers

    act = DTYPES[precision.activations]
    matrix = DTYPES.get(precision.weights, act)
    own = model.state_dict(keep_vars=True)
    matrices = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)} | {"tok_emb.weight"}
    made: dict[str, Tensor] = {}
    with open(path, "rb") as fh:
        for prefix, m in model.named_modules():
            src = index.get(f"{prefix}.weight")
            if isinstance(m, (Int8Linear, Int8Embedding)) and src is not None:  # quantise rows as they come
                q = torch.empty(src.shape, dtype=torch.int8)
                scale = torch.empty(src.shape[0], dtype=torch.float32)
                for r, rows in read_blocks(fh, src):
                    check_finite(f"{prefix}.weight", rows, path)
                    q[r : r + len(rows)], scale[r : r + len(rows)] = quantize_rows(rows)
                made[f"{prefix}.weight_int8"], made[f"{prefix}.scale"] = q, scale.to(act)
        for first, names in _first_names(own).items():
            meta = own[first]
            if first in made:
                t = made.pop(first)
            else:
                want = meta.dtype if not meta.is_floating_point() else matrix if first in matrices else act
                t = read_tensor(fh, index[first], want)
                check_finite(first, t, path)
            value = nn.Parameter(t, requires_grad=meta.requires_grad) if isinstance(meta, nn.Parameter) else t
            for name in names:  # setattr: a module that keeps views of its weights (nn.LSTM) renews them
                owner, _, attr = name.rpartition(".")
                setattr(model.get_submodule(owner), attr, value)
    compute_buffers(model)  # rotary tables: computed, not loaded
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not left, f"tensors the weights file did not fill: {left[:3]}"


def _load_from_tensors(run_dir: Path, saved: dict[str, Any], device: str) -> LoadedRun:
    """A family whose tensor shapes come from the data (the n-gram model's count tables) is built from the
    tensors of its weights file (``Architecture.from_tensors``, which checks them), in the dtypes they are
    stored in."""
    arch = run_architecture(saved)
    assert arch.from_tensors is not None
    model = arch.from_tensors(arch.config_from_dict(saved["model"]), read_weights(weights_file(run_dir)))
    return LoadedRun(run_dir, saved, arch, model.to(resolve_device(device)).eval(), load_run_tokenizer(run_dir))


__all__ = ["ADAPTER_WEIGHTS", "LM_TASKS", "RUN_OPTIONS", "SECTIONS", "TOKENIZER_FILES", "LoadedRun",
           "build_model_from_run", "clear_run_dir", "config_error", "copy_tokenizer_files", "load_run",
           "load_run_tokenizer", "load_run_weights", "read_run_config", "refuse_foreign_out", "run_architecture", "run_dir_state",
           "run_task", "save_run", "weights_file", "write_run_config"]

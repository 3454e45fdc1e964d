"""Training on several processes with PyTorch's own engine: ``torchrun`` starts them, DDP or FSDP2 keeps them
in step, and the result is the run one process would have computed.

    torchrun --nproc-per-node W -m zenlm pretrain --grad-accum K ...        (K a multiple of W)

``grad_accum`` (K) counts the micro-batches of one optimiser step over *all* processes, and a batch is a pure
function of (seed, step, micro), so process r of W takes micro-batches r, r+W, r+2W, ... of every step::

    at step s, process r of W:
        micros = r, r + W, ... < K                                   # its share of the step's K micro-batches
        N      = all_reduce(targets in its micro-batches)            # the step's targets, before any backward
        for each of its micro-batches (all but the last inside no_sync: no all-reduce yet):
            seed dropout with (seed, s, micro)                       # the same mask on whichever process
            (loss_sum / (N / W)).backward()                          # S_r: this process's summed loss
        DDP / FSDP2 average the gradients over the W processes:
            (1/W) * sum_r  W * dS_r / N  =  d(sum_r S_r) / N         # = one process over all K micro-batches
        logged loss = all_reduce(sum_r S_r * W / N) / W = S / N

so a W-process run computes the same steps (up to the order of float additions) as one process with K
micro-batches, and a run resumes on any number of processes that divides K, with no loader state to carry.

Strategies (``TrainConfig.strategy``):

    ddp    every process holds the whole model and optimiser; gradients are all-reduced after the last
           micro-batch's backward (``DistributedDataParallel``)
    fsdp   parameters, gradients and optimiser state are sharded over the processes (FSDP2: ``fully_shard`` on
           every transformer block, then on the root); on a GPU, bf16 runs compute in bf16 with fp32 master
           weights and fp32 gradient reduction (``MixedPrecisionPolicy``)
    none   one process, no wrapper            auto: none for one process, ddp for several

Both wrap a small module whose forward runs the whole objective ``loss_fn(model, batch)`` (:class:`Objective`),
so every parameter the objective touches -- BERT's masked-LM head runs after ``forward`` -- is seen by the
wrapper's hooks, and evaluation runs inside it too (FSDP2 gathers the root's weights in its forward).

Only process 0 writes metrics, TensorBoard events, plots and checkpoints. A checkpoint holds the *full* model and
optimiser state in the same safetensors + JSON files as a one-process run: with fsdp it is gathered to process
0 (``torch.distributed.checkpoint.state_dict`` with ``full_state_dict`` and ``cpu_offload``); to resume, process 0
reads and checks it and broadcasts it to the others. Every step the processes agree, in one all-reduce of two
numbers, on whether a signal arrived and on process 0's clock: SIGTERM to any process makes all of them save the
same checkpoint and stop, and a time budget ends them at the same step with the same learning rates. A process
that dies makes the others fail at their next collective (at once with gloo, after ``dist_timeout`` at most)
with a :class:`~zenlm.errors.TrainingError` that says so.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import logging
import os
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from zenlm.errors import CheckpointError, ConfigError, TrainingError
from zenlm.train.checkpoint import (
    apply_checkpoint,
    list_checkpoints,
    model_tensors,
    optimizer_tensors,
    read_latest_checkpoint,
    saved_names,
    set_rng_state,
    tied_names,
    write_checkpoint,
    write_weights,
)
from zenlm.train.step import LossFn, LossOutput

log = logging.getLogger(__name__)

Strategy = Literal["auto", "none", "ddp", "fsdp"]
STRATEGIES: tuple[str, ...] = typing.get_args(Strategy)


# ------------------------------------------------------------------------------------------- the processes


def launch_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as ``torchrun`` sets them (RANK, WORLD_SIZE, LOCAL_RANK); (0, 1, 0) when
    the process was started alone."""
    values = []
    for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
        raw = os.environ.get(name, str(default))
        try:
            values.append(int(raw))
        except ValueError:
            raise ConfigError(f"the environment variable {name}={raw!r} must be a whole number (torchrun sets "
                              "it; unset it to run one process).") from None
    rank, size, local = values
    if size < 1 or not 0 <= rank < size:
        raise ConfigError(f"RANK={rank} and WORLD_SIZE={size} do not fit together (need 0 <= RANK < WORLD_SIZE).")
    return rank, size, local


class World:
    """The processes of one run: ``rank`` of ``size`` (one process: 0 of 1, and nothing is communicated).

    Small numbers (target counts, flags, JSON) travel on a CPU (gloo) group, so they never wait for a GPU."""

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0, cpu_group: Any = None) -> None:
        self.rank, self.size, self.local_rank, self.cpu_group = rank, size, local_rank, cpu_group

    @property
    def is_main(self) -> bool:
        """Process 0: the one that prints and writes files."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every process is here."""
        if self.size > 1:
            with comm_errors(self):
                dist.barrier(group=self.cpu_group)

    def sum_cpu(self, values: list[float]) -> list[float]:
        """Element-wise sums over the processes of a few numbers (float64, on the CPU group)."""
        if self.size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        with comm_errors(self):
            dist.all_reduce(t, group=self.cpu_group)
        return t.tolist()

    def agree(self, stop: bool, seconds: float) -> tuple[bool, float]:
        """Whether any process wants to stop (a signal), and process 0's clock: one all-reduce per step, so every
        process stops at the same step and sees the same time budget and learning rate."""
        any_stop, seconds0 = self.sum_cpu([float(stop), seconds if self.is_main else 0.0])
        return any_stop > 0, seconds0

    def share(self, obj: Any) -> Any:
        """Process 0's ``obj`` (anything JSON can hold) on every process: JSON bytes in two broadcasts."""
        if self.size == 1:
            return obj
        data = json.dumps(obj, default=float).encode() if self.is_main else b""  # numpy / 0-d tensor scores
        n = torch.tensor([len(data)], dtype=torch.int64)
        with comm_errors(self):
            dist.broadcast(n, src=0, group=self.cpu_group)
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.is_main else \
                torch.empty(int(n), dtype=torch.uint8)
            dist.broadcast(buf, src=0, group=self.cpu_group)
        return json.loads(buf.numpy().tobytes().decode())

    def describe(self) -> str:
        return f"process {self.rank} of {self.size}"


_CPU_GROUP: Any = None  # the gloo group for small numbers when the default group is NCCL (made by init_world)


def current_world() -> World:
    """The processes of this run: what ``torch.distributed`` was initialised with, or one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    global _CPU_GROUP
    if _CPU_GROUP is None and dist.get_backend() != "gloo":
        _CPU_GROUP = dist.new_group(backend="gloo")  # every process calls this at the same point: fit's start
    return World(dist.get_rank(), dist.get_world_size(), launch_env()[2], _CPU_GROUP)


def init_world(device: torch.device, strategy: str, timeout_s: float) -> World:
    """Join the processes ``torchrun`` started (its environment: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT): NCCL on CUDA, gloo on the CPU; each process takes GPU LOCAL_RANK. One process started alone
    stays alone (unless ``strategy`` asks for a wrapper: then a one-process group, to measure the wrapper).
    Called once per process by the entry points (:func:`zenlm.train.loop.apply_process_settings`)."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy {strategy!r} is not supported; choose one of: {', '.join(STRATEGIES)}.")
    rank, size, local_rank = launch_env()
    if dist.is_available() and dist.is_initialized():
        return current_world()
    if size == 1 and strategy in ("auto", "none"):
        return World()
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed; train with one process (--strategy none).")
    if "MASTER_ADDR" not in os.environ:
        if size > 1:
            raise ConfigError("WORLD_SIZE is set but MASTER_ADDR is not: start the processes with torchrun.")
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    if device.type == "cuda":
        if device.index is not None and size > 1:
            raise ConfigError(f"--device {device} with {size} processes: each process uses GPU LOCAL_RANK; "
                              "pass --device cuda (or auto).")
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ConfigError(f"distributed training runs on CUDA GPUs or CPUs, not on {device.type}.")
    timeout = datetime.timedelta(seconds=timeout_s)
    kw = {"device_id": torch.device("cuda", local_rank)} if backend == "nccl" else {}  # NCCL starts at once
    dist.init_process_group(backend, rank=rank, world_size=size, timeout=timeout, **kw)
    atexit.register(_destroy)
    global _CPU_GROUP
    _CPU_GROUP = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    return World(rank, size, local_rank, _CPU_GROUP)


def _destroy() -> None:
    if dist.is_initialized():
        with contextlib.suppress(Exception):  # at exit, after a peer died: nothing left to save
            dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def resolve_strategy(strategy: str, world: World) -> str:
    """"auto" -> "none" for one process, "ddp" for several; several processes need ddp or fsdp."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy {strategy!r} is not supported; choose one of: {', '.join(STRATEGIES)}.")
    if strategy == "auto":
        return "ddp" if world.size > 1 else "none"
    if strategy == "none" and world.size > 1:
        raise ConfigError(f"--strategy none with {world.size} processes would train {world.size} separate models; "
                          "use --strategy ddp or fsdp (or auto).")
    if strategy != "none" and not dist.is_initialized():
        raise ConfigError(f"--strategy {strategy} needs torch.distributed: start the run with torchrun "
                          "(torchrun --nproc-per-node N -m zenlm ...).")
    return strategy


def check_accumulation(grad_accum: int, world: World) -> None:
    """A step's ``grad_accum`` micro-batches are shared by the processes: it must be a multiple of their number."""
    if grad_accum % world.size:
        fits = [n for n in range(1, grad_accum + 1) if grad_accum % n == 0]
        raise ConfigError(
            f"grad_accum {grad_accum} counts the micro-batches of one optimiser step over all processes (so that "
            f"the run is the same on any number of them), and {world.size} processes cannot share {grad_accum} "
            f"evenly. Use a multiple of {world.size} (e.g. --grad-accum {world.size * -(-grad_accum // world.size)}"
            f"), or run this on {', '.join(map(str, fits))} process(es); a resumed run keeps the grad_accum it "
            "started with.")


# ------------------------------------------------------------------------------------------- failures


class LostProcess(TrainingError):
    """Another process of the run stopped answering (it died, or its machine did)."""


@contextlib.contextmanager
def comm_errors(world: World, ckpt_root: Path | None = None) -> Iterator[None]:
    """Turn a failure of the communication between processes into a :class:`LostProcess` error that says what
    happened (and, given ``ckpt_root``, where the run can continue from)."""
    try:
        yield
    except LostProcess as e:
        if ckpt_root is None or e.__cause__ is None:
            raise
        raise comm_failure(world, e.__cause__, ckpt_root) from e.__cause__
    except TrainingError:
        raise
    except RuntimeError as e:
        if world.size > 1 and is_comm_failure(e):
            raise comm_failure(world, e, ckpt_root) from e
        raise


def is_comm_failure(e: BaseException) -> bool:
    """Whether ``e`` comes from the communication between processes (a peer that died, a timeout)."""
    if dist.is_available() and isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(k in text for k in ("gloo", "nccl", "connection closed",
                                                                    "connection reset", "timed out"))


def comm_failure(world: World, e: BaseException, ckpt_root: Path | None = None) -> LostProcess:
    """The error a surviving process stops with when another one is gone."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    saved = list_checkpoints(ckpt_root) if ckpt_root is not None and ckpt_root.is_dir() else []
    if saved:
        where = (f"The newest checkpoint in {ckpt_root} ({saved[-1].name}) is complete; continue from it with "
                 "--resume (on any number of processes that divides --grad-accum).")
    elif ckpt_root is not None:
        where = ("No checkpoint was saved yet: run the same command again (a run that stopped before its first "
                 "checkpoint is started again).")
    else:
        where = "Continue with --resume (on any number of processes that divides --grad-accum)."
    return LostProcess(
        f"{world.describe()} lost contact with the other processes: one of them stopped or its machine failed "
        f"(see that process's own output). PyTorch said: {first[:300]}. {where}")


# ------------------------------------------------------------------------------------------- the model


class Objective(nn.Module):
    """``forward(fn, *args) = fn(model, *args)``: a whole objective (or evaluation) as one forward pass of a
    module that holds the model, so that DDP and FSDP2 see every parameter it uses."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self.model, *args)


def _unused_parameters(model: nn.Module, probe: Callable[[nn.Module], LossOutput]) -> list[str]:
    """The trainable parameters the objective's graph does not reach, found from one forward pass (``probe``;
    no backward, nothing changes): the AccumulateGrad nodes of the autograd graph hold the parameters used."""
    loss = probe(model).loss_sum
    used: set[int] = set()
    seen: set[Any] = set()
    stack = [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            used.add(id(fn.variable))
        stack.extend(f for f, _ in fn.next_functions)
    return [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in used]


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 shards one by one (innermost first; the rest of the model is the root's unit): what
    the model's ``fsdp_units()`` names, if it has one, else every element of every ``nn.ModuleList`` (zenlm keeps
    its transformer blocks in ModuleLists). A model that calls part of a block outside the block's forward
    (the encoder-decoder computes cross-attention keys and values up front) must name that part first: FSDP2
    gathers a unit's weights only in the unit's own forward."""
    units = getattr(model, "fsdp_units", None)
    if callable(units):
        return list(units())
    return [block for m in model.modules() if isinstance(m, nn.ModuleList) for block in m]


class ParallelModel:
    """A model as the processes of a run train it: wrapped in DDP, sharded by FSDP2, or as it is (one process).

    It is the ``sync`` of :class:`zenlm.train.step.TrainStep` (how micro-batches share one optimiser step) and
    gathers, writes and restores checkpoints on behalf of all processes.

    model:     the model, on its device; with "fsdp" its parameters become DTensor shards, in place (use the
               written model.safetensors afterwards)
    strategy:  a resolved strategy: "none", "ddp" or "fsdp" (:func:`resolve_strategy`)
    precision: the resolved compute precision; "bf16" on a GPU with "fsdp" selects FSDP2's mixed precision
    """

    def __init__(self, model: nn.Module, world: World, strategy: str, precision: str = "fp32",
                 probe: Callable[[nn.Module], LossOutput] | None = None) -> None:
        assert strategy in ("none", "ddp", "fsdp"), strategy
        self.model, self.world, self.strategy = model, world, strategy
        self.device = next(model.parameters()).device
        self.names = saved_names(model)  # what a weights file holds (tied weights once)
        self.averaged_over = world.size if strategy != "none" else 1  # DDP and FSDP2 average the gradients
        self.wrapper: nn.Module | None = None
        if strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            # A BERT's pooler takes no part in masked-LM training, nor its masked-LM head in classification: DDP
            # must then not wait for their gradients (find_unused_parameters, which costs a walk over the
            # autograd graph every step, so it is asked for only when the probe finds such a parameter).
            # forward_sync_buffers: zenlm's buffers (rotary tables) are computed from the config, alike everywhere.
            unused = _unused_parameters(model, probe) if probe is not None else ["(not probed)"]
            any_unused = world.sum_cpu([float(bool(unused))])[0] > 0  # the same choice on every process
            if unused:
                log.info("DDP: parameters without gradients in this objective: %s", ", ".join(unused[:8]))
            self.wrapper = DistributedDataParallel(
                Objective(model), device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=any_unused, forward_sync_buffers=False)
        elif strategy == "fsdp":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            if precision == "fp16":
                raise ConfigError("--strategy fsdp does not support fp16 (its loss scaling would need a sharded "
                                  "grad scaler); use --precision bf16 or fp32.")
            kw: dict[str, Any] = {}
            if self.device.type == "cuda" and precision == "bf16":
                kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            for block in transformer_blocks(model):
                fully_shard(block, **kw)
            self.wrapper = fully_shard(Objective(model), **kw)  # the root: embeddings, heads, final norms

    # ---- TrainStep's sync protocol ------------------------------------------------------------------------
    def objective(self, loss_fn: LossFn) -> Callable[[Any], LossOutput]:
        """``batch -> loss_fn(model, batch)``, run through the wrapper."""
        wrapper, model = self.wrapper, self.model
        if wrapper is None:
            return lambda batch: loss_fn(model, batch)
        return lambda batch: wrapper(loss_fn, batch)

    def grad_sync(self, last: bool) -> contextlib.AbstractContextManager[None]:
        """Around forward AND backward of a micro-batch: gradients are reduced over the processes only in the
        last micro-batch's backward (DDP's reducer is armed in the forward pass, so the forward must be inside
        ``no_sync`` too)."""
        if self.strategy == "ddp" and not last:
            return self.wrapper.no_sync()  # type: ignore[union-attr,operator]
        if self.strategy == "fsdp":
            self.wrapper.set_requires_gradient_sync(last)  # type: ignore[union-attr,operator]
        return contextlib.nullcontext()

    def total_targets(self, n: int) -> int:
        """The targets of the whole step: the sum over the processes."""
        return int(self.world.sum_cpu([float(n)])[0])

    def reduce_step(self, loss: torch.Tensor, n_tokens: int) -> tuple[float, int]:
        """(the step's mean loss per target, input tokens of all processes) from this process's share."""
        if self.world.size == 1:
            return float(loss) / self.averaged_over, n_tokens
        t = torch.stack([loss.detach().double(), torch.tensor(float(n_tokens), dtype=torch.float64,
                                                               device=loss.device)])
        dist.all_reduce(t)  # on the model's device: the loss needs no copy (and one sync, as before)
        total_loss, tokens = t.tolist()
        return total_loss / self.averaged_over, int(tokens)

    # ---- evaluation --------------------------------------------------------------------------------------
    def run(self, fn: Callable[[nn.Module], Any]) -> Any:
        """``fn(model)`` where every process can call the model (FSDP2: inside the root's forward, which
        gathers the root's weights; every process must then run the same ``fn``)."""
        if self.strategy == "fsdp":
            return self.wrapper(fn)  # type: ignore[misc]
        return fn(self.model)

    # ---- checkpoints -------------------------------------------------------------------------------------
    def _full_weights(self) -> dict[str, torch.Tensor] | None:
        """The whole model's weights on process 0 (None elsewhere); every process must call this."""
        if self.strategy != "fsdp":
            return model_tensors(self.model) if self.world.is_main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {n: sd[n].contiguous() for n in self.names} if self.world.is_main else None

    def _param_names(self, opt: torch.optim.Optimizer) -> list[str]:
        """The model's name of every parameter of ``opt``, in the optimiser's order (its state-dict numbering)."""
        name_of = {id(p): n for n, p in self.model.named_parameters()}
        return [name_of[id(p)] for g in opt.param_groups for p in g["params"]]

    def _full_optimizer_states(self, optimizers: list[torch.optim.Optimizer]) -> list[dict[str, Any]] | None:
        """Each optimiser's whole ``state_dict()`` (parameters numbered) on process 0, None elsewhere."""
        if self.strategy != "fsdp":
            return [o.state_dict() for o in optimizers] if self.world.is_main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        out = []
        for opt in optimizers:
            full = get_optimizer_state_dict(self.model, opt,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if not self.world.is_main:
                continue
            names = self._param_names(opt)
            state = {i: full["state"][n] for i, n in enumerate(names) if n in full["state"]}
            groups, first = [], 0
            for g_live, g in zip(opt.param_groups, full["param_groups"], strict=True):
                n = len(g_live["params"])
                groups.append({**{k: v for k, v in g.items() if k != "params"},
                               "params": list(range(first, first + n))})
                first += n
            out.append({"state": state, "param_groups": groups})
        return out if self.world.is_main else None

    def save_checkpoint(self, ckpt_root: Path, step: int, optimizers: list[torch.optim.Optimizer],
                        trainer_state: dict[str, Any], keep: int | None) -> None:
        """Gather the whole state and write checkpoint ``step`` on process 0 (every process calls this)."""
        weights = self._full_weights()
        states = self._full_optimizer_states(optimizers)
        if self.world.is_main:
            assert weights is not None and states is not None
            state = {**trainer_state, "world_size": self.world.size, "strategy": self.strategy}
            write_checkpoint(ckpt_root, step, weights, *optimizer_tensors(optimizers, states), state, keep=keep)
        self.world.barrier()  # the checkpoint is complete before any process goes on (or exits)

    def save_weights(self, path: Path, metadata: dict[str, str] | None = None) -> None:
        """Gather the weights and write them to ``path`` on process 0 (every process calls this)."""
        weights = self._full_weights()
        if self.world.is_main:
            assert weights is not None
            write_weights(weights, path, metadata)
        self.world.barrier()

    def restore(self, ckpt_root: Path, optimizers: list[torch.optim.Optimizer],
                warn: Callable[[str], None] | None = None) -> tuple[str, dict[str, Any]]:
        """Load the newest intact checkpoint into the model and the optimisers of every process: process 0
        reads and checks it (falling back past damaged ones), then sends it to the others. Returns (its name,
        the trainer state). A checkpoint written by any number of processes loads on any other number."""
        ckpt = None
        verdict: dict[str, Any] = {}
        if self.world.is_main:
            try:
                ckpt = read_latest_checkpoint(ckpt_root, self.model, optimizers, warn=warn)
                verdict = {"name": ckpt.path.name, "state": ckpt.state}
            except CheckpointError as e:
                verdict = {"error": str(e)}
        verdict = self.world.share(verdict)
        if "error" in verdict:
            raise CheckpointError(verdict["error"])
        if self.strategy == "none":
            assert ckpt is not None
            apply_checkpoint(ckpt, self.model, optimizers)
            return verdict["name"], verdict["state"]
        self._load(ckpt.weights if ckpt else {}, ckpt.optimizer_states if ckpt else None, optimizers)
        if ckpt is not None:
            set_rng_state(ckpt.rng)
        return verdict["name"], verdict["state"]

    def _load(self, weights: dict[str, torch.Tensor], states: list[dict[str, Any]] | None,
              optimizers: list[torch.optim.Optimizer]) -> None:
        """Process 0's full weights and optimiser states into every process's model and optimisers."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        if weights:  # process 0: tied names point at the saved tensor again
            weights = {name: weights[saved] for name, saved in tied_names(self.model).items()}
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(self.model, weights, options=options)
        for i, opt in enumerate(optimizers):
            osd: dict[str, Any] = {}
            if states is not None:
                names = self._param_names(opt)
                osd = {"state": {names[pid]: st for pid, st in states[i]["state"].items()},
                       "param_groups": [{**g, "params": [names[pid] for pid in g["params"]]}
                                        for g in states[i]["param_groups"]]}
            # strict=False: a parameter that never received a gradient (an unused pooler) has no state
            set_optimizer_state_dict(self.model, opt, osd, options=StateDictOptions(
                full_state_dict=True, broadcast_from_rank0=True, strict=False))




def is_main_process() -> bool:
    """Whether this process is the one that writes files and prints (rank 0, or the only process)."""
    return current_world().is_main


def barrier() -> None:
    """Wait for every process of the run (nothing to wait for with one process)."""
    current_world().barrier()


__all__ = ["STRATEGIES", "LostProcess", "Objective", "Strategy", "ParallelModel", "World", "barrier", "check_accumulation", "comm_errors",
           "current_world", "init_world", "is_comm_failure", "is_main_process", "launch_env", "resolve_strategy",
           "transformer_blocks"]

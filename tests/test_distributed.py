"""Training on two processes (gloo, CPU) computes the run one process computes with twice the accumulation.

The processes are forked from the test process (no interpreter start-up; each joins a gloo group through the
same environment variables torchrun sets), except one test that goes through torchrun and the CLI.

Tolerance: the same losses and final weights within fp32 round-off of a different summation order (all-reduce
of two partial gradients instead of one accumulated sum): relative 1e-5 for losses, absolute 1e-5 for weights
(the weights are O(0.1) and move by lr = 3e-3 per step). Muon on FSDP2 shards is the exception: torch's Muon
orthogonalises in bf16, and on DTensor shards the matrix products are summed from partial products, each rounded
to bf16, so it agrees with one process to bf16 precision only (relative 1e-4 for losses, absolute 3e-3 for
weights after 6 steps of lr 0.02; measured 4e-5 and 1.1e-3).
"""

from __future__ import annotations

import contextlib
import functools
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from zenlm.config import GPTConfig
from zenlm.errors import ConfigError
from zenlm.models.bert import Bert, BertConfig
from zenlm.models.encdec import EncDecConfig, EncoderDecoder
from zenlm.models.gpt import GPT
from zenlm.recipes.finetune_seq2seq import seq2seq_loss
from zenlm.recipes.pretrain import masked_lm_loss, masked_lm_targets
from zenlm.train.checkpoint import list_checkpoints
from zenlm.train.distributed import ParallelModel, World, check_accumulation
from zenlm.train.loop import TrainConfig, apply_process_settings, fit
from zenlm.train.optim import OptimConfig
from zenlm.train.step import LossOutput, TrainStep, count_labels, micro_seed

pytestmark = pytest.mark.xdist_group("distributed")  # one worker: the processes need the cores

# imported here once, so that the forked processes find them loaded instead of importing them each
import torch._dynamo  # noqa: E402, F401  # (AdamW imports it when it is first built: 2-3 s)
import torch.distributed.checkpoint.state_dict  # noqa: E402, F401
import torch.distributed.fsdp  # noqa: E402, F401
import torch.nn.parallel  # noqa: E402, F401

V, B, T = 40, 3, 12
FP32 = (1e-5, 1e-5)  # relative loss tolerance, absolute weight tolerance
BF16_MUON = (1e-4, 3e-3)


# --------------------------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, err: Path) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    code = 0
    try:
        torch.set_num_threads(1)
        fn(rank, *args)
    except BaseException:
        err.write_text(traceback.format_exc())
        code = 1
    os._exit(code)  # a forked child must not run the test process's exit handlers


def start(world: int, fn: Callable[..., Any], *args: Any, errs: Path) -> list[multiprocessing.Process]:
    """Fork ``world`` processes running ``fn(rank, *args)`` as ranks of one gloo group."""
    ctx = multiprocessing.get_context("fork")
    port = free_port()
    errs.mkdir(parents=True, exist_ok=True)
    procs = [ctx.Process(target=_child, args=(r, world, port, fn, args, errs / f"rank{r}.err")) for r in range(world)]
    for p in procs:
        p.start()
    return procs


def launch(world: int, fn: Callable[..., Any], *args: Any, errs: Path, timeout: float = 120.0) -> None:
    """Run ``fn(rank, *args)`` on ``world`` processes and fail with their tracebacks if any of them fails."""
    procs = start(world, fn, *args, errs=errs)
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    failed = {r: (errs / f"rank{r}.err").read_text() if (errs / f"rank{r}.err").exists() else f"exit {p.exitcode}"
              for r, p in enumerate(procs) if p.exitcode != 0}
    assert not failed, "\n".join(f"--- rank {r}:\n{t}" for r, t in failed.items())


# ------------------------------------------------------------------------------------------- a tiny run


def get_batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens, a pure function of (step, micro); about a third of the labels are not scored, a different
    number in every micro-batch, so dividing by anything but the step's global target count would show."""
    g = torch.Generator().manual_seed(1000 * step + micro)
    ids = torch.randint(0, V, (B, T + 1), generator=g)
    y = ids[:, 1:].clone()
    y[torch.rand(y.shape, generator=g) < 0.35] = -100
    return ids[:, :-1], y


def masked_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> LossOutput:
    x, y = batch
    logits = model(x)
    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
    return LossOutput(loss, int(y.ne(-100).sum()), x.numel())


def evaluate(model: torch.nn.Module) -> dict[str, float]:
    x, y = get_batch(10_000, 0)
    out = masked_loss(model, (x, y))
    loss = float(out.loss_sum) / out.n_targets
    return {"val_loss": loss, "val_score": -loss}


def train(rank: int, run: Path, strategy: str, optimizer: str, max_steps: int, resume: bool = False,
          best: bool = False) -> None:
    """A 2-layer GPT with dropout, trained by fit: 6 steps in all (the schedule spans 6), 2 micro-batches a step;
    ``best``: keep the weights of the best evaluation (every 2 steps)."""
    cfg = TrainConfig(max_steps=max_steps, decay_steps=6, grad_accum=2, eval_every=2 if best else 3, log_every=1,
                      ckpt_every=3, device="cpu", precision="fp32", tensorboard=False, seed=5, strategy=strategy,
                      threads=1)
    apply_process_settings(cfg)  # joins the other process, as the recipes do
    run.mkdir(exist_ok=True)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=2, n_head=2, n_embd=32, dropout=0.1,
                          tie_embeddings=False))
    fit(model, get_batch, masked_loss, run, cfg, OptimConfig(name=optimizer, lr=3e-3, warmup_steps=2, grad_clip=0.5),
        evaluate=evaluate, resume=resume, best_metric="val_score" if best else None)


def losses(run: Path) -> list[tuple[int, float]]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train_loss"]) for r in recs if "train_loss" in r]


def evals(run: Path) -> list[tuple[int, float]]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]


def assert_same_run(run: Path, ref: Path, tol: tuple[float, float] = FP32, steps: int = 6) -> None:
    loss_rtol, weight_atol = tol
    got, want = losses(run), losses(ref)[:steps]
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, steps + 1))
    for (s, a), (_, b) in zip(got, want, strict=True):
        assert a == pytest.approx(b, rel=loss_rtol), f"train_loss at step {s}"
    assert [s for s, _ in evals(run)] == [s for s, _ in evals(ref) if s <= steps]
    for (s, a), (_, b) in zip(evals(run), evals(ref), strict=False):
        assert a == pytest.approx(b, rel=loss_rtol), f"val_loss at step {s}"
    w = load_file(run / "model.safetensors")
    w_ref = load_file(ref / ("model.safetensors" if steps == 6 else f"checkpoints/step-{steps:06d}/model.safetensors"))
    assert w.keys() == w_ref.keys()
    for k in w:
        torch.testing.assert_close(w[k], w_ref[k], rtol=0, atol=weight_atol, msg=lambda m, k=k: f"{k}: {m}")


# --------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_compute_the_run_of_one_and_resume_across_sizes(tmp_path: Path, strategy: str) -> None:
    """1 process x 2 micro-batches == 2 processes x 1 micro-batch each (losses, evaluations, weights, with
    dropout); and 2 -> 1 and 1 -> 2 processes resumed at step 3 continue that very run."""
    ref, a, b = tmp_path / "ref", tmp_path / "two-then-one", tmp_path / "one-then-two"
    launch(1, train, ref, "auto", "adamw", 6, errs=tmp_path / "e0")
    launch(2, train, a, strategy, "adamw", 3, errs=tmp_path / "e1")  # steps 1-3 on two processes
    assert_same_run(a, ref, steps=3)
    trainer = json.loads((a / "checkpoints" / "step-000003" / "trainer.json").read_text())
    assert (trainer["world_size"], trainer["strategy"]) == (2, strategy)
    launch(1, train, a, "auto", "adamw", 6, True, errs=tmp_path / "e2")  # steps 4-6 on one
    assert_same_run(a, ref)
    launch(1, train, b, "auto", "adamw", 3, errs=tmp_path / "e3")
    launch(2, train, b, strategy, "adamw", 6, True, errs=tmp_path / "e4")  # steps 4-6 on two
    assert_same_run(b, ref)


def test_muon_on_fsdp_shards_agrees_to_bf16_precision(tmp_path: Path) -> None:
    """torch.optim.Muon steps DTensor shards (its products are redistributed by DTensor): the run of one
    process, to the precision of Muon's bf16 orthogonalisation. The best evaluation's weights are kept (gathered
    when they are best, moved into place by process 0 at the end)."""
    ref, run = tmp_path / "ref", tmp_path / "fsdp"
    launch(1, train, ref, "auto", "muon", 6, False, True, errs=tmp_path / "e0")
    launch(2, train, run, "fsdp", "muon", 6, False, True, errs=tmp_path / "e1")
    assert_same_run(run, ref, BF16_MUON)  # model.safetensors: the kept weights, in both runs
    assert '"Muon"' in (run / "checkpoints" / "step-000006" / "trainer.json").read_text()
    best = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "best_step" in x]
    assert best and best[-1]["best_step"] == max(evals(run), key=lambda e: -e[1])[0]
    assert not (run / "best.safetensors").exists()


# ------------------------------------------------------------------------------ one step: gradients, no_sync

K = 4  # micro-batches per step: two on each of the two processes


def gpt_task() -> tuple[torch.nn.Module, Callable, Callable, Callable]:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=2, n_head=2, n_embd=32, dropout=0.1))
    return model, masked_loss, count_labels, get_batch


def bert_batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A masked-LM micro-batch (ids, flat masked positions, their targets) with a different count each time."""
    g = torch.Generator().manual_seed(1000 * step + micro)
    ids = torch.randint(0, V, (B, T), generator=g)
    pos = torch.randperm(B * T, generator=g)[: int(torch.randint(2, B * T // 2, (), generator=g))]
    return ids, pos, torch.randint(0, V, (len(pos),), generator=g)


def bert_task() -> tuple[torch.nn.Module, Callable, Callable, Callable]:
    """BERT's masked-LM head runs after forward, and its pooler takes no part: both must work."""
    torch.manual_seed(0)
    model = Bert(BertConfig(vocab_size=V, d_model=32, n_layer=2, n_head=2, d_ff=64, max_len=T, dropout=0.1))
    return model, masked_lm_loss, masked_lm_targets, bert_batch


def encdec_batch(step: int, micro: int) -> tuple[torch.Tensor, ...]:
    """(source, source mask, decoder input, labels): padded sources, a third of the labels not scored."""
    g = torch.Generator().manual_seed(1000 * step + micro)
    src = torch.randint(0, V, (B, T), generator=g)
    src_mask = torch.ones_like(src, dtype=torch.bool)
    src_mask[0, T // 2 :] = False
    tgt = torch.randint(0, V, (B, T // 2 + 1), generator=g)
    labels = tgt[:, 1:].clone()
    labels[torch.rand(labels.shape, generator=g) < 0.35] = -100
    return src, src_mask, tgt[:, :-1], labels


def encdec_task() -> tuple[torch.nn.Module, Callable, Callable, Callable]:
    """The encoder-decoder computes every decoder block's cross-attention keys and values before the blocks run
    (an FSDP2 unit of its own: EncoderDecoder.fsdp_units)."""
    torch.manual_seed(0)
    model = EncoderDecoder(EncDecConfig(vocab_size=V, max_source_len=T, max_target_len=T, n_enc_layer=1,
                                        n_dec_layer=2, n_head=2, n_embd=32, dropout=0.1))
    return model, functools.partial(seq2seq_loss, label_smoothing=0.1), count_labels, encdec_batch


TASKS = {"gpt": gpt_task, "bert": bert_task, "encdec": encdec_task}


class GradCapture(torch.optim.Optimizer):
    """An 'optimiser' that records the gradients it is asked to apply and leaves the weights alone."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, {})
        self.grads: list[torch.Tensor | None] = []

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        self.grads = [p.grad for g in self.param_groups for p in g["params"]]


class SyncAfterForward(TrainStep):
    """The wrong order: the forward pass outside no_sync, only the backward inside it."""

    def _micro_batch(self, batch: Any, divisor: float, step: int, micro: int, last: bool) -> Any:
        out = self.objective(batch)
        loss = out.loss_sum / divisor
        with self.sync.grad_sync(last):
            loss.backward()
        return out, loss.detach()


def gradients(rank: int, out: Path, strategy: str, task: str, wrong_order: bool = False) -> None:
    """Step 3 of a run on two processes: the gradients it applies (gathered) and, for DDP, how many gradient
    all-reduces each step made with one and with two micro-batches per process."""
    world = apply_process_settings(TrainConfig(device="cpu", strategy=strategy, threads=1, grad_accum=K))
    model, loss_fn, count, batch = TASKS[task]()
    par = ParallelModel(model, world, strategy, probe=lambda m: loss_fn(m, batch(0, rank)))
    calls: list[int] = []
    if strategy == "ddp":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting(state, bucket):  # type: ignore[no-untyped-def]  # DDP refuses other annotations than its own
            calls.append(1)
            return allreduce_hook(state, bucket)

        par.wrapper.register_comm_hook(None, counting)  # type: ignore[union-attr]
    cap = GradCapture([p for p in model.parameters()])
    step = (SyncAfterForward if wrong_order else TrainStep)(model, loss_fn, [cap], count_targets=count, sync=par,
                                                            seed=7)
    per_step = []
    for s, micros in ((1, [rank]), (2, [rank]), (3, list(range(rank, K, 2)))):  # the 1st step settles DDP's buckets
        before = len(calls)
        step([batch(s - 1, m) for m in micros], s, micros)
        per_step.append(len(calls) - before)
    grads = {n: (g.full_tensor() if hasattr(g, "full_tensor") else g) for (n, _), g in
             zip(model.named_parameters(), cap.grads, strict=True) if g is not None}
    if rank == 0:
        from safetensors.torch import save_file

        save_file({n: g.contiguous() for n, g in grads.items()}, out / "grads.safetensors")
        (out / "calls.json").write_text(json.dumps(per_step))


def one_process_gradients(task: str) -> dict[str, torch.Tensor]:
    model, loss_fn, count, batch = TASKS[task]()
    cap = GradCapture(model.parameters())
    TrainStep(model, loss_fn, [cap], count_targets=count, seed=7)([batch(2, m) for m in range(K)], 3)
    return {n: g for (n, _), g in zip(model.named_parameters(), cap.grads, strict=True) if g is not None}


@pytest.mark.parametrize(("strategy", "task"), [("ddp", "gpt"), ("ddp", "bert"), ("fsdp", "bert"),
                                                ("fsdp", "encdec")])
def test_step_gradients_equal_one_process_over_all_micro_batches(tmp_path: Path, strategy: str, task: str) -> None:
    """The gradient of a step over K micro-batches with unequal target counts, shared by two processes: each
    divides by (global count / 2) and the wrapper averages; the optimisers see one process's gradient."""
    launch(2, gradients, tmp_path, strategy, task, errs=tmp_path / "e")
    got, want = load_file(tmp_path / "grads.safetensors"), one_process_gradients(task)
    assert got.keys() == want.keys()
    if task == "bert":  # the pooler takes no part in masked-LM training: no gradient, as on one process
        assert not any(k.startswith("pooler") for k in got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")
    if strategy == "ddp":  # one gradient all-reduce per step (per bucket), however many micro-batches
        one_micro, _, two_micros = json.loads((tmp_path / "calls.json").read_text())
        assert one_micro >= 1 and two_micros == one_micro


def test_a_forward_outside_no_sync_would_be_caught(tmp_path: Path) -> None:
    """DDP arms its all-reduce in the forward pass: toggling sync only around the backward all-reduces after
    every micro-batch. The same count that passes above catches it."""
    launch(2, gradients, tmp_path, "ddp", "gpt", True, errs=tmp_path / "e")
    one_micro, _, two_micros = json.loads((tmp_path / "calls.json").read_text())
    assert two_micros == 2 * one_micro


# ------------------------------------------------------------------------------------- the CLI and faults


def pretrain_args(data: Path, run: Path, *extra: str) -> list[str]:
    """A tiny GPT pretrained until stopped, 2 micro-batches of 2 x 16 tokens a step (unless ``extra`` says)."""
    return ["pretrain", "--data", str(data), "--out", str(run), "--model", "tiny", "--n-layer", "1",
            "--batch-size", "2", "--seq-len", "16", "--eval-every", "0", "--ckpt-every", "0", "--log-every", "1",
            "--device", "cpu", "--precision", "fp32", "--threads", "1", *(extra or ("--grad-accum", "2",
                                                                                   "--max-steps", "100000"))]


def wait_for_steps(run: Path, n: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = run / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"{run} did not reach step {n} in {timeout} s")


def rank_pid(launcher: int, rank: int) -> int:
    """The pid of the process torchrun started as ``rank`` (its environment says RANK=rank)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == launcher and \
                    f"RANK={rank}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                return int(entry.name)
    raise AssertionError(f"no child of {launcher} with RANK={rank}")


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds torchrun's workers through /proc")
def test_torchrun_sigterm_to_rank_1_saves_one_checkpoint_and_both_exit(tmp_path: Path, char_data: Path) -> None:
    """torchrun -m zenlm pretrain on two processes; SIGTERM to rank 1 alone: the processes agree to stop at the
    same step, gather one checkpoint to rank 0, and exit 0; only rank 0 printed."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "zenlm",
           *pretrain_args(char_data, run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_for_steps(run, 3)
        os.kill(rank_pid(proc.pid, 1), signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    [ckpt] = list_checkpoints(run / "checkpoints")
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert int(ckpt.name.split("-")[1]) == last
    trainer = json.loads((ckpt / "trainer.json").read_text())
    assert (trainer["world_size"], trainer["strategy"]) == (2, "ddp")
    assert out.count("stopped by signal") == 1  # rank 0 speaks for the run
    assert "continue with --resume" in err

    # the same run continues on one process: the CLI keeps the run's 2 micro-batches a step (2 x 16 tokens each)
    launch(1, cli, pretrain_args(char_data, run, "--resume", "--max-steps", str(last + 2)), tmp_path,
           errs=tmp_path / "e")
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs[-3:]] == [last, last + 1, last + 2]
    assert recs[-1]["tokens"] == 2 * 2 * 2 * 16  # two steps of two micro-batches of 2 x 16 tokens
    trainer = json.loads((list_checkpoints(run / "checkpoints")[-1] / "trainer.json").read_text())
    assert (trainer["step"], trainer["world_size"], trainer["strategy"]) == (last + 2, 1, "none")


def cli(rank: int, argv: list[str], logs: Path) -> None:
    """``zenlm ARGV`` in this process with its stderr in logs/rank{rank}.stderr; exits with the CLI's code."""
    from zenlm.cli import main

    fd = os.open(logs / f"rank{rank}.stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    sys.stderr = os.fdopen(fd, "w", buffering=1, encoding="utf-8")
    code = main(argv)
    sys.stderr.flush()
    os._exit(code)


def test_a_rank_that_dies_makes_the_other_exit_with_a_clear_error(tmp_path: Path, char_data: Path) -> None:
    """kill -9 of rank 1 mid-run: rank 0 fails at its next collective (gloo notices the closed connection at
    once) and exits 2 with a message that says what happened, well within a bounded time."""
    run, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    args = pretrain_args(char_data, run, "--grad-accum", "2", "--max-steps", "100000", "--ckpt-every", "2")
    procs = start(2, cli, args, logs, errs=tmp_path / "e")
    try:
        wait_for_steps(run, 3)  # step 2's checkpoint is written before step 3 is logged
        os.kill(procs[1].pid, signal.SIGKILL)
        t = time.monotonic()
        procs[0].join(60)
        waited = time.monotonic() - t
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    assert procs[0].exitcode == 2 and waited < 60
    err = (logs / "rank0.stderr").read_text()
    assert "zenlm: error (rank 0): process 0 of 2 lost contact with the other processes" in err, err[-2000:]
    assert f"newest checkpoint in {run / 'checkpoints'}" in err and "Traceback" not in err, err[-2000:]


def test_grad_accum_is_shared_evenly_or_explained() -> None:
    check_accumulation(4, World(0, 2))
    with pytest.raises(ConfigError, match=r"2 processes cannot share 3 evenly.*--grad-accum 4.*1, 3 process"):
        check_accumulation(3, World(1, 2))


def test_dropout_seeds_differ_per_micro_batch_and_repeat() -> None:
    seeds = {micro_seed(5, step, micro) for step in range(3) for micro in range(4)}
    assert len(seeds) == 12  # every micro-batch of every step its own masks, whichever process runs it
    assert micro_seed(5, 2, 1) == micro_seed(5, 2, 1) and micro_seed(6, 2, 1) != micro_seed(5, 2, 1)


@pytest.mark.parametrize("verb", [["pretrain"], ["finetune", "seq2seq"], ["finetune", "classify", "--base", "b"]])
def test_training_verbs_take_strategy_and_grad_accum(verb: list[str]) -> None:
    from zenlm.cli import build_parser

    ns = build_parser().parse_args([*verb, "--data", "d", "--out", "o", "--strategy", "fsdp", "--grad-accum", "4"])
    assert (ns.strategy, ns.grad_accum) == ("fsdp", 4)
    assert build_parser().parse_args([*verb, "--data", "d", "--out", "o"]).strategy == "auto"
    with pytest.raises(SystemExit):
        build_parser().parse_args([*verb, "--data", "d", "--out", "o", "--strategy", "zero3"])

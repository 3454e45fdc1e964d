"""``zenlm evaluate RUN --tasks NAMES``: lm-evaluation-harness tasks on a causal LM run, in this process.

    zenlm evaluate RUN --tasks hellaswag arc_easy [--limit N] [--num-fewshot K] [--batch-size N]
    zenlm evaluate RUN --tasks my_task --include-path my_tasks/      (your own task YAML files)

Writes RUN/eval/lm-eval-TIMESTAMP.json (lm-eval's results; per-item samples with --log-samples) and prints
lm-eval's table. The model class and the runner are in :mod:`zenlm.lmeval`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def evaluate_lm_eval(
    run: str, tasks: list[str], *, include_path: str | None = None, limit: float | None = None,
    num_fewshot: int | None = None, batch_size: int = 16, dtype: str = "auto", device: str = "auto",
    out: str | None = None, log_samples: bool = False, bootstrap_iters: int = 1000,
) -> Path:
    """Run lm-eval ``tasks`` on the causal LM in ``run``; write the JSON report and print the table."""
    import zenlm
    from zenlm.api import LM
    from zenlm.cli.common import TerminalProgress
    from zenlm.errors import ConfigError
    from zenlm.fileio import atomic_write_text
    from zenlm.lmeval import evaluate_tasks, results_json, results_table

    lm = zenlm.load(run, device=device, dtype=dtype)
    if not isinstance(lm, LM):
        raise ConfigError(f"{run} holds a {type(lm).__name__}; lm-eval tasks (--tasks) need a causal "
                          "language model (a GPT-family run). Score this run with --data FILE instead.")
    if limit is not None and limit >= 1:
        limit = int(limit)
    progress = TerminalProgress()
    t0 = time.perf_counter()
    results = evaluate_tasks(lm, tasks, include_path=include_path, limit=limit, num_fewshot=num_fewshot,
                             batch_size=batch_size, log_samples=log_samples, bootstrap_iters=bootstrap_iters,
                             progress=progress)
    progress.close()
    elapsed = time.perf_counter() - t0
    results["zenlm"] = {"run": str(Path(run).resolve()), "dtype": dtype, "batch_size": batch_size,
                        "device": str(lm.device), "seconds": round(elapsed, 3)}
    if out is not None:
        path = Path(out)
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(run) / "eval" / f"lm-eval-{stamp}.json"
        k = 2
        while path.exists():  # two runs within one second
            path = path.with_name(f"lm-eval-{stamp}-{k}.json")
            k += 1
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, results_json(results))
    print(results_table(results))
    print(f"{', '.join(tasks)}: {elapsed:.1f} s -> {path}", file=sys.stderr)
    return path


__all__ = ["evaluate_lm_eval"]

"""lm-evaluation-harness (``lm-eval``) with a zenlm causal LM: the model class and a task runner.

lm-eval turns every benchmark into three kinds of request, and a model answers each:

    loglikelihood(context, continuation) -> (sum_t log p(c_t | context, c_<t), is c the greedy choice?)
        multiple choice: the choice with the highest sum wins (acc), or the highest sum per byte (acc_norm)
    loglikelihood_rolling(text)          -> sum over the text of log p(x_t | x_<t)
        perplexity tasks: word_perplexity = exp(-sum / words), bits_per_byte = -sum / ln 2 / bytes
    generate_until(context, {until, max_gen_toks, ...}) -> the continuation, cut at the first stop string

:class:`ZenlmLM` answers them with zenlm's own model and tokenizer, many requests per forward pass:

    loglikelihood:  requests sorted longest first; a batch is right-padded to its longest row and run once
                    through the model's blocks (causal attention: padding after a row cannot change it);
                    the head is applied only at the positions that predict continuation tokens, a piece of
                    at most ``SCORING_LOGITS`` logits at a time, and the log-softmax is taken in float32
                    (:func:`zenlm.scoring.score_tokens`). A stateful model
                    (n-gram, MLP, LSTM) reads the padded batch from its start state, which padding after a row
                    cannot change either, and has no context limit of its own (``max_length`` 2048 by default)
    rolling:        each text is cut into windows of at most ``max_length`` predicted tokens (lm-eval's
                    own windowing, the first conditioned on the prefix token); windows of all texts are
                    scored together as loglikelihood requests, then summed per text
    generate_until: requests with the same generation settings decode together
                    (:func:`zenlm.generate.generate_text_batch`; greedy rows equal decoding each alone)

Tokenization follows lm-eval's rules for causal models (``TemplateLM``): the context and the continuation are
encoded together and split where the context's own ids end. What comes before an empty context (and before
a text scored for perplexity) is the prefix token: the tokenizer's end-of-text token (else its bos), the
token that separates documents in zenlm's pretraining shards and that :meth:`zenlm.api.LM.perplexity` puts
in front of a text. lm-eval's remote tokenizer (``local-completions`` against ``zenlm serve``) picks the same
token for zenlm's own tokenizers and for GPT-2-style ones (bos = eos); for a tokenizer with a bos token
of its own (Llama-style imports) give it ``custom_prefix_token_id`` (GET /tokenizer_info lists the ids).

``lm-eval`` is an optional dependency: ``pip install -e ".[eval]"``.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from zenlm.api import LM
from zenlm.errors import ConfigError
from zenlm.generate import GenerationConfig, generate_text_batch
from zenlm.progress import ProgressFn, report
from zenlm.scoring import map_logits, score_tokens
from zenlm.stateful import is_stateful

log = logging.getLogger("zenlm.lmeval")

# Tokens a stateful model (n-gram, MLP, LSTM) reads at once: it has no context limit, so this bounds the memory
# of one forward pass ([batch, tokens, vocabulary] logits) and the length of lm-eval's rolling windows.
STATEFUL_MAX_LENGTH = 2048

try:  # the base class comes from lm-eval; without it the module still imports and says what to install
    from lm_eval.api.model import TemplateLM
except ImportError:  # pragma: no cover - exercised only where lm-eval is missing
    TemplateLM = object  # type: ignore[assignment,misc]

INSTALL_HINT = 'lm-eval is not installed: `pip install -e ".[eval]"` (or `pip install "lm-eval[api]"`).'


def _require_lm_eval() -> None:
    if TemplateLM is object:
        raise ConfigError(INSTALL_HINT)


class ZenlmLM(TemplateLM):
    """A zenlm causal LM (:class:`zenlm.api.LM`, from ``zenlm.load(RUN)``; fp32, bf16, fp16 or int8 weights)
    as an lm-eval model (see the module docstring for how each request is answered).

    batch_size: requests per forward pass (loglikelihood) or per decoded batch (generate_until).
    max_length: tokens the model sees at once (default: its block_size, or STATEFUL_MAX_LENGTH for a stateful
    model, which has none); longer inputs keep their end.
    max_gen_toks: generated tokens when a task does not say (lm-eval's default, 256).
    seed: sampling seed for tasks that sample (greedy tasks do not draw).
    """

    backend = "causal"

    def __init__(self, lm: LM, *, batch_size: int = 1, max_length: int | None = None, max_gen_toks: int = 256,
                 seed: int = 1234, progress: ProgressFn | None = None) -> None:
        _require_lm_eval()
        super().__init__()
        if not isinstance(lm, LM):
            raise ConfigError(f"lm-eval tasks need a causal language model (a GPT-family run); got "
                              f"{type(lm).__name__}.")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
        self.lm, self.model, self.zen_tokenizer = lm, lm.model.eval(), lm.tokenizer
        self.batch_size = batch_size
        self.stateful = is_stateful(lm.model)  # model(ids, state) -> (logits, state); no block_size
        if self.stateful:
            self.max_length = max_length or STATEFUL_MAX_LENGTH
        else:
            self.max_length = min(max_length or lm.config.block_size, lm.config.block_size)
        self.max_gen_toks = max_gen_toks
        self.seed = seed
        self.progress = progress
        tok = lm.tokenizer
        if tok.eos_id is None and tok.bos_id is None:
            raise ConfigError("the run's tokenizer has neither an eos nor a bos token; lm-eval needs one to "
                              "start texts with (set eos_token in tokenizer_config.json).")

    # ------------------------------------------------------------------------------------ tokenization
    @property
    def eot_token_id(self) -> int:
        tok = self.zen_tokenizer
        return tok.eos_id if tok.eos_id is not None else tok.bos_id  # type: ignore[return-value]

    @property
    def prefix_token_id(self) -> int:
        """What an empty context (and the first rolling window) is conditioned on: eos, else bos."""
        return self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Ids of ``string``; special-token strings in it become their ids (as with Hugging Face
        tokenizers and the server's /tokenize). zenlm tokenizers add nothing around a text."""
        return self.zen_tokenizer.encode(string, allow_special=True)

    def tok_decode(self, ids: Sequence[int], **kwargs: Any) -> str:
        return self.zen_tokenizer.decode(ids)

    # ------------------------------------------------------------------------------------ scoring
    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """(cache key, context ids, continuation ids) -> (summed log-prob of the continuation, greedy?)."""
        rows = []
        for _, ctx, cont in requests:
            whole = (ctx + cont)[-(self.max_length + 1):]  # the model sees at most max_length tokens
            n = min(len(cont), len(whole) - 1)
            rows.append((whole[:-1], whole[len(whole) - n:]))  # inputs; targets = the last n ids
        scores = self._score_rows(rows, "loglikelihood")
        for (key, _, _), answer in zip(requests, scores, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return scores

    @torch.inference_mode()
    def _score_rows(self, rows: list[tuple[list[int], list[int]]], task: str) -> list[tuple[float, bool]]:
        """For each (input ids [T], target ids [n]) with n <= T: the log-probs of the targets under the logits
        of the last n input positions, summed, and whether every target is the most likely token."""
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths share a batch
        device = self.lm.device
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            T = len(rows[batch[0]][0])
            ids_BT = torch.zeros(len(batch), T, dtype=torch.long)  # right padding with id 0
            for b, i in enumerate(batch):
                ids_BT[b, : len(rows[i][0])] = torch.tensor(rows[i][0])
            if self.stateful:  # logits at every position, read from the start state
                out_BTX = self.model(ids_BT.to(device))[0]
            else:  # hidden states: the head only where a target is predicted
                out_BTX = self.model.features(ids_BT.to(device))
            # positions len-n .. len-1 of each row
            picked = [out_BTX[b, len(rows[i][0]) - len(rows[i][1]) : len(rows[i][0])] for b, i in enumerate(batch)]
            targets_N = torch.tensor([t for i in batch for t in rows[i][1]], device=device)
            if self.stateful:
                parts = [score_tokens(torch.cat(picked), targets_N)]
            else:  # the head and the log-softmax a piece of positions at a time (SCORING_LOGITS)
                parts = map_logits(self.model.inference_head, torch.cat(picked), self.model.config.vocab_size,
                                   lambda piece, logits_nV, t=targets_N: score_tokens(logits_nV, t[piece]))
            logprob_N = torch.cat([part.logprob_T for part in parts])
            greedy_N = torch.cat([part.greedy_T for part in parts])
            at = 0
            for i in batch:
                n = len(rows[i][1])
                part = slice(at, at + n)
                out[i] = (float(logprob_N[part].sum()), bool(greedy_N[part].all()))
                at += n
            report(self.progress, task, start + len(batch), len(rows), unit="req")
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Summed log-prob of each whole text, over lm-eval's rolling windows (see the module docstring)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows: list[tuple[Any, list[int], list[int]]] = []
        owner: list[int] = []  # window -> text
        for t, req in enumerate(requests):
            (text,) = req.args
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(t)
        totals = [0.0] * len(requests)
        for t, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows), strict=True):
            totals[t] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------------------------ generation
    def _generation_config(self, gen_kwargs: dict[str, Any]) -> GenerationConfig:
        """lm-eval's generation settings (until, max_gen_toks, do_sample, temperature, top_p, top_k)."""
        kw = dict(gen_kwargs)
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kw.pop("max_gen_toks", kw.pop("max_new_tokens", self.max_gen_toks)))
        do_sample = bool(kw.pop("do_sample", False))
        temperature = float(kw.pop("temperature", 0.0))
        top_p, top_k = kw.pop("top_p", None), kw.pop("top_k", None)
        if kw:
            log.warning("ignoring generation settings zenlm does not use: %s", ", ".join(sorted(kw)))
        greedy = not do_sample or temperature == 0
        return GenerationConfig(max_new_tokens=max_new, temperature=0.0 if greedy else temperature,
                                top_p=None if greedy else top_p, top_k=None if greedy else top_k,
                                stop=[s for s in until if s], seed=self.seed)

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """The continuation of each context up to its first stop string (greedy unless the task samples)."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}  # one decoding setting per batch
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        done = 0
        for idxs in groups.values():
            cfg = self._generation_config(requests[idxs[0]].args[1])
            keep = max(1, self.max_length - cfg.max_new_tokens)  # the context's end, leaving room to generate
            ids = {i: self.tok_encode(requests[i].args[0])[-keep:] for i in idxs}
            order = sorted(idxs, key=lambda i: -len(ids[i]))
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                texts = generate_text_batch(self.model, self.zen_tokenizer, [ids[i] for i in batch], cfg)
                for i, text in zip(batch, texts, strict=True):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                done += len(batch)
                report(self.progress, "generate_until", done, len(requests), unit="req")
        return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------- running tasks
def task_manager(tasks: Sequence[str], include_path: str | Path | None = None) -> Any:
    """An lm-eval ``TaskManager`` that knows ``tasks``: the tasks under ``include_path`` alone when they are
    all there (indexing lm-eval's thousands of built-in tasks takes seconds), else those plus the built-in
    ones.
    Raises ConfigError naming any task it cannot find, with close names."""
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    def knows(tm: Any, name: str) -> bool:
        known = tm.all_tasks
        return name in known or any(fnmatch.fnmatch(t, name) for t in known) or Path(name).is_file()

    if include_path is not None:
        if not Path(include_path).is_dir():
            raise ConfigError(f"--include-path {include_path}: no such directory of task YAML files.")
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(knows(local, t) for t in tasks):
            return local
    tm = TaskManager(include_path=None if include_path is None else str(include_path))
    for name in tasks:
        if not knows(tm, name):
            near = difflib.get_close_matches(name, tm.all_tasks, n=5)
            hint = f" Close names: {', '.join(near)}." if near else ""
            raise ConfigError(f"lm-eval has no task {name!r}.{hint} List them with `lm-eval ls tasks`; your "
                              "own task YAML files go in a directory given with --include-path.")
    return tm


@contextlib.contextmanager
def _single_process_bootstrap() -> Iterator[None]:
    """lm-eval estimates some standard errors by bootstrap in a pool of worker processes; one process is
    enough for the sample counts here and does not fork a process that holds a model."""
    old = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = old


def evaluate_tasks(lm: LM, tasks: Sequence[str], *, include_path: str | Path | None = None,
                   limit: int | float | None = None, num_fewshot: int | None = None, batch_size: int = 1,
                   log_samples: bool = False, bootstrap_iters: int = 1000, seed: int = 1234,
                   progress: ProgressFn | None = None) -> dict[str, Any]:
    """Run lm-eval ``tasks`` on ``lm`` in this process -> lm-eval's results dictionary (``results`` per task
    and metric, ``configs``, ``n-shot``, ``n-samples``, ... and ``samples`` per item when ``log_samples``).

    include_path: a directory of your own task YAML files; limit: the first N items of each task (or a
    fraction); num_fewshot: examples put in front of each question; bootstrap_iters: resamples for the
    standard errors lm-eval bootstraps (0: no standard errors).
    """
    _require_lm_eval()
    from lm_eval import simple_evaluate

    if not tasks:
        raise ConfigError("name at least one lm-eval task (e.g. --tasks hellaswag arc_easy).")
    tm = task_manager(tasks, include_path)
    model = ZenlmLM(lm, batch_size=batch_size, seed=seed, progress=progress)
    with _single_process_bootstrap():
        results = simple_evaluate(model=model, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                  task_manager=tm, log_samples=log_samples, bootstrap_iters=bootstrap_iters,
                                  random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                  fewshot_random_seed=seed)
    if results is None:  # only on non-zero ranks of a distributed run, which this is not
        raise ConfigError("lm-eval returned no results.")
    return results


def results_json(results: dict[str, Any]) -> str:
    """lm-eval's results as JSON text (numbers from numpy become plain numbers, anything else a string)."""
    from lm_eval.utils import handle_non_serializable

    return json.dumps(results, indent=2, ensure_ascii=False, default=handle_non_serializable) + "\n"


def results_table(results: dict[str, Any]) -> str:
    """The Markdown table lm-eval prints (task, version, filter, n-shot, metric, value, stderr), and the
    groups' table when there are groups."""
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table


__all__ = ["ZenlmLM", "evaluate_tasks", "results_json", "results_table", "task_manager"]

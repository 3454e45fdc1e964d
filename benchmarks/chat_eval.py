"""Chat fine-tuning on the built-in conversations: do replies stop, and what LoRA saves against full fine-tuning.

    python benchmarks/chat_eval.py                      # base + full / LoRA / int8+LoRA on chitchat, 200 replies each
    python benchmarks/chat_eval.py --zh                 # and a full fine-tune on chatterbot-zh (Chinese samples)
    python benchmarks/chat_eval.py --smoke              # tiny settings: proves the script runs (about a minute)
    python benchmarks/chat_eval.py --batching-only      # only the padding / packing table (no training)
    python benchmarks/chat_eval.py --work runs/chat-bench --zh    # keep the runs (benchmarks/chat_samples.py
                                                                  # serves them for the sample dialogues)

Steps (each trained configuration in its own Python process, so that its peak resident memory is its own):

0. batching (no training; only the tokenizer of step 1 is made first): one epoch of --data's training conversations at the fine-tuning sequence length,
   laid out three ways -- length-bucketed batches of whole conversations (what ``zenlm finetune chat`` does),
   plain shuffled batches, and whole conversations packed into full rows (best fit; it would need a
   block-diagonal attention mask and positions restarting per conversation). Reported: rows, token positions
   computed (a batch costs rows x its longest row), the share of them that are real tokens and assistant
   tokens, and the padding share per batch.
1. base: a byte-level BPE tokenizer and a GPT (--model, default demo) pretrained for --base-steps on the text of
   the built-in conversations (chitchat, chatterbot-en, chatterbot-zh: every message, one per line). It has
   seen the language, never the chat template. With --zh, a second base for the Chinese run (full-zh) gets its
   own tokenizer and the same pretraining on People's Daily (--zh-chars characters) and the chatterbot-zh
   messages.
2. full, lora, int8+lora: ``zenlm finetune chat`` of that base on --data (default chitchat) with the same
   batches and steps; int8+lora adapts the int8 copy of the base (``zenlm quantize``). LoRA trains the rows of
   the special tokens the conversations use beside the adapters (``--lora-tokens auto``); ``--configs
   lora-no-tokens`` adds LoRA without them (``--lora-tokens none``), for contrast. Reported: trainable
   parameters, peak RSS while training (reset once the model is built, as benchmarks/lora_memory.py does), mean
   step time, and the validation loss (nats per assistant token) on the held-out conversations.
3. stop rate: the first user message (after the system message, if any) of --replies held-out conversations,
   rendered with the run's chat template, answered at temperature 0.8 with at most --max-new-tokens tokens; a
   reply "stops" when it ends with the template's end-of-turn token within that limit. The base model gets the
   same prompts for contrast (it was never taught to end a turn). Goal: >= 99% for the chat-tuned models.
   The limit (default 256) must leave room for the data itself: the script prints the share of the data's own
   replies that are longer, the most a model that imitates them exactly could fail to stop. ``--stop-only``
   measures the stop rates again (e.g. at another limit) on the runs a previous call left in --work.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_memory import _count, _mem_mb, training_peaks  # noqa: E402  # the same counts and RSS measurement

CONFIGS = ("base", "full", "lora", "lora-no-tokens", "int8+lora", "full-zh")
GOAL = 0.99


# ------------------------------------------------------------------------------------------- preparation


def _text_to_data(lines: list[str], text: Path, out: Path, vocab_size: int) -> None:
    """``lines`` written to ``text`` (one per line), a byte-level BPE tokenizer trained on them, and the text as
    token shards in ``out`` (the tokenizer saved beside them)."""
    from zenlm.data.corpus import open_corpus
    from zenlm.data.shards import prepare
    from zenlm.tokenizer import train_tokenizer

    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    corpus = open_corpus(str(text), val_fraction=0.02)
    tok = train_tokenizer(corpus.texts("train"), kind="bpe", vocab_size=vocab_size)
    shutil.rmtree(out, ignore_errors=True)
    prepare(corpus, tok, out)


def _pretrain_base(args: argparse.Namespace, data: Path, base: Path) -> None:
    """A GPT (--model) pretrained on ``data`` for --base-steps, written to ``base``."""
    from zenlm.recipes.pretrain import pretrain
    from zenlm.train.loop import TrainConfig
    from zenlm.train.optim import OptimConfig

    shutil.rmtree(base, ignore_errors=True)
    pretrain(data, base, model=args.model, model_overrides=json.loads(args.model_overrides),
             batch_size=16, train=TrainConfig(max_steps=args.base_steps, eval_every=0, ckpt_every=0,
                                              threads=args.threads, tensorboard=False, seed=args.seed),
             optim=OptimConfig(name="adamw", lr=2e-3, min_lr=2e-4, warmup_steps=min(50, args.base_steps // 5)))


def prepare_data(args: argparse.Namespace, work: Path) -> None:
    """work/data: a byte-level BPE tokenizer trained on the text of the built-in conversations (every message, one
    per line) and that text as token shards (the tokenizer is saved beside them)."""
    from zenlm.data.chat import read_builtin

    if (work / "data" / "index.json").is_file():
        return
    lines = [m["content"].strip() for name in ("chitchat", "chatterbot-en", "chatterbot-zh")
             for c in read_builtin(name) for m in c.messages]
    _text_to_data(lines, work / "chat-text.txt", work / "data", args.vocab_size)


def prepare_base(args: argparse.Namespace, work: Path) -> None:
    """work/base: a GPT pretrained on work/data (it has seen the language, never the chat template);
    work/base-int8: its int8 copy."""
    from zenlm.recipes.quantize import quantize_run

    base = work / "base"
    if not (base / "model.safetensors").is_file():
        _pretrain_base(args, work / "data", base)
    if not (work / "base-int8").exists():
        quantize_run(base, work / "base-int8")


def prepare_zh(args: argparse.Namespace, work: Path) -> None:
    """work/data-zh and work/base-zh, the base of the Chinese chat run: a byte-level BPE tokenizer and the same GPT
    preset pretrained for --base-steps on People's Daily (January 1998, at most --zh-chars characters) and the
    chatterbot-zh messages. The English base saw too little Chinese to write it."""
    from zenlm.data.chat import read_builtin
    from zenlm.data.corpus import open_corpus

    if (work / "base-zh" / "model.safetensors").is_file():
        return
    lines = [m["content"].strip() for c in read_builtin("chatterbot-zh") for m in c.messages]
    chars = sum(map(len, lines))
    for line in "".join(open_corpus("peoples-daily").texts("train")).splitlines():
        if chars >= args.zh_chars:
            break
        lines.append(line)
        chars += len(line)
    _text_to_data(lines, work / "chat-text-zh.txt", work / "data-zh", args.vocab_size)
    _pretrain_base(args, work / "data-zh", work / "base-zh")


# ----------------------------------------------------------------------------- batching: padding vs packing


def seq_len(args: argparse.Namespace) -> int:
    """Input tokens per row, as ``finetune_chat`` computes it: --max-len, at most the model's context."""
    from zenlm.models.registry import preset_config

    block = preset_config(args.model, **json.loads(args.model_overrides)).block_size
    return min(args.max_len or block, block)


def packed_rows(lengths: list[int], order: list[int], capacity: int) -> list[list[int]]:
    """Whole conversations packed into rows of ``capacity`` tokens, taken in ``order``: each goes into the
    fullest row it still fits in (best fit), else starts a new row. Returns the conversations of each row."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for i in order:
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k < len(free):
            room, r = free.pop(k)
        else:
            room, r = capacity, len(rows)
            rows.append([])
        rows[r].append(i)
        bisect.insort(free, (room - lengths[i], r))
    return rows


def batching_table(args: argparse.Namespace, work: Path) -> list[dict]:
    """Padding against useful tokens for one epoch of --data's training conversations, no training: the rows of
    length-bucketed batches (what ``finetune_chat`` trains on), of plain shuffled batches, and of whole
    conversations packed into rows of the sequence length (which needs a block-diagonal attention mask and
    positions restarting at each conversation). A batch of B rows costs B x (its longest row) token positions."""
    import numpy as np

    from zenlm.data.chat import ChatBatches, encode_conversations, read_conversations, split_conversations
    from zenlm.tokenizer import CHAT_TEMPLATE, Tokenizer

    tok = Tokenizer.load(work / "data")
    T, B = seq_len(args), args.batch_size
    train, _ = split_conversations(read_conversations(args.data), args.val_fraction, args.seed)
    enc = encode_conversations(train, tok, T + 1, template=CHAT_TEMPLATE)  # as finetune_chat: T inputs per row
    n_in = [len(x) - 1 for x in enc.ids]  # input tokens of each conversation (its row before padding)
    n_scored = [int(s[1:].sum()) for s in enc.scored]  # labels that carry loss: the assistant's tokens
    pad_id = tok.pad_id if tok.pad_id is not None else 0
    order = np.random.default_rng([args.seed, 0]).permutation(len(enc)).tolist()
    packed = packed_rows(n_in, order, T)
    layouts = {  # name -> batches, each a list of rows, each a list of conversations
        "length-bucketed (zenlm)": [[[i] for i in b] for b in ChatBatches(enc, B, pad_id=pad_id,
                                                                          seed=args.seed).epoch_batches(0)],
        "shuffled": [[[i] for i in b] for b in ChatBatches(enc, B, pad_id=pad_id, seed=args.seed,
                                                           pool=1).epoch_batches(0)],
        "packed, best fit": [packed[s : s + B] for s in range(0, len(packed), B)],
    }
    rows = []
    for name, batches in layouts.items():
        cost = real = scored = 0
        shares = []
        for batch in batches:
            lens = [sum(n_in[i] for i in row) for row in batch]
            positions = len(batch) * max(lens)
            cost, real = cost + positions, real + sum(lens)
            scored += sum(n_scored[i] for row in batch for i in row)
            shares.append(1 - sum(lens) / positions)
        rows.append({"layout": name, "rows": sum(len(b) for b in batches), "batches": len(batches),
                     "positions": cost, "real": real / cost, "scored": scored / cost,
                     "pad_mean": float(np.mean(shares)), "pad_p90": float(np.percentile(shares, 90)),
                     "per_row": len(enc) / sum(len(b) for b in batches)})
    head = {"data": args.data, "conversations": len(enc), "seq_len": T, "batch_size": B,
            "truncated": enc.truncated, "dropped": enc.dropped}
    return [head, *rows]


def print_batching(table: list[dict]) -> None:
    head, rows = table[0], table[1:]
    print(f"\nbatching, one epoch of {head['data']} ({head['conversations']:,} training conversations, "
          f"{head['truncated']:,} cut on a turn boundary, {head['dropped']:,} left out) at {head['seq_len']} tokens "
          f"per row, {head['batch_size']} rows per batch; no training\n")
    print("| layout | rows | conversations per row | token positions (vs bucketed) | real tokens | assistant "
          "tokens | padding per batch, mean | padding per batch, 90th pct |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['layout']} | {r['rows']:,} | {r['per_row']:.2f} | {r['positions']:,} "
              f"({r['positions'] / rows[0]['positions']:.2f}x) | {r['real']:.1%} | {r['scored']:.1%} | "
              f"{r['pad_mean']:.1%} | {r['pad_p90']:.1%} |")


# ------------------------------------------------------------------------------------------------ worker


def stop_rate(run: Path, data: str, args: argparse.Namespace) -> dict:
    """Replies to the first user message of held-out conversations: share that end with the end-of-turn token
    within --max-new-tokens, and the mean reply length."""
    import zenlm
    from zenlm.data.chat import read_conversations, split_conversations
    from zenlm.generate import GenerationConfig, generate_batch
    from zenlm.tokenizer import chat_stop_ids, render_chat

    lm = zenlm.load(run, device="cpu")
    _, held_out = split_conversations(read_conversations(data), args.val_fraction, args.seed)
    firsts = [list(c.messages[: 2 if c.messages[0]["role"] == "system" else 1]) for c in held_out]
    prompts = [firsts[i % len(firsts)] for i in range(args.replies)]
    stops = chat_stop_ids(lm.tokenizer)
    ids = [lm.tokenizer.encode(render_chat(lm.tokenizer, p), allow_special=True) for p in prompts]
    # eager decoding: a compiled program built in the background would run into the next configuration's timing
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=0.8, seed=args.seed, compile=False)
    outs: list[list[int]] = []
    for s in range(0, len(ids), 50):
        outs += generate_batch(lm.model, ids[s : s + 50], cfg, on_token=lambda i, t: t in stops)
    ended = [bool(o) and o[-1] in stops for o in outs]
    examples = [{"user": p[-1]["content"], "reply": lm.tokenizer.decode([t for t in o if t not in stops]),
                 "stopped": e} for p, o, e in list(zip(prompts, outs, ended, strict=True))[:5]]
    return {"stop_rate": sum(ended) / len(ended), "replies": len(ended),
            "mean_reply_tokens": sum(len(o) for o in outs) / len(outs), "examples": examples}


def long_replies(work: Path, data: str, limit: int) -> float:
    """The share of ``data``'s replies to a first user message (the replies the stop rate samples) that are
    longer than ``limit`` tokens, end-of-turn token included, with the fine-tuning tokenizer."""
    from zenlm.data.chat import read_conversations
    from zenlm.tokenizer import Tokenizer

    tok = Tokenizer.load(work / ("data-zh" if data == "chatterbot-zh" else "data"))
    lengths = []
    for c in read_conversations(data):
        roles = [m["role"] for m in c.messages]
        first = roles.index("user") if "user" in roles else None
        if first is not None and first + 1 < len(roles) and roles[first + 1] == "assistant":
            lengths.append(len(tok.encode(c.messages[first + 1]["content"])) + 1)
    return sum(n > limit for n in lengths) / max(1, len(lengths))


def worker(args: argparse.Namespace) -> dict:
    """Train (or, for "base", only evaluate) one configuration in this process and return its measurements."""
    baseline = _mem_mb("VmRSS")
    from zenlm.models.lora import LoRAConfig
    from zenlm.recipes.finetune_chat import finetune_chat
    from zenlm.train.loop import TrainConfig

    work, name = Path(args.work), args.worker
    data = "chatterbot-zh" if name == "full-zh" else args.data
    base = work / {"int8+lora": "base-int8", "full-zh": "base-zh"}.get(name, "base")
    if name == "base":
        return {"config": name, "data": data, **stop_rate(base, data, args)}
    out = work / f"run-{name.replace('+', '-')}"
    if args.stop_only:
        return {"config": name, "data": data, **stop_rate(out, data, args)}
    shutil.rmtree(out, ignore_errors=True)
    # lora-no-tokens: adapters only, the end-of-turn token's embedding and head rows frozen (--lora-tokens none)
    lora = LoRAConfig(rank=args.rank, alpha=args.alpha, tokens="none" if name == "lora-no-tokens" else "auto") \
        if "lora" in name else None
    peaks, progress = training_peaks()

    t0 = time.perf_counter()
    result = finetune_chat(base, data, out,
                           val_fraction=args.val_fraction, batch_size=args.batch_size, max_len=args.max_len,
                           train=TrainConfig(max_steps=args.steps, eval_every=args.steps, ckpt_every=0, log_every=1,
                                             keep_checkpoints=1, device="cpu", precision=args.precision,
                                             threads=args.threads, tensorboard=False, seed=args.seed),
                           lora=lora, progress=progress)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_s = [r["train_s"] for r in rows if "train_s" in r]
    step_s = [b - a for a, b in zip(train_s, train_s[1:], strict=False)][1:] or [train_s[-1]]
    weights = out / ("adapter.safetensors" if lora else "model.safetensors")
    return {"config": name, "data": data, "trainable": _count(weights),
            "total": _count(work / ("base-zh" if name == "full-zh" else "base") / "model.safetensors"),
            "peak_train_mb": round(max(peaks), 1),
            "peak_total_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "baseline_mb": round(baseline, 1), "step_s": round(sum(step_s) / len(step_s), 4),
            "val_loss": round(result.val.get("val_loss", float("nan")), 4), "wall_s": round(wall, 1),
            **stop_rate(out, data, args)}


# ------------------------------------------------------------------------------------------------ parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="demo", help="GPT preset of the base (default demo: 4 x 256, context 256)")
    ap.add_argument("--model-overrides", default="{}", help="JSON dict of GPTConfig fields to change")
    ap.add_argument("--vocab-size", type=int, default=8192, help="BPE tokenizer trained on the conversations' text")
    ap.add_argument("--base-steps", type=int, default=1500, help="pretraining steps of the base")
    ap.add_argument("--data", default="chitchat", help="conversations to fine-tune on (built-in name or .jsonl)")
    ap.add_argument("--zh", action="store_true", help="also fine-tune on chatterbot-zh (for Chinese samples), from a "
                    "base pretrained on People's Daily and the chatterbot-zh messages")
    ap.add_argument("--zh-chars", type=int, default=2_000_000, help="People's Daily characters for the Chinese base")
    ap.add_argument("--steps", type=int, default=300, help="chat fine-tuning steps of every configuration")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=None, help="tokens per conversation (default: the context)")
    ap.add_argument("--val-fraction", type=float, default=0.05)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--replies", type=int, default=200, help="sampled replies per model for the stop rate")
    ap.add_argument("--max-new-tokens", type=int, default=256,
                    help="token limit of a reply (default 256: about 2%% of chitchat's own replies to a first "
                         "message are longer than 64 tokens, 0.2%% longer than 256)")
    ap.add_argument("--stop-only", action="store_true",
                    help="measure only the stop rates again, of the runs already in --work (their training rows "
                         "are read from --json, which is rewritten)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--configs", default="base,full,lora,int8+lora", help=f"which of {', '.join(CONFIGS)} to run")
    ap.add_argument("--work", help="working directory (default: a new temporary one)")
    ap.add_argument("--json", help="also write the rows as JSON to this file")
    ap.add_argument("--smoke", action="store_true", help="tiny model, few steps: check the script runs")
    ap.add_argument("--batching-only", action="store_true",
                    help="only the tokenizer and the padding/packing table (no training; about a minute)")
    ap.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args), ensure_ascii=False))
        return
    if args.smoke:
        args.model, args.base_steps, args.steps, args.replies, args.max_new_tokens = "tiny", 20, 6, 10, 16
        args.vocab_size, args.batch_size, args.max_len, args.zh_chars = 512, 4, 64, 20_000
        args.model_overrides = json.dumps({"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 64})
    configs = args.configs.split(",") + (["full-zh"] if args.zh else [])
    for c in configs:
        if c not in CONFIGS:
            sys.exit(f"unknown configuration {c!r}; choose from {', '.join(CONFIGS)}")
    work = Path(args.work or tempfile.mkdtemp(prefix="zenlm-chat-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        bench(args, work, configs)
    finally:
        if args.work is None:  # a temporary directory: the runs go with it
            shutil.rmtree(work, ignore_errors=True)


def bench(args: argparse.Namespace, work: Path, configs: list[str]) -> None:
    """Prepare the data and the base in ``work``, run every configuration in its own process, print the tables."""
    t0 = time.perf_counter()
    prepare_data(args, work)
    batching = batching_table(args, work)
    if args.batching_only:
        print_batching(batching)
        return
    before: dict[str, dict] = {}
    if args.stop_only:
        if not (args.json and Path(args.json).is_file()):
            sys.exit("--stop-only needs --json FILE: the results of the run that trained the configurations")
        before = {r["config"]: r for r in json.loads(Path(args.json).read_text(encoding="utf-8"))["runs"]}
        missing = [c for c in configs if c not in before]
        if missing:
            sys.exit(f"--stop-only: {args.json} has no results for {', '.join(missing)}")
    else:
        prepare_base(args, work)
        if "full-zh" in configs:
            prepare_zh(args, work)
        print(f"base ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    rows = []
    for config in configs:
        cmd = [sys.executable, __file__, "--worker", config, "--work", str(work)] + [
            a for k, v in vars(args).items()
            if k not in ("worker", "work", "json", "smoke", "configs", "zh", "batching_only", "stop_only")
            and v is not None for a in (f"--{k.replace('_', '-')}", str(v))] + (["--stop-only"] if args.stop_only
                                                                                else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        if proc.returncode != 0:
            sys.exit(f"{config} failed:\n{proc.stderr[-3000:]}")
        rows.append({**before.get(config, {}), **json.loads(proc.stdout.strip().splitlines()[-1])})
        print(f"{config}: done", file=sys.stderr)

    print(f"\nbase: {args.model} pretrained {args.base_steps} steps on the built-in conversations' text; chat "
          f"fine-tuning on {args.data}: {args.steps} steps of {args.batch_size} conversations, {args.precision}, "
          f"{platform.processor() or platform.machine()}, {args.threads or os.cpu_count()} threads; LoRA rank "
          f"{args.rank}, alpha {args.alpha:g}; stop rate over {args.replies} replies at temperature 0.8, at most "
          f"{args.max_new_tokens} tokens\n")
    print("| configuration | data | trainable parameters | peak RSS, training (MB) | step time (s) | validation loss "
          "| replies that stop | mean reply tokens |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        cells = ["-"] * 4  # the base is not trained here
        if "trainable" in r:
            cells = [f"{r['trainable']:,} ({r['trainable'] / r['total']:.2%})", f"{r['peak_train_mb']:,.0f}",
                     f"{r['step_s']:.3f}", f"{r['val_loss']:.4f}"]
        print(f"| {r['config']} | {r['data']} | {' | '.join(cells)} | {r['stop_rate']:.1%} | "
              f"{r['mean_reply_tokens']:.1f} |")
    for data in sorted({r["data"] for r in rows}):
        share = long_replies(work, data, args.max_new_tokens)
        print(f"\n{data}'s own replies to a first message: {share:.1%} are longer than {args.max_new_tokens} tokens "
              f"(a model that imitated them exactly would stop at most {1 - share:.1%} of the time).")
    tuned = [r for r in rows if r["config"] not in ("base", "lora-no-tokens")]  # the contrasts have no goal
    if tuned:
        worst = min(r["stop_rate"] for r in tuned)
        print(f"\nlowest stop rate of the chat-tuned models: {worst:.1%} (goal >= {GOAL:.0%}): "
              f"{'met' if worst >= GOAL else 'NOT met'}.")
    for r in rows:
        for ex in r["examples"][:2]:
            print(f"\n[{r['config']}] user: {ex['user']}\n[{r['config']}] reply: {ex['reply']!r}"
                  f"{'' if ex['stopped'] else '  (did not stop)'}")
    print_batching(batching)
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": rows, "batching": batching}, indent=2, ensure_ascii=False)
                                   + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

"""The ``zenlm`` command. Each verb is a plain function below; its flags come from its signature or, for the
verbs that run a recipe (pretrain, demo, finetune ...), from the recipe's own parameters and settings
(zenlm.clikit.params_of), so a flag's default is the library's default.

    zenlm tokenizer train --corpus PATH --kind bpe|wordpiece|char --vocab-size N --out DIR
    zenlm prepare  --corpus PATH [--val PATH | --val-fraction F] [--tokenizer DIR|char] [--objective mlm] --out DATA_DIR
    zenlm pretrain --data DATA_DIR --out RUN_DIR [--objective causal-lm|mlm] [--model PRESET] [--max-steps N]
                   [--max-seconds S] [--resume]
    zenlm generate RUN_DIR "prompt" [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S]
                   [--dtype auto|fp32|bf16|int8] [--no-compile]
    zenlm demo [--lang en|zh] [--max-seconds S]
    zenlm presets
    zenlm convert from-hf HF_DIR --out RUN_DIR  |  zenlm convert to-hf RUN_DIR --out HF_DIR
    zenlm convert to-gguf RUN_DIR --out model.gguf [--outtype f32|f16|bf16|q8_0]
    zenlm finetune seq2seq | classify | chat ...   zenlm predict / embed / evaluate RUN ...   zenlm serve / chat RUN
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Literal

from zenlm.cli.common import (
    StderrHandler,
    TerminalProgress,
    launch_rank,
    lora_config,
    lora_params,
    print_train_result,
    shape_params,
)
from zenlm.clikit import Param, VerbParser, add_verb, call_verb, params_of
from zenlm.errors import ConfigError, TrainingError, ZenlmError

# ---------------------------------------------------------------------------------------------- verbs


def tokenizer_train(
    corpus: str,
    out: str,
    kind: Literal["bpe", "wordpiece", "char", "word"] = "bpe",
    vocab_size: int = 8192,
    min_frequency: int = 2,
    val: str | None = None,
    val_fraction: float | None = None,
    text_field: str = "text",
) -> None:
    """Train a tokenizer on the training split of a corpus and save tokenizer.json.

    Args:
        corpus: built-in corpus name (shakespeare, peoples-daily, shakespeare-char) or a .txt/.jsonl file or folder
        out: directory to write tokenizer.json and tokenizer_config.json into
        kind: bpe (byte-level BPE), wordpiece, char (one token per character) or word (one per word)
        vocab_size: size of the vocabulary, special tokens included (ignored for char)
        min_frequency: minimum count of a pair to be merged
        val: explicit validation file or folder (kept out of tokenizer training)
        val_fraction: fraction of the text, taken from the end, held out for validation
        text_field: field holding the text in .jsonl files
    """
    from zenlm.data.corpus import open_corpus
    from zenlm.tokenizer import train_tokenizer

    progress = TerminalProgress()
    c = open_corpus(corpus, val=val, val_fraction=val_fraction, text_field=text_field, progress=progress)
    t0 = time.perf_counter()
    tok = train_tokenizer(c.texts("train"), kind=kind, vocab_size=vocab_size, min_frequency=min_frequency,
                          progress=progress)
    tok.save(out)
    progress.close()
    print(f"{kind} tokenizer with {tok.vocab_size} tokens trained in {time.perf_counter() - t0:.1f} s -> {out}")


def prepare(
    corpus: str,
    out: str,
    tokenizer: str | None = None,
    val: str | None = None,
    val_fraction: float | None = None,
    vocab_size: int = 8192,
    text_field: str = "text",
    objective: Literal["causal-lm", "mlm"] = "causal-lm",
) -> None:
    """Turn a corpus into token shards (train and validation) plus index.json.

    Args:
        corpus: built-in corpus name (shakespeare, peoples-daily, shakespeare-char) or a .txt/.jsonl file or folder
        out: data directory to write
        tokenizer: a tokenizer directory, or "char" for a character vocabulary built from the training text;
            when omitted one with --vocab-size tokens is trained on the training split (see --objective)
        val: explicit validation file or folder
        val_fraction: fraction of the text, taken from the end, used for validation
        vocab_size: vocabulary size when a BPE tokenizer is trained here
        text_field: field holding the text in .jsonl files
        objective: what the shards are for when no --tokenizer is given: causal-lm trains a byte-level BPE
            (GPT), mlm a WordPiece tokenizer (BERT, for `zenlm pretrain --objective mlm`)
    """
    from zenlm.data.corpus import open_corpus
    from zenlm.data.shards import prepare as prepare_shards
    from zenlm.tokenizer import Tokenizer, train_tokenizer

    progress = TerminalProgress()
    c = open_corpus(corpus, val=val, val_fraction=val_fraction, text_field=text_field, progress=progress)
    if tokenizer is None:
        kind = "wordpiece" if objective == "mlm" else "bpe"
        tok = train_tokenizer(c.texts("train"), kind=kind, vocab_size=vocab_size, progress=progress)
    elif tokenizer == "char":
        tok = train_tokenizer(c.texts("train"), kind="char", progress=progress)
    else:
        tok = Tokenizer.load(tokenizer)
    t0 = time.perf_counter()
    index = prepare_shards(c, tok, out, progress=progress)
    progress.close()
    tr, va = index["splits"]["train"], index["splits"]["val"]
    print(f"wrote {tr['tokens']:,} train and {va['tokens']:,} validation tokens ({index['dtype']}, vocab "
          f"{index['vocab_size']}) in {time.perf_counter() - t0:.1f} s -> {out}")


# pretrain settings whose command-line default is "whatever the --recipe says" (None)
_FROM_RECIPE = ("objective", "model", "batch_size", "seq_len", "grad_accum", "max_steps", "precision", "compile")
_OPTIM_FLAGS = ("name", "lr", "min_lr", "warmup_steps", "schedule", "weight_decay", "grad_clip", "muon_lr")
# TrainConfig fields with a pretrain flag; --resume continues with the run's own value of each except the ones
# that describe this machine or this invocation (max_seconds, device, threads)
_TRAIN_FLAGS = ("max_steps", "max_seconds", "grad_accum", "eval_every", "log_every", "ckpt_every", "seed", "device",
                "precision", "compile", "threads", "strategy")
_NOT_RESUMED = ("max_seconds", "device", "threads", "strategy")
_SHAPE_FLAGS = ("model", "n_layer", "n_head", "n_embd", "block_size", "dropout")


def _pretrain_params() -> list[Param]:
    """The flags of `zenlm pretrain`: zenlm.recipes.pretrain.pretrain's parameters, the TrainConfig and
    OptimConfig fields it takes, and the shape overrides; recipe-backed settings default to None."""
    from zenlm.device import Precision
    from zenlm.recipes.pretrain import pretrain as recipe
    from zenlm.train.loop import TrainConfig
    from zenlm.train.optim import OptimConfig

    from_recipe = dict.fromkeys(_FROM_RECIPE + _OPTIM_FLAGS, None)
    return [
        *params_of(recipe, only=("data", "out")),
        Param("recipe", str | None, None),
        *params_of(recipe, only=("objective", "model"), defaults=from_recipe),
        *params_of(TrainConfig, only=("max_steps", "max_seconds"), defaults=from_recipe),
        *params_of(recipe, only=("resume", "overwrite", "batch_size", "seq_len"), defaults=from_recipe),
        *params_of(TrainConfig, only=("grad_accum",), defaults=from_recipe),
        *params_of(OptimConfig, only=_OPTIM_FLAGS, defaults=from_recipe, rename={"name": "optimizer"},
                   types={"name": Literal["adamw", "muon"], "schedule": Literal["cosine", "linear", "constant", "wsd"]}),
        *params_of(TrainConfig, only=("eval_every",)),
        *params_of(recipe, only=("eval_tokens", "init_embeddings")),
        *params_of(TrainConfig, only=("log_every", "ckpt_every", "seed", "device", "precision", "compile", "threads",
                                      "strategy"), defaults=from_recipe, types={"precision": Precision}),
        *shape_params(),
        *params_of(recipe, only=("init",)),
        *lora_params(),
    ]


def pretrain(*, _given: frozenset[str] = frozenset(), **flags: Any) -> None:
    """Pretrain a GPT with next-token prediction, or a BERT encoder with masked-LM (--objective mlm).

    Settings not given on the command line come from the --recipe (see docs/training-speed.md); without
    --recipe, causal-lm uses the "default" recipe and mlm the "mlm" recipe (bert-mini, rows of 128 tokens,
    AdamW 5e-4 with 100 warm-up steps, linear decay, weight decay 0.01).

    The lower rungs of the language-model ladder train with the same command (docs/ladder.md): --model
    lstm-small, lstm-medium, gru-small, mlp-small or mlp-direct read the text as consecutive windows with the
    state carried across them (truncated BPTT; the "ladder" recipe), and --model ngram-2 .. ngram-5 counts an
    n-gram model from the training split in one pass.

    Masked-LM pretraining hides 15% of the tokens of each row ([CLS] text [SEP]) and learns to predict them;
    it needs a tokenizer with the <|mask|>, <|bos|> ([CLS]) and <|eos|> ([SEP]) tokens, which every tokenizer
    zenlm trains has. A WordPiece tokenizer is the usual choice for BERT, and what `zenlm prepare --objective mlm`
    trains when it is given no tokenizer:

        zenlm prepare --corpus TEXT --objective mlm --out DATA        # WordPiece trained on TEXT
        zenlm pretrain --objective mlm --data DATA --out RUN

    Continued pretraining starts from a trained run (its model and tokenizer), with every weight or with LoRA
    adapters on the frozen run (docs/lora.md):

        zenlm prepare --corpus MORE_TEXT --tokenizer RUN --out DATA2
        zenlm pretrain --data DATA2 --init RUN --lora --out RUN2

    Args:
        data: data directory made by `zenlm prepare`
        out: run directory to create (config.yaml, checkpoints, metrics.jsonl, model.safetensors, plots)
        recipe: default (demo model, Muon + AdamW, bf16), fast, five-min, classic (the classic small-GPT
            recipe with AdamW and fp32), mlm (masked LM) or ladder (n-gram, MLP and LSTM rungs); default: the
            objective's recipe, ladder for a ladder preset
        objective: causal-lm (GPT, next-token prediction) or mlm (BERT, masked tokens); default: the
            recipe's, and on --resume the run's own
        model: model preset (see `zenlm presets`; BERT presets bert-tiny, bert-mini, ... for mlm; ngram-5,
            mlp-small, lstm-small, gru-small, ... for the ladder); default from the recipe
        max_steps: optimiser steps in all
        max_seconds: wall-time budget; the learning rate decays over whichever budget ends first
        resume: continue the run in --out from its newest checkpoint, with its own settings (seed, batch,
            optimiser, schedule, evaluation and checkpoint intervals ...); flags given here win, with a note
        overwrite: start again from scratch in an --out that holds a run (its checkpoints are deleted)
        batch_size: sequences per micro-batch
        seq_len: tokens per sequence (default: the model's context length)
        grad_accum: micro-batches per optimiser step, counted over all processes under torchrun (a multiple
            of their number); on --resume the run's own
        optimizer: adamw, or muon (Muon for hidden matrices, AdamW for the rest)
        lr: peak learning rate (AdamW parameters)
        min_lr: final learning rate
        warmup_steps: linear warm-up steps
        schedule: learning-rate decay shape
        weight_decay: decoupled weight decay on matrices
        grad_clip: clip the gradient norm to this (0 disables)
        muon_lr: peak learning rate of the Muon parameters
        eval_every: validate every N steps
        eval_tokens: validation tokens per evaluation (0 for the whole split)
        init_embeddings: word vectors (word2vec text or binary, fastText .vec, GloVe, or a `zenlm wordvec
            train` directory) to initialise the token embeddings of a new word-level model with; the share of
            the vocabulary they cover is reported
        log_every: write metrics every N steps
        ckpt_every: save a checkpoint every N steps
        seed: random seed (weights, dropout, data order)
        device: auto, cpu, cuda, cuda:N or mps
        precision: auto (bf16 where the hardware has it), fp32, bf16 or fp16 (CUDA only)
        compile: compile the model with torch.compile
        threads: CPU threads (default: PyTorch's choice, all cores; use 1 when other jobs share the machine)
        n_layer: override the preset's number of layers
        n_head: override the preset's number of heads
        n_embd: override the preset's width (d_model of a BERT)
        block_size: override the preset's context length (max_len of a BERT)
        dropout: override the preset's dropout
        init: continued pretraining: start from this run's weights, model and objective (the model flags are then
            ignored; prepare the data with its tokenizer: zenlm prepare --tokenizer RUN)
    """
    import dataclasses

    from zenlm.models.registry import find_preset
    from zenlm.recipes.pretrain import pretrain as run_pretrain
    from zenlm.recipes.pretrain import saved_settings
    from zenlm.recipes.registry import default_recipe, recipe_settings
    from zenlm.train.loop import TrainConfig, config_to_dict
    from zenlm.train.optim import OptimConfig

    given = set(_given)
    out, resume = Path(flags["out"]), flags["resume"]
    lora = lora_config(flags)
    own = saved_settings(out) if resume and (out / "config.yaml").is_file() else None
    objective = flags["objective"] or (own.objective if own else None)  # continue with the run's own objective
    if own is None and flags["init"] is not None and objective is None:  # what the init run's model learns
        from zenlm.rundir import read_run_config, run_architecture

        objective = "causal-lm" if run_architecture(read_run_config(flags["init"])).can("causal-lm") else "mlm"
    recipe = flags["recipe"] or default_recipe(objective or "causal-lm", flags["model"])
    s = recipe_settings(recipe, **{k: flags[k] for k in _FROM_RECIPE if k != "objective" and k in given})
    objective = objective or s["objective"]
    train = {k: s[k] for k in ("max_steps", "grad_accum", "precision", "compile")}
    train.update({k: flags[k] for k in _TRAIN_FLAGS if k not in _FROM_RECIPE})  # the library's defaults
    optim = dict(s["optim"])
    batch: dict[str, Any] = {"batch_size": s["batch_size"], "seq_len": s["seq_len"],
                             "eval_tokens": flags["eval_tokens"] or None}
    if own is not None:  # --resume: the run's own settings, except what an explicit --recipe sets
        from_recipe = {"max_steps", "grad_accum", "precision", "compile", "batch_size", "seq_len", "optim"} \
            if flags["recipe"] else set()
        saved_train = config_to_dict(own.train)
        train.update({k: v for k, v in saved_train.items() if k not in from_recipe and k not in _NOT_RESUMED})
        if "optim" not in from_recipe:
            optim = config_to_dict(own.optim)
        batch.update({k: v for k, v in own.batch.items() if k not in from_recipe})
    train.update({k: flags[k] for k in _TRAIN_FLAGS if k in given})  # flags given explicitly win
    explicit_optim = {("name" if k == "optimizer" else k): flags[k] for k in ("optimizer", *_OPTIM_FLAGS[1:])
                      if k in given}
    optim.update(explicit_optim)
    if "min_lr" not in explicit_optim and "lr" in explicit_optim:
        optim["min_lr"] = min(optim["min_lr"], explicit_optim["lr"] / 10)
    batch.update({k: (flags[k] or None) if k == "eval_tokens" else flags[k]
                  for k in ("batch_size", "seq_len", "eval_tokens") if k in given})
    if own is not None:
        _resume_notes(own, train, optim, batch, given)
    s["model_overrides"].update(find_preset(s["model"])[0].shape_overrides(
        **{k: flags[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "dropout")}))
    progress = TerminalProgress()
    result = run_pretrain(
        flags["data"], out, objective=objective, model=s["model"], model_overrides=s["model_overrides"],
        resume=resume, overwrite=flags["overwrite"], batch_size=batch["batch_size"], seq_len=batch["seq_len"],
        eval_tokens=batch["eval_tokens"], eval_seq_len=batch.get("eval_seq_len"),
        eval_batch_size=batch.get("eval_batch_size"), init_embeddings=flags["init_embeddings"],
        train=TrainConfig(**train), optim=OptimConfig(**optim), init=flags["init"], lora=lora,
        progress=progress,
    )
    progress.close()
    if result.stopped_by == "counted":  # an n-gram model: one pass over the training split
        v = result.val
        print(f"\ncounted {result.tokens:,} training tokens in {result.train_s:.1f} s\nvalidation loss "
              f"{v['val_loss']:.4f} nats/token  |  perplexity {v['val_ppl']:.2f}  |  {v['val_bpb']:.4f} bits/byte\n"
              f"run directory: {out}")
        return
    if objective != "mlm":
        print_train_result(result, out)
        return
    print_train_result(dataclasses.replace(result, val={}), out)
    if result.val:
        v = result.val
        print(f"masked-LM validation loss {v['val_loss']:.4f} nats/masked token  |  perplexity "
              f"{v['val_mlm_ppl']:.2f}  |  masked-token accuracy {v['val_masked_acc']:.1%}")


def _resume_notes(own: Any, train: dict[str, Any], optim: dict[str, Any], batch: dict[str, Any],
                  given: set[str]) -> None:
    """On --resume, say which flags given explicitly replace the run's saved settings, and which are ignored
    (the model is the run's own)."""
    from zenlm.train.loop import config_to_dict

    saved = {**config_to_dict(own.train), **config_to_dict(own.optim), **own.batch}
    now = {**train, **optim, **batch}
    changed = []
    for flag in sorted(given):
        key = "name" if flag == "optimizer" else flag
        if key in saved and key in now and now[key] != saved[key]:
            changed.append(f"--{flag.replace('_', '-')} {now[key]} (the run's: {saved[key]})")
    if changed:
        print(f"note: --resume continues with the run's own settings, except these flags given here: "
              f"{', '.join(changed)}", file=sys.stderr)
    ignored = [f"--{f.replace('_', '-')}" for f in _SHAPE_FLAGS if f in given]
    if ignored:
        print(f"note: {', '.join(ignored)} ignored: a resumed run keeps its own model", file=sys.stderr)


def generate(
    run: str,
    prompt: str = "",
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop: list[str] | None = None,
    seed: int | None = None,
    device: str = "auto",
    dtype: Literal["auto", "fp32", "bf16", "fp16", "int8"] = "auto",
    cache: bool = True,
    compile: bool | None = None,
) -> None:
    """Continue a prompt with a trained model, streaming the text to the terminal.

    Args:
        run: run directory (made by `zenlm pretrain` or `zenlm demo`)
        prompt: text to continue
        max_new_tokens: most tokens to generate
        temperature: 0 for greedy decoding; higher is more random
        top_k: sample only among the K most likely tokens (0: no limit)
        top_p: sample only among the most likely tokens whose probabilities sum to P
        repetition_penalty: > 1 discourages tokens already in the text
        stop: stop when any of these strings is produced (not printed)
        seed: random seed for reproducible sampling
        device: auto, cpu, cuda or mps
        dtype: the weights for inference: auto keeps the run's own precision (lossless); bf16 halves the
            bytes of fp32 weights, int8 quarters them (linear layers quantised per output channel while
            loading, about 1% perplexity or less); fp16 is for GPUs. bf16 and int8 compute in bf16 where the
            CPU has native bf16 (AVX-512 BF16, AMX, ARM BF16), else in fp32; the first line on stderr says
            what was chosen
        cache: use the KV cache (--no-cache recomputes the whole context each step)
        compile: decode with the compiled step, 1.4-3x faster per token on a CPU (default: yes where a C++
            compiler is installed and ZENLM_COMPILE is not 0). The first run for a model shape builds it in
            the background (20-60 s) while the tokens come eagerly; later runs load it from ~/.cache/zenlm
            in about a second. --no-compile: eager; --compile: wait for the build
    """
    import zenlm
    from zenlm.cli.common import check_run_fits, show_inference_notes, write_text
    from zenlm.generate import GenerationConfig

    check_run_fits(run, "generate")  # a classifier or an encoder: say which verb fits, before loading it
    if top_k is not None and top_k < 0:
        raise ConfigError(f"--top-k must be >= 0 (0: no limit), got {top_k}.")
    settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k or None, top_p=top_p,
                    repetition_penalty=repetition_penalty, stop=list(stop or []), seed=seed, use_cache=cache,
                    compile=compile)
    GenerationConfig(**settings)  # a bad setting is refused before the model loads
    lm = zenlm.load(run, device=device, dtype=dtype)
    show_inference_notes(lm)  # what was chosen, and the compiled step's notes (a build, no compiler)
    pieces = lm.stream(prompt, **settings)
    first = next(pieces, "")  # the prompt is read first: a note about the compiled step comes before the text
    write_text(prompt + first)
    for piece in pieces:
        write_text(piece)
    write_text("\n")


def demo(**flags: Any) -> None:
    """The whole pipeline in one command: tokenizer, shards, pretraining, evaluation, a sample.

    Args:
        lang: en (Shakespeare) or zh (People's Daily, January 1998)
        max_seconds: total wall-time budget
        out: folder for the demo (default runs/demo-LANG; a previous demo there is replaced)
        device: auto, cpu, cuda or mps
        precision: auto, fp32, bf16 or fp16
        max_steps: stop training after this many steps even if time is left (default: the time budget decides)
    """
    import zenlm
    from zenlm.recipes.demo import demo as run_demo

    progress = TerminalProgress()
    res = run_demo(**flags, progress=progress)
    progress.close()
    print_train_result(res.train, res.run_dir)
    lm = zenlm.load(res.run_dir, device=flags["device"])
    print(f"\n--- sample (temperature 0.8, top-k 50) ---\n{res.prompt}", end="")
    for piece in lm.stream(res.prompt, max_new_tokens=160, temperature=0.8, top_k=50, seed=0):
        sys.stdout.write(piece)
        sys.stdout.flush()
    print(f"\n--- end of sample ---\ndemo finished in {res.wall_s:.0f} s of wall time. Try:\n"
          f"  zenlm generate {res.run_dir} \"{res.prompt.strip()}\"")


def _demo_params() -> list[Param]:
    from zenlm.recipes.demo import demo as recipe

    return params_of(recipe, skip=("progress",))


def convert_from_hf(
    src: str | None = None,
    *,
    out: str,
    from_hub: str | None = None,
    revision: str | None = None,
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto",
    overwrite: bool = False,
    base: str | None = None,
) -> None:
    """Convert a Hugging Face checkpoint (GPT-2, Llama, Mistral, Qwen2, Qwen3; BERT) into a zenlm run, or a PEFT
    LoRA adapter for such a model into a zenlm LoRA run (give the imported base with --base).

    Args:
        src: local Hugging Face model directory (config.json, safetensors or pytorch_model.bin,
            tokenizer.json), or a PEFT adapter directory (adapter_config.json, adapter_model.safetensors)
        out: run directory to write (open it with `zenlm generate OUT` or zenlm.load)
        from_hub: download this Hugging Face Hub repository (needs network) instead of reading SRC
        revision: branch, tag or commit of --from-hub
        dtype: auto keeps the stored dtype; fp32, bf16 or fp16 converts the weights
        overwrite: replace an existing run in --out
        base: for a PEFT adapter: the zenlm run of its base model (e.g. made by `zenlm convert from-hf BASE_DIR`)
    """
    from zenlm.convert.hf import download_from_hub, import_hf
    from zenlm.convert.peft import import_peft, is_peft_adapter
    from zenlm.errors import ConfigError

    if (src is None) == (from_hub is None):
        raise ConfigError("give either a local directory SRC or --from-hub NAME (not both).")
    if from_hub is not None:
        src = str(download_from_hub(from_hub, revision))
    assert src is not None
    if is_peft_adapter(src):
        if base is None:
            raise ConfigError(f"{src} is a PEFT adapter; give the zenlm run of its base model with --base RUN "
                              "(import the base first: zenlm convert from-hf BASE_DIR --out RUN).")
        print(f"imported the LoRA adapter {src} onto {base} -> {import_peft(src, base, out, overwrite=overwrite)}")
        return
    if base is not None:
        raise ConfigError(f"--base is for PEFT adapter directories; {src} is not one (it has no adapter_config.json "
                          "with a peft_type, or it has a config.json).")
    progress = TerminalProgress()
    path = import_hf(src, out, dtype=dtype, overwrite=overwrite, progress=progress)
    progress.close()
    print(f"imported {src} -> {path}")


def convert_to_hf(
    run: str,
    *,
    out: str,
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32",
    overwrite: bool = False,
    base_model: str | None = None,
) -> None:
    """Export a zenlm run directory as a Hugging Face model directory (GPT-2, Llama, Qwen2, Qwen3; BERT and
    BERT classifiers; encoder-decoders of the Blenderbot layout); a LoRA run as a PEFT adapter directory (load it
    with peft.PeftModel.from_pretrained on the exported base).

    Args:
        run: run directory (made by `zenlm pretrain`, `zenlm finetune` or `zenlm convert from-hf`)
        out: directory to write config.json, model.safetensors, generation_config.json and the tokenizer files
            (for a LoRA run: adapter_config.json and adapter_model.safetensors)
        dtype: dtype of the written weights
        overwrite: replace an existing export in --out
        base_model: LoRA runs: the base_model_name_or_path to record (a Hub name, or the directory of the base
            exported with `zenlm convert to-hf BASE`); default: where the base was imported from, else its run
    """
    import json

    from zenlm.rundir import read_run_config

    if read_run_config(run).get("lora"):
        from zenlm.convert.peft import export_peft

        path = export_peft(run, out, base_model=base_model, dtype=dtype, overwrite=overwrite)
        print(f"exported the LoRA adapters of {run} -> {path} (load them with peft.PeftModel.from_pretrained("
              "AutoModelForCausalLM.from_pretrained(BASE), OUT), BASE = the base exported with zenlm convert to-hf)")
        return
    from zenlm.convert.hf import export_hf

    progress = TerminalProgress()
    path = export_hf(run, out, dtype=dtype, overwrite=overwrite, progress=progress)
    progress.close()
    arch = json.loads((path / "config.json").read_text(encoding="utf-8"))["architectures"][0]
    loader = {"BertModel": "AutoModel", "BertForMaskedLM": "AutoModelForMaskedLM",
              "BertForSequenceClassification": "AutoModelForSequenceClassification",
              "BlenderbotForConditionalGeneration": "AutoModelForSeq2SeqLM"}.get(arch, "AutoModelForCausalLM")
    print(f"exported {run} -> {path} as {arch} (load it with transformers.{loader}.from_pretrained)")


def convert_to_gguf(
    run: str,
    *,
    out: str,
    outtype: Literal["f32", "f16", "bf16", "q8_0"] = "f16",
    overwrite: bool = False,
) -> None:
    """Export a zenlm run as one GGUF file for llama.cpp (Llama, Qwen2, Qwen3 and GPT-2 layouts, byte-level
    BPE tokenizer and chat template included).

    Args:
        run: run directory (made by `zenlm pretrain` or `zenlm convert from-hf`)
        out: the .gguf file to write
        outtype: type of the weight matrices (norms and biases stay f32); q8_0 is 8-bit blocks of 32
        overwrite: replace an existing file
    """
    from zenlm.convert.gguf import export_gguf

    progress = TerminalProgress()
    path = export_gguf(run, out, outtype=outtype, overwrite=overwrite, progress=progress)
    progress.close()
    print(f"exported {run} -> {path} ({path.stat().st_size / 1e6:.1f} MB, {outtype}); run it with llama.cpp, "
          f"e.g. llama-cli -m {path}")


def quantize(run: str, out: str) -> None:
    """Write an int8 weight-only copy of a run (linear layers int8, one scale per output channel).

    Args:
        run: run directory to quantise (made by `zenlm pretrain`, `zenlm demo` or `zenlm convert from-hf`)
        out: new run directory to write (must not exist)
    """
    from zenlm.recipes.quantize import quantize_run

    r = quantize_run(run, out)
    ratio = f" ({r.bytes_after / r.bytes_before:.0%} of {r.bytes_before / 1e6:.1f} MB)" if r.bytes_before else ""
    print(f"wrote {r.out}: model.safetensors is {r.bytes_after / 1e6:.1f} MB{ratio}. "
          f"Load it like any run: zenlm generate {r.out} \"...\"")


def merge_lora(run: str, out: str) -> None:
    """Merge a LoRA run's adapters into its base (W + alpha/r * B A) and write a plain run directory.

    Args:
        run: LoRA run directory (trained with --lora, or imported from a PEFT adapter)
        out: run directory to write (must not exist); an int8 base comes out in float32
    """
    from zenlm.adapter import merge_lora_run

    path = merge_lora_run(run, out)
    print(f"merged {run} -> {path} (a plain run: zenlm generate {path} \"...\", zenlm convert to-hf {path} ...)")


# what each capability's presets are trained with, for the headings of `zenlm presets`
_PRESET_USE = {"causal-lm": "zenlm pretrain --model NAME", "masked-lm": "zenlm pretrain --objective mlm --model NAME",
               "seq2seq": "zenlm finetune seq2seq --model NAME"}


def presets() -> None:
    """List the model presets of every architecture with their parameter counts (at a 8192-token vocabulary)."""
    from zenlm.models.registry import architectures, num_params

    for i, arch in enumerate(architectures()):
        use = next((u for c, u in _PRESET_USE.items() if arch.can(c)), "")
        print(f"{chr(10) if i else ''}{arch.name}: {arch.description}" + (f"  ({use})" if use else ""))
        print(f"  {'name':<14} {'params':>9}  shape")
        for name, preset in arch.presets.items():
            n = num_params(arch.config(name, vocab_size=8192))
            size = "counted" if arch.count is not None else f"{n / 1e6:.2f}M"  # an n-gram's size is its data's
            print(f"  {name:<14} {size:>9}  {preset.description}")


# ------------------------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    parser = VerbParser(prog="zenlm", description="From raw text to a served language model.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debugging detail")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    tok = sub.add_parser("tokenizer", help="tokenizer commands (train)")
    tok_sub = tok.add_subparsers(dest="tokverb", metavar="ACTION")
    add_verb(tok_sub, "train", tokenizer_train)
    add_verb(sub, "prepare", prepare)
    add_verb(sub, "pretrain", pretrain, params=_pretrain_params)
    add_verb(sub, "generate", generate, positional=("run", "prompt"))
    add_verb(sub, "demo", demo, params=_demo_params)
    add_verb(sub, "presets", presets)
    add_verb(sub, "quantize", quantize, positional=("run",))
    add_verb(sub, "merge-lora", merge_lora, positional=("run",))
    conv = sub.add_parser("convert", help="convert models to and from Hugging Face format and to GGUF "
                                          "(from-hf, to-hf, to-gguf)")
    conv_sub = conv.add_subparsers(dest="convverb", metavar="ACTION")
    add_verb(conv_sub, "from-hf", convert_from_hf, positional=("src",))
    add_verb(conv_sub, "to-hf", convert_to_hf, positional=("run",))
    add_verb(conv_sub, "to-gguf", convert_to_gguf, positional=("run",))
    from zenlm.cli import chat as cli_chat  # multi-turn chat fine-tuning
    from zenlm.cli import encoder as cli_encoder  # texts -> labels or vectors
    from zenlm.cli import seq2seq as cli_seq2seq  # source -> target verbs live in their own module

    ft = sub.add_parser("finetune", help="fine-tuning commands (seq2seq, classify, chat)")
    ft_sub = ft.add_subparsers(dest="ftverb", metavar="TASK")
    add_verb(ft_sub, "seq2seq", cli_seq2seq.finetune_seq2seq, params=cli_seq2seq.finetune_seq2seq_params)
    add_verb(ft_sub, "classify", cli_encoder.finetune_classify, params=cli_encoder.finetune_classify_params)
    add_verb(ft_sub, "chat", cli_chat.finetune_chat, params=cli_chat.finetune_chat_params)
    add_verb(sub, "predict", cli_encoder.predict, positional=("run", "texts"))
    add_verb(sub, "embed", cli_encoder.embed, positional=("run", "texts"))
    add_verb(sub, "evaluate", cli_seq2seq.evaluate, positional=("run",))
    from zenlm.cli import serve as cli_serve  # HTTP server and terminal chat

    add_verb(sub, "serve", cli_serve.serve, positional=("run",))
    add_verb(sub, "chat", cli_serve.chat, positional=("run",))
    from zenlm.cli.wordvec import register as register_wordvec  # zenlm wordvec train | eval | coverage

    register_wordvec(sub)
    from zenlm.cli.generative import register as register_generative  # zenlm vae | seqgan | distill

    register_generative(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    ns = parser.parse_args(argv)
    rank = launch_rank()
    if rank != 0:  # under torchrun rank 0 speaks for the run; the others report only their own errors
        sys.stdout = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115  # for the life of the process
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.WARNING if rank == 0 else logging.ERROR,
                        format="%(levelname)s %(name)s: %(message)s", handlers=[StderrHandler()])
    if ns.version:
        from zenlm import __version__

        print(__version__)
        return 0
    if not hasattr(ns, "_fn"):  # no verb, or a verb with actions (tokenizer, convert, finetune, vae...) but none
        (parser._subparsers._group_actions[0].choices[ns.verb] if ns.verb else parser).print_help()
        return 2
    try:
        call_verb(ns, argv)
    except (ZenlmError, TrainingError) as e:
        who = f" (rank {rank})" if "WORLD_SIZE" in os.environ else ""
        print(f"zenlm: error{who}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nzenlm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Every default of every `zenlm` flag is the library's default for the same setting.

The verbs that run a recipe build their flags from the recipe's signature and settings (zenlm.clikit.params_of),
so this holds by construction there; this test keeps it true for every verb, and makes each flag that has no
library counterpart, or that differs on purpose, a visible decision (CLI_ONLY, ON_PURPOSE below).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import pytest

from zenlm.cli import build_parser


def _sources() -> dict[str, list[Any]]:
    """verb -> where its defaults come from: functions (their signature), settings objects (their fields) and
    dicts (settings under their flag names)."""
    from zenlm import wordvec as wv
    from zenlm.api import load
    from zenlm.cli.encoder import evaluate_classify
    from zenlm.cli.lmeval import evaluate_lm_eval
    from zenlm.convert.gguf import export_gguf
    from zenlm.convert.hf import download_from_hub, export_hf, import_hf
    from zenlm.convert.peft import export_peft, import_peft
    from zenlm.data.corpus import open_corpus
    from zenlm.data.seq2seq import read_pairs
    from zenlm.encoder import EncoderLM
    from zenlm.generate import GenerationConfig
    from zenlm.models.lora import LoRAConfig
    from zenlm.recipes import finetune_chat as chat
    from zenlm.recipes import finetune_seq2seq as s2s
    from zenlm.recipes.demo import demo
    from zenlm.recipes.distill import DistillSettings, distill_classifier, distill_lm
    from zenlm.recipes.finetune_classify import finetune_classify
    from zenlm.recipes.pretrain import pretrain
    from zenlm.recipes.seqgan import SeqGANSettings, train_seqgan
    from zenlm.recipes.vae import train_vae
    from zenlm.seq2seq import Seq2SeqLM, evaluate_generation
    from zenlm.serve.app import create_app
    from zenlm.serve.server import Limits
    from zenlm.tokenizer import train_tokenizer
    from zenlm.train.loop import TrainConfig
    from zenlm.train.optim import OptimConfig
    from zenlm.vae import SentenceVAE

    # --lora-rank, --lora-alpha, ...: the fields of LoRAConfig, under their flag names
    lora = {f"lora_{f.name}": getattr(LoRAConfig(), f.name) for f in dataclasses.fields(LoRAConfig)}
    return {
        "tokenizer train": [open_corpus, train_tokenizer],
        "prepare": [open_corpus, train_tokenizer],
        "pretrain": [pretrain, TrainConfig(), OptimConfig(), lora],
        "generate": [load, GenerationConfig()],
        "demo": [demo],
        "presets": [],
        "quantize": [],
        "convert from-hf": [import_hf, download_from_hub, import_peft],
        "convert to-hf": [export_hf, export_peft],
        "convert to-gguf": [export_gguf],
        "merge-lora": [],
        "finetune seq2seq": [s2s.finetune_seq2seq, TrainConfig(**s2s.DEFAULT_TRAIN), OptimConfig(**s2s.DEFAULT_OPTIM),
                             lora],
        "finetune classify": [finetune_classify, TrainConfig(), lora],
        "finetune chat": [chat.finetune_chat, TrainConfig(**chat.DEFAULT_TRAIN), lora],
        "predict": [load, EncoderLM.classify],
        "embed": [load, EncoderLM.embed],
        "evaluate": [load, Seq2SeqLM.generate, evaluate_generation, read_pairs, evaluate_lm_eval, evaluate_classify],
        "serve": [load, create_app, Limits()],
        "chat": [load, GenerationConfig()],
        "wordvec train": [wv.train_corpus_vectors, wv.Word2VecSettings()],
        "wordvec eval": [wv.read_vectors, wv.evaluate_vectors],
        "wordvec coverage": [wv.read_vectors],
        "vae train": [train_vae, TrainConfig()],
        "vae sample": [load, SentenceVAE.sample],
        "vae reconstruct": [load, SentenceVAE.reconstruct],
        "vae interpolate": [load, SentenceVAE.interpolate],
        "seqgan": [train_seqgan, SeqGANSettings(), TrainConfig()],
        "distill": [distill_classifier, distill_lm, DistillSettings(), TrainConfig()],
    }


# Flags whose library counterpart has another name.
RENAMED = {("pretrain", "optimizer"): "name", ("generate", "cache"): "use_cache", ("serve", "batch_invariant"): "invariant"}
# Flags that default to "whatever --recipe says" (None), resolved by zenlm.recipes.registry.recipe_settings.
FROM_RECIPE = {"pretrain": {"objective", "model", "batch_size", "seq_len", "grad_accum", "max_steps", "precision",
                            "compile", "optimizer", "lr", "min_lr", "warmup_steps", "schedule", "weight_decay",
                            "grad_clip", "muon_lr"},
               "distill": {"lr"}}  # None: the learning rate of the recipe the teacher calls for
# Flags with a default and no library counterpart (what the command itself decides).
CLI_ONLY = {
    "prepare": {"tokenizer", "objective"},  # train a tokenizer or load one; which kind to train
    "pretrain": {"recipe", "n_layer", "n_head", "n_embd", "block_size", "dropout"},
    "demo": set(),
    "convert from-hf": {"src", "from_hub", "base"},  # where the checkpoint comes from; a PEFT adapter's base run
    "finetune seq2seq": {"n_layer", "n_embd", "dropout"},
    "predict": {"texts", "file", "top_k"},
    "embed": {"texts", "file", "out"},
    "evaluate": {"data", "tasks"},  # --data or --tasks says what to evaluate
    "generate": {"prompt"},
    "serve": {"host", "port"},
    "chat": {"system"},
    "wordvec eval": {"json_out"},
}
# Defaults that differ from the library's on purpose, pinned here so that changing them is a decision, not a
# drift: the terminal verbs sample more creatively than GenerationConfig (README), the server names the model.
ON_PURPOSE = {
    ("generate", "max_new_tokens"): 200, ("generate", "temperature"): 0.8, ("generate", "top_k"): 50,
    ("chat", "max_new_tokens"): 256, ("chat", "temperature"): 0.7, ("chat", "top_p"): 0.95,
    ("serve", "model_id"): None,  # the run directory's name (README), where create_app says "zenlm"
    ("vae sample", "num"): 5,  # a handful of sentences to look at, where SentenceVAE.sample(n) draws one
}


def _library_default(sources: list[Any], name: str) -> Any:
    """The first source's default for ``name``; LookupError when no source has it."""
    for src in sources:
        if isinstance(src, dict):  # settings under their flag names
            if name in src:
                return src[name]
        elif dataclasses.is_dataclass(src) and not isinstance(src, type):
            if name in {f.name for f in dataclasses.fields(src)}:
                return getattr(src, name)
        elif isinstance(src, Callable):  # type: ignore[arg-type]
            param = inspect.signature(src).parameters.get(name)
            if param is not None and param.default is not inspect.Parameter.empty:
                return param.default
    raise LookupError(name)


def _verbs(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                full = f"{prefix} {name}".strip()
                if sub.get_default("_fn") is not None:
                    out[full] = sub
                else:
                    out.update(_verbs(sub, full))
    return out


def _flags(parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Flag -> default, for the flags of ``parser`` that have a default (not --help, --config, required ones)."""
    parser.format_help()  # verbs that read their flags from a recipe build them on first use
    required = set(parser.get_default("_required") or ())
    return {a.dest: a.default for a in parser._actions if a.dest not in ("help", "config") and not a.required
            and a.dest not in required and a.default is not argparse.SUPPRESS}


VERBS = _verbs(build_parser())


def test_every_verb_says_where_its_defaults_come_from() -> None:
    assert set(VERBS) == set(_sources()), "add the new verb to _sources() (and CLI_ONLY where needed)"


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_cli_defaults_equal_the_library_defaults(verb: str) -> None:
    sources = _sources()[verb]
    for flag, default in _flags(VERBS[verb]).items():
        if (verb, flag) in ON_PURPOSE:
            assert default == ON_PURPOSE[verb, flag], f"zenlm {verb} --{flag}"
            continue
        if flag in FROM_RECIPE.get(verb, ()):
            assert default is None, f"zenlm {verb} --{flag} should default to the recipe's value (None)"
            continue
        try:
            library = _library_default(sources, RENAMED.get((verb, flag), flag))
        except LookupError:
            assert flag in CLI_ONLY.get(verb, set()), (
                f"zenlm {verb} --{flag} (default {default!r}) has no library default; take it from the library "
                "function the verb calls, or list it in CLI_ONLY")
            continue
        assert flag not in CLI_ONLY.get(verb, set()), f"--{flag} of {verb} has a library default now"
        if default in (None, ()) and library in (None, (), []):  # "none given" either way (stop strings)
            continue
        assert default == library, f"zenlm {verb} --{flag} defaults to {default!r}, the library to {library!r}"


def test_recipe_backed_flags_are_settings_of_every_recipe() -> None:
    """A pretrain flag left at None takes the recipe's value: a recipe setting, or an optimiser setting (the
    recipe's, else OptimConfig's)."""
    from zenlm.recipes.registry import MLM_RECIPES, RECIPES, recipe_settings
    from zenlm.train.optim import OptimConfig

    optim_fields = {f.name for f in dataclasses.fields(OptimConfig)}
    for name in [*RECIPES, *MLM_RECIPES]:
        s = recipe_settings(name)
        for flag in FROM_RECIPE["pretrain"]:
            key = RENAMED.get(("pretrain", flag), flag)
            assert key in s or key in optim_fields, (name, flag)


def test_a_drifted_default_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check itself: a verb whose flag default differs from its library function's fails."""
    def library(x: int = 1) -> None: ...

    assert _library_default([library], "x") == 1
    with pytest.raises(LookupError):
        _library_default([library], "y")
    p = argparse.ArgumentParser()
    p.add_argument("--x", default=2)
    assert _flags(p)["x"] != _library_default([library], "x")


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_has_help(verb: str, capsys: pytest.CaptureFixture) -> None:
    """`zenlm VERB --help` works for every verb (a '%' in a help text must reach argparse escaped)."""
    from zenlm.cli import main

    with pytest.raises(SystemExit) as e:
        main([*verb.split(), "--help"])
    assert e.value.code == 0 and "usage: zenlm" in capsys.readouterr().out


def test_top_level_help_imports_no_recipe() -> None:
    """Flags read from recipes are built when their verb is used, so `zenlm --help` stays quick."""
    import subprocess
    import sys

    code = ("import sys, contextlib, io\nfrom zenlm.cli import main\n"
            "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n    main(['--help'])\n"
            "print(sorted(m for m in sys.modules if m.startswith(('zenlm.recipes', 'torch'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_params_of_reads_signatures_settings_and_their_docs() -> None:
    from zenlm.clikit import REQUIRED, Param, params_of

    @dataclasses.dataclass
    class Settings:
        """Settings.

        steps:  how many steps
                in all
        rate:   step size (5% of the way)
        """

        steps: int = 10
        rate: float = 0.05

    def run(data: str, *, steps: int = 3, progress: Any = None) -> None:
        """Run.

        Args:
            data: what to read
        """

    assert params_of(run, skip=("progress",)) == [Param("data", str, REQUIRED, "what to read"),
                                                  Param("steps", int, 3, "")]
    assert params_of(Settings, defaults=Settings(steps=7), rename={"rate": "lr"}) == [
        Param("steps", int, 7, "how many steps in all"), Param("lr", float, 0.05, "step size (5% of the way)")]
    with pytest.raises(AssertionError, match="no parameters"):
        params_of(run, only=("nope",))

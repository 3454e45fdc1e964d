"""Shared data fixtures: a sample text, small trained tokenizers, and a small prepared data directory."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from zenlm.config import GPTConfig
from zenlm.data.corpus import open_corpus, shakespeare_char_text
from zenlm.data.shards import prepare
from zenlm.models.gpt import GPT
from zenlm.rundir import save_run
from zenlm.tokenizer import Tokenizer, train_tokenizer

# Parallel workers share the cores: give each its share of threads (also for the CLI subprocesses it starts),
# or PyTorch's thread pools oversubscribe the machine and a step can take 10x longer.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)


def _scratch_dir(prefix: str) -> str:
    """A fresh temporary directory, removed when this process exits (each test process makes its own)."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, True)
    return path


# Built decode programs (zenlm.compiled) go to a fresh directory, so tests build them rather than load what an
# earlier run left in ~/.cache (CLI subprocesses inherit it).
os.environ["ZENLM_CACHE_DIR"] = _scratch_dir("zenlm-test-cache-")
# Eager decoding is the default in the suite: with the compiled default, every test's model shape would start a
# 15-60 s program build in the background. The compiled paths and the default itself (background builds, the
# missing-compiler notice) are tested on purpose in test_compiled.py and test_compiled_default.py, which unset this.
os.environ["ZENLM_COMPILE"] = "0"

# Nothing reaches the Hugging Face Hub, and the `datasets` cache (lm-eval's local task files) is a fresh
# directory. The `datasets` package reads these when it is imported, so they are set before any test runs.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_DATASETS_CACHE"] = _scratch_dir("zenlm-test-datasets-")

EXTRA = "中文文本，人民日报。Ünïcödé façade — “quotes” 😀🚀\n"


@pytest.fixture(scope="session")
def sample_text() -> str:
    """About 200k characters of Shakespeare with a little non-ASCII text mixed in."""
    return shakespeare_char_text()[:200_000] + EXTRA * 20


@pytest.fixture(scope="session")
def bpe_tok(sample_text: str) -> Tokenizer:
    return train_tokenizer([sample_text], kind="bpe", vocab_size=600)


@pytest.fixture(scope="session")
def wordpiece_tok(sample_text: str) -> Tokenizer:
    return train_tokenizer([sample_text], kind="wordpiece", vocab_size=600)


@pytest.fixture(scope="session")
def char_tok(sample_text: str) -> Tokenizer:
    return train_tokenizer([sample_text], kind="char")


@pytest.fixture(scope="session")
def char_data(tmp_path_factory: pytest.TempPathFactory, sample_text: str, char_tok: Tokenizer) -> Path:
    """A data directory: the sample text (90/10 split) as char tokens in shards of 10,000 ids."""
    root = tmp_path_factory.mktemp("char_data")
    (root / "sample.txt").write_text(sample_text, encoding="utf-8")
    prepare(open_corpus(str(root / "sample.txt")), char_tok, root / "data", shard_tokens=10_000)
    return root / "data"


TINY_RUN_TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
                 "the slings and arrows of outrageous fortune. ") * 20 + "中文文本 é ü 😀\n"


def make_tiny_gpt_run(root: Path, suppress_eos: bool = True, **overrides) -> Path:
    """A run directory (config.yaml, tokenizer, model.safetensors) holding a random-init tiny GPT.

    Weights are drawn with a large init_std so that greedy text varies; with ``suppress_eos`` the
    end-of-text embedding (tied to the head) is zeroed, so its logit is 0 and replies rarely end early.
    """
    tok = train_tokenizer([TINY_RUN_TEXT], kind="char")
    cfg = GPTConfig(**{"vocab_size": tok.vocab_size, "block_size": 512, "n_layer": 2, "n_head": 2,
                       "n_embd": 32, "init_std": 0.5, **overrides})
    torch.manual_seed(0)
    model = GPT(cfg)
    if suppress_eos:
        with torch.no_grad():
            model.tok_emb.weight[tok.eos_id] = 0
    return save_run(root, model, tok)


def _load_benchmark(name: str):
    import importlib.util

    path = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def bench_module():
    """``bench_module(name)``: the module of ``benchmarks/<name>.py`` (the benchmarks are scripts, not a package),
    for tests of their parts."""
    return _load_benchmark


@pytest.fixture(scope="session")
def run_factory():
    """``make_tiny_gpt_run(root, suppress_eos=True, **GPTConfig overrides)`` for tests that need a run
    directory of their own (serve tests, fault tests)."""
    return make_tiny_gpt_run


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models train fastest on one thread (and the suite runs two workers on two cores); for a module:
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""Serve tests: a tiny random-init GPT run directory and real uvicorn servers on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from zenlm.config import GPTConfig
from zenlm.models.gpt import GPT
from zenlm.serve.app import ServerThread, create_app
from zenlm.tokenizer import Tokenizer, train_tokenizer
from zenlm.train.checkpoint import save_model

TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
        "the slings and arrows of outrageous fortune. ") * 20 + "中文文本 é ü 😀\n"


def make_run(root: Path, suppress_eos: bool = True, **overrides) -> Path:
    """A run directory (config.yaml, tokenizer, model.safetensors) holding a random-init tiny GPT.

    Weights are drawn with a large init_std so that greedy text varies; with ``suppress_eos`` the
    end-of-text embedding (tied to the head) is zeroed, so its logit is 0 and replies rarely end early.
    """
    tok = train_tokenizer([TEXT], kind="char")
    cfg = GPTConfig(**{"vocab_size": tok.vocab_size, "block_size": 512, "n_layer": 2, "n_head": 2,
                       "n_embd": 32, "init_std": 0.5, **overrides})
    torch.manual_seed(0)
    model = GPT(cfg)
    if suppress_eos:
        with torch.no_grad():
            model.tok_emb.weight[tok.eos_id] = 0
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(yaml.safe_dump({"model": cfg.to_dict()}, sort_keys=False))
    tok.save(root)
    save_model(model, root / "model.safetensors")
    return root


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="session")
def lm(run_dir: Path):
    import zenlm

    return zenlm.load(run_dir, device="cpu")


@pytest.fixture(scope="module")
def server(lm):
    """A server for the model id 'tiny' (4 slots, 4 queue places, no API key)."""
    app = create_app(lm.model, lm.tokenizer, model_id="tiny", max_concurrency=4, max_queue=4)
    with ServerThread(app) as srv:
        srv.app = app
        yield srv


def tokenizer_of(run_dir: Path) -> Tokenizer:
    return Tokenizer.load(run_dir)


@pytest.fixture(scope="session")
def run_factory():
    """``make_run`` for tests that need a run directory of their own."""
    return make_run

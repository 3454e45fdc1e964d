"""Serve tests: a tiny random-init GPT run directory and real uvicorn servers on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import pytest

from zenlm.serve.app import ServerThread, create_app
from zenlm.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory, run_factory) -> Path:
    return run_factory(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="session")
def lm(run_dir: Path):
    import zenlm

    return zenlm.load(run_dir, device="cpu")


@pytest.fixture(scope="module")
def server(lm):
    """A server for the model id 'tiny', a base model (4 slots, 4 queue places, no API key)."""
    app = create_app(lm.model, lm.tokenizer, model_id="tiny", max_concurrency=4, max_queue=4, model_kind="base")
    with ServerThread(app) as srv:
        srv.app = app
        yield srv


def tokenizer_of(run_dir: Path) -> Tokenizer:
    return Tokenizer.load(run_dir)

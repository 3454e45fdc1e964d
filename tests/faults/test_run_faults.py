"""Run-level mistakes found before any work is done, and runs that can always be continued or restarted."""

from __future__ import annotations

from pathlib import Path

import pytest

from zenlm.data.corpus import open_corpus
from zenlm.data.shards import prepare
from zenlm.errors import DataError
from zenlm.recipes.pretrain import pretrain
from zenlm.tokenizer import Tokenizer
from zenlm.train.loop import TrainConfig


def test_a_validation_split_shorter_than_one_window_is_refused_before_training(
        tmp_path: Path, sample_text: str, char_tok: Tokenizer) -> None:
    (tmp_path / "train.txt").write_text(sample_text[:20_000], encoding="utf-8")
    (tmp_path / "val.txt").write_text("short", encoding="utf-8")
    data = tmp_path / "data"
    prepare(open_corpus(str(tmp_path / "train.txt"), val=str(tmp_path / "val.txt")), char_tok, data)
    out = tmp_path / "run"
    with pytest.raises(DataError, match="validation split .* too small for seq_len 32"):
        pretrain(data, out, model="tiny", seq_len=32, batch_size=2,
                 train=TrainConfig(max_steps=5, device="cpu", tensorboard=False))
    assert not out.exists()  # nothing written: the same command works once the data is fixed

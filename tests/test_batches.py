"""Causal-LM batches: a pure function of (seed, step, micro); shapes, shift, sequential evaluation windows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from zenlm.data.batches import CausalBatches, eval_batches
from zenlm.data.corpus import open_corpus
from zenlm.data.shards import TokenShards, prepare
from zenlm.errors import ConfigError, DataError
from zenlm.tokenizer import Tokenizer


@pytest.fixture
def train(char_data: Path) -> TokenShards:
    return TokenShards.open(char_data, "train")


def test_get_is_a_pure_function_of_seed_step_micro(char_data: Path, train: TokenShards) -> None:
    a = CausalBatches(train, batch_size=4, seq_len=16, seed=7)
    b = CausalBatches(TokenShards.open(char_data, "train"), batch_size=4, seq_len=16, seed=7)
    x1, y1 = a.get(5, 1)
    a.get(6)  # other calls in between change nothing
    x2, y2 = b.get(5, 1)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(a.get(5, 1)[0], a.get(6, 1)[0])
    assert not torch.equal(a.get(5, 0)[0], a.get(5, 1)[0])
    assert not torch.equal(a.get(5, 1)[0], CausalBatches(train, 4, 16, seed=8).get(5, 1)[0])


def test_shapes_dtype_and_shift(train: TokenShards) -> None:
    batches = CausalBatches(train, batch_size=3, seq_len=32, seed=0)
    for step in range(20):
        x, y = batches.get(step)
        assert x.shape == y.shape == (3, 32) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row, start in zip(range(3), batches.starts(step), strict=True):
            w = train.window(int(start), 33)
            assert x[row].tolist() == w[:-1].tolist() and y[row].tolist() == w[1:].tolist()


def test_windows_cover_the_whole_split_and_cross_shards(train: TokenShards) -> None:
    batches = CausalBatches(train, batch_size=64, seq_len=100, seed=3)
    starts = np.concatenate([batches.starts(s) for s in range(200)])
    assert starts.min() >= 0 and starts.max() <= len(train) - 101
    assert starts.max() > len(train) - 2_000 and starts.min() < 2_000
    assert any(s % 10_000 > 9_900 for s in starts)  # some windows span two shards


def test_bad_settings_and_too_small_splits(char_data: Path, train: TokenShards, tmp_path: Path,
                                           char_tok: Tokenizer) -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        CausalBatches(train, batch_size=0, seq_len=8, seed=0)
    with pytest.raises(ConfigError, match="seq_len"):
        CausalBatches(train, batch_size=1, seq_len=0, seed=0)
    with pytest.raises(DataError, match="too small for seq_len"):
        CausalBatches(train, batch_size=1, seq_len=len(train), seed=0)
    assert CausalBatches(train, 1, len(train) - 1, seed=0).get(0)[0].shape == (1, len(train) - 1)
    (tmp_path / "t.txt").write_text("abcdefghij" * 3, encoding="utf-8")
    prepare(open_corpus(str(tmp_path / "t.txt")), char_tok, tmp_path / "d")
    val = TokenShards.open(tmp_path / "d", "val")  # 3 characters + eos
    assert len(val) == 4
    with pytest.raises(DataError, match="validation split .* is too small for seq_len 4"):
        list(eval_batches(val, 2, 4))
    assert [x.tolist() for x, _ in eval_batches(val, 2, 3)] == [[val.window(0, 3).tolist()]]


def test_eval_batches_are_sequential_and_repeatable(char_data: Path) -> None:
    val = TokenShards.open(char_data, "val")
    seq = 50
    batches = list(eval_batches(val, 4, seq))
    n_windows = (len(val) - 1) // seq
    assert sum(x.shape[0] for x, _ in batches) == n_windows
    assert all(x.shape == (4, seq) for x, _ in batches[:-1]) and batches[-1][0].shape[0] <= 4
    flat_x = torch.cat([x for x, _ in batches]).flatten()
    flat_y = torch.cat([y for _, y in batches]).flatten()
    ids = val.window(0, n_windows * seq + 1)
    assert flat_x.tolist() == ids[:-1].tolist() and flat_y.tolist() == ids[1:].tolist()
    again = list(eval_batches(val, 4, seq))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again, strict=True))
    limited = list(eval_batches(val, 4, seq, max_tokens=6 * seq))
    assert sum(x.numel() for x, _ in limited) == 6 * seq
    assert sum(x.numel() for x, _ in eval_batches(val, 4, seq, max_tokens=1)) == seq  # at least one window

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


def test_prepare_on_a_full_disk_names_the_file_and_leaves_no_shards(
        tmp_path: Path, sample_text: str, char_tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from zenlm.data import shards

    class FullDisk:
        """A file on a full disk: the header fits, the first ids do not, and closing fails again (flush)."""

        def __init__(self, f) -> None:
            self.f, self.writes = f, 0

        def write(self, b: bytes) -> int:
            self.writes += 1
            if self.writes > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def seek(self, *a):
            return self.f.seek(*a)

        def close(self) -> None:
            self.f.close()
            raise OSError(errno.ENOSPC, "No space left on device")

    real_open = shards._ShardWriter._open

    def open_on_full_disk(self) -> None:
        real_open(self)
        self._f = FullDisk(self._f)

    monkeypatch.setattr(shards._ShardWriter, "_open", open_on_full_disk)
    (tmp_path / "t.txt").write_text(sample_text[:5000], encoding="utf-8")
    out = tmp_path / "data"
    with pytest.raises(DataError, match=r"no space left on device while writing .*train-00000\.bin\.tmp"):
        prepare(open_corpus(str(tmp_path / "t.txt")), char_tok, out)
    assert not [p.name for p in out.iterdir() if p.suffix in (".bin", ".tmp") or p.name == "index.json"]
    monkeypatch.setattr(shards._ShardWriter, "_open", real_open)
    assert prepare(open_corpus(str(tmp_path / "t.txt")), char_tok, out)["splits"]["train"]["tokens"] > 0

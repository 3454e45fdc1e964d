"""Damaged or hand-edited data directories: refused by name before any training starts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from zenlm.data.shards import HEADER_BYTES, TokenShards, load_index
from zenlm.errors import DataError


@pytest.fixture
def data_copy(char_data: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(char_data, tmp_path / "data")
    return tmp_path / "data"


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda ix: ix.update(vocab_size="65"), "'vocab_size' must be a whole number"),
        (lambda ix: ix.update(vocab_size=True), "'vocab_size' must be a whole number"),
        (lambda ix: ix.update(dtype="float32"), "'dtype' must be"),
        (lambda ix: ix.update(eos_id=10**6), "'eos_id' must be a token id"),
        (lambda ix: ix.update(splits=["train", "val"]), "'splits' must map"),
        (lambda ix: ix["splits"].update(train="shards"), "split 'train' must be an object"),
        (lambda ix: ix["splits"]["train"].update(shards="train-00000.bin"), "'shards' must be a list"),
        (lambda ix: ix["splits"]["train"].update(shards=["../../etc/passwd"]), "'shards' must be a list"),
        (lambda ix: ix["splits"]["val"].update(shard_sizes=[1.5]), "'shard_sizes' must list"),
        (lambda ix: ix["splits"]["val"].update(tokens="many"), "'tokens' must be a whole number"),
    ],
)
def test_wrong_types_in_index_json_are_named(data_copy: Path, edit, match: str) -> None:
    index = json.loads((data_copy / "index.json").read_text())
    edit(index)
    (data_copy / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match=match):
        load_index(data_copy)


def test_a_shard_id_outside_the_vocabulary_is_refused_at_open(data_copy: Path) -> None:
    index = load_index(data_copy)
    shard = data_copy / index["splits"]["train"]["shards"][0]
    raw = bytearray(shard.read_bytes())
    itemsize = 2 if index["dtype"] == "uint16" else 4
    pos = 123
    raw[HEADER_BYTES + pos * itemsize: HEADER_BYTES + (pos + 1) * itemsize] = np.array(
        [index["vocab_size"] + 5], dtype=f"<u{itemsize}").tobytes()
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=rf"{shard.name} holds token id {index['vocab_size'] + 5} at position 123"):
        TokenShards.open(data_copy, "train")
    TokenShards.open(data_copy, "val")  # the other split is fine


@pytest.mark.parametrize(("text", "match"), [("[1, 2]", "must hold a JSON object"),
                                             ('{"chat_template": 5}', "'chat_template' must be")])
def test_a_malformed_tokenizer_config_is_named(tmp_path: Path, char_tok, text: str, match: str) -> None:
    from zenlm.tokenizer import Tokenizer

    char_tok.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(text)
    with pytest.raises(DataError, match=match):
        Tokenizer.load(tmp_path)

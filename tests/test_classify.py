"""Classification fine-tuning: labelled data, the classifier model, the recipe, the API and the CLI verbs."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

import zenlm
from zenlm.data.classify import ClassBatches, encode_for_model, pad_batch, read_labelled, stratified_split
from zenlm.errors import ConfigError, DataError
from zenlm.models.bert import Bert, get_bert_preset
from zenlm.models.classifier import SequenceClassifier
from zenlm.models.gpt import GPT
from zenlm.presets import get_preset
from zenlm.recipes.finetune_classify import finetune_classify
from zenlm.tokenizer import Tokenizer
from zenlm.train.checkpoint import save_model
from zenlm.train.loop import TrainConfig

TOPICS = {
    "sport": "match goal team player coach season league win score cup".split(),
    "music": "song album band guitar concert singer chorus melody tour drum".split(),
    "food": "bread cheese soup recipe kitchen bake salt dinner sugar apple".split(),
}
FILLER = "the a of and to in it is was for on with as at by this that".split()


def topic_texts(n_per_class: int, seed: int) -> list[dict]:
    """Short texts of filler words with three topic words each: learnable from the words alone."""
    rng = random.Random(seed)
    rows = []
    for label, words in TOPICS.items():
        for _ in range(n_per_class):
            toks = rng.choices(FILLER, k=8) + rng.choices(words, k=3)
            rng.shuffle(toks)
            rows.append({"text": " ".join(toks), "label": label})
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def make_run(out: Path, model: torch.nn.Module, tok: Tokenizer) -> Path:
    """A run directory holding ``model`` (random weights) and ``tok``."""
    out.mkdir(parents=True)
    tok.save(out)
    (out / "config.yaml").write_text(yaml.safe_dump({"model": model.config.to_dict()}), encoding="utf-8")
    save_model(model, out / "model.safetensors")
    return out


@pytest.fixture(scope="module")
def topic_tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    from zenlm.tokenizer import train_tokenizer

    texts = [r["text"] for r in topic_texts(50, seed=9)]
    return train_tokenizer(texts, kind="wordpiece", vocab_size=120)


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory: pytest.TempPathFactory, topic_tok: Tokenizer) -> Path:
    torch.manual_seed(0)
    cfg = get_bert_preset("bert-tiny", vocab_size=topic_tok.vocab_size, d_model=64, n_head=2, d_ff=128, max_len=64)
    return make_run(tmp_path_factory.mktemp("cls") / "bert", Bert(cfg), topic_tok)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("cls_data") / "topics.jsonl", topic_texts(40, seed=1))


# ---------------------------------------------------------------------------------------------------- data


def test_read_labelled_jsonl_and_csv(tmp_path: Path) -> None:
    rows = [{"review": "good", "stars": 5}, {"review": "bad", "stars": 1}]
    got = read_labelled(write_jsonl(tmp_path / "a.jsonl", rows), "review", "stars")
    assert got == [("good", "5"), ("bad", "1")]
    (tmp_path / "b.csv").write_text("text,label\n\"hello, world\",pos\nawful,neg\n", encoding="utf-8")
    assert read_labelled(tmp_path / "b.csv") == [("hello, world", "pos"), ("awful", "neg")]


@pytest.mark.parametrize("rows,field,message", [
    ([{"text": "a", "label": "x"}, {"text": "b", "label": "y"}], "sentiment", "no field 'sentiment'"),
    ([{"text": "a", "label": "x"}, {"text": "b", "label": "x"}], "label", "at least two classes"),
    ([{"text": "a", "label": "x"}, {"text": "  ", "label": "y"}], "label", "empty text or label (lines 2)"),
])
def test_read_labelled_refuses_bad_data(tmp_path: Path, rows: list[dict], field: str, message: str) -> None:
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_labelled(write_jsonl(tmp_path / "d.jsonl", rows), label_field=field)


def test_stratified_split_keeps_every_class_in_both_parts() -> None:
    ex = [(f"t{i}", "big") for i in range(90)] + [(f"s{i}", "small") for i in range(10)]
    train, val = stratified_split(ex, 0.2, seed=3)
    assert sorted(train + val) == sorted(ex)
    assert sum(lb == "big" for _, lb in val) == 18 and sum(lb == "small" for _, lb in val) == 2
    assert stratified_split(ex, 0.2, seed=3) == (train, val)
    assert stratified_split(ex, 0.2, seed=4) != (train, val)


def test_encoding_padding_and_batches(topic_tok: Tokenizer) -> None:
    seqs = encode_for_model(topic_tok, ["goal goal goal", "song"], max_len=4, encoder=True)
    assert seqs[0][0] == topic_tok.bos_id and seqs[0][-1] == topic_tok.eos_id and len(seqs[0]) == 4
    assert seqs[1] == [topic_tok.bos_id, *topic_tok.encode("song")[:2], topic_tok.eos_id]
    ids, mask = pad_batch([[1, 5, 6, 2], [1, 7, 2]], pad_id=0)
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]] and ids.tolist() == [[1, 5, 6, 2], [1, 7, 2, 0]]
    dec = encode_for_model(topic_tok, ["song"], max_len=8, encoder=False)[0]
    assert dec[-1] == topic_tok.eos_id and dec[0] != topic_tok.bos_id
    b = ClassBatches([[1], [2], [3], [4], [5]], [0, 1, 0, 1, 0], batch_size=2, pad_id=0, seed=1)
    assert b.steps_per_epoch == 2
    first_epoch = torch.cat([b.get(0)[0], b.get(1)[0]]).flatten().tolist()
    assert len(set(first_epoch)) == 4  # no text twice within an epoch
    assert torch.equal(b.get(1)[0], b.get(1)[0]) and not torch.equal(b.get(0)[0], b.get(2)[0])


# --------------------------------------------------------------------------------------------------- model


def test_pooling_reads_the_right_positions() -> None:
    torch.manual_seed(0)
    gpt = GPT(get_preset("tiny", vocab_size=50))
    clf = SequenceClassifier(gpt, 3, "last", dropout=0.0).eval()
    ids = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        batched = clf(ids, mask)
        alone = clf(ids[:1, :3], mask[:1, :3])
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=1e-5)  # padding after the text is unseen
    h = torch.arange(2 * 5 * 2, dtype=torch.float32).view(2, 5, 2)
    assert clf.pool(h, mask).tolist() == [h[0, 2].tolist(), h[1, 4].tolist()]
    bert = Bert(get_bert_preset("bert-tiny", vocab_size=50, d_model=16, n_head=2, d_ff=32, max_len=16))
    mean = SequenceClassifier(bert, 2, "mean")
    assert mean.pool(h, mask)[0].tolist() == h[0, :3].mean(0).tolist()
    with pytest.raises(ConfigError, match="last token"):
        SequenceClassifier(gpt, 2, "cls")
    with pytest.raises(ConfigError, match="at least 2 classes"):
        SequenceClassifier(bert, 1, "mean")


# ---------------------------------------------------------------------------------------------------- recipe


def test_finetune_bert_learns_topics_and_keeps_the_best(tmp_path: Path, bert_run: Path, data_file: Path) -> None:
    out = tmp_path / "clf"
    res = finetune_classify(bert_run, data_file, out, val_fraction=0.25, max_len=32, batch_size=12, epochs=12,
                            lr=3e-3, patience=0, train=TrainConfig(device="cpu", seed=0, tensorboard=False))
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["train_loss"] for m in metrics if "train_loss" in m]
    assert losses[-1] < 0.5 * losses[0], losses
    evals = [m for m in metrics if "val_f1" in m]
    best = max(evals, key=lambda m: m["val_f1"])
    assert res.train.best_step == best["step"]
    assert res.report.macro_f1 == pytest.approx(best["val_f1"])  # the kept weights are the best evaluation's
    assert res.report.accuracy >= 0.9, res.report.format()
    assert res.labels == ["food", "music", "sport"]
    report = json.loads((out / "report.json").read_text())
    assert sum(map(sum, report["confusion"])) == 30
    assert (out / "plots" / "confusion.png").read_bytes()[:4] == b"\x89PNG"

    clf = zenlm.load(out, device="cpu")
    got = clf.classify(["goal team match the league", "the band song and concert"])
    assert [g["label"] for g in got] == ["sport", "music"]
    assert all(abs(sum(g["probs"].values()) - 1) < 1e-5 and g["prob"] == max(g["probs"].values()) for g in got)


def test_early_stopping_stops_after_patience(tmp_path: Path, bert_run: Path, data_file: Path) -> None:
    res = finetune_classify(bert_run, data_file, tmp_path / "es", val_fraction=0.25, max_len=32, batch_size=12,
                            epochs=20, lr=1e-9, patience=2, evals_per_epoch=1,
                            train=TrainConfig(device="cpu", seed=0, tensorboard=False))
    steps_per_epoch = 90 // 12
    assert res.train.stopped_by == "early_stop"
    assert res.train.best_step == steps_per_epoch  # nothing improves on the first evaluation
    assert res.train.step == 3 * steps_per_epoch


def test_gpt_backbone_last_token_pooling(tmp_path: Path, topic_tok: Tokenizer, data_file: Path) -> None:
    torch.manual_seed(0)
    run = make_run(tmp_path / "gpt", GPT(get_preset("tiny", vocab_size=topic_tok.vocab_size)), topic_tok)
    res = finetune_classify(run, data_file, tmp_path / "gclf", val_fraction=0.25, max_len=32, batch_size=12,
                            epochs=12, lr=3e-3, patience=0, train=TrainConfig(device="cpu", seed=0,
                                                                               tensorboard=False))
    assert yaml.safe_load((tmp_path / "gclf" / "config.yaml").read_text())["task"]["pooling"] == "last"
    assert res.report.accuracy >= 0.8, res.report.format()


def test_finetune_refuses_bad_input(tmp_path: Path, bert_run: Path, data_file: Path) -> None:
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "goal", "label": "sport"}, {"text": "x", "label": "news"}])
    with pytest.raises(DataError, match=r"label\(s\) \['news'\] that the training data never shows"):
        finetune_classify(bert_run, data_file, tmp_path / "a", val=val, train=TrainConfig(device="cpu"))
    with pytest.raises(DataError, match="no field 'topic'"):
        finetune_classify(bert_run, data_file, tmp_path / "b", label_field="topic", train=TrainConfig(device="cpu"))
    with pytest.raises(ConfigError, match="pooling 'cls' needs a BERT"):
        tok = Tokenizer.load(bert_run)
        gpt = make_run(tmp_path / "g", GPT(get_preset("tiny", vocab_size=tok.vocab_size)), tok)
        finetune_classify(gpt, data_file, tmp_path / "c", pooling="cls", train=TrainConfig(device="cpu"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------------------------------ CLI


def test_cli_finetune_predict_evaluate_embed(tmp_path: Path, bert_run: Path, data_file: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    from zenlm.cli import main

    def _zenlm(*args: str) -> subprocess.CompletedProcess:  # the CLI in this process (a subprocess: +2.5 s each)
        capsys.readouterr()
        rc = main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["zenlm", *args], rc, out, err)

    out = tmp_path / "cli"
    r = _zenlm("finetune", "classify", "--base", str(bert_run), "--data", str(data_file), "--out", str(out),
               "--epochs", "10", "--lr", "3e-3", "--max-len", "32", "--batch-size", "12", "--device", "cpu",
               "--patience", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "macro avg" in r.stdout.lower() or "macro" in r.stdout
    r = _zenlm("predict", str(out), "goal match league team", "song band tour", "--top-k", "2", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["label"] for x in lines] == ["sport", "music"] and len(lines[0]["top"]) == 2
    test = write_jsonl(tmp_path / "test.jsonl", topic_texts(5, seed=77))
    r = _zenlm("evaluate", str(out), "--data", str(test), "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((out / "eval-test.json").read_text())
    assert rep["n"] == 15 and (out / "eval-test.png").is_file()
    r = _zenlm("embed", str(bert_run), "goal", "song", "--device", "cpu")
    vecs = [json.loads(x)["embedding"] for x in r.stdout.splitlines()]
    assert len(vecs) == 2 and abs(sum(v * v for v in vecs[0]) - 1) < 1e-4
    r = _zenlm("predict", str(bert_run), "goal", "--device", "cpu")
    assert r.returncode == 2 and "labels texts with a classifier" in r.stderr and "zenlm embed" in r.stderr

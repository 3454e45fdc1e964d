"""The wrong kind of run for a verb: one line that says what the run is and which command fits it, before any
weights are loaded (no `'EncoderLM' object has no attribute 'stream'`). And the verbs that do fit work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

import zenlm

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "runs"


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain BERT encoder run (the BERT classifier fixture without its task)."""
    run = tmp_path_factory.mktemp("bert") / "run"
    shutil.copytree(FIXTURES / "bert-classify", run)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved.pop("task")
    saved["objective"] = "mlm"
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    return run


CASES = [  # (verb and its arguments; {run} is the run, the run, what the one line says)
    (["generate", "{run}", "hello"], "gpt-classify", "is a GPT classifier (labels: neg, pos); try `zenlm predict"),
    (["generate", "{run}", "hello"], "bert-classify", "is a BERT encoder classifier (labels"),
    (["generate", "{run}", "hello"], "bert", "`zenlm generate` writes text, and {run} is a BERT encoder (a "
                                              "classifier is made from it with `zenlm finetune classify --base`); "
                                              "try `zenlm embed {run}"),
    (["predict", "{run}", "hello"], "gpt", "`zenlm predict` labels texts with a classifier, and {run} is a GPT "
                                            "language model; try `zenlm generate {run}"),
    (["predict", "{run}", "hello"], "encdec", "is a encoder-decoder trained on source -> target pairs; try "
                                               "`zenlm generate"),
    (["predict", "{run}", "hello"], "bert", "try `zenlm embed"),
    (["embed", "{run}", "hello"], "encdec", "`zenlm embed` turns texts into vectors, and"),
    (["evaluate", "{run}", "--data", "x.jsonl"], "gpt", "try `zenlm evaluate {run} --tasks NAMES`"),
    (["evaluate", "{run}", "--data", "x.jsonl"], "bert", "try `zenlm embed"),
    (["evaluate", "{run}", "--tasks", "hellaswag"], "encdec", "try `zenlm evaluate {run} --data FILE`"),
    (["evaluate", "{run}", "--tasks", "hellaswag"], "gpt-classify", "try `zenlm evaluate {run} --data FILE`"),
]


@pytest.mark.parametrize(("args", "kind", "says"), CASES, ids=[f"{a[0]}-{k}" for a, k, _ in CASES])
def test_a_verb_on_the_wrong_kind_of_run_names_the_one_that_fits(args, kind: str, says: str, bert_run: Path,
                                                                zenlm_cli) -> None:
    run = bert_run if kind == "bert" else FIXTURES / kind
    rc, _, err = zenlm_cli([a.format(run=run) for a in args] + ["--device", "cpu"])
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("zenlm: error: "), err
    assert says.format(run=run) in lines[0], err


@pytest.mark.parametrize("kind", ["gpt", "gpt-int8", "bert-classify"])
def test_embed_works_on_every_run_that_can_embed(kind: str, zenlm_cli) -> None:
    """The registry says a GPT can embed (the mean of its last hidden states, as the server's /v1/embeddings)."""
    rc, out, err = zenlm_cli(["embed", FIXTURES / kind, "a cat", "a dog", "--device", "cpu"])
    assert rc == 0, err
    rows = [json.loads(x) for x in out.splitlines()]
    width = zenlm.load(FIXTURES / kind, device="cpu").config
    assert [r["text"] for r in rows] == ["a cat", "a dog"]
    assert all(len(r["embedding"]) == getattr(width, "n_embd", getattr(width, "d_model", None)) for r in rows)
    assert abs(sum(x * x for x in rows[0]["embedding"]) - 1.0) < 1e-3  # normalised


def test_evaluate_on_a_classifier_takes_the_field_names_it_suggests(tmp_path: Path, zenlm_cli) -> None:
    """Issue 14.4: the error told the user to pass --text-field, which evaluate did not accept."""
    run = tmp_path / "clf"
    shutil.copytree(FIXTURES / "gpt-classify", run)
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"review": t, "stars": lb}) + "\n"
                            for t, lb in [("good fun", "pos"), ("bad", "neg"), ("great", "pos"), ("awful", "neg")]))
    rc, _, err = zenlm_cli(["evaluate", run, "--data", data, "--device", "cpu"])
    assert rc == 2 and "--text-field" in err
    rc, out, err = zenlm_cli(["evaluate", run, "--data", data, "--text-field", "review", "--label-field", "stars",
                          "--device", "cpu"])
    assert rc == 0, err
    assert "4 texts" in out and (run / "eval-test.json").is_file()


def test_evaluate_help_keeps_the_whole_data_help(zenlm_cli) -> None:
    """Issue 14.4: `evaluate --help` cut the --data help short."""
    rc, out, _ = zenlm_cli(["evaluate", "--help"])
    flat = " ".join(out.split())
    assert rc == 0 and "(for a classifier: .jsonl/.csv with the text and label fields it was trained with)" in flat
    assert "--text-field" in out and "--label-field" in out


def test_a_decoder_only_seq2seq_run_loads_as_what_it_is(tmp_path: Path, zenlm_cli) -> None:
    """Issue 14.5: `finetune seq2seq --arch gpt` runs loaded as a plain LM: num_beams raised TypeError and
    generation continued the source instead of writing a target."""
    import torch

    import zenlm.seq2seq as s2s
    from zenlm.recipes.finetune_seq2seq import finetune_seq2seq
    from zenlm.tokenizer import train_tokenizer
    from zenlm.train.loop import TrainConfig

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"source": w, "target": w[::-1]}) + "\n"
                             for w in ["abc", "bcd", "cde", "def", "efg", "fgh", "ghi", "hij"] * 4))
    run = tmp_path / "gpt-s2s"
    torch.set_num_threads(1)
    finetune_seq2seq(pairs, run, arch="gpt", model="tiny", model_overrides={"n_layer": 1},
                     tokenizer=train_tokenizer(["abcdefghij "], kind="char"), batch_size=8,
                     train=TrainConfig(max_steps=3, eval_every=0, device="cpu", precision="fp32", tensorboard=False))
    lm = zenlm.load(run, device="cpu")
    assert isinstance(lm, s2s.Seq2SeqLM) and not lm.reads_source
    out = lm.generate("abc", num_beams=4)
    assert isinstance(out, str) and out == s2s.load(run, device="cpu").generate("abc", num_beams=4)
    assert lm.generate(["abc", "cde"], num_beams=1) == s2s.load(run, device="cpu").generate(["abc", "cde"],
                                                                                              num_beams=1)
    rc, printed, err = zenlm_cli(["generate", run, "abc", "--max-new-tokens", "6", "--device", "cpu"])
    assert rc == 0 and printed.rstrip("\n") == "abc" + lm.generate("abc", num_beams=4, max_new_tokens=6), err

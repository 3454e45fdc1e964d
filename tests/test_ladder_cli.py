"""The ladder's rungs through the commands a user types: `zenlm pretrain --model lstm-small|gru-small|mlp-small|
ngram-3` on a prepared data directory, `--resume`, `--init-embeddings`, then zenlm.load, `zenlm generate`,
perplexity and `zenlm evaluate --tasks` (lm-eval) on the runs, exactly as on a GPT run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import zenlm
from zenlm.cli import main
from zenlm.data.corpus import open_corpus
from zenlm.data.shards import prepare
from zenlm.models.ngram import NO_TOKEN, NGramLM
from zenlm.models.rnn import MLPLM, RNNLM
from zenlm.recipes.ladder import init_from_vectors
from zenlm.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
# tiny shapes of each rung's preset (the shape flags map to each family's own fields)
RUNGS = {
    "lstm": ["--model", "lstm-small", "--n-embd", "32", "--n-layer", "1", "--dropout", "0.1"],
    "gru": ["--model", "gru-small", "--n-embd", "32", "--n-layer", "1"],
    "mlp": ["--model", "mlp-small", "--n-embd", "8"],
}
COMMON = ["--batch-size", "8", "--seq-len", "32", "--eval-tokens", "2048", "--log-every", "1", "--threads", "1",
          "--device", "cpu"]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def pretrain(data: Path, run: Path, *flags: str) -> None:
    assert main(["pretrain", "--data", str(data), "--out", str(run), *flags]) == 0


@pytest.fixture(scope="module")
def runs(char_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each neural rung trained for 40 steps through `zenlm pretrain` (the ladder recipe, lr 1e-2)."""
    root = tmp_path_factory.mktemp("ladder-runs")
    for name, flags in RUNGS.items():
        pretrain(char_data, root / name, *flags, *COMMON, "--max-steps", "40", "--lr", "1e-2", "--eval-every", "20")
    return {name: root / name for name in RUNGS}


@pytest.mark.parametrize("name", list(RUNGS))
def test_pretrain_trains_each_rung_and_the_run_loads_as_an_lm(runs: dict[str, Path], name: str,
                                                              capsys: pytest.CaptureFixture) -> None:
    run = runs[name]
    recs = metrics(run)
    train = [r["train_loss"] for r in recs if "train_loss" in r]
    val = [r["val_loss"] for r in recs if "val_loss" in r]
    vocab = yaml.safe_load((run / "config.yaml").read_text())["model"]["vocab_size"]
    assert len(train) == 40 and train[0] == pytest.approx(math.log(vocab), rel=0.2)  # starts near uniform
    assert val[-1] < train[0] - 0.7 and sum(train[-5:]) / 5 < train[0] - 0.7, (train, val)
    assert {"val_ppl", "val_bpb"} <= set(recs[-1]) and (run / "plots" / "loss.png").is_file()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["arch"] == ("mlp" if name == "mlp" else "rnn")
    assert saved["optim"]["name"] == "adamw" and saved["batch"]["seq_len"] == 32  # the ladder recipe + flags
    # the run's weights are the model's own: no wrapper prefix, no carried training state
    lm = zenlm.load(run, device="cpu")
    assert isinstance(lm, zenlm.LM) and isinstance(lm.model, MLPLM if name == "mlp" else RNNLM)
    assert set(load_file(str(run / "model.safetensors"))) == set(lm.model.state_dict())
    # generation and scoring through the state
    prompt = "ROMEO:\n"
    text = lm.generate(prompt, max_new_tokens=40, temperature=0)
    assert len(text) == 40 and text == lm.generate(prompt, max_new_tokens=40, temperature=0, use_cache=False)
    pieces = list(lm.stream(prompt, max_new_tokens=40, temperature=0.8, seed=1, stop=["\n\n"]))
    assert "\n\n" not in "".join(pieces) and "".join(pieces) == lm.generate(prompt, max_new_tokens=40,
                                                                             temperature=0.8, seed=1, stop=["\n\n"])
    assert lm.generate_batch([prompt, "JULIET"], max_new_tokens=20, temperature=0)[0] == text[:20]
    sample = "First Citizen:\nBefore we proceed any further, hear me speak."
    assert lm.perplexity(sample) < 0.6 * vocab  # better than uniform
    total, n_tok, n_bytes = lm.nll(sample)
    assert lm.bits_per_byte(sample) == pytest.approx(total / math.log(2) / n_bytes)
    capsys.readouterr()
    assert main(["generate", str(run), prompt, "--max-new-tokens", "40", "--temperature", "0",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out == prompt + text + "\n"
    # int8 weight-only quantisation is for Transformers' linear layers: refused, in one line
    assert main(["quantize", str(run), "--out", str(run.parent / f"{name}-int8")]) == 2
    assert "supports language-model runs (gpt)" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(RUNGS))
def test_resume_is_exact_with_the_carried_state(char_data: Path, tmp_path: Path, name: str) -> None:
    """Stopped after 3 steps and resumed to 6 = 6 steps in one go: losses and final weights bit for bit (the
    state each stream carries comes back from the checkpoint; a constant schedule does not depend on the step
    budget; dropout draws come back with the RNG)."""
    flags = [*RUNGS[name], *COMMON, "--grad-accum", "2", "--schedule", "constant", "--warmup-steps", "2",
             "--eval-every", "0"]
    pretrain(char_data, tmp_path / "straight", *flags, "--max-steps", "6")
    pretrain(char_data, tmp_path / "split", *flags, "--max-steps", "3")
    ckpt = load_file(str(next((tmp_path / "split" / "checkpoints").iterdir()) / "model.safetensors"))
    assert "carry_0" in ckpt  # the checkpoint holds the carried state
    pretrain(char_data, tmp_path / "split", *flags, "--resume", "--max-steps", "6")
    a = [(r["step"], r["train_loss"]) for r in metrics(tmp_path / "straight") if "train_loss" in r]
    b = [(r["step"], r["train_loss"]) for r in metrics(tmp_path / "split") if "train_loss" in r]
    assert a == b and len(a) == 6
    wa, wb = load_file(str(tmp_path / "straight" / "model.safetensors")), load_file(
        str(tmp_path / "split" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_an_ngram_run_is_counted(char_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "ngram"
    pretrain(char_data, run, "--model", "ngram-3", "--eval-tokens", "4096", "--device", "cpu")
    out = capsys.readouterr().out
    assert "counted" in out and "bits/byte" in out
    (rec,) = metrics(run)  # one record: step 0, the counting time and the validation scores
    assert rec["step"] == 0 and rec["tokens"] > 100_000 and {"val_loss", "val_ppl", "val_bpb"} <= set(rec)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["order"] == 3 and saved["counted"]["table_entries"] > 0 and 3 in saved["discounts"]
    lm = zenlm.load(run, device="cpu")
    assert isinstance(lm, zenlm.LM) and isinstance(lm.model, NGramLM)
    # the probabilities of the loaded model sum to 1 over the vocabulary, after any history (seen or not)
    V = lm.model.config.vocab_size
    ctx = torch.randint(NO_TOKEN, V, (64, 2))
    assert torch.allclose(lm.model.probs(ctx).sum(-1), torch.ones(64, dtype=torch.float64), atol=1e-9)
    text = lm.generate("ROMEO:\n", max_new_tokens=30, temperature=0.8, seed=0)
    assert len(text) == 30 and text == lm.generate("ROMEO:\n", max_new_tokens=30, temperature=0.8, seed=0)
    assert lm.perplexity("First Citizen:\nBefore we proceed any further, hear me speak.") < math.exp(rec["val_loss"]) * 3
    # nothing to resume (no checkpoint), an existing run is not counted over, and --overwrite counts again
    assert main(["pretrain", "--data", str(char_data), "--out", str(run), "--resume"]) == 2
    assert "no checkpoint to continue from; pass --overwrite" in capsys.readouterr().err
    assert main(["pretrain", "--data", str(char_data), "--out", str(run), "--model", "ngram-3"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    pretrain(char_data, run, "--model", "ngram-2", "--overwrite", "--eval-tokens", "4096", "--device", "cpu")
    assert zenlm.load(run, device="cpu").model.config.order == 2 and metrics(run)[0]["val_loss"] > rec["val_loss"]


@pytest.fixture(scope="module")
def word_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A word-level data directory and a word2vec text file with 16-dimensional vectors for some of its words."""
    root = tmp_path_factory.mktemp("words")
    words = "the king and the queen walk to the castle and the knight rides a horse to the king".split()
    (root / "text.txt").write_text("\n".join(" ".join(words[i:] + words[:i]) for i in range(len(words))) * 20,
                                   encoding="utf-8")
    corpus = open_corpus(str(root / "text.txt"))
    tok = train_tokenizer(corpus.texts("train"), kind="word", vocab_size=100, min_frequency=1)
    prepare(corpus, tok, root / "data")
    known = ["the", "king", "queen", "castle", "horse"]
    g = torch.Generator().manual_seed(0)
    lines = [f"{len(known)} 16"] + [w + " " + " ".join(f"{x:.4f}" for x in torch.randn(16, generator=g).tolist())
                                    for w in known]
    (root / "vec.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "data", root / "vec.txt"


def test_init_embeddings_from_word_vectors(word_data: tuple[Path, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    data, vec = word_data
    run = tmp_path / "words"
    pretrain(data, run, "--model", "lstm-small", "--n-embd", "16", "--n-layer", "1", "--batch-size", "2",
             "--seq-len", "8", "--max-steps", "2", "--init-embeddings", str(vec), "--device", "cpu")
    assert "vectors cover 5 of" in capsys.readouterr().err
    init = yaml.safe_load((run / "config.yaml").read_text())["init_embeddings"]
    assert init["found"] == 5 and init["file"] == str(vec.resolve()) and 0 < init["fraction"] < 1
    # the rows of the words found are the vectors, scaled to the embedding's initial spread
    lm = zenlm.load(run, device="cpu")
    torch.manual_seed(0)
    fresh = RNNLM(lm.model.config)
    init_from_vectors(fresh, lm.tokenizer, vec)
    king, horse = lm.tokenizer.encode("king")[0], lm.tokenizer.encode("horse")[0]
    rows = fresh.emb.weight[[king, horse]]
    g = torch.Generator().manual_seed(0)
    want = torch.randn(5, 16, generator=g)[[1, 4]]
    assert torch.allclose(torch.nn.functional.cosine_similarity(rows, want), torch.ones(2), atol=1e-3)
    # vectors of another width, or a model without token embeddings, are refused before anything is written
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "w8"), "--model", "lstm-small",
                 "--n-embd", "8", "--init-embeddings", str(vec)]) == 2
    assert "16-dimensional" in capsys.readouterr().err and not (tmp_path / "w8").exists()
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "ng"), "--model", "ngram-2",
                 "--init-embeddings", str(vec)]) == 2
    assert "no token embedding" in capsys.readouterr().err and not (tmp_path / "ng").exists()


def test_lm_eval_tasks_on_an_lstm_run(runs: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    """`zenlm evaluate RUN --tasks` on an LSTM: every logged answer is what the model itself gives (batches of
    rows of different lengths, read from the start state, score each row as alone)."""
    monkeypatch.chdir(ROOT)  # the task files name their data relative to the repository root
    run, out = runs["lstm"], tmp_path / "report.json"
    assert main(["evaluate", str(run), "--tasks", "zenlm_mc", "zenlm_rolling", "zenlm_gen", "--include-path",
                 "tests/lmeval_tasks", "--batch-size", "4", "--log-samples", "--bootstrap-iters", "0",
                 "--device", "cpu", "--out", str(out)]) == 0
    results = json.loads(out.read_text(encoding="utf-8"))
    lm = zenlm.load(run, device="cpu")
    eos = lm.tokenizer.eos_id

    def loglikelihood(context: str, continuation: str) -> float:
        ctx = lm.tokenizer.encode(context) if context else [eos]
        ids = ctx + lm.tokenizer.encode(continuation)
        logits = lm.model(torch.tensor([ids[:-1]]))[0][0].log_softmax(-1)
        n = len(ids) - len(ctx)
        return logits[-n:].gather(1, torch.tensor(ids[-n:])[:, None]).sum().item()

    with torch.no_grad():
        for item in results["samples"]["zenlm_mc"]:
            got = [r[0][0] for r in item["resps"]]
            assert got == pytest.approx([loglikelihood(*args) for args in item["arguments"]], abs=1e-4)
    for item in results["samples"]["zenlm_rolling"]:
        text = item["arguments"][0][0]
        assert item["resps"][0][0] == pytest.approx(-lm.nll(text)[0], abs=1e-3)
    for item in results["samples"]["zenlm_gen"]:
        context, kwargs = item["arguments"][0]
        assert item["resps"][0][0] == lm.generate(context, max_new_tokens=kwargs["max_gen_toks"], temperature=0,
                                                  stop=kwargs["until"])

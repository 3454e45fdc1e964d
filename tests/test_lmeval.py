"""lm-evaluation-harness against zenlm, both ways it is used: ``lm_eval --model local-completions`` against a
real ``zenlm serve`` on 127.0.0.1, and ``zenlm evaluate RUN --tasks`` in-process. Every item must be scored
as ``transformers`` scores it on the same model.

The model is a tiny random GPT-2 built from a ``transformers`` config (no downloads), saved with
``save_pretrained`` and imported with ``zenlm convert from-hf``. The four local tasks in tests/lmeval_tasks/
(``dataset_path: json``, no network) cover a multiple-choice task, a loglikelihood task, a rolling-perplexity
task with a text longer than the context, and a generate-until task with five stop strings.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import transformers as tf
from lm_eval import simple_evaluate
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

import zenlm
from zenlm.cli import main
from zenlm.lmeval import evaluate_tasks, task_manager
from zenlm.serve.app import ServerThread, create_app

ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = ROOT / "tests" / "lmeval_tasks"
TASKS = ["zenlm_mc", "zenlm_ll", "zenlm_rolling", "zenlm_gen"]
BLOCK = 64  # the model's context: the long rolling text needs several windows
EOT = "<|endoftext|>"
NATS = 1e-4  # per-item agreement with transformers


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the task files name their data relative to the repository root


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """(HF model dir, zenlm run dir, GPT2LMHeadModel, PreTrainedTokenizerFast)."""
    texts = [f.read_text(encoding="utf-8") for f in sorted(TASK_DIR.glob("*.jsonl"))]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts * 3, trainers.BpeTrainer(
        vocab_size=400, special_tokens=[AddedToken(EOT, special=True)], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOT, eos_token=EOT, unk_token=EOT)
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(
        vocab_size=bpe.get_vocab_size(), n_positions=BLOCK, n_embd=48, n_layer=2, n_head=4, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # weights with enough spread that greedy text varies from prompt to prompt
        for name, p in model.named_parameters():
            if ".ln_" not in name and not name.startswith("transformer.ln_f"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    root = tmp_path_factory.mktemp("lmeval")
    model.save_pretrained(root / "hf")
    tok.save_pretrained(root / "hf")
    assert main(["convert", "from-hf", str(root / "hf"), "--out", str(root / "run")]) == 0
    return root / "hf", root / "run", model, tok


# ------------------------------------------------------------------------------- transformers' answers
def _enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def _split(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The ids lm-eval scores for a (context, continuation) request of a causal model."""
    if context == "":
        return [tok.eos_token_id], _enc(tok, continuation)
    n = len(context) - len(context.rstrip())  # trailing spaces belong to the continuation
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = _enc(tok, context + continuation), _enc(tok, context)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def _score(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    ids = ctx + cont
    assert len(ids) <= BLOCK + 1
    logprobs = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].float(), -1)[len(ctx) - 1:]
    target = torch.tensor(cont)
    return float(logprobs.gather(-1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())


def _rolling(model, tok, text: str, max_seq_len: int) -> float:
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    windows = get_rolling_token_windows(_enc(tok, text), tok.eos_token_id, max_seq_len, 1)
    return sum(_score(model, *make_disjoint_window(w))[0] for w in windows)


@torch.no_grad()
def _generate(model, tok, context: str, kwargs: dict, keep: int) -> str:
    ids = _enc(tok, context)[-keep:]
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=kwargs["max_gen_toks"], do_sample=False,
                         pad_token_id=tok.eos_token_id)
    new = out[0, len(ids):].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    text = tok.decode(new, clean_up_tokenization_spaces=False)
    for stop in kwargs["until"]:
        text = text.split(stop)[0]
    return text


def check_against_transformers(results: dict, hf, rolling_window: int, context_keep: int) -> None:
    """Every logged item of the four tasks equals what transformers computes on the same model."""
    _, _, model, tok = hf
    samples = results["samples"]
    assert sorted(samples) == sorted(TASKS) and all(samples.values())
    correct = []
    for item in samples["zenlm_mc"]:
        got = [r[0] for r in item["resps"]]  # one (loglikelihood, is_greedy) per choice
        want = [_score(model, *_split(tok, *args)) for args in item["arguments"]]
        assert [g[0] for g in got] == pytest.approx([w[0] for w in want], abs=NATS)
        best = max(range(len(want)), key=lambda j: want[j][0])
        assert max(range(len(got)), key=lambda j: got[j][0]) == best  # the same answer is chosen
        correct.append(best == item["doc"]["label"])
    assert results["results"]["zenlm_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))
    for item in samples["zenlm_ll"]:
        ll, greedy = item["resps"][0][0]
        want_ll, want_greedy = _score(model, *_split(tok, *item["arguments"][0]))
        assert ll == pytest.approx(want_ll, abs=NATS) and greedy == want_greedy
    total, words = 0.0, 0
    for item in samples["zenlm_rolling"]:
        text = item["arguments"][0][0]
        want = _rolling(model, tok, text, rolling_window)
        assert item["resps"][0][0] == pytest.approx(want, abs=NATS)
        total, words = total + want, words + len(re.split(r"\s+", text))
    assert any(len(_enc(tok, s["arguments"][0][0])) > rolling_window for s in samples["zenlm_rolling"])
    assert results["results"]["zenlm_rolling"]["word_perplexity,none"] == pytest.approx(
        math.exp(-total / words), rel=1e-4)
    generations = []
    for item in samples["zenlm_gen"]:
        context, kwargs = item["arguments"][0]
        generations.append(item["resps"][0][0])
        assert generations[-1] == _generate(model, tok, context, kwargs, context_keep)
    assert len(set(generations)) > 1 and any(generations)  # the model does not say one thing to every prompt


# ------------------------------------------------------------------------------------------ the tests
@pytest.mark.parametrize("batch_size", [1, 4])
def test_local_completions_against_zenlm_serve_equals_transformers(hf, batch_size):
    _, run, _, _ = hf
    lm = zenlm.load(run, device="cpu")
    app = create_app(lm.model, lm.tokenizer, model_id="tiny", max_concurrency=4, max_queue=4)
    with ServerThread(app) as srv:
        results = simple_evaluate(
            model="local-completions", model_args={"model": "tiny", "base_url": srv.url + "/v1/completions",
                                                   "max_length": BLOCK, "max_retries": 1},
            tasks=TASKS, task_manager=task_manager(TASKS, TASK_DIR), batch_size=batch_size, log_samples=True,
            bootstrap_iters=0)
        metrics = app.state.metrics
        requests = metrics.value("zenlm_requests_total", labels={"route": "/v1/completions", "code": "200"})
    # lm-eval's remote tokenizer (GET /tokenizer_info, POST /tokenize) was used, and requests were batched
    assert metrics.value("zenlm_requests_total", labels={"route": "/tokenizer_info", "code": "200"}) >= 1
    n_items = sum(len(v) for v in results["samples"].values())
    assert requests < n_items if batch_size > 1 else requests >= n_items
    # local-completions keeps max_length - 1 tokens and leaves one for the generated token
    check_against_transformers(results, hf, rolling_window=BLOCK - 2, context_keep=BLOCK - 1 - 10)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_zenlm_evaluate_tasks_equals_transformers(hf, batch_size, tmp_path, capsys):
    _, run, _, _ = hf
    out = tmp_path / "report.json"
    assert main(["evaluate", str(run), "--tasks", *TASKS, "--include-path", str(TASK_DIR), "--batch-size",
                 str(batch_size), "--log-samples", "--bootstrap-iters", "0", "--device", "cpu",
                 "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert all(t in table for t in TASKS) and "word_perplexity" in table and "acc_norm" in table
    results = json.loads(out.read_text(encoding="utf-8"))
    assert results["zenlm"]["batch_size"] == batch_size and results["n-samples"]["zenlm_mc"]["effective"] == 6
    check_against_transformers(results, hf, rolling_window=BLOCK, context_keep=BLOCK - 10)


def test_the_head_scores_a_piece_of_positions_at_a_time(hf, tmp_path, capsys, monkeypatch):
    """SCORING_LOGITS bounds the logits a scoring batch holds at once (a rolling batch of GPT-2 windows held
    gigabytes): with room for 3 positions' logits, the head runs on pieces of at most 3 positions, and every
    answer still equals transformers'."""
    import yaml

    import zenlm.lmeval
    import zenlm.scoring
    from zenlm.models.gpt import GPT

    _, run, _, _ = hf
    vocab = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))["model"]["vocab_size"]
    monkeypatch.setattr(zenlm.scoring, "SCORING_LOGITS", 3 * vocab)
    pieces: list[int] = []  # positions per head call while scoring
    scoring = [False]
    head, score_rows = GPT.head, zenlm.lmeval.ZenlmLM._score_rows

    def counted(self, x_BTC):
        if scoring[0]:
            pieces.append(x_BTC.shape[0] * x_BTC.shape[1])
        return head(self, x_BTC)

    def scored(self, *args, **kwargs):
        scoring[0] = True
        try:
            return score_rows(self, *args, **kwargs)
        finally:
            scoring[0] = False

    monkeypatch.setattr(GPT, "head", counted)
    monkeypatch.setattr(zenlm.lmeval.ZenlmLM, "_score_rows", scored)
    out = tmp_path / "report.json"
    assert main(["evaluate", str(run), "--tasks", *TASKS, "--include-path", str(TASK_DIR), "--batch-size", "4",
                 "--log-samples", "--bootstrap-iters", "0", "--device", "cpu", "--out", str(out)]) == 0
    capsys.readouterr()
    assert pieces and max(pieces) == 3 and len(pieces) > 20
    check_against_transformers(json.loads(out.read_text(encoding="utf-8")), hf, rolling_window=BLOCK,
                               context_keep=BLOCK - 10)


def test_zenlm_evaluate_writes_the_report_into_the_run(hf, capsys):
    _, run, _, _ = hf
    assert main(["evaluate", str(run), "--tasks", "zenlm_mc", "--include-path", str(TASK_DIR), "--limit", "2",
                 "--num-fewshot", "1", "--device", "cpu"]) == 0
    reports = sorted((run / "eval").glob("lm-eval-*.json"))
    assert reports and "| zenlm_mc" in capsys.readouterr().out.replace("|zenlm_mc", "| zenlm_mc")
    results = json.loads(reports[-1].read_text(encoding="utf-8"))
    assert results["n-shot"]["zenlm_mc"] == 1 and results["n-samples"]["zenlm_mc"]["effective"] == 2
    assert "samples" not in results  # per-item answers only with --log-samples
    assert set(results["results"]["zenlm_mc"]) >= {"acc,none", "acc_norm,none", "acc_stderr,none"}


@pytest.mark.parametrize("weights", ["bf16", "int8"])
def test_evaluate_tasks_with_bf16_and_int8_weights(hf, weights, tmp_path):
    """Scores from reduced-precision weights equal the same weights' own forward pass, and stay near fp32."""
    _, run, model, tok = hf
    if weights == "int8":
        assert main(["quantize", str(run), "--out", str(tmp_path / "int8")]) == 0
        lm = zenlm.load(tmp_path / "int8", device="cpu")
    else:
        lm = zenlm.load(run, device="cpu", dtype="bf16")
    results = evaluate_tasks(lm, ["zenlm_ll", "zenlm_mc"], include_path=TASK_DIR, batch_size=3,
                             log_samples=True, bootstrap_iters=0)
    for item in results["samples"]["zenlm_ll"] + results["samples"]["zenlm_mc"]:
        for args, resp in zip(item["arguments"], item["resps"], strict=True):
            ctx, cont = _split(tok, *args)
            with torch.no_grad():
                logits = lm.model(torch.tensor([(ctx + cont)[:-1]]))[0, len(ctx) - 1:].float()
            own = float(torch.log_softmax(logits, -1).gather(-1, torch.tensor(cont)[:, None]).sum())
            assert resp[0][0] == pytest.approx(own, abs=0.05 * len(cont))  # batched vs alone, same weights
            assert resp[0][0] == pytest.approx(_score(model, ctx, cont)[0], abs=0.5 * len(cont))  # near fp32


def test_evaluate_refuses_what_it_cannot_do(hf, tmp_path, capsys):
    _, run, _, _ = hf
    assert main(["evaluate", str(run)]) == 2
    assert "--tasks" in capsys.readouterr().err
    assert main(["evaluate", str(run), "--tasks", "zenlm_mc", "--include-path", str(tmp_path / "none")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["evaluate", str(run), "--tasks", "zenlm_mc", "--data", "x.jsonl"]) == 2
    assert "not both" in capsys.readouterr().err

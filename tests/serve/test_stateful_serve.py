"""Serving a stateful model (a tiny LSTM, and an n-gram model): the official openai client against a real server
whose engine keeps one state row per sequence (zenlm.serve.stateful_engine)."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai
import pytest
import torch

import zenlm
from zenlm.cli import main
from zenlm.generate import GenerationConfig, generate_ids
from zenlm.models.ngram import NGramConfig, NGramLM
from zenlm.models.rnn import RNNLM, RNNLMConfig
from zenlm.rundir import save_run
from zenlm.serve.app import ServerThread, create_app
from zenlm.serve.chat import chat_loop
from zenlm.serve.stateful_engine import STATEFUL_MAX_LEN, StatefulEngine
from zenlm.tokenizer import render_chat, train_tokenizer

TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
        "the slings and arrows of outrageous fortune. ") * 5


@pytest.fixture(scope="module")
def lstm(tmp_path_factory: pytest.TempPathFactory):
    """A random-init 2-layer LSTM run (large weights, so that greedy text varies; special tokens never chosen)."""
    tok = train_tokenizer([TEXT], kind="char")
    torch.manual_seed(0)
    model = RNNLM(RNNLMConfig(vocab_size=tok.vocab_size, n_embd=16, n_hidden=24, n_layer=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 2.0 if name.startswith(("emb", "head")) else 0.5)
        model.head.bias.zero_()
        model.head.bias[sorted(tok.special_ids)] = -100.0
    run = save_run(tmp_path_factory.mktemp("serve-lstm") / "lstm", model, tok)
    return zenlm.load(run, device="cpu")


@pytest.fixture(scope="module")
def server(lstm):
    app = create_app(lstm.model, lstm.tokenizer, model_id="lstm", max_concurrency=3, max_queue=8, model_kind="base")
    assert isinstance(app.state.engine, StatefulEngine)
    with ServerThread(app) as srv:
        srv.app = app
        yield srv


def client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def greedy(lm, prompt: str, n: int) -> str:
    ids = list(generate_ids(lm.model, lm.tokenizer.encode(prompt), GenerationConfig(max_new_tokens=n, temperature=0),
                            eos_id=lm.tokenizer.eos_id))
    return lm.tokenizer.decode(ids)


def test_completions_equal_generation_alone_also_when_batched(server, lstm) -> None:
    c = client(server)
    r = c.completions.create(model="lstm", prompt="To be", max_tokens=30, temperature=0)
    assert r.choices[0].text == greedy(lstm, "To be", 30) and len(set(r.choices[0].text)) > 3
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 30
    assert c.models.retrieve("lstm").model_extra["context_length"] == STATEFUL_MAX_LEN
    # more requests than slots at once: each sequence's state row is its own
    prompts = ["whether", "To be, or not", "the slings", "T", "arrows of outrageous"]
    with ThreadPoolExecutor(len(prompts)) as pool:
        texts = list(pool.map(lambda p: c.completions.create(model="lstm", prompt=p, max_tokens=25,
                                                             temperature=0).choices[0].text, prompts))
    assert texts == [greedy(lstm, p, 25) for p in prompts]
    assert server.app.state.engine.max_batch_seen > 1


def test_stream_stop_strings_and_seeded_sampling(server, lstm) -> None:
    c = client(server)
    kw = dict(model="lstm", prompt="question: ", max_tokens=40, temperature=0)
    whole = c.completions.create(**kw).choices[0].text
    chunks = list(c.completions.create(**kw, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole
    stop = whole[10:12]
    cut = c.completions.create(**kw, stop=[stop]).choices[0]
    assert cut.text == whole[:whole.index(stop)] and cut.finish_reason == "stop"
    a, b = (c.completions.create(model="lstm", prompt="To", max_tokens=20, temperature=0.9, seed=5, n=2)
            for _ in range(2))
    assert [x.text for x in a.choices] == [x.text for x in b.choices]
    assert a.choices[0].text == lstm.generate("To", max_new_tokens=20, temperature=0.9, seed=5)


def test_echo_logprobs_score_the_prompt(server, lstm) -> None:
    c = client(server)
    prompt = "the mind to suffer"
    r = c.completions.create(model="lstm", prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    got = r.choices[0].logprobs.token_logprobs
    ids = lstm.tokenizer.encode(prompt)
    with torch.no_grad():
        logp = lstm.model(torch.tensor([ids[:-1]]))[0][0].log_softmax(-1)
    assert got[0] is None and got[1:] == pytest.approx(logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist(),
                                                       abs=1e-5)
    assert all(lp <= max(top.values()) + 1e-6 for lp, top in zip(got[1:], r.choices[0].logprobs.top_logprobs[1:],
                                                                  strict=True))


def test_chat_and_what_is_refused(server) -> None:
    c = client(server)
    r = c.chat.completions.create(model="lstm", messages=[{"role": "user", "content": "Hello"}], max_tokens=12,
                                  temperature=0)
    assert r.choices[0].message.content and r.usage.completion_tokens == 12
    with pytest.raises(openai.BadRequestError, match="gives no embeddings"):
        c.embeddings.create(model="lstm", input="hello")
    assert c.completions.create(model="lstm", prompt="ok", max_tokens=3).usage.completion_tokens == 3  # still up


def test_an_ngram_model_serves_too(tmp_path: Path) -> None:
    tok = train_tokenizer([TEXT], kind="char")
    ids = np.array(tok.encode(TEXT))
    model = NGramLM.from_ids(ids, NGramConfig(vocab_size=tok.vocab_size, order=4))
    lm = zenlm.load(save_run(tmp_path / "ng", model, tok), device="cpu")
    app = create_app(lm.model, lm.tokenizer, model_id="ng", max_concurrency=2)
    with ServerThread(app) as srv:
        text = client(srv).completions.create(model="ng", prompt="To be", max_tokens=20, temperature=0).choices[0].text
    assert text == greedy(lm, "To be", 20)
    whole = "To be" + text  # greedy after seen histories: every 4-gram it writes was counted
    assert all(whole[i:i + 4] in TEXT for i in range(len(whole) - 3))


def test_terminal_chat_with_an_lstm(lstm, tmp_path: Path, monkeypatch, capsys) -> None:
    """`zenlm chat` on an LSTM run: the history is rendered with the chat template and read whole (no context
    window to crop it to), the reply is the greedy continuation."""
    lines = iter(["To be", "or not", "/quit"])
    pieces: list[str] = []
    cfg = GenerationConfig(max_new_tokens=10, temperature=0)
    history = chat_loop(lstm.model, lstm.tokenizer, lambda: next(lines), pieces.append, cfg)
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    prompt = render_chat(lstm.tokenizer, history[:3])
    ids = lstm.tokenizer.encode(prompt, allow_special=True)
    want = lstm.tokenizer.decode(list(generate_ids(lstm.model, ids, cfg, eos_id=lstm.tokenizer.eos_id)),
                                 skip_special=True)
    assert history[3]["content"] == want and len(want) == 10
    run = save_run(tmp_path / "chat-lstm", lstm.model, lstm.tokenizer)
    monkeypatch.setattr("sys.stdin", io.StringIO("To be\n/quit\n"))
    assert main(["chat", str(run), "--temperature", "0", "--max-new-tokens", "8", "--device", "cpu"]) == 0
    assert "assistant: " in capsys.readouterr().out

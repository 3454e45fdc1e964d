"""``zenlm chat RUN``: streamed replies, multi-turn history, /reset and /quit."""

from __future__ import annotations

import io

from zenlm.cli import main
from zenlm.generate import GenerationConfig
from zenlm.serve.app import render_chat
from zenlm.serve.chat import chat_loop, reply_stream


def test_chat_loop_keeps_history_and_resets(lm):
    lines = iter(["To be", "or not", "/reset", "hello", "/quit", "never read"])
    pieces: list[str] = []
    cfg = GenerationConfig(max_new_tokens=12, temperature=0)
    history = chat_loop(lm.model, lm.tokenizer, lambda: next(lines), pieces.append, cfg, system="Be brief.")
    assert next(lines) == "never read"  # /quit stopped reading
    assert [m["role"] for m in history] == ["system", "user", "assistant"]  # /reset dropped the first turns
    assert history[1]["content"] == "hello"
    # the reply streamed in several pieces and equals a fresh reply to the same history
    want = "".join(reply_stream(lm.model, lm.tokenizer, history[:2], cfg))
    assert history[2]["content"] == want and len(want) > 0
    out = "".join(pieces)
    assert "(history cleared)" in out and want in out
    assert len(pieces) > 5


def test_reply_uses_the_chat_template(lm):
    msgs = [{"role": "user", "content": "hi"}]
    assert render_chat(lm.tokenizer, msgs) == "<|bos|>user:\nhi<|eos|>\nassistant:\n"


def test_cli_chat_verb(run_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("To be\n/quit\n"))
    assert main(["chat", str(run_dir), "--temperature", "0", "--max-new-tokens", "8", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "assistant: " in out and "/reset" in out


def test_a_template_that_refuses_is_a_clear_error(lm):
    """The chat template lives with the tokenizer (zenlm.tokenizer.render_chat): a template that refuses the
    messages is a DataError for the terminal, and the server answers it with a 400 (tests/serve)."""
    import copy

    import pytest

    from zenlm.errors import DataError
    from zenlm.tokenizer import render_chat as render

    tok = copy.copy(lm.tokenizer)
    tok.chat_template = "{% if messages[0].role != 'system' %}{{ raise_exception('start with a system message') }}{% endif %}"
    with pytest.raises(DataError, match="refused the messages: start with a system message"):
        render(tok, [{"role": "user", "content": "hi"}])
    tok.chat_template = "{{ messages[0].content | no_such_filter }}"
    with pytest.raises(DataError, match="chat template failed"):
        render(tok, [{"role": "user", "content": "hi"}])
    assert render_chat is render  # the server renders with the same code (zenlm.chat_template, in a worker)

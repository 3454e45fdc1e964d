"""Chat fine-tuning (zenlm finetune chat): the template and its ids, the assistant-only loss mask, refused
input, a short run whose replies then stop, and a LoRA chat run served through the official openai client."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import yaml

import zenlm
from zenlm.chat_template import compile_template, render_spans
from zenlm.cli import main
from zenlm.config import GPTConfig
from zenlm.data.batches import IGNORE_INDEX
from zenlm.data.chat import (
    ChatBatches,
    Conversation,
    assistant_mask,
    check_messages,
    collate_chats,
    encode_conversations,
    read_builtin,
)
from zenlm.errors import ConfigError, DataError
from zenlm.generate import GenerationConfig, generate_ids
from zenlm.models.gpt import GPT
from zenlm.recipes.finetune_chat import finetune_chat
from zenlm.rundir import read_run_config, save_run
from zenlm.serve.chat import model_kind, reply_stream
from zenlm.tokenizer import (
    CHAT_TEMPLATE,
    LEGACY_CHAT_TEMPLATE,
    Tokenizer,
    chat_stop_ids,
    end_of_turn_id,
    render_chat,
    train_tokenizer,
)
from zenlm.train.loop import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Hello there "},
                {"role": "assistant", "content": "Hi! How can I help?"}, {"role": "user", "content": "你好，世界 😀"},
                {"role": "assistant", "content": "你好！\nNice to meet you."}]
PAIRS = [("hi", "hello!"), ("how are you?", "fine, thanks."), ("what is your name?", "i am zen."),
         ("bye", "goodbye!")]


def _train(steps: int, **kw) -> TrainConfig:
    return TrainConfig(**{"max_steps": steps, "eval_every": 0, "ckpt_every": 0, "log_every": 1, "device": "cpu",
                          "precision": "fp32", "tensorboard": False, **kw})


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if "train_loss" in r]


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------- template and ids


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, bpe_tok: Tokenizer) -> tuple[Tokenizer, Path]:
    """A GPT run with the byte-level BPE tokenizer and zenlm's chat template, exported by `zenlm convert to-hf`."""
    from zenlm.convert.hf import export_hf

    root = tmp_path_factory.mktemp("chat_export")
    tok = Tokenizer.load(_saved(bpe_tok, root / "tok"))
    assert tok.chat_template == CHAT_TEMPLATE
    torch.manual_seed(0)
    run = save_run(root / "run", GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16,
                                               block_size=64)), tok)
    return tok, export_hf(run, root / "hf")


def _saved(tok: Tokenizer, where: Path) -> Path:
    tok.save(where)
    return where


def test_template_ids_and_assistant_mask_equal_transformers(exported) -> None:
    """What zenlm renders, tokenizes and scores for a conversation is what transformers' apply_chat_template
    gives on the exported tokenizer, assistant mask ({% generation %}) included."""
    from transformers import AutoTokenizer

    tok, hf_dir = exported
    hf = AutoTokenizer.from_pretrained(hf_dir)
    theirs = hf.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    text, spans = render_spans(compile_template(tok.chat_template, 1 << 20), CONVERSATION, False,
                               {"bos_token": "<|bos|>", "eos_token": "<|eos|>"}, 1 << 20)
    [(ids, offsets)] = tok.encode_offsets([text])
    assert ids == tok.encode(render_chat(tok, CONVERSATION, add_generation_prompt=False), allow_special=True)
    assert ids == theirs["input_ids"]
    assert assistant_mask(offsets, spans).astype(int).tolist() == theirs["assistant_masks"]
    for k in (1, 3):  # the prompt the chat and the server send is the same on both sides
        prompt = tok.encode(render_chat(tok, CONVERSATION[:k + 1]), allow_special=True)
        assert prompt == hf.apply_chat_template(CONVERSATION[:k + 1], add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]
    enc = encode_conversations([Conversation(check_messages(CONVERSATION, "t"), "t")], tok, 10_000)
    n = len(enc.ids[0])  # the row ends with the last reply's end-of-turn token
    assert enc.ids[0].tolist() == theirs["input_ids"][:n] and enc.scored[0].tolist() == \
        [bool(m) for m in theirs["assistant_masks"][:n]]
    assert theirs["input_ids"][n - 1] == tok.eos_id and not any(theirs["assistant_masks"][n:])


@pytest.mark.parametrize("kind", ["bpe", "char", "wordpiece"])
def test_a_reply_continues_the_prompt_ids(kind, bpe_tok, char_tok, wordpiece_tok) -> None:
    """The ids of the prompt for turn k are exactly the first ids of the conversation that continues it, so a
    model trained on whole conversations is prompted at inference the way it saw them."""
    tok = {"bpe": bpe_tok, "char": char_tok, "wordpiece": wordpiece_tok}[kind]
    full = tok.encode(render_chat(tok, CONVERSATION, add_generation_prompt=False), allow_special=True)
    for k in (2, 4):
        prompt = tok.encode(render_chat(tok, CONVERSATION[:k]), allow_special=True)
        assert full[: len(prompt)] == prompt
    assert end_of_turn_id(tok) == tok.eos_id != tok.pad_id and chat_stop_ids(tok) == {tok.eos_id}


@pytest.fixture(scope="module")
def conv_tok() -> Tokenizer:
    """A char tokenizer that knows every character of CONVERSATION."""
    return train_tokenizer([" ".join(m["content"] for m in CONVERSATION) + " user: assistant: system:\n"],
                           kind="char")


def _runs(flags: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each run of True in a 1-D bool tensor."""
    out, start = [], None
    for t, f in enumerate([*flags.tolist(), False]):
        if f and start is None:
            start = t
        elif not f and start is not None:
            out, start = [*out, (start, t)], None
    return out


def test_exactly_the_assistant_tokens_carry_loss(conv_tok: Tokenizer) -> None:
    """The labels of a conversation are the assistant's replies, each with its end-of-turn token, and nothing
    else: not the system prompt, the user's turns, the role headers or the padding."""
    conv = Conversation(check_messages(CONVERSATION, "t"), "t")
    short = Conversation(check_messages(CONVERSATION[1:3], "s"), "s")
    enc = encode_conversations([conv, short], conv_tok, 10_000)
    x, labels = collate_chats(enc, [0, 1], pad_id=conv_tok.pad_id)
    for row, want in ((0, ["Hi! How can I help?", "你好！\nNice to meet you."]), (1, ["Hi! How can I help?"])):
        n = len(enc.ids[row])
        assert torch.equal(x[row, : n - 1], torch.as_tensor(enc.ids[row][:-1]))  # inputs: the conversation
        scored = labels[row] != IGNORE_INDEX
        assert torch.equal(labels[row][scored], torch.as_tensor(enc.ids[row][1:])[scored[: n - 1]])
        replies = [conv_tok.decode(labels[row, a:b].tolist()) for a, b in _runs(scored)]
        assert replies == [w + "<|eos|>" for w in want]
        assert (x[row, n - 1:] == conv_tok.pad_id).all() and not scored[n - 1:].any()  # padding: never scored
    assert enc.n_scored == int((labels != IGNORE_INDEX).sum())


def test_long_conversations_are_cut_on_turn_boundaries(conv_tok: Tokenizer) -> None:
    conv = Conversation(check_messages(CONVERSATION, "t"), "t")
    full = encode_conversations([conv], conv_tok, 10_000)
    cut = encode_conversations([conv], conv_tok, len(full.ids[0]) - 1)  # one token short of the whole
    assert (cut.truncated, cut.dropped) == (1, 0)
    assert conv_tok.decode(cut.ids[0].tolist()).endswith("assistant:\nHi! How can I help?<|eos|>")
    assert cut.ids[0].tolist() == full.ids[0][: len(cut.ids[0])].tolist()
    with pytest.raises(DataError, match="no conversation fits"):
        encode_conversations([conv], conv_tok, 20)


def test_batches_group_lengths_and_are_a_function_of_the_step(char_tok: Tokenizer) -> None:
    convs = [Conversation(check_messages([{"role": "user", "content": "q" * (1 + i % 17)},
                                          {"role": "assistant", "content": "a" * (1 + (7 * i) % 23)}], str(i)), str(i))
             for i in range(64)]
    enc = encode_conversations(convs, char_tok, 10_000)
    bucketed = ChatBatches(enc, 4, pad_id=char_tok.pad_id, seed=3, pool=16)
    plain = ChatBatches(enc, 4, pad_id=char_tok.pad_id, seed=3, pool=1)
    assert bucketed.real_share() > plain.real_share()
    assert bucketed.batches_per_epoch == 16 and sorted(i for b in bucketed.epoch_batches(0) for i in b) == \
        list(range(64))
    again = ChatBatches(enc, 4, pad_id=char_tok.pad_id, seed=3, pool=16)
    for step in (0, 5, 17):  # a resumed run sees the same batches
        assert all(torch.equal(a, b) for a, b in zip(bucketed.get(step), again.get(step), strict=True))


def test_builtin_conversations_are_read_from_the_installed_packages() -> None:
    for name, first_user in (("chatterbot-en", None), ("chatterbot-zh", None)):
        convs = read_builtin(name)
        assert len(convs) > 100 and all(c.messages[1]["role"] == "assistant" for c in convs), name
        assert first_user is None or convs[0].messages[0]["content"] == first_user
    assert any("你好" in m["content"] for c in read_builtin("chatterbot-zh") for m in c.messages)


# --------------------------------------------------------------------------------------------- bad input


BAD_LINES = [
    ({"messages": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "x"}]},
     r":2: messages\[0\].role is 'assistant' first"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     r":2: messages\[1\].role is 'user' after a 'user' message"),
    ({"messages": [{"role": "bot", "content": "Hi"}]}, r":2: messages\[0\].role is 'bot'; use one of"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]},
     r":2: messages\[1\].content is empty"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "Hi"}]},
     ":2: the conversation has no assistant message"),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "x"}]},
     r":2: conversations\[1\].from is 'robot'"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "ok<|eos|>"}]},
     ":2: message 1 contains the special token '<|eos|>'"),
    ({"text": "hello"}, ":2 has neither 'messages'"),
]


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny GPT run with a char tokenizer that knows the characters of PAIRS, and zenlm's earlier chat
    template (which chat fine-tuning replaces)."""
    text = " ".join(q + " " + a for q, a in PAIRS) + " user: assistant: system:\n"
    tok = train_tokenizer([text], kind="char")
    tok.chat_template = LEGACY_CHAT_TEMPLATE
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_head=2, n_embd=64)
    return save_run(tmp_path_factory.mktemp("chat") / "base", GPT(cfg), tok)


@pytest.fixture(scope="module")
def chats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = []
    for i in range(40):  # two-turn conversations: the second reply is scored with the first exchange in front
        (q, a), (q2, a2) = PAIRS[i % 4], PAIRS[(i + 1) % 4]
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a},
                                  {"role": "user", "content": q2}, {"role": "assistant", "content": a2}]})
    rows[5] = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello!"}]}  # ShareGPT
    return _write_jsonl(tmp_path_factory.mktemp("chat_data") / "chats.jsonl", rows)


@pytest.mark.parametrize("line,match", BAD_LINES, ids=[m.split(" ")[1] for _, m in BAD_LINES])
def test_bad_conversations_are_refused_naming_file_line_and_field(tmp_path: Path, chat_base: Path, line, match
                                                                  ) -> None:
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}]}
    data = _write_jsonl(tmp_path / "bad.jsonl", [good, line])
    with pytest.raises(DataError, match=match):
        finetune_chat(chat_base, data, tmp_path / "out", train=_train(1))
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_bad_templates_are_refused_before_the_run_directory_is_made(tmp_path: Path, chat_base: Path, chats: Path
                                                                    ) -> None:
    cases = [
        ("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}",
         DataError, r"marks no reply with {% generation %}"),
        ("{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{{ eos_token }}{% endfor %}",
         ConfigError, r"span does not end with its end-of-turn token"),
        ("{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}",
         ConfigError, "writes no special token right after a reply"),
        ("{% for m in messages %}{% generation %}{{ m['content'] }}{{ pad_token }}{% endgeneration %}{% endfor %}",
         ConfigError, "ends a reply with the padding token"),
        ("{% for m in messages %}{% generation %}{{ m['content'] | no_such_filter }}{% endgeneration %}{% endfor %}",
         DataError, "failed to compile"),
        ("{% if messages|length > 2 %}{{ raise_exception('two messages at most') }}{% endif %}"
         "{% for m in messages %}{% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %}{% endfor %}",
         DataError, r"chats.jsonl:\d+: the chat template refused the messages: two messages at most"),
    ]
    for template, error, match in cases:
        file = tmp_path / "t.jinja"
        file.write_text(template, encoding="utf-8")
        with pytest.raises(error, match=match):
            finetune_chat(chat_base, chats, tmp_path / "out", chat_template=file, train=_train(1))
        assert not (tmp_path / "out").exists()
    with pytest.raises(DataError, match="does not exist"):
        finetune_chat(chat_base, chats, tmp_path / "out", chat_template=tmp_path / "none.jinja", train=_train(1))


# ------------------------------------------------------------------------------------- training and use


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory: pytest.TempPathFactory, chat_base: Path, chats: Path) -> Path:
    out = tmp_path_factory.mktemp("chat_run") / "chat"
    finetune_chat(chat_base, chats, out, batch_size=8, lr=3e-3, train=_train(60, eval_every=30))
    return out


def test_a_short_chat_fine_tune_learns_to_reply_and_to_stop(chat_run: Path, chat_base: Path) -> None:
    losses = _losses(chat_run)
    assert losses[-1] < 0.3 * losses[0]
    saved = read_run_config(chat_run)
    assert saved["task"]["kind"] == "chat" and model_kind(saved) == "chat"
    assert saved["task"]["end_of_turn"] == "<|eos|>" and saved["task"]["template"] == "zenlm"
    lm = zenlm.load(chat_run, device="cpu")
    assert lm.tokenizer.chat_template == CHAT_TEMPLATE  # the template it was trained with, for chat and serve
    assert Tokenizer.load(chat_base).chat_template == LEGACY_CHAT_TEMPLATE  # the base is left as it was
    cfg = GenerationConfig(max_new_tokens=40, temperature=0)
    ended = 0
    for q, _ in PAIRS:
        ids = lm.tokenizer.encode(render_chat(lm.tokenizer, [{"role": "user", "content": q}]), allow_special=True)
        out = list(generate_ids(lm.model, ids, cfg, eos_id=None))
        ended += lm.tokenizer.eos_id in out  # the reply ends with its end-of-turn token, within the limit
    assert ended == len(PAIRS)
    reply = "".join(reply_stream(lm.model, lm.tokenizer, [{"role": "user", "content": "bye"}], cfg))
    assert reply == "goodbye!"


def test_lora_chat_run_end_to_end_through_the_cli_chat_and_the_openai_client(
        tmp_path: Path, chat_run: Path, chats: Path, monkeypatch, capsys) -> None:
    """LoRA adapters trained with `zenlm finetune chat --lora` (on the chat run: a chat model may be tuned
    further), then `zenlm chat` and the server through the official openai client: the reply ends at the
    end-of-turn token (finish_reason "stop") and is what the terminal chat writes."""
    import httpx
    import openai

    from zenlm.serve.app import ServerThread, create_app

    out = tmp_path / "lora-chat"
    assert main(["finetune", "chat", "--base", str(chat_run), "--data", str(chats), "--out", str(out), "--lora",
                 "--lora-rank", "4", "--max-steps", "20", "--eval-every", "10", "--device", "cpu",
                 "--precision", "fp32"]) == 0
    assert (out / "adapter.safetensors").is_file() and not (out / "model.safetensors").exists()
    saved = read_run_config(out)
    assert saved["task"]["kind"] == "chat" and saved["lora"]["rank"] == 4
    # --lora-tokens auto: the rows of the special tokens the conversations use train too, end of turn first
    eot = Tokenizer.load(out).token_to_id(saved["task"]["end_of_turn"])
    assert saved["lora"]["tokens"][0] == eot
    from safetensors.torch import load_file

    adapter = load_file(str(out / "adapter.safetensors"))
    assert adapter["tok_emb.rows"].shape[0] == len(saved["lora"]["tokens"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["val_loss"] < 0.5 for r in rows if "val_loss" in r)
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO("bye\n/quit\n"))
    assert main(["chat", str(out), "--temperature", "0", "--max-new-tokens", "30", "--device", "cpu"]) == 0
    said = capsys.readouterr().out
    assert "chat-tuned model" in said and "assistant: goodbye!\n" in said
    lm = zenlm.load(out, device="cpu")
    app = create_app(lm.model, lm.tokenizer, model_id="chat", max_concurrency=2, model_kind=model_kind(saved))
    with ServerThread(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=30)
        got = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "bye"}],
                                             max_tokens=30, temperature=0)
        assert "chat-tuned model" in httpx.get(srv.url + "/").text
    assert (got.choices[0].message.content, got.choices[0].finish_reason) == ("goodbye!", "stop")


def test_int8_base_with_lora(tmp_path: Path, chat_base: Path, chats: Path) -> None:
    from zenlm.models.int8 import Int8Linear
    from zenlm.models.lora import LoRAConfig, TokenRows
    from zenlm.recipes.quantize import quantize_run

    int8 = quantize_run(chat_base, tmp_path / "int8").out
    with pytest.raises(ConfigError, match="int8 weights"):
        finetune_chat(int8, chats, tmp_path / "full", train=_train(1))
    out = tmp_path / "int8-lora"
    finetune_chat(int8, chats, out, lora=LoRAConfig(rank=2), train=_train(3))
    lm = zenlm.load(out, device="cpu")
    assert any(isinstance(m, Int8Linear) for m in lm.model.modules())
    assert isinstance(lm.model.tok_emb, TokenRows)  # an int8 base keeps its layers: the token rows stay beside
    ids = lm.tokenizer.encode(render_chat(lm.tokenizer, [{"role": "user", "content": "hi"}]), allow_special=True)
    assert len(list(generate_ids(lm.model, ids, GenerationConfig(max_new_tokens=3, temperature=0.0),
                                 eos_id=None))) == 3
    assert read_run_config(out)["lora"]["base"]["quantization"] == "int8-weight-only"


def test_chat_runs_export_and_are_refused_as_other_tasks(tmp_path: Path, chat_run: Path) -> None:
    from zenlm.convert.hf import export_hf

    hf = export_hf(chat_run, tmp_path / "hf")
    cfg = json.loads((hf / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == CHAT_TEMPLATE
    saved = yaml.safe_load((chat_run / "config.yaml").read_text())
    assert saved["objective"] == "chat"


def test_generation_marks_removed_for_llama_cpp_render_the_same_text() -> None:
    from zenlm.chat_template import without_generation_marks

    plain = without_generation_marks(CHAT_TEMPLATE)
    assert "{% generation" not in plain and "endgeneration" not in plain and plain.count("{% if true %}") == 1
    tokens = {"bos_token": "<|bos|>", "eos_token": "<|eos|>"}
    for gen in (False, True):
        ours = render_spans(compile_template(CHAT_TEMPLATE, 1 << 20), CONVERSATION, gen, tokens, 1 << 20)[0]
        assert render_spans(compile_template(plain, 1 << 20), CONVERSATION, gen, tokens, 1 << 20) == (ours, [])
    assert without_generation_marks("a{%- generation -%}b{%- endgeneration %}") == "a{%- if true -%}b{%- endif %}"

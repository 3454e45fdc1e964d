"""Scoring text through /v1/completions (echo + logprobs, max_tokens 0), batched prompts, long stop lists and
the tokenizer routes, driven by the official ``openai`` client (plain HTTP where it has no method)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

from zenlm.serve.app import ServerThread, create_app
from zenlm.serve.schema import MAX_STOP


def client(srv, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=30)


def reference_logprobs(lm, ids: list[int]) -> tuple[list[float], list[bool]]:
    """log p(ids[t] | ids[:t]) for t >= 1 from one plain forward pass, and whether ids[t] is the argmax."""
    with torch.no_grad():
        logprobs_TV = torch.log_softmax(lm.model(torch.tensor([ids]))[0, :-1].float(), -1)
    target = torch.tensor(ids[1:])
    lp = logprobs_TV.gather(-1, target[:, None])[:, 0]
    return lp.tolist(), (logprobs_TV.argmax(-1) == target).tolist()


def test_echo_with_logprobs_scores_the_prompt_then_the_completion(server, lm):
    c = client(server)
    # the model's own greedy continuation inside the prompt: its tokens are the argmax, the others are not
    prompt = "To be, or not" + c.completions.create(model="tiny", prompt="To be, or not", max_tokens=5,
                                                     temperature=0).choices[0].text
    ids = lm.tokenizer.encode(prompt)
    plain = c.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0, logprobs=2)
    r = c.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0, logprobs=2, echo=True)
    ch = r.choices[0]
    assert ch.text == prompt + plain.choices[0].text
    lp = ch.logprobs
    T = len(ids)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == T + 4
    assert lp.tokens[:T] == [lm.tokenizer.decode([i]) for i in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing comes before the first token
    want, greedy = reference_logprobs(lm, ids)
    assert lp.token_logprobs[1:T] == pytest.approx(want, abs=1e-5)
    for tlp, top, is_best in zip(lp.token_logprobs[1:T], lp.top_logprobs[1:T], greedy, strict=True):
        assert len(top) == 2
        assert (tlp == max(top.values())) == is_best  # exact: both read from one float32 tensor
    assert not all(greedy) and any(greedy)  # both cases were checked
    # the completion part is what the request without echo returns
    assert lp.tokens[T:] == plain.choices[0].logprobs.tokens
    assert lp.token_logprobs[T:] == pytest.approx(plain.choices[0].logprobs.token_logprobs, abs=1e-5)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(T + 4)]


def test_max_tokens_0_with_echo_scores_the_prompt_only(server, lm):
    c = client(server)
    tok = lm.tokenizer
    ids = [tok.eos_id, *tok.encode("whether 'tis nobler")]  # a special id opens it, as in rolling windows
    r = c.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=1)
    ch = r.choices[0]
    assert ch.finish_reason == "length" and r.usage.completion_tokens == 0
    assert r.usage.prompt_tokens == len(ids)
    assert ch.text == tok.decode(ids) and ch.logprobs.tokens[0] == "<|eos|>"
    assert ch.logprobs.token_logprobs[1:] == pytest.approx(reference_logprobs(lm, ids)[0], abs=1e-5)
    # a scored prompt may fill the whole context; one token more, or any generation, is refused
    n = server.app.state.engine.max_len
    full = [ids[1]] * n
    r = c.completions.create(model="tiny", prompt=full, max_tokens=0, echo=True, logprobs=0)
    assert len(r.choices[0].logprobs.token_logprobs) == n and r.choices[0].logprobs.top_logprobs[1] == {}
    for body in ({"prompt": full + [ids[1]], "max_tokens": 0}, {"prompt": full, "max_tokens": 1}):
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="tiny", echo=True, logprobs=1, **body)
        assert e.value.code == "context_length_exceeded"
    # echo without logprobs and max_tokens 0: the prompt back, no scores
    r = c.completions.create(model="tiny", prompt="To be", max_tokens=0, echo=True)
    assert r.choices[0].text == "To be" and r.choices[0].logprobs is None


def test_batched_prompts_give_one_choice_per_prompt_times_n_in_order(server, lm):
    c = client(server)
    engine = server.app.state.engine
    prompts = ["To be", "or not to be, that", "Q"]
    alone = [c.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0).choices[0].text
             for p in prompts]
    steps = engine.steps
    r = c.completions.create(model="tiny", prompt=prompts, max_tokens=12, temperature=0, n=2)
    # decoded together: 6 sequences in 4 slots take two rounds of batched steps, not one round per sequence
    assert engine.steps - steps <= 2 * 12 and engine.max_batch_seen == 4
    assert [ch.index for ch in r.choices] == list(range(6))
    assert [ch.text for ch in r.choices] == [t for t in alone for _ in range(2)]
    ids = [lm.tokenizer.encode(p) for p in prompts]
    assert r.usage.prompt_tokens == sum(map(len, ids)) and r.usage.completion_tokens == 6 * 12
    # token-id lists, as lm-eval sends a loglikelihood batch: echo, logprobs 1, one generated token each
    r = c.completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=1,
                             seed=1234)
    for ch, p in zip(r.choices, ids, strict=True):
        lp = ch.logprobs.token_logprobs
        assert len(lp) == len(p) + 1 and lp[1:-1] == pytest.approx(reference_logprobs(lm, p)[0], abs=1e-5)
    # streamed: each choice's echo chunk carries its prompt's scores, then its tokens follow
    chunks = list(c.completions.create(model="tiny", prompt=prompts, max_tokens=3, temperature=0, echo=True,
                                       logprobs=1, stream=True))
    for i, p in enumerate(prompts):
        mine = [ch.choices[0] for ch in chunks if ch.choices[0].index == i]
        assert "".join(x.text for x in mine) == p + alone[i][:3]
        assert mine[0].text == p and len(mine[0].logprobs.token_logprobs) == len(ids[i])


def test_batch_mistakes_are_400(server):
    url = server.url + "/v1/completions"
    engine = server.app.state.engine
    too_many = ["x"] * (engine.max_concurrency + engine.max_queue + 1)
    for prompt in ([], ["a", [1, 2]], [[1], []], [[1, True]], too_many):
        r = httpx.post(url, json={"model": "tiny", "prompt": prompt})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", (prompt, r.text)


def test_stop_takes_up_to_16_strings(server):
    c = client(server)
    kw = dict(model="tiny", prompt="To be", max_tokens=30, temperature=0)
    full = c.completions.create(**kw).choices[0].text
    stops = [f"zz{i}" for i in range(MAX_STOP - 1)] + [full[4:6]]
    assert MAX_STOP == 16
    r = c.completions.create(**kw, stop=stops)
    assert r.choices[0].text == full[: full.index(full[4:6])] and r.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(**kw, stop=stops + ["one more"])
    assert e.value.body["param"] == "stop"


def test_tokenize_detokenize_and_tokenizer_info(server, lm):
    url, tok = server.url, lm.tokenizer
    r = httpx.post(url + "/tokenize", json={"model": "tiny", "prompt": "To be<|eos|>",
                                           "add_special_tokens": False, "return_token_strs": True}).json()
    assert r["tokens"] == tok.encode("To be<|eos|>", allow_special=True) and r["tokens"][-1] == tok.eos_id
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == server.app.state.engine.max_len
    assert r["token_strs"][-1] == "<|eos|>"
    msgs = [{"role": "user", "content": "Hi"}]
    chat = httpx.post(url + "/tokenize", json={"messages": msgs}).json()["tokens"]
    assert tok.decode(chat).endswith("assistant:\n")
    assert httpx.post(url + "/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "To be<|eos|>"}
    info = httpx.get(url + "/tokenizer_info").json()
    assert info["eos_token"] == "<|eos|>" and info["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert info["eos_token_id"] == tok.eos_id and info["bos_token_id"] == tok.bos_id
    assert info["chat_template"] == tok.chat_template
    for path, body in (("/tokenize", {"prompt": 5}), ("/detokenize", {"tokens": [10**6]}),
                       ("/detokenize", {"tokens": "1 2"}), ("/tokenize", {"prompt": "x", "model": "other"})):
        resp = httpx.post(url + path, json=body)
        assert 400 <= resp.status_code < 500 and set(resp.json()["error"]) >= {"message", "param"}, resp.text
    # lm-eval's remote tokenizer finds these routes and reads them as it reads vLLM's
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    assert check_remote_tokenizer_support(url + "/v1/completions")
    remote = RemoteTokenizer(url + "/v1/completions")
    assert remote.eos_token_id == tok.eos_id and remote.encode("To be") == tok.encode("To be")
    assert remote.decode(tok.encode("中文 é")) == "中文 é"


def test_tokenizer_routes_need_the_api_key_when_one_is_set(lm):
    app = create_app(lm.model, lm.tokenizer, model_id="tiny", api_key="k3y", max_concurrency=1)
    with ServerThread(app) as srv:
        assert httpx.get(srv.url + "/tokenizer_info").status_code == 401
        assert httpx.post(srv.url + "/tokenize", json={"prompt": "x"}).status_code == 401
        ok = httpx.post(srv.url + "/tokenize", json={"prompt": "x"}, headers={"Authorization": "Bearer k3y"})
        assert ok.status_code == 200 and json.loads(ok.text)["count"] == 1

"""Whatever JSON a client sends, the request parsers answer with a typed request or a 4xx APIError."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from zenlm.serve.schema import (
    APIError,
    parse_chat,
    parse_completion,
    parse_detokenize,
    parse_embeddings,
    parse_json,
    parse_tokenize,
)

scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=8)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=6), inner, max_size=4), max_leaves=12)
FIELDS = ["model", "prompt", "messages", "input", "max_tokens", "max_completion_tokens", "temperature", "top_p",
          "top_k", "n", "stop", "seed", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty",
          "stream", "stream_options", "echo", "encoding_format"]
bodies = st.dictionaries(st.sampled_from(FIELDS), values, max_size=8)


@settings(max_examples=300, deadline=None)
@given(bodies)
def test_parsers_accept_or_raise_a_4xx(body):
    body.setdefault("model", "m")
    for parse in (parse_completion, parse_chat, parse_embeddings):
        try:
            req = parse(body)
        except APIError as e:
            assert 400 <= e.status < 500 and e.message
            assert e.body()["error"]["type"] == "invalid_request_error"
            continue
        if parse is parse_embeddings:
            assert req.inputs and req.encoding_format in ("float", "base64")
            continue
        p = req.params
        assert p.max_tokens >= 0 and 0 <= p.temperature <= 2 and 0 < p.top_p <= 1 and 1 <= req.n <= 16
        assert all(isinstance(s, str) and s for s in p.stop)


@given(st.binary(max_size=40))
def test_any_bytes_are_json_object_or_400(raw):
    try:
        body = parse_json(raw)
    except APIError as e:
        assert e.status == 400
    else:
        assert isinstance(body, dict) and body == json.loads(raw)


TOKENIZER_FIELDS = ["model", "prompt", "messages", "tokens", "add_special_tokens", "return_token_strs",
                    "add_generation_prompt"]


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(TOKENIZER_FIELDS), values, max_size=5))
def test_tokenizer_route_parsers_accept_or_raise_a_4xx(body):
    try:
        req = parse_tokenize(body)
    except APIError as e:
        assert 400 <= e.status < 500 and e.message
    else:
        assert isinstance(req.prompt, str) and (req.messages is None or req.messages)
    try:
        detok = parse_detokenize(body, vocab_size=50)
    except APIError as e:
        assert 400 <= e.status < 500 and e.message
    else:
        assert all(isinstance(i, int) and 0 <= i < 50 for i in detok.tokens)


@given(st.lists(st.one_of(st.text(max_size=5), st.lists(st.integers(0, 99), max_size=4)), max_size=4))
def test_batched_prompts_are_all_texts_or_all_id_lists(prompt):
    try:
        req = parse_completion({"model": "m", "prompt": prompt})
    except APIError as e:
        assert e.status == 400 and e.param == "prompt"
    else:
        kinds = {type(p) for p in req.prompts}
        assert len(req.prompts) >= 1 and len(kinds) == 1
        assert all(p for p in req.prompts if isinstance(p, list))  # no empty id list


def test_an_integer_out_of_range_says_the_range_in_words():
    def message(body):
        try:
            parse_completion({"model": "m", "prompt": "hi", **body})
        except APIError as e:
            return e.message, e.body()["error"]["param"]
        raise AssertionError(f"{body} was accepted")

    assert message({"max_tokens": -3}) == ("'max_tokens' must be >= 0, got -3.", "max_tokens")
    assert message({"n": 17})[0] == "'n' must be in 1..16, got 17."

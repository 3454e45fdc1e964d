"""Whatever JSON a client sends, the request parsers answer with a typed request or a 4xx APIError."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from zenlm.serve.schema import APIError, parse_chat, parse_completion, parse_embeddings, parse_json

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

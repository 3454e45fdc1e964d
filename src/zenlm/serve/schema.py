"""Request validation for the OpenAI-compatible routes: JSON body -> typed request, or a 4xx APIError.

Every client mistake becomes ``APIError(status, message, param, code)``, which the app turns into the
OpenAI error body ``{"error": {"message", "type", "param", "code"}}``. Validation is written out by hand
(no schema library) so each message names the field and says what is allowed.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from zenlm.sampling import SEED_LIMIT
from zenlm.serve.engine import SamplingParams

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "server_error"}
# The roles a chat message may have (OpenAI's; "developer" is its newer name for "system"). The role is
# rendered into the prompt by the chat template, so an unknown one is refused rather than passed through.
ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP = 16  # stop strings per request (OpenAI allows 4; lm-eval adds end-of-text to a task's own list)


class APIError(Exception):
    """A request the server answers with ``status`` and the OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


# A JSON string escape of a UTF-16 surrogate (\ud800-\udfff). Raw UTF-8 cannot hold one (the decoder refuses
# it), so only such an escape can put a lone surrogate into a parsed string.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


# Arrays and objects inside each other a request may have (OpenAI requests nest a handful deep; a tool's JSON
# schema a few more). Deeper bodies are refused before they are parsed: how deep Python's parser goes depends on
# the process's recursion limit, which compiling a model in the same process raises.
MAX_JSON_DEPTH = 128
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_BRACKETS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[{]}")


def _too_deep(raw: bytes) -> bool:
    """Whether ``raw`` nests arrays and objects more than MAX_JSON_DEPTH deep (brackets inside strings do not
    count). Bodies with fewer brackets than that in all are not looked at further."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return False
    steps = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKET).translate(_BRACKETS)
    if not steps:
        return False
    depth = torch.frombuffer(bytearray(steps), dtype=torch.int8).to(torch.int32).cumsum(0)  # summed in C
    return int(depth.max()) > MAX_JSON_DEPTH


def parse_json(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object (400 when it is not one, or nests too deeply to parse).

    Lone surrogates (``"\\ud800"`` without its pair) have no UTF-8 form: the tokenizer reads each as U+FFFD,
    and so does everything else here (they are replaced in every string of the body), so an echoed prompt or
    a model name in an error message can always be sent back."""
    if _too_deep(raw):
        raise APIError(400, f"the request body nests JSON arrays or objects more than {MAX_JSON_DEPTH} deep.",
                       code="invalid_json")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e}).", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body nests JSON arrays or objects too deeply.",
                       code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object.", code="invalid_json")
    if _SURROGATE_ESCAPE.search(raw):
        body = _replace_lone_surrogates(body)
    return body


def _replace_lone_surrogates(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` with every lone surrogate in its strings (keys too) replaced by U+FFFD (in place, iteratively,
    so any depth json.loads accepted is fine)."""
    def clean(v: Any) -> Any:
        if isinstance(v, str):
            return _SURROGATE.sub("\ufffd", v)
        if isinstance(v, (list, dict)):
            todo.append(v)
        return v

    todo: list[Any] = [body]
    while todo:
        node = todo.pop()
        if isinstance(node, list):
            node[:] = [clean(v) for v in node]
        else:
            items = [(clean(k), clean(v)) for k, v in node.items()]
            node.clear()
            node.update(items)
    return body


def _preview(v: Any) -> str:
    """At most about 80 characters showing what a client sent (a long list is not serialised whole)."""
    if isinstance(v, (list, dict)) and len(v) > 8:
        return f"a {type(v).__name__} of {len(v)} items"
    if isinstance(v, str) and len(v) > 80:
        v = v[:80]
    try:
        return json.dumps(v)[:80]
    except (ValueError, RecursionError):
        return type(v).__name__


def _type_error(name: str, want: str, got: Any) -> APIError:
    return APIError(400, f"'{name}' must be {want}, got {_preview(got)}.", param=name, code="invalid_type")


def _int(body: dict, name: str, default: int | None, lo: int | None = None, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise _type_error(name, "an integer", v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        if lo is None:
            rng = f"<= {hi}"
        else:
            rng = f"in {lo}..{hi}" if hi is not None else f">= {lo}"
        raise APIError(400, f"'{name}' must be {rng}, got {v}.", param=name, code="invalid_value")
    return v


def _float(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _type_error(name, "a number", v)
    if not lo <= v <= hi:
        raise APIError(400, f"'{name}' must be between {lo:g} and {hi:g}, got {v}.", param=name,
                       code="invalid_value")
    return float(v)


def _bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _type_error(name, "true or false", v)
    return v


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v) or len(v) > MAX_STOP:
        raise _type_error("stop", f"a string or a list of up to {MAX_STOP} strings", v)
    return [s for s in v if s]


def _model(body: dict) -> str:
    v = body.get("model")
    if not isinstance(v, str) or not v:
        raise APIError(400, "'model' is required: the id from GET /v1/models.", param="model",
                       code="missing_required_parameter" if v is None else "invalid_type")
    return v


def _stream_options(body: dict) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise _type_error("stream_options", "an object", opts)
    if not _bool(body, "stream", False):
        raise APIError(400, "'stream_options' is only allowed when 'stream' is true.", param="stream_options",
                       code="invalid_value")
    return _bool(opts, "include_usage", False)


@dataclass
class GenerationRequest:
    """What /v1/completions and /v1/chat/completions share."""

    model: str
    params: SamplingParams
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    prompts: list[str | list[int]] = field(default_factory=list)  # completions: texts or token-id lists
    messages: list[dict[str, str]] = field(default_factory=list)  # chat


def _common(body: dict, *, chat: bool, default_max_tokens: int) -> GenerationRequest:
    model = _model(body)
    max_tokens = _int(body, "max_tokens", None, 0)
    if chat:
        mct = _int(body, "max_completion_tokens", None, 0)
        max_tokens = mct if mct is not None else max_tokens
    params = SamplingParams(
        max_tokens=default_max_tokens if max_tokens is None else max_tokens,
        temperature=_float(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_float(body, "top_p", 1.0, 0.0, 1.0) or 1e-9,
        top_k=_int(body, "top_k", None, 1),
        stop=_stop(body),
        seed=_int(body, "seed", None, 0, SEED_LIMIT - 1),
        presence_penalty=_float(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_float(body, "frequency_penalty", 0.0, -2.0, 2.0),
    )
    n = _int(body, "n", 1, 1, 16)
    assert n is not None
    stream = _bool(body, "stream", False)
    return GenerationRequest(model=model, params=params, n=n, stream=stream, include_usage=_stream_options(body))


def _is_ids(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)


def parse_completion(body: dict, default_max_tokens: int = 16) -> GenerationRequest:
    """POST /v1/completions: prompt, echo, logprobs 0..5.

    The prompt is a string, a list of token ids, or a batch: a list of strings or a list of token-id lists
    (one choice per prompt, times n). With echo and logprobs the prompt's own tokens are scored too.
    """
    req = _common(body, chat=False, default_max_tokens=default_max_tokens)
    prompt = body.get("prompt")
    if isinstance(prompt, str) or _is_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and (all(isinstance(p, str) for p in prompt)
                                                  or all(_is_ids(p) for p in prompt)):
        prompts = list(prompt)
    elif prompt is None:
        raise APIError(400, "'prompt' is required.", param="prompt", code="missing_required_parameter")
    else:
        raise _type_error("prompt", "a string, a list of token ids, a list of strings or a list of token-id "
                          "lists", prompt)
    req.prompts = [p if isinstance(p, str) else [int(i) for i in p] for p in prompts]
    req.echo = _bool(body, "echo", False)
    req.params.logprobs = _int(body, "logprobs", None, 0, 5)
    if req.echo and req.params.logprobs is not None:  # echo scores the prompt too
        req.params.prompt_logprobs = req.params.logprobs
    return req


def parse_chat(body: dict, default_max_tokens: int = 256) -> GenerationRequest:
    """POST /v1/chat/completions: messages [{role, content}], logprobs (bool) + top_logprobs 0..20."""
    req = _common(body, chat=True, default_max_tokens=default_max_tokens)
    req.messages = _messages(body)
    top = _int(body, "top_logprobs", None, 0, 20)
    if _bool(body, "logprobs", False):
        req.params.logprobs = top or 0
    elif top is not None:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true.", param="top_logprobs", code="invalid_value")
    return req


def _messages(body: dict) -> list[dict[str, str]]:
    """``messages``: a non-empty list of {role, content} (content: a string or a list of text parts)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _type_error("messages", "a non-empty list of {role, content} objects", messages)
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _type_error(f"messages[{i}]", "an object with a string 'role'", m)
        if m["role"] not in ROLES:
            raise APIError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, got {_preview(m['role'])}.",
                           param=f"messages[{i}].role", code="invalid_value")
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _type_error(f"messages[{i}].content", "a string or a list of text parts", content)
            content = "".join(p["text"] for p in content)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise _type_error(f"messages[{i}].content", "a string", content)
        out.append({"role": m["role"], "content": content})
    return out


@dataclass
class EmbeddingRequest:
    model: str
    inputs: list[str | list[int]]
    encoding_format: str = "float"


def parse_embeddings(body: dict) -> EmbeddingRequest:
    """POST /v1/embeddings: input (string, list of strings, token ids, list of token id lists)."""
    model = _model(body)
    inp = body.get("input")
    if isinstance(inp, str):
        inputs: list[str | list[int]] = [inp]
    elif isinstance(inp, list) and inp and all(isinstance(i, int) and not isinstance(i, bool) for i in inp):
        inputs = [list(inp)]
    elif isinstance(inp, list) and inp and all(isinstance(x, str) or _is_ids(x) for x in inp):
        inputs = list(inp)
    else:
        raise _type_error("input", "a string, a list of strings, or token ids", inp)
    if any(isinstance(x, str) and not x for x in inputs):
        raise APIError(400, "'input' must not contain empty strings.", param="input", code="invalid_value")
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise APIError(400, f"'encoding_format' must be 'float' or 'base64', got {_preview(fmt)}.",
                       param="encoding_format", code="invalid_value")
    return EmbeddingRequest(model, inputs, fmt)


@dataclass
class TokenizeRequest:
    model: str | None
    prompt: str = ""
    messages: list[dict[str, str]] | None = None  # chat messages to render with the chat template instead
    add_generation_prompt: bool = True
    return_token_strs: bool = False


def _optional_model(body: dict) -> str | None:
    return None if body.get("model") is None else _model(body)


def parse_tokenize(body: dict) -> TokenizeRequest:
    """POST /tokenize: {prompt} or {messages, add_generation_prompt}, with add_special_tokens and
    return_token_strs."""
    req = TokenizeRequest(_optional_model(body),
                          add_generation_prompt=_bool(body, "add_generation_prompt", True),
                          return_token_strs=_bool(body, "return_token_strs", False))
    _bool(body, "add_special_tokens", True)  # accepted; zenlm tokenizers add no special tokens around a text
    if "messages" in body:
        req.messages = _messages(body)
    elif isinstance(body.get("prompt"), str):
        req.prompt = body["prompt"]
    else:
        raise _type_error("prompt", "a string (or send 'messages')", body.get("prompt"))
    return req


@dataclass
class DetokenizeRequest:
    model: str | None
    tokens: list[int]


def parse_detokenize(body: dict, vocab_size: int) -> DetokenizeRequest:
    """POST /detokenize: {tokens: [ids]} with every id in 0..vocab_size-1."""
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not (tokens == [] or _is_ids(tokens)):
        raise _type_error("tokens", "a list of token ids", tokens)
    if any(not 0 <= i < vocab_size for i in tokens):
        raise APIError(400, f"token ids must be in 0..{vocab_size - 1}.", param="tokens",
                       code="invalid_value")
    return DetokenizeRequest(_optional_model(body), list(tokens))

"""Hostile and careless clients against a real server: every client mistake is a 4xx, nothing one client
sends disturbs another, and the server stays within its limits (body size, connections, time).

One in-process server serves the module; the tests that need their own process (file-descriptor limits,
signals) start ``zenlm serve`` in a subprocess.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

import zenlm
from zenlm.cli import main
from zenlm.cli.serve import served_run
from zenlm.errors import ConfigError, DataError
from zenlm.generate import GenerationConfig, generate_ids
from zenlm.serve.app import ServerThread, create_app
from zenlm.serve.chat import KIND_LABELS, model_kind
from zenlm.serve.engine import Engine, ErrorEvent, FinishEvent, SamplingParams, Sequence, TokenEvent
from zenlm.serve.server import Limits
from zenlm.tokenizer import render_chat

FIXTURE_GPT = Path(__file__).resolve().parents[1] / "fixtures" / "runs" / "gpt"


@pytest.fixture(scope="module")
def fault_lm(tmp_path_factory: pytest.TempPathFactory, run_factory):
    return zenlm.load(run_factory(tmp_path_factory.mktemp("faults") / "tiny", block_size=128), device="cpu")


@pytest.fixture(scope="module")
def srv(fault_lm):
    """The module's server: model id 'tiny', 2 slots + 2 queue places."""
    app = create_app(fault_lm.model, fault_lm.tokenizer, model_id="tiny", max_concurrency=2, max_queue=2)
    with ServerThread(app) as s:
        s.app = app
        yield s


def _post(srv, path: str, body: object, **kw) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, **{"timeout": 30, **kw})


def _greedy(lm, prompt: str, n: int) -> str:
    ids = generate_ids(lm.model, lm.tokenizer.encode(prompt), GenerationConfig(max_new_tokens=n, temperature=0),
                       eos_id=lm.tokenizer.eos_id)
    return lm.tokenizer.decode(list(ids))


# ------------------------------------------------------------------ 1. one request must not abort the others


def test_engine_fails_only_the_sequence_whose_step_raised(fault_lm):
    """Receivers that raise on their first token (inside the batched prefill they share with the others) or on
    their third (inside a decode step) end their own sequences; the sequences decoded beside them, one with a
    temperature that overflows the logits, finish with the greedy tokens. A seed torch cannot take is refused
    when submitted, before it reaches the loop."""
    engine = Engine(fault_lm.model, fault_lm.tokenizer, max_concurrency=4)
    events: dict[str, list] = {"good": [], "first": [], "third": [], "tiny": [], "after": []}
    done = threading.Semaphore(0)

    def emit_to(name: str, fail_at: int = 0):
        def emit(ev) -> None:
            events[name].append(ev)
            if isinstance(ev, (FinishEvent, ErrorEvent)):
                done.release()
            if isinstance(ev, TokenEvent) and len(events[name]) == fail_at:
                raise RuntimeError("the receiver broke")
        return emit

    prompt = fault_lm.tokenizer.encode("To be, or not")
    try:
        with pytest.raises(ConfigError, match="seed"):
            engine.submit([Sequence(prompt, SamplingParams(max_tokens=30, seed=2**70), emit_to("after"))])
        engine.submit([Sequence(prompt, SamplingParams(max_tokens=30, temperature=0), emit_to("good")),
                       Sequence(prompt, SamplingParams(max_tokens=30, temperature=0), emit_to("first", 1)),
                       Sequence(prompt, SamplingParams(max_tokens=30, temperature=0), emit_to("third", 3)),
                       Sequence(prompt, SamplingParams(max_tokens=30, temperature=1e-40), emit_to("tiny"))])
        for _ in range(4):
            assert done.acquire(timeout=60)
        engine.submit([Sequence(prompt, SamplingParams(max_tokens=5, temperature=0), emit_to("after"))])
        assert done.acquire(timeout=60)
    finally:
        engine.close()
    assert isinstance(events["first"][-1], ErrorEvent) and len(events["first"]) == 2
    assert isinstance(events["third"][-1], ErrorEvent) and len(events["third"]) == 4
    want = list(generate_ids(fault_lm.model, prompt, GenerationConfig(max_new_tokens=30, temperature=0)))
    for name in ("good", "tiny"):
        assert isinstance(events[name][-1], FinishEvent), events[name][-1]
        assert [ev.token_id for ev in events[name] if isinstance(ev, TokenEvent)] == want
    assert isinstance(events["after"][-1], FinishEvent)
    assert engine.running == 0


@pytest.mark.parametrize("seed", [-1, 2**64, 2**70, 1.5, True])
def test_seed_outside_0_to_2_pow_64_is_a_400(srv, seed):
    r = _post(srv, "/v1/completions", {"model": "tiny", "prompt": "To be", "max_tokens": 2, "seed": seed})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "seed"


def test_largest_seed_and_n_choices_past_it_work(srv):
    r = _post(srv, "/v1/completions", {"model": "tiny", "prompt": "To be", "max_tokens": 3, "seed": 2**64 - 1,
                                       "n": 2})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 2


@pytest.mark.parametrize("temperature", [1e-40, 5e-324])
def test_tiny_temperature_is_greedy(srv, fault_lm, temperature):
    """A temperature so small that dividing the logits by it overflows float32 decodes greedily: the limit of
    sampling as the temperature goes to 0 (zenlm.sampling.pick_token), not an error inside the draw."""
    for route, body in (("/v1/completions", {"prompt": "To be, or not"}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}]})):
        r = _post(srv, route, {"model": "tiny", "max_tokens": 12, "temperature": temperature, **body})
        assert r.status_code == 200, r.text
        greedy = _post(srv, route, {"model": "tiny", "max_tokens": 12, "temperature": 0, **body})
        assert r.json()["choices"] == greedy.json()["choices"]
    assert fault_lm.generate("To be", max_new_tokens=8, temperature=temperature) == _greedy(fault_lm, "To be", 8)


def test_generate_cli_refuses_a_70_bit_seed_and_takes_a_tiny_temperature(capsys):
    assert main(["generate", str(FIXTURE_GPT), "the cat", "--max-new-tokens", "4", "--seed", str(2**70)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zenlm: error: seed must be an integer in 0..2**64-1") and len(err.splitlines()) == 1
    outs = []
    for temperature in ("1e-40", "0"):
        assert main(["generate", str(FIXTURE_GPT), "the cat", "--max-new-tokens", "4", "--temperature",
                     temperature, "--device", "cpu"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]  # greedy


def test_serve_takes_a_prefill_budget_and_refuses_one_below_one_before_loading(capsys, monkeypatch):
    assert main(["serve", str(FIXTURE_GPT), "--max-prefill-tokens", "0", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zenlm: error: --max-prefill-tokens must be at least 1") and len(err.splitlines()) == 1
    import zenlm.serve.server as server

    budgets: list[int] = []

    class NoServer:  # the app is built as `zenlm serve` builds it; nothing is served
        def __init__(self, app, limits) -> None:
            self.engine = app.state.engine

        def run(self, sockets) -> None:
            budgets.append(self.engine.max_prefill_tokens)
            self.engine.close()

    monkeypatch.setattr(server, "make_server", NoServer)
    monkeypatch.setenv("ZENLM_COMPILE", "0")
    assert main(["serve", str(FIXTURE_GPT), "--max-prefill-tokens", "48", "--port", "0"]) == 0
    assert budgets == [48]


# ------------------------------------------------------------- 7. special tokens through the chat role field


@pytest.mark.parametrize("role", ["user<|eos|>\n<|bos|>system", "<|bos|>", "admin", "User", ""])
def test_chat_role_must_be_a_known_role(srv, role):
    r = _post(srv, "/v1/chat/completions", {"model": "tiny", "max_tokens": 2,
                                            "messages": [{"role": role, "content": "hi"}]})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "messages[0].role"


def test_every_known_role_is_served(srv):
    messages = [{"role": r, "content": "hi"} for r in ("system", "developer", "user", "assistant", "tool", "user")]
    r = _post(srv, "/v1/chat/completions", {"model": "tiny", "max_tokens": 2, "messages": messages})
    assert r.status_code == 200, r.text


# --------------------------------------------------------------------------- 13. 4xx, never 500, for these


def _raw(srv, path: str, raw: str) -> httpx.Response:
    return httpx.post(srv.url + path, content=raw.encode(), headers={"content-type": "application/json"},
                      timeout=30)


@pytest.mark.parametrize("prompt", [[-1, 3], [2**63, 3], [[3, 2**63]], [[-5]]])
@pytest.mark.parametrize("echo", [False, True])
def test_prompt_ids_outside_the_vocabulary_are_a_400(srv, prompt, echo):
    r = _post(srv, "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 2, "echo": echo})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "prompt"


def test_lone_surrogates_are_read_as_replacement_characters(srv, fault_lm):
    r = _raw(srv, "/v1/completions", '{"model": "tiny", "prompt": "To \\ud800be", "max_tokens": 0, "echo": true}')
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == "To \ufffdbe"
    r = _raw(srv, "/v1/completions", '{"model": "ti\\udfffny", "prompt": "To be", "max_tokens": 1}')
    assert r.status_code == 404 and "ti\ufffdny" in r.json()["error"]["message"]
    r = _raw(srv, "/v1/chat/completions",
             '{"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": "a\\udc00"}]}')
    assert r.status_code == 200, r.text
    r = _raw(srv, "/v1/completions", '{"model": "tiny", "prompt": "To be", "max_tokens": 1, "stop": ["\\ud800"]}')
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_deeply_nested_json_is_a_400(srv, depth):
    r = _raw(srv, "/v1/completions", '{"model": "tiny", "prompt": ' + "[" * depth + "]" * depth + "}")
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_json"


def test_the_nesting_limit_does_not_depend_on_the_recursion_limit():
    """Compiling a model in the server's process (Inductor) raises Python's recursion limit, which let a body
    nested 1,000 deep through the parser; the limit is now MAX_JSON_DEPTH either way, strings aside."""
    import sys

    from zenlm.serve.schema import MAX_JSON_DEPTH, APIError, parse_json

    def nested(depth: int) -> bytes:  # the body's object, then depth - 1 arrays
        arrays = depth - 1
        return ('{"prompt": ' + "[" * arrays + "]" * arrays + ', "stop": "' + "[" * 500 + '"}').encode()

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(5000)
    try:
        assert parse_json(nested(MAX_JSON_DEPTH))["stop"] == "[" * 500
        with pytest.raises(APIError, match=f"more than {MAX_JSON_DEPTH} deep") as e:
            parse_json(nested(MAX_JSON_DEPTH + 1))
    finally:
        sys.setrecursionlimit(limit)
    assert e.value.status == 400 and e.value.code == "invalid_json"


@pytest.mark.parametrize("inp", [[[True, False]], [[1, True]], [True], [[]], [[1.0]]])
def test_embedding_ids_must_be_integers(srv, inp):
    r = _post(srv, "/v1/embeddings", {"model": "tiny", "input": inp})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "input"


def test_a_long_wrong_value_is_not_echoed_whole(srv):
    r = _post(srv, "/v1/embeddings", {"model": "tiny", "input": [{"x": 1}] * 100_000})
    assert r.status_code == 400 and len(r.text) < 400, r.text


# ---------------------------------------------------- 21. a request that can never fit is a 400, not a 429


@pytest.mark.parametrize(("route", "body"), [
    ("/v1/completions", {"prompt": "To be", "n": 5}),
    ("/v1/completions", {"prompt": ["a", "b", "c"], "n": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 5}),
])
def test_more_sequences_than_the_server_holds_is_a_400_naming_the_limit(srv, route, body):
    r = _post(srv, route, {"model": "tiny", "max_tokens": 2, **body})  # the server holds 2 + 2
    assert r.status_code == 400, r.text
    assert "--max-concurrency + --max-queue" in r.json()["error"]["message"]
    r = _post(srv, route, {"model": "tiny", "max_tokens": 2, **body, "n": 1})
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------------ 23. /metrics follows the API key


@pytest.mark.parametrize("public", [False, True])
def test_metrics_need_the_api_key_unless_public(fault_lm, public):
    app = create_app(fault_lm.model, fault_lm.tokenizer, model_id="tiny", api_key="sesame", public_metrics=public)
    with ServerThread(app) as s:
        anonymous = httpx.get(s.url + "/metrics", timeout=10)
        keyed = httpx.get(s.url + "/metrics", headers={"Authorization": "Bearer sesame"}, timeout=10)
        health = httpx.get(s.url + "/health", timeout=10)
    assert anonymous.status_code == (200 if public else 401)
    assert keyed.status_code == 200 and "zenlm_requests_total" in keyed.text
    assert health.status_code == 200


# ------------------------------------------------- 3. request size: 413 before reading, tokenising off the loop


@pytest.fixture(scope="module")
def small_srv(fault_lm):
    """A server that takes bodies of at most 64 KiB and gives a client 2 s to send one."""
    app = create_app(fault_lm.model, fault_lm.tokenizer, model_id="tiny",
                     limits=Limits(max_request_bytes=64 << 10, request_timeout=2))
    with ServerThread(app) as s:
        yield s


def _send_raw(srv, data: bytes, read: bool = True, timeout: float = 10) -> bytes:
    with socket.create_connection((srv.host, srv.port), timeout=timeout) as sock:
        sock.sendall(data)
        if not read:
            return b""
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


def test_a_body_declared_too_large_is_a_413_before_it_is_read(small_srv):
    t0 = time.monotonic()
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000000\r\n\r\n")  # 100 MB announced, none sent
    answer = _send_raw(small_srv, head + b'{"model": "tiny", "prompt": "')
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"--max-request-bytes" in answer
    assert time.monotonic() - t0 < 1.5  # answered at once, not after the 2 s body timeout


def test_a_chunked_body_is_cut_off_at_the_limit(small_srv):
    def chunks():
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(100):
            yield b"a" * 4096
        yield b'"}'

    r = httpx.post(small_srv.url + "/v1/completions", content=chunks(), timeout=30)
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "request_too_large"


def test_a_body_that_does_not_arrive_in_time_is_a_408(small_srv):
    t0 = time.monotonic()
    answer = _send_raw(small_srv, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert 1.5 < time.monotonic() - t0 < 8


def test_a_prompt_certainly_longer_than_the_context_is_refused_before_tokenising(srv, fault_lm, monkeypatch):
    calls = []
    monkeypatch.setattr(fault_lm.tokenizer, "encode", lambda *a, **k: calls.append(a) or [])
    for route, body in (("/v1/completions", {"prompt": "x" * 200_000}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 200_000}]})):
        r = _post(srv, route, {"model": "tiny", "max_tokens": 1, **body})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "context_length_exceeded"
    assert calls == []


def test_min_tokens_is_a_lower_bound(bpe_tok, char_tok, wordpiece_tok):
    texts = ["", "hello world", "x" * 5000, "中文文本，人民日报。" * 50, "😀" * 100, "e\u0301" * 200, " " * 300,
             "<|bos|>user: hi<|eos|>\n" * 30]
    for tok in (bpe_tok, char_tok):
        for t in texts:
            assert tok.min_tokens(t) <= len(tok.encode(t)), (tok, t[:20])
            assert tok.min_tokens(t) <= len(tok.encode(t, allow_special=True))
        assert tok.min_tokens("ab" * 10_000) > 1000  # a real bound, not 0
    assert wordpiece_tok.min_tokens(" " * 10_000) == 0  # drops whitespace: no bound


def test_tokenising_runs_off_the_event_loop(srv, fault_lm, monkeypatch):
    """While a request's prompt is being tokenised, /health answers at once."""
    real = fault_lm.tokenizer.encode

    def slow(*a, **k):
        time.sleep(1.0)
        return real(*a, **k)

    monkeypatch.setattr(fault_lm.tokenizer, "encode", slow)
    for route, body in (("/v1/completions", {"prompt": "To be"}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "To be"}]}),
                        ("/v1/embeddings", {"input": "To be"}), ("/tokenize", {"prompt": "To be"})):
        t = threading.Thread(target=_post, args=(srv, route, {"model": "tiny", "max_tokens": 1, **body}))
        t.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
        assert time.monotonic() - t0 < 0.6, route  # well before the tokenizer is done
        t.join()


# ------------------------------------------------------- 11. embeddings: capped, and interleaved with decoding


def test_embedding_inputs_are_capped_at_2048(srv):
    r = _post(srv, "/v1/embeddings", {"model": "tiny", "input": ["a"] * 2049})
    assert r.status_code == 400 and "--max-embedding-inputs" in r.json()["error"]["message"], r.text
    r = _post(srv, "/v1/embeddings", {"model": "tiny", "input": ["a"] * 2048, "encoding_format": "base64"})
    assert r.status_code == 200 and len(r.json()["data"]) == 2048
    r = _post(srv, "/v1/embeddings", {"model": "tiny", "input": ["a" * 129]})  # the context is 128
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_embeddings_are_interleaved_with_decoding(srv, fault_lm):
    """A stream keeps receiving tokens while a large embedding request is being computed."""
    arrivals: list[float] = []
    span: list[float] = []
    first = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=60,
                          json={"model": "tiny", "prompt": "T", "max_tokens": 120, "temperature": 0,
                                "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    arrivals.append(time.monotonic())
                    first.set()

    t = threading.Thread(target=stream)
    t.start()
    assert first.wait(30)
    span.append(time.monotonic())
    r = _post(srv, "/v1/embeddings", {"model": "tiny", "input": ["To be, or not to be. " * 6] * 400},
              timeout=120)
    span.append(time.monotonic())
    t.join()
    assert r.status_code == 200, r.text
    during = [a for a in arrivals if span[0] < a < span[1]]
    assert len(during) >= 20, (len(during), len(arrivals), span[1] - span[0])


# ---------------------------------------- 4 and 14. idle connections, file descriptors, SIGTERM, disconnects


class _Served:
    """``zenlm serve`` in a subprocess (on a free port), its stderr collected in a file."""

    def __init__(self, run: Path, log: Path, *flags: str, nofile: int | None = None) -> None:
        def limit() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.log = log
        self.out = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "zenlm", "serve", str(run), "--port", "0", *flags],
                                     stdout=self.out, stderr=self.out, preexec_fn=limit,
                                     env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        deadline = time.monotonic() + 60
        while not (m := re.search(r"serving \S+ on http://([\d.]+):(\d+)/", log.read_text(errors="replace"))):
            assert self.proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.1)
        self.host, self.port = m.group(1), int(m.group(2))
        self.url = f"http://{self.host}:{self.port}"

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.out.close()
        return self.proc.returncode


def _half_sent(srv, data: bytes) -> socket.socket:
    sock = socket.create_connection((srv.host, srv.port), timeout=10)
    sock.sendall(data)
    return sock


def test_idle_half_sent_connections_cannot_exhaust_file_descriptors(tmp_path):
    """1,100 clients each send half a request line and wait, against a process allowed 256 descriptors:
    the server answers 503 past its connection limit, closes the idle ones after --request-timeout, serves
    again, and logs a few lines rather than a traceback per failed accept."""
    srv = _Served(FIXTURE_GPT, tmp_path / "serve.log", "--request-timeout", "1", nofile=256)
    socks = []
    try:
        for _ in range(1100):
            try:
                socks.append(_half_sent(srv, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"))
            except OSError:  # the server closed this one before it was written to
                pass
        time.sleep(1.5)  # > --request-timeout: the server closes the half-sent ones
        deadline, status = time.monotonic() + 20, None
        while status != 200 and time.monotonic() < deadline:  # (a loaded machine accepts them late)
            with contextlib.suppress(httpx.HTTPError):
                status = httpx.get(srv.url + "/health", timeout=5).status_code
            time.sleep(0.2)
        assert status == 200, srv.log.read_text(errors="replace")[-2000:]
        assert srv.proc.poll() is None
    finally:
        for s in socks:
            s.close()
        srv.stop()
    log = srv.log.read_text(errors="replace")
    assert "Traceback" not in log
    assert len(log) < 5000, log[-2000:]


def test_a_client_that_disconnects_is_not_a_500_nor_a_traceback(srv, caplog):
    # the body stops half-way; a stream is dropped after its first chunk; a plain request is dropped waiting
    _send_raw(srv, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"model\"", read=False)
    with httpx.stream("POST", srv.url + "/v1/completions", timeout=30,
                      json={"model": "tiny", "prompt": "To be", "max_tokens": 100, "stream": True}) as r:
        next(r.iter_lines())
    with contextlib.suppress(httpx.ReadTimeout):
        _post(srv, "/v1/completions", {"model": "tiny", "prompt": "To be", "max_tokens": 120, "n": 2}, timeout=0.05)
    time.sleep(1.5)
    assert 'code="500"' not in httpx.get(srv.url + "/metrics", timeout=10).text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_a_server_leaves_the_process_logging_alone(fault_lm, capsys):
    """A server started in a process that has its own logging (a notebook, an application, a test with its
    output captured) neither closes nor replaces its handlers. uvicorn's default logging setup closes every
    handler of the process; a handler such as absl's, which closes its stream unless it is the current
    sys.stderr, then closed a file that was still in use (under pytest: the capture file of every later test)."""

    class Recording(logging.StreamHandler):
        closed_times = 0

        def close(self) -> None:
            Recording.closed_times += 1
            super().close()

    handler = Recording(io.StringIO())
    log = logging.getLogger("zenlm.tests.host")
    log.addHandler(handler)
    root_handlers = list(logging.getLogger().handlers)
    try:
        app = create_app(fault_lm.model, fault_lm.tokenizer, model_id="tiny", max_concurrency=1, max_queue=1)
        with ServerThread(app) as s:
            assert httpx.get(s.url + "/v1/models", timeout=10).status_code == 200
        assert Recording.closed_times == 0
        assert log.handlers == [handler] and logging.getLogger().handlers == root_handlers
        log.warning("still here")
        assert handler.stream.getvalue() == "still here\n"
        print("captured")
        assert capsys.readouterr().out == "captured\n"
    finally:
        log.removeHandler(handler)


# ------------------------------------------------------------- 22. a hostile chat template is bounded


HOSTILE_TEMPLATES = {
    "nested loops": "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    "repeat": "{{ 'x' * 10**10 }}",
    "power": "{{ 10 ** (10 ** 10) }}",
    "format width": "{{ '%10000000000s' % 'x' }}",
    "filter width": "{{ 'x' | center(10**10) }}",
    "growing output": "{% for a in range(100000) %}{{ 'y' * 100000 }}{% endfor %}",
}


def test_a_hostile_chat_template_cannot_freeze_or_exhaust_the_server(fault_lm):
    tok = copy.copy(fault_lm.tokenizer)
    tok.chat_template = "{{ messages[0].content }}"
    app = create_app(fault_lm.model, tok, model_id="tiny", limits=Limits(template_timeout=1.0))
    with ServerThread(app) as s:
        worker = app.state.templates
        for name, template in HOSTILE_TEMPLATES.items():
            worker.init["template"] = template  # the next worker process renders this one
            worker.close()
            done = threading.Event()
            answer: list[httpx.Response] = []

            def chat(answer: list[httpx.Response], done: threading.Event) -> None:
                answer.append(_post(s, "/v1/chat/completions", {"model": "tiny", "max_tokens": 2, "messages": [
                    {"role": "user", "content": "hi"}]}))
                done.set()

            t0 = time.monotonic()
            threading.Thread(target=chat, args=(answer, done)).start()
            assert httpx.get(s.url + "/health", timeout=5).status_code == 200
            assert _post(s, "/v1/completions", {"model": "tiny", "prompt": "To be", "max_tokens": 2}).status_code == 200
            assert done.wait(30), name
            assert time.monotonic() - t0 < 10, name
            assert answer[0].status_code == 500, (name, answer[0].text)
            assert answer[0].json()["error"]["code"] == "chat_template_failed"
        worker.init["template"] = "{{ messages[0].content }}"  # a sound template serves again
        worker.close()
        r = _post(s, "/v1/chat/completions", {"model": "tiny", "max_tokens": 2,
                                               "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("name", ["repeat", "power", "format width", "growing output"])
def test_render_chat_refuses_oversized_work_at_once(fault_lm, name):
    tok = copy.copy(fault_lm.tokenizer)
    tok.chat_template = HOSTILE_TEMPLATES[name]
    t0 = time.monotonic()
    with pytest.raises(DataError, match="chat template"):
        render_chat(tok, [{"role": "user", "content": "hi"}], max_chars=1 << 20)
    assert time.monotonic() - t0 < 5


# ================================================ issue 14: the README's serve and chat commands as written


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `zenlm demo` leaves: runs/demo-en/.zenlm-demo and the run in runs/demo-en/run."""
    root = tmp_path_factory.mktemp("runs") / "demo-en"
    shutil.copytree(FIXTURE_GPT, root / "run")
    (root / ".zenlm-demo").write_text("made by zenlm demo\n")
    return root


def test_the_demo_folder_is_served_as_demo_en(demo_folder):
    assert served_run(str(demo_folder), "serve")[:2] == (demo_folder / "run", "demo-en")
    assert served_run(str(demo_folder / "run"), "serve")[:2] == (demo_folder / "run", "demo-en")
    assert served_run(str(FIXTURE_GPT), "serve")[:2] == (FIXTURE_GPT, "gpt")


def test_served_demo_answers_the_readme_snippet_and_sigterm_stops_it_despite_half_sent_requests(demo_folder, tmp_path):
    """`zenlm serve runs/demo-en` serves the model as "demo-en" (the README's client snippet works); then, with
    clients holding a half-sent body, half-sent headers and an empty connection, SIGTERM stops it at once."""
    import openai

    srv = _Served(demo_folder, tmp_path / "serve.log")
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="KEY", max_retries=0, timeout=30)
        r = client.chat.completions.create(model="demo-en", messages=[{"role": "user", "content": "Hello"}],
                                           max_tokens=4)
        assert r.model == "demo-en" and r.choices[0].finish_reason in ("stop", "length")
        chunks = list(client.completions.create(model="demo-en", prompt="the cat", max_tokens=8, stream=True))
        assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")
        assert [m.id for m in client.models.list().data] == ["demo-en"]
        held = [_half_sent(srv, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"m"),
                _half_sent(srv, b"POST /v1/completions HTTP/1.1\r\nHo"),
                _half_sent(srv, b"")]
        time.sleep(0.5)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        srv.proc.wait(timeout=8)
        assert time.monotonic() - t0 < 5
        for sock in held:
            sock.close()
    finally:
        srv.stop()
    log = srv.log.read_text(errors="replace")
    assert "serving demo-en on http://" in log and "Traceback" not in log


def test_chat_on_the_demo_folder_says_what_model_talks(demo_folder, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("the cat\n/quit\n"))
    assert main(["chat", str(demo_folder), "--max-new-tokens", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("demo-en: base model (pretrained only)\n")
    assert "will not" in out or "not trained to answer" in out
    assert "assistant: " in out


@pytest.mark.parametrize(("run", "fits"), [("gpt-classify", "zenlm predict"), ("bert-classify", "zenlm predict"),
                                           ("encdec", "zenlm generate")])
@pytest.mark.parametrize("verb", ["serve", "chat"])
def test_serve_and_chat_refuse_a_run_that_cannot_write_text(run, fits, verb, capsys):
    path = str(FIXTURE_GPT.parent / run)
    assert main([verb, path, "--port", "0"] if verb == "serve" else [verb, path]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zenlm: error: "), err
    assert f"`zenlm {verb}` needs a language model" in err and fits in err


def test_serve_says_the_port_is_taken_before_saying_it_serves(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(FIXTURE_GPT), "--port", str(port)]) == 2
    captured = capsys.readouterr()
    assert "serving" not in captured.out + captured.err
    assert captured.err.strip() == (f"zenlm: error: port {port} on 127.0.0.1 is already in use; stop what runs "
                                    "there or pick another with --port.")


@pytest.mark.parametrize("port", ["99999", "-1"])
def test_serve_refuses_a_port_outside_the_tcp_range_in_one_line(port, capsys):
    assert main(["serve", str(FIXTURE_GPT), "--port", port]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"zenlm: error: --port {port} is not a TCP port: give one from 1 to 65535 (0: any free one)."


def test_chat_compile_says_it_compiles_before_the_first_reply(monkeypatch, capsys):
    import zenlm.compiled

    calls = []

    def fake_compiled_decoder(model):  # stands in for the compiled step (building one takes 25-45 s)
        def step(*args, **kwargs):
            calls.append(1)
            return model.decode_step(*args, **kwargs)
        return step

    monkeypatch.setattr(zenlm.compiled, "compiled_decoder", fake_compiled_decoder)
    monkeypatch.setattr("sys.stdin", io.StringIO("the cat\n/quit\n"))
    assert main(["chat", str(FIXTURE_GPT), "--compile", "--max-new-tokens", "3", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.index("compiled decode step ready in") < out.index("assistant: ")
    assert calls  # the step was built (here: stood in for) and run before the conversation began


@pytest.mark.parametrize(("saved", "kind"), [({"task": {"kind": "chat"}}, "chat"),
                                            ({"source": {"format": "huggingface"}}, "imported"),
                                            ({"train": {}}, "base"), ({"task": None}, "base")])
def test_model_kind(saved, kind):
    assert model_kind({"model": {}, **saved}) == kind


@pytest.mark.parametrize("kind", ["base", "chat"])
def test_the_chat_page_shows_the_model_kind_a_hint_and_a_welcome(fault_lm, kind):
    app = create_app(fault_lm.model, fault_lm.tokenizer, model_id="tiny", model_kind=kind)
    with ServerThread(app) as s:
        page = httpx.get(s.url + "/", timeout=10).text
    assert f'<span id="kind">{KIND_LABELS[kind]}</span>' in page
    assert ("not trained to answer" in page) == (kind == "base")
    assert 'id="welcome">Start a conversation with tiny' in page

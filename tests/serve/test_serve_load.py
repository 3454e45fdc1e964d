"""benchmarks/serve_load.py's load generators: the hand-written HTTP client counts what the openai client counts,
and a refused request, a closed connection or a server that is not there are errors, not a hang."""

from __future__ import annotations

import socket

import pytest

from zenlm.serve.app import ServerThread, create_app


@pytest.fixture(scope="module")
def serve_load(bench_module):
    return bench_module("serve_load")


@pytest.fixture(scope="module")
def bench_server(lm):
    """The tiny model served under the benchmark's model id."""
    app = create_app(lm.model, lm.tokenizer, model_id="bench", max_concurrency=4, max_queue=4)
    with ServerThread(app) as srv:
        srv.metrics = app.state.engine.metrics
        yield srv


@pytest.mark.parametrize("kind", ["raw", "openai", "sse"])
def test_each_client_counts_the_tokens_the_server_generated(serve_load, bench_server, kind):
    generated = bench_server.metrics.value("zenlm_completion_tokens_total")
    s = serve_load.run_level(bench_server.url, 3, 2, 6, "To be, or not", kind)  # 3 clients x 2 requests
    assert (s["done"], s["errors"]) == (6, 0)
    assert 6 <= s["tokens"] == bench_server.metrics.value("zenlm_completion_tokens_total") - generated <= 36
    # at most one first text chunk a request (none when this random model's reply is special tokens only,
    # which chat replies leave out of their text), and the gaps after them
    assert 1 <= len(s["ttft"]) <= 6 and s["itl"]
    assert all(t > 0 for t in s["ttft"] + s["itl"])


def test_the_raw_client_counts_refusals_and_lost_servers_as_errors(serve_load, bench_server):
    stats = {"ttft": [], "itl": [], "tokens": 0, "done": 0, "errors": 0}
    asyncio = serve_load.asyncio
    # a 400 (max_tokens below 0), twice: each answer read whole and counted
    asyncio.run(serve_load.raw_client(bench_server.url, "hi", 2, -3, stats))
    assert (stats["done"], stats["errors"], stats["tokens"]) == (0, 2, 0)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    asyncio.run(serve_load.raw_client(f"http://127.0.0.1:{port}", "hi", 3, 4, stats))
    assert (stats["done"], stats["errors"]) == (0, 5)

    async def hang_up(reader, writer):  # reads a request, closes the connection without an answer
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    async def against_a_server_that_hangs_up():
        server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        async with server:
            await asyncio.wait_for(serve_load.raw_client(url, "hi", 2, 4, stats), timeout=30)

    asyncio.run(against_a_server_that_hangs_up())
    assert (stats["done"], stats["errors"]) == (0, 7)

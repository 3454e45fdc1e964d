"""The batching engine on its own: batched decoding equals one-sequence decoding, for every model family."""

from __future__ import annotations

import threading

import pytest
import torch

from zenlm.config import GPTConfig
from zenlm.generate import GenerationConfig, generate_ids
from zenlm.models.gpt import GPT
from zenlm.serve.engine import (
    PREFILL_CHUNK,
    Engine,
    FinishEvent,
    Overloaded,
    PromptEvent,
    SamplingParams,
    Sequence,
    TokenEvent,
)


def _collect(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    done = threading.Semaphore(0)
    outs: list[list[int]] = [[] for _ in prompts]

    def emit_for(i: int):
        def emit(ev) -> None:
            if isinstance(ev, TokenEvent):
                outs[i].append(ev.token_id)
            else:
                assert isinstance(ev, FinishEvent), ev
                done.release()
        return emit

    engine.submit([Sequence(p, params, emit_for(i)) for i, p in enumerate(prompts)])
    for _ in prompts:
        assert done.acquire(timeout=60)
    return outs


@pytest.mark.parametrize(("family", "dtype"), [("gpt2", torch.float32), ("llama", torch.float32),
                                               ("gpt2", torch.bfloat16), ("llama", torch.bfloat16)])
def test_batched_greedy_equals_single_sequence_decoding(char_tok, family, dtype):
    extra = {} if family == "gpt2" else dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1,
                                             qk_norm=True, bias=False)
    cfg = GPTConfig(vocab_size=char_tok.vocab_size, block_size=96, n_layer=2, n_head=2, n_embd=32,
                    init_std=0.5, **extra)
    torch.manual_seed(0)
    model = GPT(cfg).eval().to(dtype)  # bf16: rows must not change each other's last bits either
    texts = ["Hamlet", "Romeo!", "To be", "or not to be, that", "Q", "whether 'tis nobler in the"]
    prompts = [char_tok.encode(t) for t in texts]  # the first two have one length: prefilled in one batch
    engine = Engine(model, char_tok, max_concurrency=4, max_queue=2)  # 6 prompts: two wait for a slot
    try:
        got = _collect(engine, prompts, SamplingParams(max_tokens=40, temperature=0))
        assert engine.max_batch_seen == 4
    finally:
        engine.close()
    for p, ids in zip(prompts, got, strict=True):
        want = list(generate_ids(model, p, GenerationConfig(max_new_tokens=40, temperature=0),
                                 eos_id=char_tok.eos_id))
        assert ids[: len(want)] == want


def test_decode_step_matches_forward_with_per_row_positions():
    cfg = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, pos="rope")
    torch.manual_seed(1)
    model = GPT(cfg).eval()
    seqs = [torch.randint(0, 50, (n,)) for n in (3, 7, 1)]
    cache = model.make_cache(3)
    for b, s in enumerate(seqs):  # prefill each row on its own, up to its last token
        if len(s) > 1:
            model(s[None, :-1], cache=cache.row(b))
    tokens = torch.stack([s[-1] for s in seqs])
    pos = torch.tensor([len(s) - 1 for s in seqs])
    with torch.inference_mode():
        logits = model.decode_step(tokens, pos, cache.k, cache.v)
    with torch.no_grad():
        for b, s in enumerate(seqs):
            torch.testing.assert_close(logits[b], model(s[None])[0, -1], atol=1e-4, rtol=1e-4)


def test_submit_refuses_overflow_and_long_prompts(char_tok):
    cfg = GPTConfig(vocab_size=char_tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16)
    engine = Engine(GPT(cfg), char_tok, max_concurrency=1, max_queue=0)
    try:
        with pytest.raises(ValueError, match="context"):
            engine.submit([Sequence([1] * 32, SamplingParams(), lambda ev: None)])
        with pytest.raises(Overloaded):
            engine.submit([Sequence([1], SamplingParams(), lambda ev: None)] * 2)
    finally:
        engine.close()


def test_scored_prompts_are_prefilled_between_decode_steps_of_others(char_tok):
    """Prompts that are only scored (max_tokens 0) go through the model like a prefill, a budget of prompt
    tokens per loop at a time, while a running sequence keeps decoding, unchanged."""
    cfg = GPTConfig(vocab_size=char_tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32,
                    init_std=0.5)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    engine = Engine(model, char_tok, max_concurrency=4, max_prefill_tokens=8)
    gen_prompt = char_tok.encode("Hamlet")
    texts = ["To be!", "or not", "Romeo."]  # 6 tokens each: one per loop under a budget of 8
    done = threading.Semaphore(0)
    generated: list[int] = []
    scored: dict[int, tuple[int, PromptEvent]] = {}

    def on_gen(ev) -> None:
        if isinstance(ev, TokenEvent):
            generated.append(ev.token_id)
        elif isinstance(ev, FinishEvent):
            done.release()

    def on_score(i: int):
        def emit(ev) -> None:
            if isinstance(ev, PromptEvent):
                scored[i] = (engine.steps, ev)  # decode steps taken when this prompt was scored
            elif isinstance(ev, FinishEvent):
                assert ev.completion_tokens == 0 and ev.finish_reason == "length"
                done.release()
        return emit

    try:
        score_only = SamplingParams(max_tokens=0, prompt_logprobs=2)
        engine.submit([Sequence(gen_prompt, SamplingParams(max_tokens=30, temperature=0), on_gen)]
                      + [Sequence(char_tok.encode(t), score_only, on_score(i)) for i, t in enumerate(texts)])
        for _ in range(4):
            assert done.acquire(timeout=60)
    finally:
        engine.close()
    assert [scored[i][0] for i in range(3)] == [1, 2, 3]  # one decode step of the other sequence in between
    want = list(generate_ids(model, gen_prompt, GenerationConfig(max_new_tokens=30, temperature=0)))
    assert generated == want
    for i, t in enumerate(texts):
        ids = char_tok.encode(t)
        ev = scored[i][1]
        with torch.no_grad():
            logprobs_TV = torch.log_softmax(model(torch.tensor([ids]))[0, :-1], -1)
        assert ev.token_ids == ids and ev.logprobs[0] is None and ev.top_logprobs[0] is None
        want = logprobs_TV.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(ev.logprobs[1:]), want)
        best = [top[0] for top in ev.top_logprobs[1:]]
        assert [b[0] for b in best] == logprobs_TV.argmax(-1).tolist()
        assert all(len(top) == 2 for top in ev.top_logprobs[1:])


def test_a_scored_prompt_meets_the_head_a_piece_of_positions_at_a_time(char_tok, monkeypatch):
    """Scored prompts keep their final hidden states, not their logits: the head and the log-softmax run over
    at most zenlm.scoring.SCORING_LOGITS logits at a time (here 4 positions), across the rows of one prefill,
    with the scores and the first token of scoring every position of each prompt alone at once."""
    import zenlm.scoring

    cfg = GPTConfig(vocab_size=char_tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32, init_std=0.5)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    texts = ["To be, or", "not to.", "Romeo, oh"]  # 9, 7 and 9 positions: the two of 9 are prefilled together
    ks = [2, 3, 1]
    with torch.no_grad():
        want_lp = [torch.log_softmax(model(torch.tensor([char_tok.encode(t)]))[0, :-1], -1) for t in texts]
    want_gen = list(generate_ids(model, char_tok.encode(texts[0]), GenerationConfig(max_new_tokens=6,
                                                                                   temperature=0)))
    monkeypatch.setattr(zenlm.scoring, "SCORING_LOGITS", 4 * cfg.vocab_size)
    rows_seen: list[int] = []
    head = model.head
    monkeypatch.setattr(model, "head", lambda x: rows_seen.append(x.shape[-2]) or head(x) if x.dim() == 3
                        else head(x))
    engine = Engine(model, char_tok, max_concurrency=3)
    events: dict[int, list] = {i: [] for i in range(3)}
    done = threading.Semaphore(0)

    def emit_for(i: int):
        def emit(ev) -> None:
            events[i].append(ev)
            if isinstance(ev, FinishEvent):
                done.release()
        return emit

    try:
        engine.submit([Sequence(char_tok.encode(t), SamplingParams(max_tokens=6 if i == 0 else 0, temperature=0,
                                                                   prompt_logprobs=ks[i]), emit_for(i))
                       for i, t in enumerate(texts)])
        for _ in texts:
            assert done.acquire(timeout=60)
    finally:
        engine.close()
    # the 18 positions of the two prompts of 9 in pieces of 4 (one spans both), the 7 of the other in 4 + 3
    assert sorted(rows_seen) == [2, 3, 4, 4, 4, 4, 4]
    for i, t in enumerate(texts):
        ids = char_tok.encode(t)
        prompt = events[i][0]
        assert isinstance(prompt, PromptEvent) and len(prompt.logprobs) == len(ids) and prompt.token_ids == ids
        want = want_lp[i].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(prompt.logprobs[1:]), want)
        assert [top[0][0] for top in prompt.top_logprobs[1:]] == want_lp[i].argmax(-1).tolist()
        torch.testing.assert_close(torch.tensor([[lp for _, lp in top] for top in prompt.top_logprobs[1:]]),
                                   want_lp[i].topk(ks[i], -1).values)
    assert [ev.token_id for ev in events[0] if isinstance(ev, TokenEvent)] == want_gen


def test_sampling_limits_are_handled_per_sequence(char_tok):
    """A seed the generator cannot take is refused at submit (before it can fail the step of the others); a
    temperature too small to divide by decodes greedily."""
    cfg = GPTConfig(vocab_size=char_tok.vocab_size, block_size=48, n_layer=1, n_head=2, n_embd=16, init_std=0.5)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    engine = Engine(model, char_tok, max_concurrency=2)
    try:
        for seed in (2**64, -1):
            with pytest.raises(ValueError, match="seed"):
                engine.submit([Sequence([1, 2], SamplingParams(seed=seed), lambda ev: None)])
        prompts = [char_tok.encode("to be"), char_tok.encode("or")]
        greedy = _collect(engine, prompts, SamplingParams(max_tokens=12, temperature=0))
        tiny = _collect(engine, prompts, SamplingParams(max_tokens=12, temperature=1e-40, seed=2**64 - 1))
        assert tiny == greedy
    finally:
        engine.close()


def test_a_long_prompt_is_prefilled_in_chunks_between_the_steps_of_a_running_sequence(char_tok):
    """Chunked prefill: a prompt longer than the loop's prefill budget goes in chunks of at most the budget,
    one per loop, each followed by a decode step of the running sequence; both sequences get the tokens they
    get alone."""
    cfg = GPTConfig(vocab_size=char_tok.vocab_size, block_size=96, n_layer=2, n_head=2, n_embd=32, init_std=0.5)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    with torch.no_grad():
        model.tok_emb.weight[char_tok.eos_id] = 0  # tied head: eos logit 0, sequences run to max_tokens
    engine = Engine(model, char_tok, max_concurrency=2, max_prefill_tokens=8)
    running, long_ = char_tok.encode("Hamlet"), char_tok.encode("To be, or not to be, that is the question:")
    assert len(running) <= 8 < len(long_)
    widths: list[int] = []  # tokens per row of every forward pass (the prefills; steps use decode_step)
    hook = model.register_forward_pre_hook(lambda _m, args: widths.append(args[0].shape[1]))
    outs: list[list[int]] = [[], []]
    first_at: list[int] = []
    done = threading.Semaphore(0)

    def emit_for(i: int):
        def emit(ev) -> None:
            if isinstance(ev, TokenEvent):
                if i == 1 and not outs[1]:
                    first_at.append(engine.steps)
                outs[i].append(ev.token_id)
            elif isinstance(ev, FinishEvent):
                done.release()
        return emit

    try:
        engine.submit([Sequence(running, SamplingParams(max_tokens=30, temperature=0), emit_for(0)),
                       Sequence(long_, SamplingParams(max_tokens=10, temperature=0), emit_for(1))])
        for _ in range(2):
            assert done.acquire(timeout=60)
    finally:
        engine.close()
        hook.remove()
    assert max(widths) <= 8 and sum(widths) == len(running) + len(long_)  # every prompt token once
    assert first_at[0] >= (len(long_) - 2) // 8  # the running sequence stepped while the prompt went in
    for prompt, ids, n in ((running, outs[0], 30), (long_, outs[1], 10)):
        assert ids == list(generate_ids(model, prompt, GenerationConfig(max_new_tokens=n, temperature=0)))


def test_a_prompt_that_fits_a_loop_is_never_cut_to_fit_what_is_left_of_one(char_tok):
    """Three 5-token prompts under a budget of 8 per loop: each goes whole, in a loop of its own (the second one
    used to go in pieces of 3 and 2, each a forward pass of a few rows), in the order they came."""
    prompts = [char_tok.encode(t) for t in ("To be", "or no", "t to ")]
    assert [len(p) for p in prompts] == [5, 5, 5]
    assert _prefill_passes(char_tok, prompts, block_size=48, max_concurrency=4, max_prefill_tokens=8) == [
        (1, 5), (1, 5), (1, 5)]


def _prefill_passes(char_tok, prompts: list[list[int]], *, block_size: int, **engine_kw) -> list[tuple[int, int]]:
    """Decode ``prompts`` (6 greedy tokens each) with an engine of ``engine_kw`` over a small GPT of context
    ``block_size`` -> (rows, tokens) of every prefill forward pass; each prompt must get the tokens it gets
    alone."""
    cfg = GPTConfig(vocab_size=char_tok.vocab_size, block_size=block_size, n_layer=1, n_head=2, n_embd=16,
                    init_std=0.5)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    engine = Engine(model, char_tok, **engine_kw)
    widths: list[tuple[int, int]] = []
    hook = model.register_forward_pre_hook(lambda _m, args: widths.append(tuple(args[0].shape)))
    try:
        outs = _collect(engine, prompts, SamplingParams(max_tokens=6, temperature=0))
    finally:
        engine.close()
        hook.remove()
    for prompt, ids in zip(prompts, outs, strict=True):  # the same tokens, up to an end-of-text token
        want = list(generate_ids(model, prompt, GenerationConfig(max_new_tokens=6, temperature=0)))
        assert ids == want[: len(ids)] and (len(ids) == 6 or ids[-1] == char_tok.eos_id), (ids, want)
    return widths


def test_a_burst_of_sixteen_chat_sized_prompts_goes_in_one_pass_by_default(char_tok, capsys):
    """The default budget, PREFILL_CHUNK = 1024 prompt tokens per loop: 16 prompts of 60 tokens sent at once
    (a chat message with its template) go through the model in one pass of 16 rows, so no stream that starts
    early waits through the prefills of the others (docs/BENCHMARKS.md: p99 inter-token latency at 16 clients
    62 against 132 ms with 256 a loop, bf16); each gets the tokens it gets alone. `zenlm serve --help` states
    the default."""
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"
    prompts = [char_tok.encode(text[i : i + 60]) for i in range(16)]
    assert {len(p) for p in prompts} == {60} and PREFILL_CHUNK == 1024
    assert _prefill_passes(char_tok, prompts, block_size=80, max_concurrency=16) == [(16, 60)]

    from zenlm.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert f"(default: {PREFILL_CHUNK} for a Transformer" in " ".join(capsys.readouterr().out.split())


def test_the_model_computes_on_the_engine_thread_only(char_tok):
    """prepare() hands its warm-up steps to the engine's thread (the thread that builds an engine lets go of its
    OpenMP workers, see zenlm.device.release_openmp_workers, and must not take new ones by computing)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=char_tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16))
    engine = Engine(model, char_tok, max_concurrency=4, compile=False)
    try:
        calls: list[tuple[str, int, bool]] = []

        class Recorder:
            def prepare(self, k_layers, rows, *, batched=False):
                calls.append((threading.current_thread().name, tuple(rows), batched))

            def __call__(self, tokens_B, pos_B, k_layers, v_layers, *, batched=False):
                calls.append((threading.current_thread().name, tokens_B.shape[0], torch.is_inference_mode_enabled()))

        engine.decoder = Recorder()  # type: ignore[assignment]
        engine.prepare()
        # every batch size's program asked for at once (one build process for those missing), then a warm-up
        # step of each
        assert calls == [("zenlm-engine", (1, 2, 4), True), ("zenlm-engine", 1, True), ("zenlm-engine", 2, True),
                         ("zenlm-engine", 4, True)]

        def fails() -> None:
            raise ValueError("boom")

        with pytest.raises(ValueError, match="boom"):  # an error of the handed-over work reaches the caller
            engine._on_engine_thread(fails)
        nested: list[str] = []  # handed over from the engine thread itself: run there at once, no deadlock
        engine._on_engine_thread(lambda: engine._on_engine_thread(
            lambda: nested.append(threading.current_thread().name)))
        assert nested == ["zenlm-engine"]
        engine.decoder = None
        assert _collect(engine, [[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0.0))[0]  # still serving
    finally:
        engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine._on_engine_thread(lambda: None)

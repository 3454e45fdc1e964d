"""The compiled decode step (zenlm.compiled): same logits and tokens as eager decoding, one program for all
positions, int8 weights, the model's own tensors, and clear refusals. Both backends: "aot" (AOTInductor, the
CPU default) and "dynamo" (torch.compile). The batched programs (generate_batch, the server's engine): the
tokens of eager decoding, and rows that do not depend on the other rows.

Building a program takes 15-30 s here, so the tests share them: built programs go to a fresh directory per test
session (conftest), the one-sequence fp32 tests all use models of one shape (``llama_like()``), whose program
the session fixture ``llama_program`` builds once, and every later model of that shape loads it from disk (each
with its own weights). The int8 model needs a second program; the batched tests three more (fp32 at batch 4,
bf16 at batches 2 and 4), which the engine test shares. The tests run in one xdist worker (one directory).
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from zenlm.compiled import CompiledDecoder, ProgramShape, cache_dir, compiled_decoder, packs_weights
from zenlm.config import GPTConfig
from zenlm.errors import ConfigError
from zenlm.generate import GenerationConfig, generate_batch, generate_ids
from zenlm.models.gpt import GPT
from zenlm.models.int8 import quantize_int8

pytestmark = pytest.mark.xdist_group("compiled")  # one worker: one program directory, each program built once

V = 96


def llama_like(**kw) -> GPTConfig:
    base = dict(vocab_size=V, block_size=24, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, pos="rope",
                norm="rmsnorm", mlp="swiglu", bias=False, qk_norm=True, init_std=0.1)
    return GPTConfig(**{**base, **kw})


def gpt2_like(**kw) -> GPTConfig:
    base = dict(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_embd=64, init_std=0.1)
    return GPTConfig(**{**base, **kw})


def programs() -> set[str]:
    return {p.name for p in cache_dir().glob("step-*.pt2")}


@pytest.fixture(scope="session")
def llama_build() -> tuple[str, list[tuple[list[str], float, float]]]:
    """Build the AOT program of the ``llama_like()`` shape (batch 1, a full-length cache) once per session: the
    first use of a shape compiles exactly one program and writes it to the disk cache whole. -> its file name,
    and the compiler commands the build ran, each with the times it started and ended."""
    from torch._inductor import cpp_builder

    compiles: list[tuple[list[str], float, float]] = []
    run = cpp_builder._run_compile_cmd

    def timed(cmd_line: str, cwd: str) -> None:
        start = time.perf_counter()
        run(cmd_line, cwd)
        compiles.append((cmd_line.split(), start, time.perf_counter()))

    torch.manual_seed(100)
    model = GPT(llama_like()).eval()
    decoder = compiled_decoder(model, "aot")
    before = programs()
    cache = model.make_cache(1)
    with torch.inference_mode(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpp_builder, "_run_compile_cmd", timed)
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        decoder.next_logits(4, cache)
    assert decoder.backend == "aot" and decoder.programs_built == 1
    new = programs() - before
    assert len(new) == 1 and not list(cache_dir().glob("*.tmp.pt2"))
    return new.pop(), compiles


@pytest.fixture(scope="session")
def llama_program(llama_build) -> str:
    return llama_build[0]


def test_a_programs_wrapper_and_kernels_compile_side_by_side(llama_build):
    """The program's two C++ files (the wrapper, the kernels) compile at the same time, and the link starts once
    both are done (``_WrapperBesideKernels``: a third of a GPT-2 build was the wrapper's compile alone)."""
    _, compiles = llama_build

    def one(suffix: str, linking: bool = False) -> tuple[float, float]:
        found = [(start, end) for words, start, end in compiles
                 if any(w.endswith(suffix) for w in words) and ("-c" not in words) == linking]
        assert len(found) == 1, (suffix, [" ".join(w) for w, _, _ in compiles])
        return found[0]

    wrapper, kernels, link = one(".wrapper.cpp"), one(".kernel.cpp"), one(".wrapper.so", linking=True)
    assert wrapper[0] < kernels[1] and kernels[0] < wrapper[1]  # the two overlap
    assert link[0] >= max(wrapper[1], kernels[1])


def test_a_wrapper_compile_that_fails_fails_the_build(tmp_path):
    """The wrapper's compile runs on a thread of its own, but its failure still reaches the build: at the next
    build (the kernels'), or when the build ends without one."""
    from torch._inductor.cpp_builder import CppBuilder
    from torch._inductor.exc import CppCompileError

    from zenlm.compiled import _WrapperBesideKernels

    class Builder:  # what CppBuilder.build reads of a builder; the "compiler" is `true` or `false`
        _use_relative_path, _compile_only = False, True

        def __init__(self, name: str, command: str) -> None:
            self._name, self._output_dir, self.command = name, str(tmp_path), command

        def get_command_line(self) -> str:
            return self.command

    with pytest.raises(CppCompileError), _WrapperBesideKernels():
        CppBuilder.build(Builder("p.wrapper", "false"))  # returns at once: the compile runs on its thread
        CppBuilder.build(Builder("p.kernel", "true"))  # waits for it, and raises its error
    with pytest.raises(CppCompileError), _WrapperBesideKernels():
        CppBuilder.build(Builder("q.wrapper", "false"))
    with _WrapperBesideKernels():  # all well: no error
        CppBuilder.build(Builder("r.wrapper", "true"))
        CppBuilder.build(Builder("r.kernel", "true"))


@pytest.mark.parametrize("backend", ["aot", "dynamo"])
def test_compiled_step_matches_eager_at_every_position_with_one_program(backend, request):
    if backend == "aot":
        request.getfixturevalue("llama_program")
    torch.manual_seed(0)
    model = GPT(llama_like()).eval()  # rope, GQA, qk-norm, RMSNorm, SwiGLU
    prompt = torch.randint(0, V, (1, 5), generator=torch.Generator().manual_seed(1))
    eager, fast = model.make_cache(1), model.make_cache(1)
    decoder = compiled_decoder(model, backend)
    assert compiled_decoder(model) is decoder  # one per model
    graphs_before, programs_before = counters["stats"]["unique_graphs"], programs()
    with torch.inference_mode():
        model(prompt, cache=eager)
        model(prompt, cache=fast)
        token = 7
        for _ in range(12):
            want = model(torch.tensor([[token]]), cache=eager)[0, -1]
            got = decoder.next_logits(token, fast)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            token = int(want.argmax())
    assert fast.pos == eager.pos == 5 + 12
    for a, b in zip(fast.k + fast.v, eager.k + eager.v, strict=True):  # the compiled step wrote the cache
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert decoder.backend == backend  # no fallback happened
    if backend == "aot":  # 12 different key counts, all through the program of this shape, loaded from disk
        assert decoder.programs_built == 0 and programs() == programs_before
    else:  # at most two programs (a first static one, then one with a dynamic length)
        assert counters["stats"]["unique_graphs"] - graphs_before <= 2


def test_generate_ids_compiled_gives_the_eager_greedy_tokens_through_cache_refills(llama_program):
    torch.manual_seed(2)
    model = GPT(llama_like()).eval()  # 40 new tokens > block_size 24: the cache is refilled twice
    prompt = [3, 1, 4, 1, 5, 9]
    cfg = dict(max_new_tokens=40, temperature=0)
    want = list(generate_ids(model, prompt, GenerationConfig(**cfg)))
    got = list(generate_ids(model, prompt, GenerationConfig(**cfg, compile=True)))
    assert len(want) == 40
    assert got == want
    decoder = compiled_decoder(model)
    assert decoder.backend == "aot"  # the refills' first and last slots ran eagerly, no fallback
    assert decoder.programs_built == 0  # the session's program of this shape


def test_compiled_int8_model_reads_its_int8_weights_and_matches_eager():
    torch.manual_seed(3)
    model = quantize_int8(GPT(gpt2_like(n_layer=1)).eval()).to(torch.bfloat16)
    prompt = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(4))
    eager, fast = model.make_cache(1), model.make_cache(1)
    decoder = compiled_decoder(model)
    with torch.inference_mode():
        model(prompt, cache=eager)
        model(prompt, cache=fast)
        for token in (5, 17, 2, 60):
            want = model(torch.tensor([[token]]), cache=eager)[0, -1]
            got = decoder.next_logits(token, fast)
            # bf16 activations: the two paths round at different points (int8 kernel vs fused fp32 sums)
            torch.testing.assert_close(got, want, atol=0.05, rtol=0.05)
    # still int8 on the model: compiling did not widen the stored weights
    assert model.blocks[0].mlp.fc.weight_int8.dtype == torch.int8


def test_compile_is_refused_where_it_does_not_apply():
    with pytest.raises(ConfigError, match="use_cache"):
        GenerationConfig(compile=True, use_cache=False)
    GenerationConfig(use_cache=False)  # the default (compile=None) simply decodes eagerly there
    model = GPT(gpt2_like()).eval()
    cache = model.make_cache(2)
    with pytest.raises(ConfigError, match="batch-1"):
        compiled_decoder(model).next_logits(1, cache)
    full = model.make_cache(1, max_len=2)
    full.pos = 2
    with pytest.raises(ConfigError, match="overflow"):
        compiled_decoder(model).next_logits(1, full)
    with pytest.raises(ConfigError, match="unknown compile backend"):
        CompiledDecoder(model, backend="jit")


def test_models_of_one_shape_share_a_program_but_each_uses_its_own_weights(llama_program):
    prompt = torch.tensor([[1, 2, 3]])
    built = []
    for seed in (5, 6):
        torch.manual_seed(seed)
        model = GPT(llama_like()).eval()
        eager, fast = model.make_cache(1), model.make_cache(1)
        with torch.inference_mode():
            model(prompt, cache=eager)
            model(prompt, cache=fast)
            for token in (4, 5, 6):
                want = model(torch.tensor([[token]]), cache=eager)[0, -1]
                torch.testing.assert_close(compiled_decoder(model).next_logits(token, fast), want,
                                           atol=1e-4, rtol=1e-4)
        built.append(compiled_decoder(model).programs_built)
    # both loaded the program another model built (it holds no weights) and got their own logits
    assert built == [0, 0] and llama_program in programs()


def test_the_program_reads_the_models_current_tensors(llama_program):
    torch.manual_seed(7)
    model = GPT(llama_like()).eval()
    prompt = torch.tensor([[1, 2, 3]])

    def check(tokens):
        eager, fast = model.make_cache(1), model.make_cache(1)
        decoder = compiled_decoder(model)  # as generate() does for each generation: re-reads the tensors
        with torch.inference_mode():
            model(prompt, cache=eager)
            model(prompt, cache=fast)
            for token in tokens:
                want = model(torch.tensor([[token]]), cache=eager)[0, -1]
                torch.testing.assert_close(decoder.next_logits(token, fast), want, atol=1e-4, rtol=1e-4)
        return decoder

    decoder = check((4, 5))
    with torch.no_grad():  # changed in place: the program reads the same memory
        model.blocks[0].mlp.up.weight.mul_(3)
    check((6, 7))
    fc = model.blocks[1].mlp.up  # replaced by a new tensor: compiled_decoder() re-reads the model
    fc.weight = nn.Parameter(torch.randn_like(fc.weight))
    assert check((8, 9)) is decoder
    assert decoder.programs_built == 0  # one shape all along: never rebuilt (the session's program)


def test_a_model_that_cannot_be_exported_falls_back_to_dynamo(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("this model cannot be exported")

    monkeypatch.setattr(torch.export, "export", refuse)
    torch.manual_seed(8)
    model = GPT(gpt2_like(n_layer=1)).eval()
    decoder = CompiledDecoder(model, backend="aot")
    eager, fast = model.make_cache(1, 20), model.make_cache(1, 20)  # a shape no other test has built
    with torch.inference_mode():
        model(torch.tensor([[1, 2]]), cache=eager)
        model(torch.tensor([[1, 2]]), cache=fast)
        want = model(torch.tensor([[3]]), cache=eager)[0, -1]
        with pytest.warns(RuntimeWarning, match="could not be compiled ahead of time"):
            got = decoder.next_logits(3, fast)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert decoder.backend == "dynamo"


# ------------------------------------------------------------------------------------- batched programs


def batch_model(tok, dtype: torch.dtype = torch.float32, n_layer: int = 2, tied: bool = False) -> GPT:
    """A ``llama_like`` model for the batched tests (the vocabulary of the char tokenizer, so that the engine
    test shares their programs), whose end-of-text logit is 0: rows run to max_new_tokens."""
    torch.manual_seed(11)
    model = GPT(llama_like(vocab_size=tok.vocab_size, tie_embeddings=tied, init_std=0.3, n_layer=n_layer)).eval()
    with torch.no_grad():
        (model.tok_emb if tied else model.lm_head).weight[tok.eos_id] = 0
    return model.to(dtype)


@pytest.fixture(scope="session")
def batch4_program(char_tok) -> None:
    """Build the fp32 batched program of batch 4 for ``batch_model``'s shape and 24 cache slots, once."""
    model = batch_model(char_tok)
    generate_batch(model, [[1], [2], [3], [4, 5, 6]], GenerationConfig(max_new_tokens=14, temperature=0,
                                                                      compile=True))
    assert compiled_decoder(model).programs_built == 1


def test_batched_programs_give_the_eager_tokens_of_each_prompt_alone(char_tok, batch4_program):
    model = batch_model(char_tok)
    prompts = [[5, 9, 14], [7], [20, 21, 22, 23, 24, 25, 26, 27, 28], [30, 31]]  # longest + 12 > 16: 24 slots
    cfg = dict(max_new_tokens=12, temperature=0)
    got = generate_batch(model, prompts, GenerationConfig(**cfg, compile=True))
    eager = generate_batch(model, prompts, GenerationConfig(**cfg, compile=False))
    alone = [list(generate_ids(model, p, GenerationConfig(**cfg, compile=False))) for p in prompts]
    assert got == eager == alone
    assert len({t for ids in got for t in ids}) > 5  # not stuck on one token
    decoder = compiled_decoder(model)
    assert decoder.backend == "aot" and decoder.programs_built == 0  # the session's batch-4 program, no fallback


def test_batched_program_rows_do_not_depend_on_the_other_rows_in_bf16(char_tok):
    """The invariance of test_generate_batch (other rows never change a row) through the batched programs of
    batch 2 and 4, in bf16, where a sum that splits differently would show: bit-equal rows give equal tokens
    however long the rows beside them are."""
    model = batch_model(char_tok, torch.bfloat16, n_layer=1, tied=True)  # one layer: two programs, half the size
    short, a, b = [5, 9, 14], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31], [40]
    cfg = GenerationConfig(max_new_tokens=10, temperature=0, compile=True)
    runs = [generate_batch(model, batch, cfg) for batch in ([short, a], [short, b], [b, short, a, a])]
    assert runs[0][0] == runs[1][0] == runs[2][1]  # the short prompt, beside a long, a short and three others
    assert runs[0][1] == runs[2][2] == runs[2][3] and runs[1][1] == runs[2][0]
    assert compiled_decoder(model).backend == "aot"


@pytest.mark.skipif(not packs_weights(True, "cpu", torch.bfloat16), reason="oneDNN computes no bf16 on this CPU")
def test_batched_bf16_programs_read_prepacked_matrices_with_the_same_bits(char_tok):
    """A batched bf16 program multiplies by prepacked copies of the layer matrices: the logits of the same program
    given the matrices as stored, and a matrix changed in place is packed again before the next step."""
    from zenlm.compiled import KEY_BLOCK, PACKED_HEAD, _open

    model = batch_model(char_tok, torch.bfloat16, n_layer=1, tied=True)  # the shape of the bf16 test above
    cache = model.make_cache(2, 24)
    for t in cache.k + cache.v:
        t.normal_()
    tokens, pos = torch.tensor([3, 7]), torch.tensor([9, 4])
    decoder = CompiledDecoder(model)
    with torch.inference_mode():
        decoder(tokens, pos, cache.k, cache.v, batched=True)  # built (or loaded) here
    path = decoder._path((decoder._shape(2, cache.k, True), False))
    plain = _open(path, decoder._weights, {PACKED_HEAD: model.tok_emb.weight})  # every matrix as stored

    def steps():
        with torch.inference_mode():
            packed = decoder(tokens, pos, cache.k, cache.v, batched=True)
            return packed, plain(tokens, pos, torch.arange(KEY_BLOCK), cache.k, cache.v)

    first, as_stored = steps()
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert decoder._packs is not None and set(decoder._packs.packed) == linears | {PACKED_HEAD}  # the tied head too
    # the same bits on the CPUs we checked (a Xeon with AMX); within bf16 rounding wherever oneDNN might block
    # the two layouts differently
    torch.testing.assert_close(first, as_stored, rtol=2e-2, atol=1e-2)
    for change in (model.blocks[0].mlp.up.weight, model.tok_emb.weight):  # a layer's matrix, the tied head's
        with torch.no_grad():
            change.mul_(2)
        changed, as_stored = steps()
        assert (as_stored - first).abs().max() > 0.3  # the change shows ...
        torch.testing.assert_close(changed, as_stored, rtol=2e-2, atol=1e-2)  # ... in the packed program too
        first = changed


def test_a_program_that_reads_a_packed_matrix_otherwise_is_refused():
    """Only a product may read a matrix the program is given prepacked (any other use would read its blocks as
    a plain matrix): the build refuses a step where one is also added to something."""
    from zenlm.compiled import _check_packed_products

    class Step(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Linear(8, 8).to(torch.bfloat16)

        def forward(self, x):
            w = self.model.weight
            return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "") + w[0]

    exported = torch.export.export(Step(), (torch.randn(2, 8, dtype=torch.bfloat16),), strict=False)
    with pytest.raises(RuntimeError, match="other than as a product's weight"):
        _check_packed_products(exported, ["weight"])
    _check_packed_products(exported, [])  # nothing to read prepacked: nothing to refuse


def test_engine_steps_through_the_batched_programs(char_tok, batch4_program):
    from zenlm.serve.engine import Engine, FinishEvent, SamplingParams, Sequence, TokenEvent

    model = batch_model(char_tok)
    prompts = [char_tok.encode(t) for t in ("Hamlet", "To be", "or not to", "Q")]
    engine = Engine(model, char_tok, max_concurrency=4, compile=True)  # 24 positions per slot, as above
    outs: list[list[int]] = [[] for _ in prompts]
    done = threading.Semaphore(0)

    def emit_for(i: int):
        def emit(ev) -> None:
            if isinstance(ev, TokenEvent):
                outs[i].append(ev.token_id)
            elif isinstance(ev, FinishEvent):
                done.release()
        return emit

    try:
        engine.submit([Sequence(p, SamplingParams(max_tokens=12, temperature=0), emit_for(i))
                       for i, p in enumerate(prompts)])
        for _ in prompts:
            assert done.acquire(timeout=300)
    finally:
        engine.close()
    want = [list(generate_ids(model, p, GenerationConfig(max_new_tokens=12, temperature=0, compile=False)))
            for p in prompts]
    assert outs == want
    shape = ProgramShape(True, 4, tuple(engine.pool.k[0].shape[1:]), "torch.float32", "cpu")
    assert engine.decoder is not None and engine.decoder.ready(shape)  # the steps ran the batch-4 program
    assert engine.decoder.programs_built == 0  # the session's program of this shape, loaded
    assert engine.decoder.status() == {"ready": 1, "pending": 0}  # what GET /health reports


def test_a_lone_stream_takes_the_one_sequence_program_when_invariance_is_off(char_tok):
    """``invariant=False`` (`zenlm serve --no-batch-invariant`): while one stream runs alone, its steps run
    the one-sequence program of ``generate`` (same program, same cache shape: the same tokens); by default they
    run the batched program of batch size 1."""
    from zenlm.serve.engine import Engine, FinishEvent, SamplingParams, Sequence, TokenEvent

    model = batch_model(char_tok, n_layer=1)
    prompt = char_tok.encode("Hamlet")
    engine = Engine(model, char_tok, max_concurrency=4, compile=True, invariant=False)
    out: list[int] = []
    done = threading.Event()

    def emit(ev) -> None:
        if isinstance(ev, TokenEvent):
            out.append(ev.token_id)
        elif isinstance(ev, FinishEvent):
            done.set()

    try:
        engine.submit([Sequence(prompt, SamplingParams(max_tokens=10, temperature=0), emit)])
        assert done.wait(timeout=300)
    finally:
        engine.close()
    k = engine.pool.k[0]
    assert engine.decoder is not None
    assert engine.decoder.ready(ProgramShape(False, 1, tuple(k.shape[1:]), "torch.float32", "cpu"))
    assert not engine.decoder.ready(ProgramShape(True, 1, tuple(k.shape[1:]), "torch.float32", "cpu"))
    alone = list(generate_ids(model, prompt, GenerationConfig(max_new_tokens=10, temperature=0, compile=True)))
    assert out == alone


@pytest.mark.parametrize("release", [True, False])
def test_a_program_lets_go_of_the_interpreter_lock_where_asked(llama_program, monkeypatch, release):
    """With ``$ZENLM_RELEASE_GIL`` on, other Python threads run while a step computes (the server's event loop
    reads requests and sends tokens meanwhile): the program is called through its library's C interface, which
    then releases the interpreter lock; off, the lock is kept, as torch's own loader keeps it. With no forced
    hand-over of the lock (a switch interval of 10 s), the main thread gets to run while the steps are still
    going only if a step lets go of it (the steps go on until the main thread has run, at most 2,000 of them:
    the main thread also needs a free core, which two test processes on two cores may take a while to give it).
    Either way the logits are those of torch's loader."""
    import sys

    from zenlm.compiled import KEY_BLOCK, RELEASE_GIL_ENV, _LoaderProgram, _Program

    monkeypatch.setenv(RELEASE_GIL_ENV, "1" if release else "0")
    torch.manual_seed(0)
    model = GPT(llama_like()).eval()
    decoder = compiled_decoder(model, "aot")
    cache = model.make_cache(1)
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        decoder.next_logits(4, cache)  # loads the program
    (program,) = decoder._programs.values()
    assert isinstance(program, _Program)
    S = min(-(-5 // KEY_BLOCK) * KEY_BLOCK, cache.max_len - 1)
    inputs = (torch.tensor([5]), torch.tensor([4]), torch.arange(S), cache.k, cache.v)
    ready, seen, done, out = threading.Event(), threading.Event(), threading.Event(), []

    def steps() -> None:
        with torch.inference_mode():
            ready.set()
            for _ in range(2000):
                out.append(program(*inputs))
                if seen.is_set():  # the main thread ran
                    break
        done.set()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(10.0)
    try:
        worker = threading.Thread(target=steps)
        worker.start()
        ready.wait()
        ran_meanwhile = not done.is_set()
        seen.set()
        worker.join()
    finally:
        sys.setswitchinterval(interval)
    assert program.release_gil is release
    assert ran_meanwhile is release, "a step held the interpreter lock" if release else "a step let go of it"
    loader = _LoaderProgram(decoder._path(next(iter(decoder._programs))))
    names = loader.get_constant_fqns()
    assert sorted(names) == sorted(program.get_constant_fqns())
    loader.load_constants({n: decoder._weights[n.removeprefix("model.")] for n in names},
                          check_full_update=True, user_managed=True)
    with torch.inference_mode():
        assert torch.equal(loader(*inputs), out[-1])


def test_loading_a_program_does_not_import_inductor(llama_program, tmp_path):
    """A later process runs a built program without importing Inductor (about 70 MB of resident memory): the
    program's library is loaded by torch's own C++ loader, and its logits are the eager step's."""
    import os
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(
        "import sys, torch\n"
        "from zenlm.compiled import compiled_decoder\n"
        "from zenlm.config import GPTConfig\n"
        "from zenlm.models.gpt import GPT\n"
        "torch.manual_seed(7)\n"
        f"model = GPT(GPTConfig(**{llama_like().__dict__!r})).eval()\n"
        "decoder = compiled_decoder(model, 'aot')\n"
        "fast, eager = model.make_cache(1), model.make_cache(1)\n"
        "with torch.inference_mode():\n"
        "    for c in (fast, eager):\n"
        "        model(torch.tensor([[1, 2, 3]]), cache=c)\n"
        "    got = decoder.next_logits(4, fast)\n"
        "    want = model(torch.tensor([[4]]), cache=eager)[0, -1]\n"
        "torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)\n"
        "assert decoder.programs_built == 0, 'the program was built again'\n"
        "print('inductor' if 'torch._inductor' in sys.modules else 'lean')\n"
    )
    env = {**os.environ, "ZENLM_CACHE_DIR": str(cache_dir().parent)}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(__file__)), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "lean"


def test_one_row_products_are_loops_and_match_eager(monkeypatch):
    """In the one-sequence step every one-row product becomes a multiply-and-sum loop (fp32 included, on any
    CPU), and the step gives the eager logits."""
    import zenlm.compiled as compiled

    loops = []
    real = compiled.matvec
    monkeypatch.setattr(compiled, "matvec", lambda *a: loops.append(a[1].shape) or real(*a))
    torch._dynamo.reset()
    torch.manual_seed(3)
    model = GPT(llama_like()).eval()
    decoder = compiled_decoder(model, "dynamo")
    eager, fast = model.make_cache(1), model.make_cache(1)
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]), cache=eager)
        model(torch.tensor([[1, 2, 3]]), cache=fast)
        for token in (4, 5, 6):
            want = model(torch.tensor([[token]]), cache=eager)[0, -1]
            torch.testing.assert_close(decoder.next_logits(token, fast), want, atol=1e-4, rtol=1e-4)
    assert decoder.backend == "dynamo"
    n_layer = model.config.n_layer
    assert len(loops) >= 4 * n_layer + 1  # every block's products and the head, traced as loops


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.bfloat16, torch.int8), (torch.float16, torch.float16),
                                             (torch.float32, torch.bfloat16), (torch.float32, torch.int8)])
@pytest.mark.parametrize("n_rows", [50, 203, 384])
def test_a_compiled_one_row_product_sums_fp32_products(x_dtype, w_dtype, n_rows):
    """The one-row product under the compiler (8 row blocks, narrow activations read in their own dtype) sums
    the fp32 products of x and W in fp32: within float rounding of a float64 product, where products rounded
    to bf16 or fp16 would be ~1e-3 off. Rows left over after the blocks (203 = 8 x 25 + 3) are summed too,
    and 50 rows (too few for blocks) are one product."""
    from zenlm.models.layers import matvec, matvec_sums

    torch.manual_seed(0)
    K = 96
    x = torch.randn(1, K).to(x_dtype)
    w = (torch.randint(-127, 128, (n_rows, K), dtype=torch.int8) if w_dtype == torch.int8
         else torch.randn(n_rows, K).to(w_dtype))
    want = (x.double() @ w.double().T)[0]
    torch._dynamo.reset()
    sums = torch.compile(matvec_sums, fullgraph=True)(x, w)
    assert sums.dtype == torch.float32 and sums.shape == (1, n_rows)
    assert ((sums[0].double() - want).abs().max() / want.abs().max()).item() < 1e-5
    y = torch.compile(matvec, fullgraph=True)(x, w)
    assert y.dtype == x_dtype
    torch.testing.assert_close(y, sums.to(x_dtype), atol=0, rtol=0)


def test_a_program_that_holds_weight_values_in_its_code_is_refused(tmp_path, monkeypatch) -> None:
    """A program must read every weight the step uses from the model's tensors (it is reused by other models
    of the shape, and built in the background from empty tensors). Inductor writes 1-d tensors of at most 8
    entries into the code unless ``always_keep_tensor_constants`` is on; with it off, the 8-wide q/k-norm gains
    here are written in, and the build refuses the program and leaves no file."""
    import zenlm.compiled
    from zenlm.compiled import build_program

    monkeypatch.setitem(zenlm.compiled._INDUCTOR_OPTIONS, "always_keep_tensor_constants", False)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, block_size=32, n_layer=1, n_head=2, n_embd=16, qk_norm=True)).eval()
    shape = ProgramShape(False, 1, (2, 32, 8), "torch.float32", "cpu")
    with pytest.raises(RuntimeError, match="q_norm.weight"):
        build_program(model, tmp_path / "p.pt2", shape)
    assert not list(tmp_path.iterdir())  # no program, no temporary file


def test_a_batched_int8_program_with_fp32_activations_builds_and_matches_eager():
    """int8 weights with fp32 activations (a CPU without native bf16) through the batched family: the int8
    kernel there got a constant scale of ones, which Inductor could not hand it, so every build failed and
    the server and generate_batch decoded such models eagerly (or raised, with compile=True)."""
    torch.manual_seed(5)
    model = quantize_int8(GPT(gpt2_like(n_layer=1)).eval())  # fp32 activations
    decoder = CompiledDecoder(model, backend="aot")
    prompts = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(6))
    eager, fast = model.make_cache(2, 20), model.make_cache(2, 20)
    with torch.inference_mode():
        model(prompts, cache=eager)
        model(prompts, cache=fast)
        tokens, pos = torch.tensor([7, 9]), torch.tensor([5, 5])
        want = model.decode_step(tokens, pos, eager.k, eager.v, row_attention=True)
        got = decoder(tokens, pos, fast.k, fast.v, batched=True)
    assert decoder.backend == "aot" and decoder.ready(ProgramShape(True, 2, (4, 20, 16), "torch.float32", "cpu"))
    # the kernel rounds each row's sums to bf16 before the fp32 scale: agreement to bf16's precision
    torch.testing.assert_close(got, want, atol=0.02, rtol=0.02)


def test_a_step_lets_go_of_the_lock_unless_told_not_to(monkeypatch):
    """By default a compiled step lets go of the interpreter lock; ``$ZENLM_RELEASE_GIL`` = 0 keeps it."""
    from zenlm.compiled import RELEASE_GIL_ENV, releases_gil

    monkeypatch.delenv(RELEASE_GIL_ENV, raising=False)
    assert releases_gil()
    monkeypatch.setenv(RELEASE_GIL_ENV, "off")
    assert not releases_gil()
    monkeypatch.setenv(RELEASE_GIL_ENV, "1")
    assert releases_gil()

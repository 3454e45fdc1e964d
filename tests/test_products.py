"""fp32 products at inference on a CPU go through oneDNN (zenlm.models.layers): the same numbers as F.linear to
rounding, a row computed the same whatever the other rows, never under autograd or autocast, and a switch to
turn it off. And the short KV cache of generate_ids (zenlm.generate.cache_length)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from zenlm.config import GPTConfig
from zenlm.generate import MIN_CACHE_LENGTH, GenerationConfig, cache_length, generate_ids
from zenlm.models import layers
from zenlm.models.gpt import GPT

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this PyTorch has no oneDNN")


@pytest.fixture(autouse=True)
def onednn_on(monkeypatch):
    """The oneDNN products on whatever CPU runs the tests (by default an Intel CPU keeps the wheel's BLAS)."""
    monkeypatch.setenv("ZENLM_ONEDNN", "1")
    layers.onednn_min_rows.cache_clear()
    yield
    monkeypatch.undo()
    layers.onednn_min_rows.cache_clear()


def test_onednn_linear_equals_f_linear_to_rounding():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 32, generator=g), torch.randn(48, generator=g)
    for shape in ((1, 32), (2, 32), (5, 32), (3, 4, 32), (32,)):
        x = torch.randn(*shape, generator=g)
        got = layers.onednn_linear(x, w, b)
        assert got.shape == F.linear(x, w, b).shape
        torch.testing.assert_close(got, F.linear(x, w, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("n", "k"), [(300, 96), (2304, 768), (768, 3072)])  # small; GPT-2's qkv and MLP out
def test_a_row_is_computed_the_same_alone_and_among_others(n, k):
    """Bit for bit: one row (sent as two copies of itself) and the same row among 1..15 others. (MKL, the
    default on Intel CPUs, fails this at GPT-2's widths: see zenlm.models.layers.)"""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(n, k, generator=g) * 0.02
    x = torch.randn(16, k, generator=g)
    alone = layers.onednn_linear(x[:1], w)
    for m in (2, 3, 7, 10, 16):
        assert torch.equal(layers.onednn_linear(x[:m], w)[:1], alone)


def test_inference_uses_onednn_only_without_gradients_or_autocast(monkeypatch):
    calls: list[int] = []
    real = layers.onednn_linear

    def spy(x, w, b=None):
        calls.append(x.shape[0])
        return real(x, w, b)

    monkeypatch.setattr(layers, "onednn_linear", spy)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32)).eval()
    idx = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        fast = model(idx)
    assert calls, "fp32 inference did not use oneDNN"
    calls.clear()
    slow = model(idx)  # gradients recorded: the autograd path
    assert not calls
    torch.testing.assert_close(fast, slow.detach(), atol=1e-5, rtol=1e-5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(idx)
    assert not calls  # autocast picks its own dtype


def test_the_head_applied_apart_runs_as_in_forward(monkeypatch):
    """inference_head (the head over features a piece at a time: scoring, the server's echo) multiplies as
    forward does at inference: through oneDNN where forward's products go, with the same bits."""
    calls: list[int] = []
    real = layers.onednn_linear
    monkeypatch.setattr(layers, "onednn_linear", lambda x, w, b=None: calls.append(w.shape[0]) or real(x, w, b))
    torch.manual_seed(4)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32)).eval()
    idx = torch.randint(0, 64, (2, 5))
    with torch.inference_mode():
        whole = model(idx)
        calls.clear()
        apart = model.inference_head(model.features(idx))
    assert 64 in calls  # the head's product (64 outputs) went through oneDNN
    assert torch.equal(apart, whole)


def test_decode_step_rows_do_not_depend_on_the_batch():
    """Eager decoding: a sequence's logits are bit-equal alone and as row 0 of a batch of three."""
    torch.manual_seed(3)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)).eval()
    prompts = torch.randint(0, 64, (3, 6))
    with torch.inference_mode():
        one, three = model.make_cache(1), model.make_cache(3)
        model(prompts[:1], cache=one)
        model(prompts, cache=three)
        pos = torch.tensor([6])
        alone = model.decode_step(torch.tensor([7]), pos, one.k, one.v, row_attention=True)
        batch = model.decode_step(torch.tensor([7, 8, 9]), pos.repeat(3), three.k, three.v, row_attention=True)
    assert torch.equal(alone[0], batch[0])


def test_the_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv("ZENLM_ONEDNN", "0")
    layers.onednn_min_rows.cache_clear()
    assert not layers.onednn_products()
    with torch.no_grad():
        assert not isinstance(layers.inference_products(torch.device("cpu"), torch.float32),
                              layers._OneDNNProducts)


def _pretend(monkeypatch, vendor: str, setting: str | None) -> None:
    """This CPU's vendor as ``vendor`` and $ZENLM_ONEDNN as ``setting`` (None: unset), for onednn_min_rows."""
    monkeypatch.setattr(layers, "_cpu_vendor", lambda: vendor)
    if setting is None:
        monkeypatch.delenv("ZENLM_ONEDNN")
    else:
        monkeypatch.setenv("ZENLM_ONEDNN", setting)
    layers.onednn_min_rows.cache_clear()


@pytest.mark.parametrize(("vendor", "setting", "on"), [
    ("AuthenticAMD", None, True), ("GenuineIntel", None, False), ("", None, True),
    ("GenuineIntel", "1", True), ("AuthenticAMD", "off", False),
])
def test_by_default_every_cpu_but_intels_uses_it(monkeypatch, vendor, setting, on):
    """Intel CPUs keep the wheel's BLAS (MKL, faster there for one or two rows); the setting decides either way."""
    _pretend(monkeypatch, vendor, setting)
    assert layers.onednn_products() is on


@pytest.mark.parametrize(("vendor", "setting", "least"), [
    ("GenuineIntel", None, layers.ONEDNN_MIN_ROWS_INTEL), ("AuthenticAMD", None, 1), ("GenuineIntel", "1", 1),
    ("GenuineIntel", "0", None),
])
def test_an_intel_cpu_takes_onednn_for_decode_steps_of_several_rows(monkeypatch, vendor, setting, least):
    """On Intel, MKL keeps prompts and decode steps of fewer than ONEDNN_MIN_ROWS_INTEL rows, oneDNN takes larger
    decode steps (eager and compiled alike: zenlm.compiled traces its batched step with the same rule)."""
    _pretend(monkeypatch, vendor, setting)
    assert layers.onednn_min_rows() == least
    calls: list[int] = []
    real = layers.onednn_linear
    monkeypatch.setattr(layers, "onednn_linear", lambda x, w, b=None: (calls.append(x.shape[0]), real(x, w, b))[1])
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32)).eval()
    cache = model.make_cache(8)
    with torch.inference_mode():
        model(torch.randint(0, 64, (1, 6)))  # a prompt
        prompt_calls = len(calls)
        for rows in (1, 2, 3, 4, 8):
            calls.clear()
            model.decode_step(torch.ones(rows, dtype=torch.long), torch.full((rows,), 3), cache.k, cache.v,
                              row_attention=True)
            assert bool(calls) == (least is not None and rows >= least), rows
    assert bool(prompt_calls) == (least == 1)


def test_the_vendor_is_read_from_this_machine():
    vendor = layers._cpu_vendor()
    assert isinstance(vendor, str)
    if Path("/proc/cpuinfo").is_file() and "vendor_id" in Path("/proc/cpuinfo").read_text():
        assert vendor


def test_cache_length_is_a_power_of_two_that_fits_or_the_whole_context():
    assert cache_length(1024, 160) == MIN_CACHE_LENGTH == 256
    assert cache_length(1024, 257) == 512
    assert cache_length(1024, 1024) == 1024
    assert cache_length(1024, 5000) == 1024  # more than the context: generation refills the cache
    assert cache_length(24, 10) == 24  # a short context: the whole of it


def test_generate_ids_allocates_a_short_cache_with_the_same_tokens(monkeypatch):
    torch.manual_seed(4)
    model = GPT(GPTConfig(vocab_size=64, block_size=1024, n_layer=1, n_head=2, n_embd=32)).eval()
    lengths: list[int] = []
    real = model.make_cache

    def spy(batch_size, max_len=None, **kw):
        lengths.append(max_len)
        return real(batch_size, max_len, **kw)

    monkeypatch.setattr(model, "make_cache", spy)
    prompt = [5, 6, 7, 8]
    got = list(generate_ids(model, prompt, GenerationConfig(max_new_tokens=20, temperature=0, compile=False)))
    want = list(generate_ids(model, prompt, GenerationConfig(max_new_tokens=20, temperature=0, use_cache=False)))
    assert lengths == [256] and got == want


# ------------------------------------------------------------------ a prompt's fc and GELU in one oneDNN call
@pytest.fixture
def fused_gelu(monkeypatch):
    """Counts the fused calls; ``switch(on)`` turns the fusion on or off ($ZENLM_FUSED_GELU)."""
    calls: list[tuple[int, ...]] = []
    real = layers.fused_linear_gelu

    def spy(x, lin):
        calls.append(tuple(x.shape))
        return real(x, lin)

    def switch(on: bool) -> None:
        monkeypatch.setenv("ZENLM_FUSED_GELU", "1" if on else "0")
        layers._fused_gelu_dtypes.cache_clear()

    monkeypatch.setattr(layers, "fused_linear_gelu", spy)
    yield calls, switch
    monkeypatch.undo()
    layers._fused_gelu_dtypes.cache_clear()


def test_a_prompt_takes_fc_and_gelu_in_one_call_and_a_step_does_not(fused_gelu):
    calls, switch = fused_gelu
    switch(True)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32)).eval()
    prompt = torch.randint(0, 64, (3, 7))
    with torch.inference_mode():
        cache = model.make_cache(3)
        fused = model(prompt, cache=cache)
        assert calls == [(3, 7, 32)] * 2  # one call per layer, over every position of every sequence
        calls.clear()
        model.decode_step(torch.tensor([1, 2, 3]), torch.tensor([7, 7, 7]), cache.k, cache.v, row_attention=True)
        model(prompt[:, :1])  # one position: a step's shape, not a prompt's
        assert not calls
    switch(False)
    with torch.inference_mode():
        plain = model(prompt)
    assert not calls
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    switch(True)
    trained = model(prompt)  # gradients recorded: ATen's ops, which autograd knows
    assert not calls
    trained.sum().backward()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(prompt)
    assert not calls  # autocast picks its own dtype


def test_the_fused_gelu_takes_bf16_only_where_the_cpu_computes_it(fused_gelu, monkeypatch):
    _, switch = fused_gelu
    import zenlm.device

    for native, expected in ((True, {torch.float32, torch.bfloat16}), (False, {torch.float32})):
        monkeypatch.setattr(zenlm.device, "cpu_has_bf16", lambda native=native: native)
        switch(True)
        assert layers._fused_gelu_dtypes() == expected
    switch(False)
    assert not layers._fused_gelu_dtypes()


def test_the_prefill_fusion_benchmark_prints_its_table(monkeypatch, capsys, bench_module):
    import sys

    bench = bench_module("prefill_fusion")
    monkeypatch.setenv("ZENLM_FUSED_GELU", "1")  # the script sets it; restored after the test
    monkeypatch.setattr(sys, "argv", ["prefill_fusion.py", "--n-layer", "1", "--vocab", "64", "--shapes", "2x17",
                                      "--repeats", "1", "--threads", "1"])
    try:
        bench.main()
    finally:
        layers._fused_gelu_dtypes.cache_clear()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| fp32 | 2 x 17 |")]
    assert len(rows) == 1 and rows[0].count("|") == 8
    monkeypatch.setattr(sys, "argv", ["prefill_fusion.py", "--shapes", "4by60"])
    with pytest.raises(SystemExit) as e:
        bench.main()
    assert e.value.code == 2 and "BATCHxTOKENS" in capsys.readouterr().err

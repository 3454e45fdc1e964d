"""Int8 weight-only quantisation: the formula, the run directory it writes, and the quality it keeps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zenlm
from zenlm.cli import main
from zenlm.data.corpus import open_corpus, shakespeare_char_text
from zenlm.data.shards import prepare
from zenlm.errors import ConfigError
from zenlm.models.int8 import Int8Linear, quantize_int8
from zenlm.recipes.pretrain import pretrain
from zenlm.recipes.quantize import quantize_run
from zenlm.tokenizer import train_tokenizer
from zenlm.train.loop import TrainConfig


def test_per_channel_scales_and_rounding_error() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight[3] *= 50  # one row with large weights must not coarsen the others
    q = Int8Linear.from_linear(lin)
    assert q.weight_int8.dtype == torch.int8 and q.weight_int8.abs().max() == 127
    w = lin.weight.detach()
    assert torch.allclose(q.scale, w.abs().amax(1) / 127)
    err = (q.dequantized() - w).abs()
    assert (err <= q.scale[:, None] / 2 + 1e-7).all()
    assert err[0].max() < err[3].max() / 10  # row 0 keeps its own fine scale
    x = torch.randn(5, 7, 64)
    torch.testing.assert_close(q(x), F.linear(x, q.dequantized(), lin.bias), rtol=1e-5, atol=1e-5)
    for rows in (x[:1, :1], x):  # one row: the int8 x bf16 kernel; many rows: bf16 expansion
        y16 = q(rows.bfloat16())
        assert y16.dtype == torch.bfloat16 and y16.shape == (*rows.shape[:-1], 48)
        torch.testing.assert_close(y16.float(), q(rows), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_rows_expand_the_int8_matrix_a_block_of_rows_at_a_time(monkeypatch, dtype) -> None:
    """A product of many input rows (a prompt's pass, scoring) expands a large int8 matrix to the activations'
    dtype a block of rows at a time (EXPAND_ELEMENTS at most): no float copy of a whole large matrix exists
    (GPT-2's head would take 77 MB in bf16), and the result is the product with the whole matrix expanded."""
    from torch.overrides import TorchFunctionMode

    import zenlm.models.int8 as int8

    monkeypatch.setattr(int8, "EXPAND_ELEMENTS", 64 * 48 + 10)  # 64 rows of 48
    torch.manual_seed(1)
    q = Int8Linear.from_linear(nn.Linear(48, 200))  # 200 rows: blocks of 64, 64, 64 and 8
    x = torch.randn(40, 48).to(dtype)  # more rows than the int8 kernel takes
    expanded: list[tuple[int, ...]] = []

    class Expansions(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.Tensor.to and args[0].dtype == torch.int8 and out.is_floating_point():
                expanded.append(tuple(out.shape))
            return out

    with torch.no_grad(), Expansions():
        y = q(x)
    assert sorted(expanded) == [(8, 48), (64, 48), (64, 48), (64, 48)]
    monkeypatch.setattr(int8, "EXPAND_ELEMENTS", 200 * 48)  # a matrix within the bound: expanded whole
    expanded.clear()
    with torch.no_grad(), Expansions():
        whole = q(x)
    assert expanded == [(200, 48)]
    torch.testing.assert_close(y, whole, rtol=1e-2, atol=1e-2)
    want = F.linear(x, q.weight_int8.to(dtype)) * q.scale.to(dtype) + q.bias.to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # the same sums; a smaller product may round differently
    torch.testing.assert_close(y.float(), want.float(), rtol=tol, atol=tol)


pytestmark = pytest.mark.xdist_group("int8")  # one worker: the trained run below is made once


# session-scoped, so that it is trained once per worker whatever order the worker runs the tests in
@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("int8")
    text = shakespeare_char_text()[:120_000]
    (root / "c.txt").write_text(text, encoding="utf-8")
    corpus = open_corpus(str(root / "c.txt"), val_fraction=0.1)
    tok = train_tokenizer(corpus.texts("train"), kind="bpe", vocab_size=512)
    prepare(corpus, tok, root / "data")
    pretrain(root / "data", root / "run", model="tiny", batch_size=16, seq_len=64,
             model_overrides=dict(n_embd=128, n_head=4),
             train=TrainConfig(max_steps=150, eval_every=0, device="cpu", precision="fp32", tensorboard=False))
    return root / "run", "".join(corpus.texts("val"))


def test_quantized_run_is_smaller_and_keeps_perplexity(trained_run: tuple[Path, str], tmp_path: Path) -> None:
    run, held_out = trained_run
    res = quantize_run(run, tmp_path / "q")
    assert res.bytes_after < res.bytes_before * 0.6
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == [
        "config.yaml", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    full, q = zenlm.load(run, device="cpu"), zenlm.load(tmp_path / "q", device="cpu")
    assert any(isinstance(m, Int8Linear) for m in q.model.modules())
    assert not any(type(m) is nn.Linear for m in q.model.modules())
    chunks = [held_out[i:i + 400] for i in range(0, 8000, 400)]
    ppl_full, ppl_q = full.perplexity(chunks), q.perplexity(chunks)
    assert ppl_full < 40  # the model learned something, so the comparison means something
    assert abs(ppl_q / ppl_full - 1) <= 0.01, (ppl_full, ppl_q)
    x = torch.tensor([full.tokenizer.encode(held_out[:1000])[:64]])
    with torch.no_grad():
        a, b = full.model(x), q.model(x)
        c = zenlm.load(tmp_path / "q", device="cpu", dtype="bf16").model(x)
    assert (a - b).abs().max() < 0.1 * a.abs().max()
    assert (c - b).abs().max() < 0.15 * b.abs().max()  # bf16 activations through the int8 kernel
    assert q.generate("ROMEO:", max_new_tokens=10, temperature=0.0)  # and it talks


def test_int8_while_loading_keeps_perplexity(trained_run: tuple[Path, str]) -> None:
    """--dtype int8 on an fp32 run: quantised a block of rows at a time while loading, with the activations the
    CPU computes fastest (bf16 where native, else fp32), at most 1% perplexity above the fp32 weights."""
    run, held_out = trained_run
    full, q = zenlm.load(run, device="cpu"), zenlm.load(run, device="cpu", dtype="int8")
    assert q.precision is not None and q.precision.weights == "int8"
    assert not any(type(m) is nn.Linear for m in q.model.modules())
    chunks = [held_out[i:i + 400] for i in range(0, 8000, 400)]
    ppl_full, ppl_q = full.perplexity(chunks), q.perplexity(chunks)
    assert abs(ppl_q / ppl_full - 1) <= 0.01, (ppl_full, ppl_q, q.precision)


def test_quantize_refuses_to_overwrite_or_requantize(trained_run: tuple[Path, str], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    run, _ = trained_run
    assert main(["quantize", str(run), "--out", str(tmp_path / "q")]) == 0
    assert "model.safetensors is" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="already exists"):
        quantize_run(run, tmp_path / "q")
    with pytest.raises(ConfigError, match="already quantised"):
        quantize_run(tmp_path / "q", tmp_path / "q2")
    assert not (tmp_path / "q2").exists()


def test_empty_structure_takes_a_quantized_state_dict() -> None:
    torch.manual_seed(0)
    a = quantize_int8(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3, bias=False)))
    b = quantize_int8(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3, bias=False)), empty=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 8)
    assert torch.equal(a(x), b(x))


def test_tied_head_becomes_one_int8_matrix_used_twice(tmp_path: Path) -> None:
    from zenlm.models.gpt import GPT
    from zenlm.models.int8 import Int8Embedding
    from zenlm.presets import get_preset
    from zenlm.train.checkpoint import load_model_weights, save_model

    cfg = get_preset("classic-char", vocab_size=300)  # tied embeddings
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        ref = model(x)
        q = quantize_int8(model)
        out = q(x)
    assert isinstance(q.tok_emb, Int8Embedding) and isinstance(q.lm_head, Int8Linear)
    assert q.lm_head.weight_int8 is q.tok_emb.weight_int8
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    save_model(q, tmp_path / "m.safetensors")
    back = quantize_int8(GPT(cfg).eval(), empty=True)
    load_model_weights(back, tmp_path / "m.safetensors")
    with torch.no_grad():
        assert torch.equal(back(x), out)
    back = back.to(torch.bfloat16)  # the int8 matrix stays int8 and shared; scales follow the dtype
    assert back.lm_head.weight_int8 is back.tok_emb.weight_int8 and back.tok_emb.scale.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(back(x[:, :1])).all()

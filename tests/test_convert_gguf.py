"""GGUF export (``zenlm convert to-gguf``): every file is read back with the gguf package's own reader and
checked field by field (architecture hyper-parameters, tensor names, shapes, types and values, the
tokenizer arrays), Q8_0 against the reference quantiser bit for bit.

That llama.cpp itself loads these files and decodes the same greedy tokens as zenlm is checked by
``benchmarks/gguf_check.py`` (it needs a llama.cpp build: ``pip install llama-cpp-python``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from zenlm.chat_template import without_generation_marks
from zenlm.cli import main
from zenlm.config import GPTConfig
from zenlm.convert.gguf import (
    export_gguf,
    permute_for_llama_rope,
    quantize_q8_0,
)
from zenlm.convert.hf import architecture_for_config
from zenlm.errors import ConfigError
from zenlm.models.gpt import GPT
from zenlm.tokenizer import Tokenizer, train_tokenizer
from zenlm.train.checkpoint import save_model

gguf = pytest.importorskip("gguf")

TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! "
        "Sphinx of black quartz, judge my vow. Ünïcödé façade, 中文文本 and 😀 emoji. I'll say it's 2024.\n") * 40
V = 320  # the model's vocabulary: the tokenizer's ~300 tokens plus padding rows

LLAMA = dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_layer=2, n_head=4, n_embd=64,
             mlp_hidden=96, block_size=64, norm_eps=1e-5)
CONFIGS = {  # name -> (GPTConfig fields, llama.cpp architecture)
    "llama-gqa-untied": (dict(LLAMA, n_kv_head=2, tie_embeddings=False, rope_theta=5e5), "llama"),
    "llama-biases-linear-rope": (dict(LLAMA, bias=True, tie_embeddings=True,
                                      rope_scaling={"rope_type": "linear", "factor": 2.0}), "llama"),
    "llama3-rope": (dict(LLAMA, n_kv_head=2, tie_embeddings=True, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}), "llama"),
    "qwen2": (dict(LLAMA, n_kv_head=2, qkv_bias=True, tie_embeddings=True, rope_theta=1e6), "qwen2"),
    "qwen3": (dict(LLAMA, n_kv_head=2, qk_norm=True, tie_embeddings=False, norm_eps=1e-6), "qwen3"),
    "gpt2": (dict(pos="learned", norm="layernorm", mlp="gelu", bias=True, n_layer=2, n_head=4, n_embd=64,
                  block_size=64), "gpt2"),
    "gpt2-rows-not-blocks": (dict(pos="learned", norm="layernorm", mlp="gelu", bias=True, n_layer=1, n_head=2,
                                  n_embd=48, block_size=32, tie_embeddings=False), "gpt2"),
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer([TEXT], kind="bpe", vocab_size=300)


def make_run(root: Path, name: str, tok: Tokenizer, **fields) -> Path:
    """A run directory with a random model of the given config (norm gains and biases off their init
    values, so a misplaced one shows) and ``tok``."""
    run = root / name
    run.mkdir(parents=True)
    tok.save(run)
    cfg = GPTConfig(vocab_size=V, **fields)
    torch.manual_seed(len(name))
    model = GPT(cfg)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    save_model(model, run / "model.safetensors")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": cfg.to_dict()}))
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tok: Tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {name: make_run(root, name, tok, **fields) for name, (fields, _) in CONFIGS.items()}


def field(reader, key: str):
    return reader.fields[key].contents()


def tensors(reader) -> dict:
    return {t.name: t for t in reader.tensors}


def expected_tensors(run: Path, arch: str) -> dict[str, torch.Tensor]:
    """What llama.cpp should find, built independently of the exporter: the zenlm state dict renamed by
    hand (q/k rows reordered per head for the "llama" graph, rotary factors for llama3 scaling)."""
    from zenlm.api import load

    lm = load(run, device="cpu")
    cfg, sd = lm.config, lm.model.state_dict()
    H, K, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    out = {"token_embd.weight": sd["tok_emb.weight"]}
    if not cfg.tie_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        b, g = f"blocks.{i}.", f"blk.{i}."
        if arch == "gpt2":
            pairs = [("norm_attn", "attn_norm"), ("attn.qkv", "attn_qkv"), ("attn.proj", "attn_output"),
                     ("norm_mlp", "ffn_norm"), ("mlp.fc", "ffn_up"), ("mlp.proj", "ffn_down")]
            for ours, theirs in pairs:
                for kind in ("weight", "bias"):
                    out[f"{g}{theirs}.{kind}"] = sd[f"{b}{ours}.{kind}"]
            continue
        out[g + "attn_norm.weight"] = sd[b + "norm_attn.weight"]
        out[g + "ffn_norm.weight"] = sd[b + "norm_mlp.weight"]
        for kind in ["weight"] + (["bias"] if cfg.qkv_bias else []):
            q, k, v = sd[f"{b}attn.qkv.{kind}"].split([H * D, K * D, K * D])
            if arch == "llama":  # rows of each head: [x_0..x_{D/2-1}, y_0..] -> [x_0, y_0, x_1, y_1, ...]
                q = q.reshape(H, 2, D // 2, *q.shape[1:]).transpose(1, 2).reshape(q.shape)
                k = k.reshape(K, 2, D // 2, *k.shape[1:]).transpose(1, 2).reshape(k.shape)
            out.update({f"{g}attn_q.{kind}": q, f"{g}attn_k.{kind}": k, f"{g}attn_v.{kind}": v})
        out[g + "attn_output.weight"] = sd[b + "attn.proj.weight"]
        if cfg.attn_proj_bias:
            out[g + "attn_output.bias"] = sd[b + "attn.proj.bias"]
        for ours, theirs in [("gate", "ffn_gate"), ("up", "ffn_up"), ("proj", "ffn_down")]:
            out[f"{g}{theirs}.weight"] = sd[f"{b}mlp.{ours}.weight"]
            if cfg.mlp_bias:
                out[f"{g}{theirs}.bias"] = sd[f"{b}mlp.{ours}.bias"]
        if cfg.qk_norm:
            out[g + "attn_q_norm.weight"] = sd[b + "attn.q_norm.weight"]
            out[g + "attn_k_norm.weight"] = sd[b + "attn.k_norm.weight"]
    out["output_norm.weight"] = sd["norm_f.weight"]
    if arch == "gpt2":
        out["position_embd.weight"] = sd["pos_emb.weight"]
        out["output_norm.bias"] = sd["norm_f.bias"]
    if (cfg.rope_scaling or {}).get("rope_type") == "llama3":  # per frequency: plain / scaled
        s = cfg.rope_scaling
        lo, hi = s["original_max_position_embeddings"] / s["low_freq_factor"], \
            s["original_max_position_embeddings"] / s["high_freq_factor"]
        factors = []
        for i in range(D // 2):
            wavelen = 2 * math.pi * cfg.rope_theta ** (2 * i / D)
            if wavelen < hi:
                factors.append(1.0)
            elif wavelen > lo:
                factors.append(s["factor"])
            else:
                smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / \
                    (s["high_freq_factor"] - s["low_freq_factor"])
                factors.append(1 / ((1 - smooth) / s["factor"] + smooth))
        out["rope_freqs.weight"] = torch.tensor(factors)
    return {k: v.float() for k, v in out.items()}


# ------------------------------------------------------------------------------------ f32: exact copy


@pytest.mark.parametrize("name", list(CONFIGS))
def test_f32_file_holds_every_tensor_and_hyperparameter(runs, tok, tmp_path: Path, name: str) -> None:
    run, (fields, arch) = runs[name], CONFIGS[name]
    out = export_gguf(run, tmp_path / "m.gguf", outtype="f32")
    reader = gguf.GGUFReader(out)
    cfg = GPTConfig(vocab_size=V, **fields)

    assert field(reader, "general.architecture") == arch
    assert field(reader, "general.file_type") == gguf.LlamaFileType.ALL_F32
    assert field(reader, "general.name") == name
    expect = {"context_length": cfg.block_size, "embedding_length": cfg.n_embd, "block_count": cfg.n_layer,
              "feed_forward_length": cfg.mlp_hidden, "attention.head_count": cfg.n_head,
              "attention.head_count_kv": cfg.n_kv_head, "vocab_size": V}
    if arch == "gpt2":
        expect["attention.layer_norm_epsilon"] = cfg.norm_eps
    else:
        expect.update({"attention.layer_norm_rms_epsilon": cfg.norm_eps, "rope.freq_base": cfg.rope_theta,
                       "rope.dimension_count": cfg.head_dim, "attention.key_length": cfg.head_dim})
    for key, value in expect.items():
        assert field(reader, f"{arch}.{key}") == pytest.approx(value), key
    if (cfg.rope_scaling or {}).get("rope_type") == "linear":
        assert field(reader, f"{arch}.rope.scaling.type") == "linear"
        assert field(reader, f"{arch}.rope.scaling.factor") == pytest.approx(2.0)
    else:
        assert f"{arch}.rope.scaling.type" not in reader.fields

    want = expected_tensors(run, arch)
    got = tensors(reader)
    assert set(got) == set(want)
    for tname, t in want.items():
        g = got[tname]
        assert g.tensor_type == gguf.GGMLQuantizationType.F32, tname
        assert tuple(int(n) for n in g.shape) == tuple(reversed(t.shape)), tname  # ggml lists dims inner first
        torch.testing.assert_close(torch.from_numpy(np.array(g.data)).reshape(t.shape), t, atol=0, rtol=0,
                                   msg=tname)


def test_llama_row_order_makes_adjacent_pair_rotation_equal_rotate_half() -> None:
    """Why the "llama" graph gets reordered q/k rows: rotating adjacent pairs (llama.cpp) of the reordered
    projections gives the attention scores that rotating halves (zenlm, transformers) gives."""
    from zenlm.models.layers import Rotary, apply_rotary

    T, H, D, C, theta = 7, 2, 8, 16, 1e4
    g = torch.Generator().manual_seed(0)
    x_TC, wq, wk = torch.randn(T, C, generator=g), torch.randn(H * D, C, generator=g), \
        torch.randn(H * D, C, generator=g)
    cos, sin = Rotary(D, T, theta)(0, T)

    def half(w):  # [H, T, D] rotated the zenlm way
        return apply_rotary((x_TC @ w.t()).view(T, H, D).transpose(0, 1), cos, sin)

    def adjacent(w):  # llama.cpp's "llama" rope: pair (2i, 2i+1) turned by t * theta^(-2i/D)
        y = (x_TC @ w.t()).view(T, H, D // 2, 2).transpose(0, 1)
        ang = torch.arange(T)[:, None] * theta ** (-torch.arange(0, D, 2) / D)[None, :]
        c, s = ang.cos(), ang.sin()
        return torch.stack([y[..., 0] * c - y[..., 1] * s, y[..., 0] * s + y[..., 1] * c], -1).flatten(-2)

    ours = half(wq) @ half(wk).transpose(-1, -2)
    theirs = adjacent(permute_for_llama_rope(wq, H)) @ adjacent(permute_for_llama_rope(wk, H)).transpose(-1, -2)
    torch.testing.assert_close(theirs, ours)
    assert not torch.allclose(adjacent(wq) @ adjacent(wk).transpose(-1, -2), ours)  # without it: wrong


# ------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_arrays_equal_ours(runs, tok, tmp_path: Path) -> None:
    reader = gguf.GGUFReader(export_gguf(runs["qwen3"], tmp_path / "m.gguf", outtype="f16"))
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == V
    assert tokens[: tok.vocab_size] == [tok.id_to_token(i) for i in range(tok.vocab_size)]
    assert tokens[tok.vocab_size:] == [f"[PAD{i}]" for i in range(tok.vocab_size, V)]
    special = {tok.token_to_id(t) for t in ("<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>", "<|mask|>")}
    assert [i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL] == sorted(special)
    assert set(types[tok.vocab_size:]) == {gguf.TokenType.UNUSED}
    assert set(types[: tok.vocab_size]) - {gguf.TokenType.CONTROL} == {gguf.TokenType.NORMAL}
    merges = json.loads(tok.hf.to_str())["model"]["merges"]
    assert field(reader, "tokenizer.ggml.merges") == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert len(merges) > 10
    assert field(reader, "tokenizer.ggml.bos_token_id") == tok.bos_id
    assert field(reader, "tokenizer.ggml.eos_token_id") == tok.eos_id
    assert field(reader, "tokenizer.ggml.padding_token_id") == tok.pad_id
    assert field(reader, "tokenizer.ggml.add_bos_token") is False
    assert field(reader, "tokenizer.chat_template") == without_generation_marks(tok.chat_template)


def test_tokenizers_llama_cpp_cannot_take_are_refused(runs, tmp_path: Path) -> None:
    from tokenizers import normalizers

    for kind in ("wordpiece", "char"):
        bad = make_run(tmp_path, kind, train_tokenizer([TEXT], kind=kind, vocab_size=200), **CONFIGS["qwen3"][0])
        with pytest.raises(ConfigError, match=rf"tokenizer\.json: a '{kind}' tokenizer"):
            export_gguf(bad, tmp_path / "x.gguf")
    # a byte-level BPE whose text is normalised first has no llama.cpp pre-tokenizer
    nfc = train_tokenizer([TEXT], kind="bpe", vocab_size=300)
    nfc.hf.normalizer = normalizers.NFC()
    with pytest.raises(ConfigError, match=r"tokenizer\.json: normalizer=.*NFC"):
        export_gguf(make_run(tmp_path, "nfc", nfc, **CONFIGS["qwen3"][0]), tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


# ------------------------------------------------------------------------------------ f16, bf16, q8_0


def q8_error_ok(got: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether dequantised Q8_0 values are within rounding of the originals: per block of 32, half a step
    d = max|x| / 127, plus what storing d as fp16 moves the largest value (127 * |fp16(d) - d|)."""
    blocks = w.reshape(-1, 32)
    d = blocks.abs().amax(1, keepdim=True) / 127
    bound = 0.5 * d + 127 * (d.half().float() - d).abs() + 1e-7 * d
    return bool(((got.reshape(-1, 32) - blocks).abs() <= bound).all())


def test_half_types_store_matrices_and_keep_norms_f32(runs, tmp_path: Path) -> None:
    want = expected_tensors(runs["llama-gqa-untied"], "llama")
    for outtype, qt, torch_dtype in [("f16", gguf.GGMLQuantizationType.F16, torch.float16),
                                     ("bf16", gguf.GGMLQuantizationType.BF16, torch.bfloat16)]:
        reader = gguf.GGUFReader(export_gguf(runs["llama-gqa-untied"], tmp_path / f"{outtype}.gguf",
                                             outtype=outtype))
        assert field(reader, "general.file_type") == getattr(gguf.LlamaFileType, f"MOSTLY_{outtype.upper()}")
        for name, t in tensors(reader).items():
            if t.tensor_type == gguf.GGMLQuantizationType.F32:
                assert name.endswith("norm.weight"), name
                continue
            assert t.tensor_type == qt and name.endswith(".weight"), name
            got = torch.from_numpy(gguf.quants.dequantize(np.array(t.data), qt).copy()).reshape(want[name].shape)
            torch.testing.assert_close(got, want[name].to(torch_dtype).float(), atol=0, rtol=0)


def test_q8_0_is_the_reference_quantiser_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 96, generator=g) * torch.logspace(-3, 1, 96)  # blocks of very different scales
    x[0, :32] = 0  # an all-zero block: scale 0, no division by zero
    x[1, 5] = 2.5 * 0.02  # values that sit near a rounding boundary
    ours = quantize_q8_0(x)
    assert ours.dtype == np.uint8 and ours.shape == (6, 96 // 32 * 34)
    np.testing.assert_array_equal(ours, gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType.Q8_0))
    back = torch.from_numpy(gguf.quants.dequantize(ours, gguf.GGMLQuantizationType.Q8_0))
    assert q8_error_ok(back, x) and bool((back[0, :32] == 0).all())


def test_q8_0_file_dequantises_close_to_the_weights(runs, tmp_path: Path) -> None:
    for name in ("qwen3", "gpt2-rows-not-blocks"):
        reader = gguf.GGUFReader(export_gguf(runs[name], tmp_path / f"{name}.gguf", outtype="q8_0"))
        assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
        want = expected_tensors(runs[name], CONFIGS[name][1])
        kinds = set()
        for tname, t in tensors(reader).items():
            w = want[tname]
            kinds.add(t.tensor_type)
            got = torch.from_numpy(gguf.quants.dequantize(np.array(t.data), t.tensor_type).copy()).reshape(w.shape)
            if w.dim() < 2 or tname.startswith("position_embd"):
                assert t.tensor_type == gguf.GGMLQuantizationType.F32, tname
            elif w.shape[-1] % 32:  # rows that are not whole blocks: f16, as llama.cpp's converter does
                assert t.tensor_type == gguf.GGMLQuantizationType.F16, tname
            else:
                assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0, tname
                assert q8_error_ok(got, w), tname
                continue
            exact = w.half().float() if t.tensor_type == gguf.GGMLQuantizationType.F16 else w
            torch.testing.assert_close(got, exact, atol=0, rtol=0, msg=tname)
        T = gguf.GGMLQuantizationType  # width 48: rows of 48 are f16, the MLP's 192-wide rows are q8_0
        assert kinds == ({T.F32, T.Q8_0} if name == "qwen3" else {T.F32, T.F16, T.Q8_0})


# ------------------------------------------------------------------------------------ refusals, files, CLI


def test_models_llama_cpp_cannot_run_are_refused_naming_the_field(runs, tok, tmp_path: Path) -> None:
    from zenlm.presets import get_preset

    demo = get_preset("demo-relu2", vocab_size=V, n_layer=1, n_embd=64)
    cases = [(dict(demo.to_dict()), "mlp='relu2'"),
             (dict(CONFIGS["qwen3"][0], rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                       "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 16}), "llama3"),
             (dict(CONFIGS["qwen3"][0], logit_softcap=30.0), "logit_softcap")]
    for i, (fields, needle) in enumerate(cases):
        fields.pop("arch", None)
        fields.pop("vocab_size", None)
        run = tmp_path / f"bad{i}"
        run.mkdir()
        (run / "config.yaml").write_text(yaml.safe_dump({"model": GPTConfig(vocab_size=V, **fields).to_dict()}))
        with pytest.raises(ConfigError, match=needle):
            export_gguf(run, tmp_path / "x.gguf")
    (run := tmp_path / "bert").mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"arch": "bert"}}))
    with pytest.raises(ConfigError, match="BERT encoder model; export to GGUF supports decoder-only"):
        export_gguf(run, tmp_path / "x.gguf")
    with pytest.raises(ConfigError, match="outtype 'q4'"):
        export_gguf(runs["qwen3"], tmp_path / "x.gguf", outtype="q4")
    assert architecture_for_config(GPTConfig(vocab_size=V, **CONFIGS["qwen3"][0])).name == "Qwen3ForCausalLM"


def test_written_atomically_and_never_over_an_existing_file(runs, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import zenlm.convert.gguf as mod

    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep")
    with pytest.raises(ConfigError, match="already exists.*--overwrite"):
        export_gguf(runs["gpt2"], out)
    with pytest.raises(ConfigError, match="is a directory"):
        export_gguf(runs["gpt2"], tmp_path)
    calls = []

    def failing(t, kind):
        calls.append(kind)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(t, kind)

    real = mod.encode_tensor
    monkeypatch.setattr(mod, "encode_tensor", failing)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(runs["gpt2"], out, overwrite=True)
    assert out.read_bytes() == b"keep" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    monkeypatch.setattr(mod, "encode_tensor", real)
    export_gguf(runs["gpt2"], out, overwrite=True)
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "gpt2"


def test_cli_to_gguf(runs, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "exports" / "model.gguf"
    assert main(["convert", "to-gguf", str(runs["llama-gqa-untied"]), "--out", str(out), "--outtype", "q8_0"]) == 0
    assert "model.gguf" in capsys.readouterr().out
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert main(["convert", "to-gguf", str(runs["llama-gqa-untied"]), "--out", str(out)]) == 2
    assert "zenlm: error:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert", "to-gguf", "--help"])
    assert "q8_0" in capsys.readouterr().out


def test_missing_gguf_package_is_a_clear_error(runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now fails, as when it is not installed
    with pytest.raises(ConfigError, match=r"needs the gguf package: pip install gguf"):
        export_gguf(runs["qwen3"], tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()

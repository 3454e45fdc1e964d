"""zenlm run directory -> one GGUF file that llama.cpp loads (``zenlm convert to-gguf RUN --out model.gguf``).

GGUF is llama.cpp's single-file format: typed key/value metadata (the architecture's hyper-parameters, the
tokenizer's vocabulary and merges, the chat template) followed by the tensors, each named the way llama.cpp
looks it up (``blk.3.attn_q.weight``) and stored as F32, F16, BF16 or Q8_0.

Our weights reach the file through the Hugging Face export's declarative weight map, so the two exports
cannot drift::

    our tensor --WeightRule.to_theirs (zenlm.convert.hf)--> transformers' tensor(s)
               --gguf.TensorNameMap (llama.cpp's own name table)--> the GGUF tensor name

plus the few places where llama.cpp lays a tensor out differently from transformers:

    Llama   llama.cpp's "llama" graph rotates *adjacent* channel pairs (2i, 2i+1) of a head; transformers and
            zenlm rotate channel i with channel i + D/2 ("rotate half"). Reordering the rows of W_q and W_k
            (and their biases) inside each head from [first halves; second halves] to interleaved pairs
            makes the two rotations compute the same thing. Its "qwen2"/"qwen3" graphs rotate halves like
            we do: no reordering there.
    GPT-2   GGUF stores matrices [out, in] like nn.Linear, so the Conv1D transposition of the GPT-2 map is
            undone.
    Q8_0    every row is cut into blocks of 32 values; a block keeps d = max|x| / 127 (as fp16) and 32 int8
            values q = round(x / d), so x ~ q * d. Norm gains, biases and position tables stay F32 (llama.cpp
            reads them only as F32), and a matrix whose rows are not a multiple of 32 is written as F16.

The tokenizer goes in as llama.cpp's "gpt2" (byte-level BPE) tokenizer: the byte-level tokens, their kinds
(normal, control for special tokens, unused for the padding rows of a larger embedding table), the merges in
rank order, the special ids, the chat template, and the name of llama.cpp's pre-tokenizer whose split rule is
exactly ours (refused when there is none).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from zenlm.chat_template import without_generation_marks
from zenlm.config import GPTConfig
from zenlm.errors import ConfigError
from zenlm.progress import ProgressFn, report
from zenlm.tokenizer import Tokenizer

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
Q8_BLOCK = 32  # values per Q8_0 block

# the transformers architecture of our export -> llama.cpp's architecture name (its model graph)
GGUF_ARCH = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
             "GPT2LMHeadModel": "gpt2"}

# Pre-tokenizer rules -> llama.cpp's name for the same rule. GPT-2's rule splits text into contractions,
# letters, digits and other symbols (each with one optional leading space), then whitespace:
#     's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# `tokenizers`' ByteLevel(use_regex=True) applies it, and so does llama.cpp for the name "gpt-2".
LLAMA_CPP_PRE = {"gpt2-byte-level": "gpt-2"}

# llama.cpp's token kinds (gguf.TokenType)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise ConfigError("zenlm convert to-gguf needs the gguf package: pip install gguf "
                          "(or pip install -e \".[gguf]\").") from None
    return gguf


# --------------------------------------------------------------------------------------- architecture


def gguf_architecture(cfg: GPTConfig) -> str:
    """llama.cpp's architecture name for a GPT config ("llama", "qwen2", "qwen3" or "gpt2"); ConfigError
    naming the config field when llama.cpp has no graph that computes what ``cfg`` computes."""
    from zenlm.convert.hf import architecture_for_config

    try:
        hf_arch = architecture_for_config(cfg).name  # refuses layouts without a transformers counterpart
    except ConfigError as e:
        raise ConfigError(f"{e} GGUF export covers the same layouts (llama.cpp's llama, qwen2, qwen3 and gpt2 "
                          "graphs).") from None
    arch = GGUF_ARCH[hf_arch]
    kind = (cfg.rope_scaling or {}).get("rope_type")
    if kind == "llama3" and arch != "llama":
        raise ConfigError(f"rope_scaling of type 'llama3' has no counterpart in llama.cpp's {arch!r} graph "
                          "(it reads per-frequency factors only in 'llama'); export to Hugging Face instead.")
    return arch


def permute_for_llama_rope(w: Tensor, n_head: int) -> Tensor:
    """Rows of W_q or W_k (or their bias), [n_head * D, ...], reordered per head from the "rotate half"
    layout (channel i pairs with i + D/2) to llama.cpp's adjacent pairs (2i, 2i + 1)."""
    D = w.shape[0] // n_head
    return w.reshape(n_head, 2, D // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def llama3_rope_factors(cfg: GPTConfig) -> Tensor:
    """llama.cpp's ``rope_freqs.weight`` for Llama 3.1's rotary scaling: per frequency, the number each
    plain frequency is divided by ([D/2], float32)."""
    from zenlm.models.layers import rope_frequencies

    plain = rope_frequencies(cfg.head_dim, cfg.rope_theta)
    return (plain / rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)).float()


def gguf_tensors(cfg: GPTConfig, state: dict[str, Tensor], arch: str) -> Iterator[tuple[str, Tensor]]:
    """(GGUF name, float32 tensor in PyTorch's [out, in] layout) for every tensor llama.cpp reads."""
    gguf = _gguf()
    from zenlm.convert.hf import architecture_for_config

    rules = architecture_for_config(cfg).weight_map(cfg)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), cfg.n_layer)
    for rule in rules:
        for hf_name, t in zip(rule.theirs, rule.to_theirs(state[rule.ours].detach()), strict=True):
            if rule.transpose:  # GPT-2's Conv1D [in, out] back to [out, in]
                t = t.t()
            if arch == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                t = permute_for_llama_rope(t, cfg.n_head)
            elif arch == "llama" and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                assert cfg.n_kv_head is not None
                t = permute_for_llama_rope(t, cfg.n_kv_head)
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            assert name is not None, f"gguf has no name for {hf_name}"
            yield name, t.float().contiguous()
    if (cfg.rope_scaling or {}).get("rope_type") == "llama3":
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(cfg)


# ------------------------------------------------------------------------------------------ encoding


def _round_half_away(x: Tensor) -> Tensor:
    """round(x), halves away from zero, computed as ggml does (floor(|x|) + floor(2 * frac)) so the int8
    values equal llama.cpp's own quantiser bit for bit."""
    a = x.abs()
    f = a.floor()
    return x.sign() * (f + (2 * (a - f)).floor())


def quantize_q8_0(x: Tensor) -> np.ndarray:
    """Q8_0 bytes of a float32 matrix [rows, cols] (cols a multiple of 32) -> uint8 [rows, cols / 32 * 34].

    Per block of 32 values: d = max|x| / 127, q = round(x / d) in [-127, 127]; the block is d as fp16 (2
    bytes) followed by the 32 int8 q. Dequantised: x ~ q * d(fp16)."""
    rows, cols = x.shape
    assert cols % Q8_BLOCK == 0, "Q8_0 needs rows that are a multiple of 32 values"
    blocks_NB = x.float().reshape(-1, Q8_BLOCK)
    d_N1 = blocks_NB.abs().amax(dim=1, keepdim=True) / 127
    inv_N1 = torch.where(d_N1 == 0, torch.zeros_like(d_N1), 1 / d_N1)
    q_NB = _round_half_away(blocks_NB * inv_N1).to(torch.int8)
    d_bytes = d_N1.half().numpy().view(np.uint8)  # [N, 2]
    q_bytes = q_NB.numpy().view(np.uint8)  # [N, 32]
    return np.concatenate([d_bytes, q_bytes], axis=1).reshape(rows, -1)


def _stored_type(name: str, t: Tensor, outtype: str) -> str:
    """The type a tensor is written in: matrices take ``outtype``, everything else (norm gains, biases,
    llama.cpp's position table and rotary factors) stays f32, as llama.cpp reads them; Q8_0 falls back to
    f16 for rows that are not whole blocks."""
    if t.dim() < 2 or name.startswith("position_embd"):
        return "f32"
    if outtype == "q8_0" and t.shape[-1] % Q8_BLOCK:
        return "f16"
    return outtype


def encode_tensor(t: Tensor, kind: str) -> np.ndarray:
    """A float32 tensor as the array GGUF stores for ``kind`` (f32/f16: those dtypes; bf16: its raw 16-bit
    patterns as uint8; q8_0: :func:`quantize_q8_0`)."""
    if kind == "f32":
        return t.float().numpy()
    if kind == "f16":
        return t.half().numpy()
    if kind == "bf16":
        return t.bfloat16().view(torch.int16).numpy().view(np.uint8).reshape(*t.shape[:-1], -1)
    return quantize_q8_0(t)


def _nbytes(shape: tuple[int, ...], kind: str) -> int:
    n = int(np.prod(shape))
    return {"f32": 4 * n, "f16": 2 * n, "bf16": 2 * n}.get(kind, n // Q8_BLOCK * (Q8_BLOCK + 2))


# ------------------------------------------------------------------------------------------ tokenizer


def llama_cpp_pre_tokenizer(tok: Tokenizer, where: Path) -> str:
    """The name of llama.cpp's pre-tokenizer that splits text exactly as ``tok`` does (ConfigError naming the
    tokenizer.json field otherwise). Supported: byte-level BPE with GPT-2's split rule and nothing else
    around it (zenlm's ``--kind bpe`` tokenizers and GPT-2's own)."""
    file = where / "tokenizer.json"
    if tok.kind != "bpe":
        raise ConfigError(f"{file}: a {tok.kind!r} tokenizer has no llama.cpp counterpart; to-gguf exports "
                          "byte-level BPE tokenizers (train one with `zenlm tokenizer train --kind bpe`).")
    spec = json.loads(tok.hf.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    checks = [
        ("model.type", model.get("type"), "BPE"),
        ("normalizer", spec.get("normalizer"), None),
        ("pre_tokenizer.type", pre.get("type"), "ByteLevel"),
        ("pre_tokenizer.use_regex", pre.get("use_regex", True), True),
        ("pre_tokenizer.add_prefix_space", pre.get("add_prefix_space"), False),
        ("model.dropout", model.get("dropout"), None),
        ("model.byte_fallback", bool(model.get("byte_fallback")), False),
        ("model.ignore_merges", bool(model.get("ignore_merges")), False),
        ("model.continuing_subword_prefix", model.get("continuing_subword_prefix") or None, None),
        ("model.end_of_word_suffix", model.get("end_of_word_suffix") or None, None),
        ("decoder.type", (spec.get("decoder") or {}).get("type"), "ByteLevel"),
    ]
    for field, value, want in checks:
        if value != want:
            raise ConfigError(f"{file}: {field}={value!r} has no llama.cpp pre-tokenizer that splits text the "
                              f"same way (needed: {want!r}); to-gguf exports byte-level BPE tokenizers with "
                              "GPT-2's split rule, as `zenlm tokenizer train --kind bpe` makes.")
    return LLAMA_CPP_PRE["gpt2-byte-level"]


def tokenizer_fields(tok: Tokenizer, vocab_size: int, where: Path) -> dict[str, Any]:
    """Everything llama.cpp needs to tokenize like ``tok``: the GGUF ``tokenizer.*`` values, with the token
    list padded to the model's ``vocab_size`` rows (padding rows are "unused" tokens nobody can produce)."""
    pre = llama_cpp_pre_tokenizer(tok, where)
    spec = json.loads(tok.hf.to_str())
    vocab = tok.hf.get_vocab(with_added_tokens=True)
    added = tok.hf.get_added_tokens_decoder()
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [UNUSED] * vocab_size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = (CONTROL if added[i].special else USER_DEFINED) if i in added else NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    if not merges:
        raise ConfigError(f"{where / 'tokenizer.json'} has no merges (a vocabulary of single bytes); llama.cpp's "
                          "BPE tokenizer needs them: train the tokenizer with a larger --vocab-size.")
    ids = {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id, "unk": tok.unk_id}
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "types": types, "merges": merges,
            "ids": {k: v for k, v in ids.items() if v is not None},
            "chat_template": without_generation_marks(tok.chat_template)}  # llama.cpp renders no marks


def _add_tokenizer(writer: Any, fields: dict[str, Any]) -> None:
    writer.add_tokenizer_model(fields["model"])
    writer.add_tokenizer_pre(fields["pre"])
    writer.add_token_list(fields["tokens"])
    writer.add_token_types(fields["types"])
    writer.add_token_merges(fields["merges"])
    add_id = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "pad": writer.add_pad_token_id,
              "unk": writer.add_unk_token_id}
    for role, i in fields["ids"].items():
        add_id[role](i)
    writer.add_add_bos_token(False)  # zenlm encodes prompts as they are; templates add <|bos|> themselves
    writer.add_add_eos_token(False)
    writer.add_chat_template(fields["chat_template"])


# ------------------------------------------------------------------------------------------ export


def _add_hyperparameters(writer: Any, cfg: GPTConfig, arch: str) -> None:
    gguf = _gguf()
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.mlp_hidden)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_kv_head)
    writer.add_vocab_size(cfg.vocab_size)
    if arch == "gpt2":
        writer.add_layer_norm_eps(cfg.norm_eps)
        return
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    if (cfg.rope_scaling or {}).get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))  # type: ignore[index]


def export_gguf(
    run_dir: str | os.PathLike[str], out_file: str | os.PathLike[str], *, outtype: str = "f16",
    overwrite: bool = False, progress: ProgressFn | None = None,
) -> Path:
    """Write a decoder-only zenlm run as one GGUF file for llama.cpp; returns ``out_file``.

    run_dir:   a run of a Llama-layout (rotary, RMSNorm, SwiGLU), Qwen2/Qwen3-layout or GPT-2-layout model
               with a byte-level BPE tokenizer (anything else is refused, naming the field)
    out_file:  the .gguf file to write (through a temporary file and a rename: a failure leaves nothing)
    outtype:   f32, f16, bf16 or q8_0 for the weight matrices (norms and biases stay f32)
    overwrite: replace an existing file
    """
    from zenlm.convert.hf import gpt_run_config, load_gpt_run

    gguf = _gguf()
    run, out = Path(run_dir), Path(out_file)
    if outtype not in OUTTYPES:
        raise ConfigError(f"outtype {outtype!r} is not supported; choose one of {', '.join(OUTTYPES)}.")
    if out.is_dir():
        raise ConfigError(f"{out} is a directory; give the path of the .gguf file to write.")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; choose another --out or pass --overwrite.")
    cfg = gpt_run_config(run, "export to GGUF")
    arch = gguf_architecture(cfg)
    model, tok = load_gpt_run(run, cfg)
    fields = tokenizer_fields(tok, cfg.vocab_size, run)
    state = model.state_dict()
    plan = [(name, t, _stored_type(name, t, outtype)) for name, t in gguf_tensors(cfg, state, arch)]

    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(run.resolve().name)
        _add_hyperparameters(writer, cfg, arch)
        writer.add_file_type(file_type)
        _add_tokenizer(writer, fields)
        for name, t, kind in plan:  # describe every tensor first; the data is written one tensor at a time
            writer.add_tensor_info(name, tuple(t.shape), np.dtype(np.float32), _nbytes(tuple(t.shape), kind),
                                   raw_dtype=qtype[kind])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for n, (_, t, kind) in enumerate(plan):
            writer.write_tensor_data(encode_tensor(t, kind))
            report(progress, "gguf", done=n + 1, total=len(plan), unit="tensor")
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


__all__ = ["OUTTYPES", "GGUF_ARCH", "export_gguf", "gguf_architecture", "gguf_tensors", "permute_for_llama_rope",
           "llama3_rope_factors", "quantize_q8_0", "encode_tensor", "llama_cpp_pre_tokenizer", "tokenizer_fields"]
